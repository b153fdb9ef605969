"""The files `compare` writes: `results.json`, `results.csv`, `report.md`, `compare.png`, `compute.png`.

Charts are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so they
render on machines without a display and leave the caller's matplotlib state alone.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLUMNS = (
    "name",
    "objective",
    "n_runs",
    "pretrain_seconds",
    "images_seen",
    "pretrain_flops",
    "linear_probe_top1",
    "linear_probe_top1_std",
    "lowshot_top1",
    "lowshot_top1_std",
    "shots",
    "knn_top1",
    "knn_top1_std",
    "finetune_top1",
    "finetune_top1_std",
    "finetune_shots",
)
BASELINES = ("raw_pixels", "random_init")


def _metric_labels(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Accuracy columns that were measured for at least one row, with their display names (a K-shot
    fine-tune says so: next to a full-data one it would read as the same protocol)."""
    shots = next((r["shots"] for r in rows if r.get("shots")), None)
    finetune_shots = next((r["finetune_shots"] for r in rows if r.get("finetune_shots")), None)
    labels = {
        "linear_probe_top1": "linear probe",
        "lowshot_top1": f"{shots}-shot probe",
        "knn_top1": "k-NN",
        "finetune_top1": f"fine-tune {finetune_shots}-shot" if finetune_shots else "fine-tune",
    }
    return {k: v for k, v in labels.items() if any(r.get(k) is not None for r in rows)}


def _pct(row: dict[str, Any], key: str) -> str:
    if row.get(key) is None:
        return "—"
    std = row.get(f"{key}_std")
    return f"{100 * row[key]:.1f} ± {100 * std:.1f}" if std is not None else f"{100 * row[key]:.1f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 10:
        return f"{value:.1f} s" if value else "0 s"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def _count(value: float | None) -> str:
    return "—" if value is None else (f"{value:.0f}" if value < 1e6 else f"{value:.2e}")


def table_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells, shared by the Markdown and terminal tables."""
    metrics = _metric_labels(rows)
    header = [
        "name",
        "objective",
        "runs",
        "pretrain time",
        "images seen",
        "pretrain FLOPs",
        *metrics.values(),
    ]
    cells = [
        [
            str(r["name"]),
            str(r["objective"]),
            str(r.get("n_runs", 1)),
            _seconds(r["pretrain_seconds"]),
            _count(r["images_seen"]),
            "—"
            if r["pretrain_flops"] is None
            else f"{r['pretrain_flops']:.2e}"
            if r["pretrain_flops"]
            else "0",
            *[_pct(r, k) for k in metrics],
        ]
        for r in rows
    ]
    return header, cells


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table for the terminal (top-1 in %, mean ± std)."""
    header, cells = table_cells(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header, cells = table_cells(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def plot_compare(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Grouped bars: one group per row, one bar per protocol, error bars where std is known."""
    metrics = _metric_labels(rows)
    fig = Figure(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(len(metrics), 1)
    x = np.arange(len(rows))
    for i, (key, label) in enumerate(metrics.items()):
        values = [np.nan if r[key] is None else 100 * r[key] for r in rows]  # not measured: no bar
        errors = [100 * (r.get(f"{key}_std") or 0.0) for r in rows]
        ax.bar(x + (i - (len(metrics) - 1) / 2) * width, values, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(x, [str(r["name"]) for r in rows], rotation=20, ha="right")
    ax.set_ylabel("top-1 on test (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(
        loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=len(metrics), fontsize="small", frameon=False
    )
    fig.suptitle("Same protocols for every backbone (baselines first); mean ± std")
    fig.savefig(path, dpi=120)


def plot_compute(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Accuracy against pretraining FLOPs, one panel per protocol, one colour per row (the same in
    every panel); baselines, which have no pretraining, as dashed lines."""
    metrics = _metric_labels(rows)
    cols = min(len(metrics), 2) or 1
    nrows = (len(metrics) + cols - 1) // cols or 1
    fig = Figure(figsize=(5.0 * cols, 3.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    colours = {str(r["name"]): f"C{i % 10}" for i, r in enumerate(rows)}
    for i, (key, label) in enumerate(metrics.items()):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for r in rows:
            name = str(r["name"])
            if r[key] is None:
                continue
            if r["objective"] in BASELINES or not r["pretrain_flops"]:
                ax.axhline(100 * r[key], linestyle="--", linewidth=1, color=colours[name], label=name)
                continue
            err = 100 * (r.get(f"{key}_std") or 0.0)
            ax.errorbar(
                r["pretrain_flops"],
                100 * r[key],
                yerr=err,
                fmt="o",
                capsize=3,
                color=colours[name],
                label=name,
            )
        if any(r["pretrain_flops"] for r in rows if r["objective"] not in BASELINES):
            ax.set_xscale("log")
        ax.set_xlabel("pretraining compute (FLOPs)")
        ax.set_ylabel(f"{label} top-1 (%)")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize="x-small")
    fig.suptitle("Accuracy against pretraining compute (forward + backward FLOPs x steps)")
    fig.savefig(path, dpi=120)


def write_report(rows: Sequence[dict[str, Any]], out: Path, protocol: dict[str, Any]) -> None:
    """All five files; `protocol` is recorded in `report.md` so a reader knows what was measured."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(list(rows), indent=2))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot_compare(rows, out / "compare.png")
    plot_compute(rows, out / "compute.png")
    settings = ", ".join(f"{k}={v}" for k, v in protocol.items())
    (out / "report.md").write_text(
        "# Backbone comparison\n\n"
        "Top-1 on the test split in %, mean ± std over seeds or over runs of one recipe. "
        "`raw_pixels` and `random_init` are baselines measured with the same protocols.\n\n"
        f"{markdown_table(rows)}\n\n"
        f"Protocol: {settings}.\n\n"
        "![accuracy per protocol](compare.png)\n\n"
        "![accuracy against pretraining compute](compute.png)\n"
    )
