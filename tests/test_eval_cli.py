"""The evaluation commands end to end on a tiny digits run: probe --shots, knn, finetune, compare, demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssl_vit import cli, objectives
from ssl_vit.cli import main
from tests.conftest import TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sup"
    assert (
        main(["pretrain", "digits/supervised", *TINY, "train.max_steps=2", "--out", str(out), "--quiet"]) == 0
    )
    return out


def last_json(capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_knn_and_lowshot_probe_json(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = ["--cache-dir", str(tmp_path)]
    assert main(["knn", str(run), "--k", "1", "20", "--json", *cache]) == 0
    knn = last_json(capsys)
    assert set(knn["top1_per_k"]) == {"1", "20"} and knn["n_test"] == 540
    assert json.loads((run / "eval" / "knn.json").read_text()) == knn
    assert (
        main(["probe", str(run), "--shots", "5", "--seeds", "2", "--feature", "cls4", "--json", *cache]) == 0
    )
    low = last_json(capsys)
    assert low["shots"] == 5 and len(low["per_draw"]) == 2 and low["dim"] == 64
    assert (run / "eval" / "lowshot_5.json").is_file()


def test_evaluators_pool_by_the_recipes_eval_feature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """MPP trains patch tokens, not CLS: a run whose recipe says `eval.feature=avg` is scored on avg
    by knn, probe and compare (and in its export), unless --feature says otherwise."""
    run = tmp_path / "avg-run"
    overrides = [*TINY, "train.max_steps=1", "eval.feature=avg"]
    assert main(["pretrain", "digits/supervised", *overrides, "--out", str(run), "--quiet"]) == 0
    cache = ["--cache-dir", str(tmp_path / "c")]
    assert main(["knn", str(run), "--json", *cache]) == 0
    avg = last_json(capsys)
    assert avg["feature"] == "avg"
    assert main(["knn", str(run / "backbone"), "--json", *cache]) == 0  # the export remembers it
    assert last_json(capsys)["feature"] == "avg"
    assert main(["knn", str(run), "--feature", "cls4", "--json", *cache]) == 0
    cls4 = last_json(capsys)
    assert cls4["feature"] == "cls4" and cls4["dim"] == 2 * avg["dim"]  # CLS of both blocks
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp"), "--knn", *cache]) == 0
    assert json.loads((run / "eval" / "compare.json").read_text())["feature"] == "avg"


def test_finetune_json_writes_into_the_run(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["finetune", str(run), "--steps", "2", "--batch-size", "16", "--json"]) == 0
    result = last_json(capsys)
    assert result["steps"] == 2 and 0.0 <= result["top1"] <= 1.0
    assert json.loads((run / "eval" / "finetune.json").read_text())["top1"] == result["top1"]
    assert list((run / "eval" / "finetune" / "checkpoints").glob("step-*"))


def test_compare_prints_the_table(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", str(run), "--out", str(tmp_path / "cmp"), "--knn", "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "raw pixels" in out and "random init" in out and "k-NN" in out and "report.md" in out
    rows = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert rows[-1]["pretrain_flops"] > 0 and rows[-1]["linear_probe_top1"] is None


@pytest.mark.parametrize(
    "args, expected",
    [
        (["compare", "/no/such/run", "--out", "x"], "does not exist"),
        (["probe", "RUN", "--shots", "500"], "shots 500"),
        (["knn", "RUN", "--k", "0"], "k >= 1"),
    ],
)
def test_user_mistakes_exit_2(
    run: Path, args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [str(run) if a == "RUN" else a for a in args]
    assert main([*args, "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]


def test_demo_on_digits_at_a_tiny_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real demo path with a tiny model and a cheaper probe grid, to keep the suite fast."""
    monkeypatch.setattr(cli, "DEMO_OVERRIDES", [*cli.DEMO_OVERRIDES, *TINY])
    monkeypatch.setattr(cli, "DEMO_PROTOCOL", {**cli.DEMO_PROTOCOL, "seeds": 2, "probe_cs": [1.0]})
    assert main(["demo", "--data", "digits", "--steps-scale", "0.02", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "raw pixels" in out and "supervised" in out and "fine-tune" in out and "demo finished" in out
    rows = json.loads((tmp_path / "compare" / "results.json").read_text())
    pretrained = [r.split("/")[1] for r in cli.demo_recipes("digits")]
    assert "supervised" in pretrained and len(pretrained) == len(objectives.names())
    assert [r["objective"] for r in rows] == ["raw_pixels", "random_init", *pretrained]
    assert all(r["finetune_top1"] is not None and r["lowshot_top1"] is not None for r in rows[2:])
    assert (tmp_path / "supervised" / "backbone" / "config.json").is_file()
    assert {"curves.png", "embedding.png"} <= {p.name for p in (tmp_path / "compare" / "figures").iterdir()}
