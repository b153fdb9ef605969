"""Training curves from `metrics.jsonl`: one panel per logged quantity against the optimiser step.

Loss, learning rate and throughput come first, then the online monitor's k-NN top-1 and RankMe where
the run measured them (every `eval.online_every_steps`, so on fewer steps than the loss), then
whatever else was logged (gradient norm, the objective's own logs such as accuracy or DINO's teacher
entropy). Several runs share the panels, one line each, so `ssl-vit show A B --curves` overlays them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from ssl_vit.figures._mpl import FONT, grid_figure, save

FIRST = ("loss", "lr", "images_per_sec", "knn_top1", "rankme")
NOT_CURVES = {"step", "epoch", "images_seen", "monitor_seconds"}
LABELS = {
    "loss": "loss",
    "lr": "learning rate",
    "images_per_sec": "images / s",
    "grad_norm": "gradient norm",
    "knn_top1": "online k-NN top-1 (train subset)",
    "rankme": "RankMe (effective rank)",
}
COLS = 3
PANEL_W, PANEL_H = 3.4, 2.4  # inches


def curve_keys(runs: Mapping[str, Sequence[Mapping[str, float]]]) -> list[str]:
    """The quantities to draw, in panel order."""
    seen: list[str] = []
    for records in runs.values():
        for record in records:
            seen += [k for k, v in record.items() if k not in seen and isinstance(v, int | float)]
    rest = [k for k in seen if k not in FIRST and k not in NOT_CURVES]
    return [k for k in FIRST if k in seen] + rest


def curves_layout(n_keys: int) -> tuple[int, int]:
    """(rows, cols) of the panel grid."""
    return max(math.ceil(n_keys / COLS), 1), COLS


def draw_curves(runs: Mapping[str, Sequence[Mapping[str, float]]], out: Path) -> Path:
    """One panel per quantity, one line per run (labelled by its name when there are several)."""
    keys = curve_keys(runs)
    rows, cols = curves_layout(len(keys))
    fig, axes = grid_figure(rows, cols, PANEL_W, PANEL_H)
    for ax, key in zip(axes.flat, keys, strict=False):
        for name, records in runs.items():
            points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="." if len(points) < 20 else None, label=name)
        ax.set_title(LABELS.get(key, key.replace("_", " ")), fontsize=FONT + 1)
        ax.set_xlabel("step", fontsize=FONT)
        ax.tick_params(labelsize=FONT - 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    if len(runs) > 1 and keys:
        axes.flat[0].legend(fontsize=FONT - 1, frameon=False)
    fig.tight_layout()
    return save(fig, out)
