"""`compare` end to end on tiny runs (fine-tuning replaced by a stub; it has its own tests)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from ssl_vit.eval import finetune as finetune_lib
from ssl_vit.eval.compare import Protocol, compare
from ssl_vit.eval.features import EvalModel, load_eval_model
from ssl_vit.eval.finetune import default_config
from ssl_vit.eval.report import COLUMNS, format_table, table_cells

from ssl_vit.api import FinetuneRun, export, finetune_model, pretrain
from ssl_vit.errors import RecipeError
from ssl_vit.rundir import RunDir
from tests.conftest import TINY

FIELDS = {
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
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two runs of one recipe (seeds 0 and 1) and an export of a third run with another lr."""
    base = tmp_path_factory.mktemp("compare")
    out = [
        pretrain(
            "digits/supervised", [*TINY, "train.max_steps=2", f"seed={s}"], base / f"sup-s{s}", quiet=True
        )
        for s in (0, 1)
    ]
    other = pretrain(
        "digits/supervised", [*TINY, "train.max_steps=2", "optim.lr=3e-3"], base / "sup-lr", quiet=True
    )
    return [*out, export(other, base / "exported")]


def fake_finetune(model: EvalModel, seed: int, out: Path) -> float:
    out.mkdir(parents=True)
    return 0.5 + 0.1 * seed


def test_compare_writes_every_file_with_baselines_and_aggregates_runs(
    runs: list[Path], tmp_path: Path
) -> None:
    protocol = Protocol(probe=True, knn=True, finetune=True, shots=5, seeds=2, probe_cs=[0.1, 1.0])
    rows = compare(runs, tmp_path / "report", protocol, tmp_path / "cache", lambda run: 1e9, fake_finetune)
    out = tmp_path / "report"
    for name in ("report.md", "results.json", "results.csv", "compare.png", "compute.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved == rows
    assert [r["objective"] for r in rows] == ["raw_pixels", "random_init", "supervised", "supervised"]
    assert all(set(r) == FIELDS for r in rows)
    raw, rand, pair, exported = rows
    assert raw["finetune_top1"] is None and raw["pretrain_flops"] == 0.0 and raw["shots"] == 5
    assert raw["finetune_shots"] is None and rand["finetune_shots"] == 0  # 0: all training labels
    assert rand["finetune_top1"] == pytest.approx(0.55) and rand["finetune_top1_std"] is not None
    # two seeds of one recipe: one row, mean ± std over runs
    assert pair["n_runs"] == 2 and pair["name"] == "sup-s" and pair["pretrain_flops"] == 1e9
    assert pair["knn_top1_std"] is not None and pair["images_seen"] == 64
    # an export folder is its own row; its pretraining figures come from the run it records
    assert exported["n_runs"] == 1 and exported["name"] == "exported" and exported["images_seen"] == 64
    for r in rows:
        for metric in ("linear_probe_top1", "lowshot_top1", "knn_top1"):
            assert 0.0 <= r[metric] <= 1.0
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and [t["name"] for t in table] == [r["name"] for r in rows]
    report = (out / "report.md").read_text()
    assert "| raw pixels | raw_pixels |" in report and "| random init | random_init |" in report
    assert "5-shot probe" in format_table(rows) and (runs[0] / "eval" / "compare.json").is_file()
    assert table_cells(rows)[0][-1] == "fine-tune"  # all labels: no K in the column name


def test_compare_with_finetune_shots_labels_the_column_and_records_k(
    runs: list[Path], tmp_path: Path
) -> None:
    calls: list[tuple[str, int, str]] = []

    def recording_finetune(model: EvalModel, seed: int, out: Path) -> float:
        calls.append((model.name, seed, out.name))
        return 0.5 + 0.1 * seed

    protocol = Protocol(probe=False, knn=True, finetune=True, finetune_shots=4, seeds=2, shots=0)
    out = tmp_path / "report"
    rows = compare([runs[2]], out, protocol, tmp_path / "cache", None, recording_finetune)
    # every input and the random-init baseline: the fine-tune seeds 0 and 1, which pick the draws
    assert [(name, seed) for name, seed, _ in calls] == [
        ("random init", 0),
        ("random init", 1),
        ("exported", 0),
        ("exported", 1),
    ]
    assert calls[0][2] == "random_init-4shot-seed0"
    raw, rand, exported = rows
    assert raw["finetune_shots"] is None and rand["finetune_shots"] == exported["finetune_shots"] == 4
    assert json.loads((out / "results.json").read_text())[2]["finetune_shots"] == 4
    with (out / "results.csv").open() as f:
        assert [t["finetune_shots"] for t in csv.DictReader(f)] == ["", "4", "4"]
    table = format_table(rows)
    assert "fine-tune 4-shot" in table.splitlines()[0]
    report = (out / "report.md").read_text()
    assert "| fine-tune 4-shot |" in report and "finetune_shots=4" in report
    with pytest.raises(RecipeError, match="needs --finetune"):
        compare([runs[2]], out, Protocol(finetune=False, finetune_shots=4), tmp_path / "cache")


def test_compare_without_finetune_leaves_nulls(runs: list[Path], tmp_path: Path) -> None:
    rows = compare(
        [runs[0] / "backbone"], tmp_path, Protocol(probe=False, knn=True, shots=0), tmp_path / "cache"
    )
    assert len(rows) == 3 and rows[2]["name"] == "sup-s0"  # a run's backbone/ export is named after the run
    assert all(
        r["linear_probe_top1"] is None and r["lowshot_top1"] is None and r["shots"] is None for r in rows
    )
    assert all(r["finetune_top1"] is None and r["knn_top1"] is not None for r in rows)
    assert rows[2]["pretrain_flops"] is None  # no FLOP counter given


def test_compare_fine_tunes_every_input_with_the_same_augmentation(
    runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose recipe crops mildly (digits/supervised: crop_scale 0.6) is fine-tuned with the
    default augmentation, as the random-initialised row is: not with its own."""
    seen: list[object] = []
    monkeypatch.setattr(
        finetune_lib, "finetune", lambda model, out, cfg, data=None, *rest: seen.append(data) or {"top1": 0.5}
    )
    model = load_eval_model(runs[0])
    assert RunDir(runs[0]).recipe().data.crop_scale == 0.6
    FinetuneRun(default_config(4))(model, 0, tmp_path / "ft")
    assert seen == [None]  # finetune's default DataConfig, the same for every row
    finetune_model(model, default_config(4), tmp_path / "own", progress=False)  # `ssl-vit finetune RUN`
    assert getattr(seen[-1], "crop_scale", None) == 0.6  # a single fine-tune keeps the run's own
