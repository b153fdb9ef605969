"""Matplotlib set up for files only: the Agg backend is chosen before pyplot is imported.

Every figure module draws through this one, so nothing ever opens a window and a machine without a
display works. Sizes are fixed (no tight bounding box), so a figure of R x C panels is always
`C * PANEL * DPI` by `R * PANEL * DPI` pixels: two runs give pictures that line up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 100
PANEL = 1.6  # inches per image panel
FONT = 9


def grid_figure(
    rows: int, cols: int, width: float = PANEL, height: float = PANEL
) -> tuple[Figure, np.ndarray]:
    """A figure of rows x cols panels of width x height inches; axes come back as a (rows, cols) array."""
    fig, axes = plt.subplots(rows, cols, figsize=(cols * width, rows * height), dpi=DPI, squeeze=False)
    return fig, axes


def pixel_size(rows: int, cols: int, width: float = PANEL, height: float = PANEL) -> tuple[int, int]:
    """(height, width) in pixels of `grid_figure(rows, cols, width, height)` once saved."""
    return round(rows * height * DPI), round(cols * width * DPI)


def save(fig: Figure, path: Path) -> Path:
    """Write a PNG at the figure's own size and free it (pyplot keeps figures alive otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def to_display(imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised images (B, C, H, W) -> (B, H, W, C) in [0, 1] for `imshow`."""
    m = torch.tensor(list(mean), dtype=imgs.dtype).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=imgs.dtype).view(1, -1, 1, 1)
    pixels = (imgs.detach().cpu() * s + m).clamp(0, 1)
    return rearrange(pixels, "b c h w -> b h w c").numpy()  # type: ignore[no-any-return]


def show_image(ax: Axes, img: np.ndarray, title: str | None = None) -> None:
    """One (H, W, C) image, grey for one channel, no ticks."""
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=FONT)


__all__ = ["DPI", "FONT", "PANEL", "Axes", "Figure", "grid_figure", "pixel_size", "plt", "save", "show_image"]
