"""The online monitor: RankMe against its formula, a train-only stratified subset, and the records a
pretraining run writes with `eval.online_every_steps` (and without it)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from ssl_vit.eval import monitor as monitor_module
from ssl_vit.eval.features import load_eval_model
from ssl_vit.eval.monitor import bank_and_queries, online_monitor, rankme

import ssl_vit.data
import ssl_vit.data.evalsets
from ssl_vit.backbone import Backbone
from ssl_vit.cli import main
from ssl_vit.config import RECIPES_DIR, EvalConfig
from ssl_vit.errors import DataError
from tests.conftest import TINY, records

MONITOR = ["eval.online_samples=200", "log.every_steps=4"]


def rankme_by_loops(z: np.ndarray, eps: float = 1e-7) -> float:
    """Eq. 1 of Garrido et al. 2023 with singular values from the eigenvalues of Z^T Z (no SVD)."""
    sigma = [math.sqrt(max(v, 0.0)) for v in np.linalg.eigvalsh(z.T @ z)]
    total = sum(sigma)
    entropy = 0.0
    for s in sigma:
        p = s / total + eps
        entropy -= p * math.log(p)
    return math.exp(entropy)


# ---------------------------------------------------------------- RankMe
def test_rankme_of_rank_one_embeddings_is_one() -> None:
    rng = np.random.default_rng(0)
    z = np.outer(rng.normal(size=64), rng.normal(size=16))  # (64, 16), rank 1
    assert rankme(z) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("d", [1, 7, 32])
def test_rankme_of_orthonormal_rows_is_their_width(d: int) -> None:
    q, _ = np.linalg.qr(np.random.default_rng(d).normal(size=(d, d)))  # (d, d), orthonormal rows
    assert np.allclose(q @ q.T, np.eye(d))
    assert rankme(q) == pytest.approx(d, rel=1e-4)
    assert rankme(3.0 * q) == pytest.approx(d, rel=1e-4)  # scale-free


def test_rankme_matches_the_formula_written_as_a_loop() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(200, 24)) * np.geomspace(1.0, 1e-3, 24)  # decaying spectrum
    assert rankme(z) == pytest.approx(rankme_by_loops(z), rel=1e-6)
    assert 1.0 < rankme(z) < 24.0
    assert rankme(torch.as_tensor(z, dtype=torch.float32)) == pytest.approx(rankme_by_loops(z), rel=1e-4)


# ---------------------------------------------------------------- subset
def test_bank_and_queries_are_a_disjoint_seeded_stratified_subset() -> None:
    labels = np.repeat(np.arange(4), [400, 200, 100, 20])  # (720,), unbalanced
    bank, queries = bank_and_queries(labels, 360)
    assert len(bank) + len(queries) == 360 and not set(bank) & set(queries)
    chosen = np.concatenate([bank, queries])
    assert np.abs(np.bincount(labels[chosen]) - [200, 100, 50, 10]).max() <= 1  # in proportion
    for c in range(4):  # each class split evenly between bank and queries
        assert abs(int((labels[bank] == c).sum()) - int((labels[queries] == c).sum())) <= 1
    again = bank_and_queries(labels, 360)
    assert np.array_equal(bank, again[0]) and np.array_equal(queries, again[1])
    everything = bank_and_queries(labels, 10_000)  # more than there are: the whole split
    assert len(everything[0]) + len(everything[1]) == 720


@pytest.fixture
def train_only(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every split anything asks the data layer for; a test split request fails loudly."""
    requested: list[str] = []
    real = ssl_vit.data.resolve

    def spy(source: str, split: str = "train", cache_dir: str | None = None) -> Any:
        requested.append(split)
        if split != "train":
            raise DataError(f"the online monitor must not read the {split} split")
        return real(source, split, cache_dir)

    for module in (ssl_vit.data, ssl_vit.data.evalsets):  # everywhere the data layer resolves splits
        monkeypatch.setattr(module, "resolve", spy)
    return requested


def test_monitor_reads_only_train_images_and_labels(train_only: list[str], tiny_backbone: Backbone) -> None:
    cfg = EvalConfig(online_samples=300)
    mon = online_monitor(tiny_backbone, "digits", 16, 1, [0.5], [0.5], cfg)
    assert train_only == ["train"]
    tiny_backbone.train()
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    measures = mon()
    assert train_only == ["train"]  # calls use the images read once
    assert set(measures) == {"knn_top1", "rankme"}
    assert 0.0 <= measures["knn_top1"] <= 1.0 and 1.0 <= measures["rankme"] <= tiny_backbone.embed_dim
    assert tiny_backbone.training  # train mode restored
    assert all(torch.equal(before[k], v) for k, v in tiny_backbone.state_dict().items())
    images, labels = ssl_vit.data.load_images("digits", "train", 16, 1)
    assert mon.labels is not None and len(mon.images) == 300
    for row in (0, 137, 299):  # each kept image is a train image with its own train label
        match = (images == mon.images[row]).flatten(1).all(1).nonzero().flatten()
        assert len(match) >= 1 and int(labels[match[0]]) == int(mon.labels[row])


def test_unlabelled_data_gets_rankme_only(monkeypatch: pytest.MonkeyPatch, tiny_backbone: Backbone) -> None:
    imgs = torch.rand(40, 1, 16, 16)
    monkeypatch.setattr(monitor_module, "load_images", lambda *a: (imgs, torch.full((40,), -1)))
    mon = online_monitor(tiny_backbone, "unlabelled", 16, 1, [0.5], [0.5], EvalConfig(online_samples=30))
    assert mon.labels is None and len(mon.images) == 30
    assert set(mon()) == {"rankme"}


# ---------------------------------------------------------------- in a pretraining run
def test_run_logs_knn_and_rankme_at_the_monitor_steps(train_only: list[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*TINY, *MONITOR, "train.max_steps=7", "eval.online_every_steps=3"]
    assert main(["pretrain", "digits/simclr", *args, "--out", str(out), "--quiet"]) == 0
    assert set(train_only) == {"train"}
    recs = records(out)
    assert [r["step"] for r in recs] == [3, 4, 6, 7]  # log grid 4, monitor every 3, and the last step
    measured = [r for r in recs if "knn_top1" in r]
    assert [r["step"] for r in measured] == [3, 6, 7]
    assert all("rankme" in r and r["monitor_seconds"] > 0 for r in measured)
    assert all(1.0 <= r["rankme"] <= 32 and 0.0 <= r["knn_top1"] <= 1.0 for r in measured)
    # The last measure is of the backbone the run exported: the same numbers from the export folder.
    model = load_eval_model(out / "backbone")
    cfg = EvalConfig(online_samples=200, feature=model.feature)
    again = online_monitor(model.backbone, "digits", 16, 1, model.mean, model.std, cfg)()
    assert again["knn_top1"] == pytest.approx(measured[-1]["knn_top1"], abs=1e-9)
    assert again["rankme"] == pytest.approx(measured[-1]["rankme"], rel=1e-4)


def test_teacher_objectives_are_measured_on_the_teacher(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """DINO exports its EMA teacher, so the monitor watches the teacher, the weights export writes."""
    watched: list[Backbone] = []
    real = monitor_module.online_monitor

    def spy(backbone: Backbone, *args: Any) -> Any:
        watched.append(backbone)
        return real(backbone, *args)

    monkeypatch.setattr(monitor_module, "online_monitor", spy)
    out = tmp_path / "dino"
    args = [*TINY, *MONITOR, "train.max_steps=2", "eval.online_every_steps=1", "objective.local_crops=0"]
    assert main(["pretrain", "digits/dino", *args, "--out", str(out), "--quiet"]) == 0
    assert len(watched) == 1 and not any(p.requires_grad for p in watched[0].parameters())
    exported = load_file(str(out / "backbone" / "model.safetensors"))
    live = watched[0].vit.state_dict()
    assert exported and all(torch.equal(v, live[k].cpu()) for k, v in exported.items())
    assert [r["step"] for r in records(out) if "knn_top1" in r] == [1, 2]


def test_off_by_default_and_a_negative_period_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = yaml.safe_load((RECIPES_DIR / "digits" / "supervised.yaml").read_text())
    recipe.get("eval", {}).pop("online_every_steps", None)  # the schema's default, whatever the recipe
    (tmp_path / "sup.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert (
        main(
            ["pretrain", str(tmp_path / "sup.yaml"), *TINY, "train.max_steps=2", "--out", str(out), "--quiet"]
        )
        == 0
    )
    assert all(not {"knn_top1", "rankme", "monitor_seconds"} & set(r) for r in records(out))
    bad = ["pretrain", "digits/supervised", "eval.online_every_steps=-1", "--out", str(tmp_path / "bad")]
    assert main([*bad, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval.online_every_steps" in err
