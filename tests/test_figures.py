"""Figures: every kind is written for a tiny run, attention recording changes nothing, and the
reconstruction figure shows exactly the hidden patches as predicted (checked on its arrays)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import matplotlib.image
import numpy as np
import pytest
import torch
import yaml
from einops import rearrange
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.cli import main
from ssl_vit.config import RECIPES_DIR
from ssl_vit.figures import show, write_compare_figures
from ssl_vit.figures.attention import attention_layout, cls_attention
from ssl_vit.figures.curves import (
    COLS,
    PANEL_H,
    PANEL_W,
    curve_keys,
    curves_layout,
    draw_curves,
)
from ssl_vit.figures.embedding import embedding_size, project_2d
from ssl_vit.figures.reconstruction import HIDDEN_GREY, reconstruct, reconstruction_layout
from ssl_vit.figures.source import open_source, pick_images
from ssl_vit.objectives.base import Objective
from ssl_vit.rundir import read_metrics
from ssl_vit.types import Batch, ViewSpec
from tests.conftest import TINY, registered_objective


@dataclass
class FakeMaskedConfig:
    mask_ratio: float = 0.5
    num_classes: int | None = None


class FakeMasked(Objective):
    """A tiny masked objective: hide half the patches behind a mask token, regress their pixels."""

    Config = FakeMaskedConfig
    view_spec: ClassVar[ViewSpec] = ViewSpec(kind="masked")

    def __init__(self, backbone: Backbone, cfg: FakeMaskedConfig) -> None:
        super().__init__(backbone)
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))
        self.decoder = nn.Linear(backbone.embed_dim, backbone.patch_size**2 * backbone.in_chans)

    def _mask(self, imgs: Tensor, generator: torch.Generator | None) -> Tensor:
        batch, n = imgs.shape[0], self.backbone.num_patches
        rank = torch.rand(batch, n, generator=generator).argsort(1).argsort(1)
        return rank < int(n * self.cfg.mask_ratio)  # (B, N), True = hidden

    def _predict(self, imgs: Tensor, mask: Tensor) -> Tensor:
        tokens = Backbone.replace_tokens(self.backbone.embed(imgs), mask, self.mask_token)
        out = self.backbone.encode(tokens, grid=self.backbone.grid_of(imgs))
        return self.decoder(self.backbone.patch_tokens(out))  # (B, N, p*p*C)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        imgs = batch.views[0]
        mask = self._mask(imgs, None)
        p = self.backbone.patch_size
        target = rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)
        loss = ((self._predict(imgs, mask) - target) ** 2).mean(-1)[mask].mean()
        return loss, {"hidden": mask.float().mean()}

    def reconstruct(self, imgs: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        mask = self._mask(imgs, generator)
        h, w = self.backbone.grid_of(imgs)
        p = self.backbone.patch_size
        pred = rearrange(self._predict(imgs, mask), "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)
        return {"mask": mask, "pred": pred}


@pytest.fixture(scope="module")
def runs(shared_supervised_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The shared tiny supervised run `sup` (figures only read it) and a tiny run of the fake masked
    objective (registered for this module)."""
    with registered_objective("fake_masked", FakeMasked):  # gone afterwards: other modules list names()
        base = tmp_path_factory.mktemp("figure-runs")
        recipe = yaml.safe_load((RECIPES_DIR / "digits" / "supervised.yaml").read_text())
        recipe["objective"] = {"name": "fake_masked"}
        (base / "fake_masked.yaml").write_text(yaml.safe_dump(recipe))
        out = {"sup": shared_supervised_run, "masked": base / "masked"}
        steps = [*TINY, "train.max_steps=3", "--quiet"]
        assert main(["pretrain", str(base / "fake_masked.yaml"), *steps, "--out", str(out["masked"])]) == 0
        yield out


def decoded_size(path: Path) -> tuple[int, int]:
    return matplotlib.image.imread(path).shape[:2]  # type: ignore[no-any-return]


def grid_pixels(rows: int, cols: int, width: float = 1.6, height: float = 1.6) -> tuple[int, int]:
    """(height, width) in pixels of a saved grid of rows x cols panels, each width x height inches
    (1.6 by default) at the figures' 100 dpi: fixed, with no tight bounding box to change it."""
    return round(rows * height * 100), round(cols * width * 100)


def test_every_kind_is_written_with_its_size_and_is_deterministic(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    first = show([runs["masked"]], tmp_path / "a", method="pca")
    names = {p.name for p in first.written}
    assert names == {"curves.png", "embedding.png", "attention.png", "reconstruction.png"}
    assert first.skipped == []
    keys = curve_keys({"m": read_metrics(runs["masked"] / "metrics.jsonl")})
    assert {"loss", "lr", "images_per_sec", "hidden"} <= set(keys)
    rows, cols = curves_layout(len(keys))
    expected = {
        "curves.png": grid_pixels(rows, COLS, PANEL_W, PANEL_H),
        "embedding.png": embedding_size(1),
        "attention.png": grid_pixels(*attention_layout(4, 2)),  # input + 2 heads
        "reconstruction.png": grid_pixels(*reconstruction_layout(4)),
    }
    assert cols == COLS
    for path in first.written:
        assert decoded_size(path) == expected[path.name], path.name
    index = (tmp_path / "a" / "index.md").read_text()
    assert all(f"({name})" in index for name in names)
    again = show([runs["masked"]], tmp_path / "b", ("embedding", "attention", "reconstruction"), "pca")
    for path in again.written:  # same seed: same images, same masks, same pixels
        assert path.read_bytes() == (tmp_path / "a" / path.name).read_bytes(), path.name


def test_recording_attention_leaves_the_forward_unchanged(tiny_backbone: Backbone) -> None:
    tiny_backbone.eval()
    imgs = torch.randn(3, 1, 16, 16)
    reference = tiny_backbone.forward_features(imgs)
    seen: dict[str, Tensor] = {}
    attn_module = tiny_backbone.vit.blocks[-1].attn
    handle = attn_module.register_forward_hook(lambda m, a, o: seen.update(x=a[0], out=o))
    features, attn = tiny_backbone.forward_with_attention(imgs)
    handle.remove()
    assert (features - reference).abs().max().item() == 0
    assert attn.shape == (3, 2, 17, 17)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 2, 17))
    # The recorded probabilities are the ones the block used: proj(attn @ v) gives its output back.
    v = rearrange(attn_module.qkv(seen["x"]), "b n (three h d) -> three b h n d", three=3, h=2)[2]
    out = attn_module.proj(rearrange(attn @ v, "b h n d -> b n (h d)"))
    torch.testing.assert_close(out, seen["out"], atol=1e-5, rtol=1e-5)
    # The map of patch (r, c) covers its 4x4 pixels with the CLS token's attention to that patch.
    maps = cls_attention(tiny_backbone, imgs)
    assert maps.shape == (3, 2, 16, 16)
    for n in range(16):
        r, c = divmod(n, 4)
        block = maps[:, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
        assert torch.equal(block, attn[:, :, 0, 1 + n, None, None].expand_as(block))


def test_reconstruction_shows_exactly_the_hidden_patches_as_predicted(runs: dict[str, Path]) -> None:
    source = open_source(runs["masked"], "masked")
    assert source.objective is not None and source.model is not None
    imgs, _ = pick_images(source.model, 3)
    rec = reconstruct(source.objective, imgs, source.model.mean, source.model.std, seed=7)
    with torch.no_grad():
        expected = source.objective.reconstruct(imgs, generator=torch.Generator().manual_seed(7))
    pixels = (imgs * 0.5 + 0.5).clamp(0, 1)  # digits: mean 0.5, std 0.5
    predicted = (expected["pred"] * 0.5 + 0.5).clamp(0, 1)
    for b in range(3):
        for n in range(16):
            r, c = divmod(n, 4)
            rows, cols = slice(4 * r, 4 * r + 4), slice(4 * c, 4 * c + 4)
            hidden = bool(expected["mask"][b, n])
            assert rec.mask[b, rows, cols].all() == hidden and rec.mask[b, rows, cols].any() == hidden
            shown = torch.from_numpy(rec.paste[b, rows, cols, 0])
            truth = predicted[b, 0, rows, cols] if hidden else pixels[b, 0, rows, cols]
            torch.testing.assert_close(shown, truth)
            grey = torch.full((4, 4), HIDDEN_GREY)
            torch.testing.assert_close(
                torch.from_numpy(rec.masked[b, rows, cols, 0]), grey if hidden else pixels[b, 0, rows, cols]
            )
    assert rec.mask.mean() == 0.5
    other = reconstruct(source.objective, imgs, source.model.mean, source.model.std, seed=8)
    assert not np.array_equal(other.mask, rec.mask)


def test_show_on_a_supervised_run_skips_the_reconstruction(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(runs["sup"]), "--out", str(tmp_path), "--embedding", "pca"]) == 0
    out = capsys.readouterr().out
    assert "skipped reconstruction (sup): objective Supervised has no reconstruct()" in out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["attention.png", "curves.png", "embedding.png"]


def test_show_on_an_export_folder_says_what_it_skipped(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(runs["sup"] / "backbone"), "--out", str(tmp_path), "--embedding", "pca"]) == 0
    out = capsys.readouterr().out
    assert "skipped curves (backbone):" in out and "no metrics.jsonl" in out
    assert "skipped reconstruction (backbone): an export folder holds the backbone only" in out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["attention.png", "embedding.png"]
    assert "## Skipped" in (tmp_path / "index.md").read_text()


def test_show_on_a_run_that_has_only_started(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "started"
    run.mkdir()
    shutil.copy(runs["sup"] / "recipe.yaml", run)
    first_line = (runs["sup"] / "metrics.jsonl").read_text().splitlines()[0]
    (run / "metrics.jsonl").write_text(first_line + '\n{"step": 2, "lo')  # a line still being written
    report = show([run], method="pca")
    assert [p.name for p in report.written] == ["curves.png"]
    assert {figure for figure, _ in report.skipped} == {
        "embedding (started)",
        "attention (started)",
        "reconstruction (started)",
    }
    assert all("no checkpoint yet" in why for _, why in report.skipped)
    assert len(read_metrics(run / "metrics.jsonl")) == 1


def test_several_runs_curves_and_compare_figures(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(runs["sup"]), str(runs["masked"]), "--curves"]) == 2
    assert "several inputs need an output folder" in capsys.readouterr().err
    assert (
        main(["show", str(runs["sup"]), str(runs["masked"]), "--curves", "--out", str(tmp_path / "c")]) == 0
    )
    assert [p.name for p in (tmp_path / "c").glob("*.png")] == ["curves.png"]
    written = write_compare_figures([runs["sup"], runs["masked"]], tmp_path / "cmp", method="pca")
    assert [p.name for p in written] == ["curves.png", "embedding.png"]
    assert decoded_size(written[1]) == embedding_size(2)


def test_tsne_keeps_separated_clusters_apart() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 20
    feats = np.concatenate([c + rng.normal(size=(20, 16)) for c in centres])
    labels = np.repeat(np.arange(3), 20)
    points = project_2d(feats, "tsne", seed=0)
    assert np.array_equal(points, project_2d(feats, "tsne", seed=0))
    dist = ((points[:, None] - points[None]) ** 2).sum(-1) + np.eye(60) * 1e9
    assert (labels[dist.argmin(1)] == labels).all()


def test_metrics_reader_skips_what_is_not_a_record(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([json.dumps({"step": 1, "loss": 2.0}), "[]", json.dumps({"x": 1}), "{bad"]))
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_online_monitor_panels_follow_throughput_and_their_cost_is_not_drawn(tmp_path: Path) -> None:
    recs: list[dict[str, float]] = [
        {"step": s, "loss": 1.0 / s, "lr": 1e-3, "images_per_sec": 100.0, "grad_norm": 1.0}
        for s in range(1, 11)
    ]
    for r in recs[4::5]:  # measured every 5 steps only
        r.update(knn_top1=0.5, rankme=3.0, monitor_seconds=0.1)
    keys = curve_keys({"run": recs})
    assert keys == ["loss", "lr", "images_per_sec", "knn_top1", "rankme", "grad_norm"]
    assert "knn_top1" not in curve_keys({"run": recs[:4]})  # absent when the run did not measure
    out = draw_curves({"run": recs}, tmp_path / "curves.png")
    rows, _ = curves_layout(len(keys))
    assert decoded_size(out) == grid_pixels(rows, COLS, PANEL_W, PANEL_H)
