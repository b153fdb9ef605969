"""Figures of runs: training curves, attention maps, embedding maps, masked reconstructions.

`show(paths, out_dir)` draws every kind it can for each input and writes `out_dir/index.md`; what it
cannot draw (no metrics yet, an export folder with no objective, an objective that does not mask) is
listed with the reason instead of failing. `write_compare_figures` is the part `ssl-vit compare
--figures` uses: the inputs' curves overlaid and their embedding maps side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ssl_vit.data import class_names, load_images
from ssl_vit.errors import DataError, RecipeError, SslVitError
from ssl_vit.eval.features import EvalModel, extract, normalise
from ssl_vit.figures import attention, curves, embedding, reconstruction
from ssl_vit.figures._mpl import to_display
from ssl_vit.figures.source import Source, open_source, pick_images
from ssl_vit.objectives.base import Reconstructor
from ssl_vit.rundir import RunDir

log = logging.getLogger(__name__)

KINDS = ("curves", "embedding", "attention", "reconstruction")


@dataclass
class FigureReport:
    out_dir: Path
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (figure, why)

    def skip(self, figure: str, why: str) -> None:
        self.skipped.append((figure, why))
        log.debug("skipped %s: %s", figure, why)  # the caller reports skips (show prints them)


def run_names(paths: Sequence[Path]) -> list[str]:
    """Short distinct names for legends and file names: the folder name, made unique."""
    names = [p.resolve().name for p in paths]
    return [n if names.count(n) == 1 else f"{n}-{i + 1}" for i, n in enumerate(names)]


def show(
    paths: Sequence[Path],
    out_dir: Path | None = None,
    kinds: Sequence[str] = KINDS,
    method: str = "tsne",
    seed: int = 0,
    n_images: int = 4,
    index: bool = True,
) -> FigureReport:
    """Draw `kinds` for `paths` into `out_dir` (default: the only input's `figures/`)."""
    if out_dir is None:
        if len(paths) != 1:
            raise RecipeError("several inputs need an output folder: add --out DIR")
        out_dir = RunDir(paths[0]).figures
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise RecipeError(f"unknown figure kind '{unknown[0]}'; choose from {', '.join(KINDS)}")
    if n_images < 1:
        raise RecipeError(f"the number of images must be at least 1, not {n_images}")
    if method not in embedding.METHODS:
        raise RecipeError(f"embedding method must be one of {', '.join(embedding.METHODS)}, not '{method}'")
    with_model = any(k != "curves" for k in kinds)
    sources = [open_source(p, n, with_model) for p, n in zip(paths, run_names(paths), strict=True)]
    report = FigureReport(out_dir)
    if "curves" in kinds:
        _curves(sources, report)
    if "embedding" in kinds:
        _embedding(sources, report, method, seed)
    for source in sources:
        suffix = "" if len(sources) == 1 else f"-{source.name}"
        if "attention" in kinds:
            _guard(
                report, f"attention ({source.name})", partial(_attention, source, report, suffix, n_images)
            )
        if "reconstruction" in kinds:
            draw = partial(_reconstruction, source, report, suffix, n_images, seed)
            _guard(report, f"reconstruction ({source.name})", draw)
    if index:
        write_index(report, paths)
    return report


def write_compare_figures(run_dirs: Sequence[Path], out_dir: Path, method: str = "tsne") -> list[Path]:
    """Curves overlaid and embedding maps side by side for `ssl-vit compare --figures`.

    Inputs without metrics (export folders) or without a loadable backbone are left out, with a log
    line saying why; the paths of the figures written come back.
    """
    report = show(run_dirs, out_dir, kinds=("curves", "embedding"), method=method, index=False)
    for figure, why in report.skipped:
        log.info("figures: skipped %s: %s", figure, why)
    return report.written


def _guard(report: FigureReport, figure: str, draw: Callable[[], None]) -> None:
    """Draw one figure; a reason it cannot be drawn (an `SslVitError`) becomes a skip, not a failure."""
    try:
        draw()
    except SslVitError as err:
        report.skip(figure, str(err))


def _curves(sources: Sequence[Source], report: FigureReport) -> None:
    runs = {s.name: s.metrics for s in sources if s.metrics}
    for s in sources:
        if not s.metrics:
            report.skip(f"curves ({s.name})", f"{s.path} has no metrics.jsonl records yet")
    if runs:
        report.written.append(curves.draw_curves(runs, report.out_dir / "curves.png"))


def _embedding(sources: Sequence[Source], report: FigureReport, method: str, seed: int) -> None:
    panels, names = [], None
    for s in sources:
        if s.model is None:
            report.skip(f"embedding ({s.name})", s.missing["model"])
            continue
        try:
            feats, labels = _test_features(s.model, seed)
            names = names or class_names(s.model.data)
        except DataError as err:
            report.skip(f"embedding ({s.name})", str(err))
            continue
        points = embedding.project_2d(feats, method, seed)
        panels.append(embedding.EmbeddingPanel(f"{s.name} ({s.model.data} test)", points, labels))
    if panels:
        report.written.append(
            embedding.draw_embedding(panels, names, method, report.out_dir / "embedding.png")
        )


def _test_features(model: EvalModel, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features of a seeded subset of the test split, on the GPU when there is one, then back."""
    images, labels = load_images(model.data, "test", model.img_size, model.in_chans)
    idx = torch.from_numpy(embedding.subset(len(labels), seed))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = model.backbone.to(device)
    try:
        feats = extract(backbone, normalise(images[idx], model.mean, model.std), kind=model.feature)
    finally:
        backbone.cpu()
    return feats, labels[idx].numpy()


def _attention(source: Source, report: FigureReport, suffix: str, n_images: int) -> None:
    if source.model is None:
        raise DataError(source.missing["model"])
    model = source.model
    imgs, _ = pick_images(model, n_images)
    maps = attention.cls_attention(model.backbone, imgs)
    out = report.out_dir / f"attention{suffix}.png"
    report.written.append(attention.draw_attention(to_display(imgs, model.mean, model.std), maps, out))


def _reconstruction(source: Source, report: FigureReport, suffix: str, n_images: int, seed: int) -> None:
    if source.objective is None or source.model is None:
        raise DataError(source.missing["objective"])
    if not isinstance(source.objective, Reconstructor):
        name = type(source.objective).__name__
        raise RecipeError(f"objective {name} has no reconstruct() (only masked objectives have one)")
    model = source.model
    imgs, _ = pick_images(model, n_images)
    rec = reconstruction.reconstruct(source.objective, imgs, model.mean, model.std, seed)
    out = report.out_dir / f"reconstruction{suffix}.png"
    title = f"{source.name} ({type(source.objective).__name__})"
    report.written.append(reconstruction.draw_reconstruction(rec, out, title))


def write_index(report: FigureReport, paths: Sequence[Path]) -> Path:
    """`index.md`: every figure written (as an image link) and every one skipped, with why."""
    lines = ["# Figures", "", "Drawn by `ssl-vit show` from:", ""]
    lines += [f"- `{p}`" for p in paths]
    for path in report.written:
        lines += ["", f"## {path.stem}", "", f"![{path.stem}]({path.name})"]
    if report.skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- {figure}: {why}" for figure, why in report.skipped]
    index = report.out_dir / "index.md"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text("\n".join(lines) + "\n")
    return index


__all__ = ["KINDS", "FigureReport", "show", "write_compare_figures"]
