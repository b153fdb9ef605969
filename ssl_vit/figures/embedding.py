"""A 2-D map of the test split's features coloured by class: do the classes separate?

t-SNE (van der Maaten & Hinton 2008) shows neighbourhoods and is what papers draw; PCA is linear
and fast and keeps global distances. Both are seeded, so the same features give the same map. For
several runs the maps sit side by side with one shared legend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from ssl_vit.errors import RecipeError
from ssl_vit.figures._mpl import DPI, FONT, grid_figure, plt, save

METHODS = ("tsne", "pca")
MAX_POINTS = 2000  # t-SNE is quadratic-ish; a seeded subset keeps a map within seconds
PANEL = 3.6  # inches, square panels
LEGEND_W = 0.9  # inches kept right of the panels for the class legend


@dataclass
class EmbeddingPanel:
    """One map: its title, 2-D points (M, 2) and their labels (M,)."""

    title: str
    points: np.ndarray
    labels: np.ndarray


def project_2d(features: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """Features (M, D) -> (M, 2) with t-SNE or PCA, deterministic for a seed."""
    if method not in METHODS:
        raise RecipeError(f"embedding method must be one of {', '.join(METHODS)}, not '{method}'")
    features = features.astype(np.float64)
    if method == "pca" or features.shape[0] < 5:
        return PCA(n_components=2, random_state=seed).fit_transform(features)  # type: ignore[no-any-return]
    perplexity = float(min(30.0, (features.shape[0] - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    with threadpool_limits(1):  # OpenMP threads next to torch's: measured here 45 s instead of 5 s
        return tsne.fit_transform(features)  # type: ignore[no-any-return]


def subset(n: int, seed: int = 0, limit: int = MAX_POINTS) -> np.ndarray:
    """Indices of at most `limit` of `n` points, the same for every run with the same seed."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def embedding_size(n_panels: int) -> tuple[int, int]:
    """(height, width) in pixels of `draw_embedding` with `n_panels` maps."""
    return round(PANEL * DPI), round((n_panels * PANEL + LEGEND_W) * DPI)


def draw_embedding(
    panels: Sequence[EmbeddingPanel], class_names: Sequence[str] | None, method: str, out: Path
) -> Path:
    """Maps side by side, points coloured by class, one legend on the right."""
    fig, axes = grid_figure(1, len(panels), PANEL, PANEL)
    fig.set_size_inches(len(panels) * PANEL + LEGEND_W, PANEL)
    classes = np.unique(np.concatenate([p.labels for p in panels]))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "viridis")
    colour = {
        c: cmap(i if len(classes) <= 20 else i / max(len(classes) - 1, 1)) for i, c in enumerate(classes)
    }
    for ax, panel in zip(axes[0], panels, strict=True):
        for c in classes:
            sel = panel.labels == c
            name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
            ax.scatter(*panel.points[sel].T, s=6, color=colour[c], label=name, linewidths=0)
        ax.set_title(panel.title, fontsize=FONT + 1)
        ax.set_xticks([])
        ax.set_yticks([])
    axis_name = "t-SNE" if method == "tsne" else "PCA"
    axes[0, 0].set_xlabel(f"{axis_name} 1", fontsize=FONT)
    axes[0, 0].set_ylabel(f"{axis_name} 2", fontsize=FONT)
    if len(classes) <= 20:
        handles, labels = axes[0, -1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=FONT - 1, frameon=False, markerscale=2)
    fig.tight_layout(rect=(0, 0, 1 - LEGEND_W / (len(panels) * PANEL + LEGEND_W), 1))
    return save(fig, out)
