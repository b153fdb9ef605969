"""What a masked objective makes of hidden patches: MAE's own visualisation.

He et al. 2021 (fig. 2) show, per image, the input, the masked input, the reconstruction and the
reconstruction pasted into the hidden patches next to the visible ones. For the ViT paper's masked
patch prediction the prediction is each corrupted patch's 3-bit mean colour. Any objective that is a
`Reconstructor` (`reconstruct(imgs, generator=None) -> {"mask": (B, N) bool, True = hidden, "pred":
(B, C, H, W)}`, objectives/base.py) is drawn; a seeded generator gives the same masks every time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import repeat
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.errors import RecipeError
from ssl_vit.figures._mpl import FONT, grid_figure, save, show_image, to_display
from ssl_vit.objectives.base import Reconstructor

HIDDEN_GREY = 0.5
COLUMNS = ("input", "masked", "prediction", "prediction + visible")


@dataclass
class Reconstruction:
    """The arrays behind the figure, each (B, H, W, C) in [0, 1] except `mask` (B, H, W), True = hidden."""

    inputs: np.ndarray
    mask: np.ndarray
    masked: np.ndarray
    pred: np.ndarray
    paste: np.ndarray


@torch.no_grad()
def reconstruct(
    objective: nn.Module, imgs: Tensor, mean: Sequence[float], std: Sequence[float], seed: int = 0
) -> Reconstruction:
    """Run the objective's `reconstruct` on normalised images (B, C, H, W) with a seeded mask."""
    if not isinstance(objective, Reconstructor):
        raise RecipeError(f"objective '{type(objective).__name__}' has no reconstruct() method")
    backbone = objective.backbone
    assert isinstance(backbone, Backbone)
    was_training = objective.training
    objective.eval()
    out = objective.reconstruct(imgs, generator=torch.Generator().manual_seed(seed))
    objective.train(was_training)
    h, w = backbone.grid_of(imgs)
    p = backbone.patch_size
    mask = repeat(out["mask"].bool().cpu(), "b (h w) -> b (h p) (w q)", h=h, w=w, p=p, q=p)  # (B, H', W')
    full = torch.zeros(imgs.shape[0], imgs.shape[-2], imgs.shape[-1], dtype=torch.bool)  # (B, H, W)
    full[:, : h * p, : w * p] = mask
    hidden = full.numpy()[..., None]  # (B, H, W, 1)
    inputs, pred = to_display(imgs, mean, std), to_display(out["pred"].float(), mean, std)
    return Reconstruction(
        inputs=inputs,
        mask=full.numpy(),
        masked=np.where(hidden, np.float32(HIDDEN_GREY), inputs),
        pred=pred,
        paste=np.where(hidden, pred, inputs),
    )


def reconstruction_layout(n_images: int) -> tuple[int, int]:
    """(rows, cols): one row per image, the four columns of `COLUMNS`."""
    return n_images, len(COLUMNS)


def draw_reconstruction(rec: Reconstruction, out: Path, title: str) -> Path:
    rows, cols = reconstruction_layout(rec.inputs.shape[0])
    fig, axes = grid_figure(rows, cols)
    for i in range(rows):
        for j, img in enumerate((rec.inputs[i], rec.masked[i], rec.pred[i], rec.paste[i])):
            show_image(axes[i, j], img, COLUMNS[j] if i == 0 else None)
    hidden = rec.mask.mean() * 100
    fig.suptitle(f"{title}: {hidden:.0f}% of pixels hidden", fontsize=FONT + 1)
    fig.tight_layout()
    return save(fig, out)
