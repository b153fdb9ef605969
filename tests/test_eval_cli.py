"""The evaluation commands end to end on a tiny digits run: probe --shots, knn, finetune, compare, demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssl_vit import demo_runs, objectives
from ssl_vit.cli import main
from tests.conftest import TINY, copy_run


@pytest.fixture(scope="module")
def run(shared_supervised_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny supervised run (conftest); a copy, as the evaluators write into it."""
    return copy_run(shared_supervised_run, tmp_path_factory.mktemp("runs") / "sup")


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


def test_finetune_shots_reports_mean_and_std_over_draws(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["finetune", str(run), "--shots", "2", "--seeds", "2", "--steps", "2", "--quiet"]
    assert main([*args, "--json"]) == 0
    result = last_json(capsys)
    assert result["shots"] == 2 and result["draws"] == 2 and result["seeds"] == [0, 1]
    assert len(result["per_draw"]) == 2 and result["top1_std"] is not None
    assert [r["batch_size"] for r in result["runs"]] == [20, 20]  # 2 shots x 10 classes, not the full split
    saved = json.loads((run / "eval" / "finetune_lowshot_2.json").read_text())
    assert saved["per_draw"] == result["per_draw"]
    assert (run / "eval" / "finetune_lowshot_2" / "seed1" / "metrics.jsonl").is_file()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fine-tune 2-shot top-1:" in out and " ± " in out and "over 2 seed(s)" in out
    assert main(["finetune", str(run), "--shots", "500", "--quiet"]) == 2  # more than a class holds
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "shots 500" in err[0]


def test_compare_finetune_shots_runs_k_shot_and_labels_the_column(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cmp = tmp_path / "cmp"
    args = ["compare", str(run), "--out", str(cmp), "--finetune", "--finetune-shots", "2", "--seeds", "1"]
    assert main([*args, "--finetune-steps", "1", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "fine-tune 2-shot" in capsys.readouterr().out
    rows = json.loads((cmp / "results.json").read_text())
    assert [r["finetune_shots"] for r in rows] == [None, 2, 2]
    plan = json.loads((cmp / "finetune" / "random_init-2shot-seed0" / "train_state.json").read_text())
    assert plan["per_device_batch"] == 20  # trained on the 2-shot draw, not the full split


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
        (["compare", "RUN", "--out", "x", "--finetune-shots", "5"], "needs --finetune"),
    ],
)
def test_user_mistakes_exit_2(
    run: Path, args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [str(run) if a == "RUN" else a for a in args]
    assert main([*args, "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]


def test_demo_short_runs_get_a_faster_teacher_that_user_overrides_replace(tmp_path: Path) -> None:
    from ssl_vit.config import load_recipe

    jobs = {job.name: job for job in demo_runs.demo_jobs("digits", 1.0, tmp_path)}
    momentum = {
        name: load_recipe(job.recipe, job.overrides).objective.get("momentum") for name, job in jobs.items()
    }
    assert momentum["dino"] == 0.96 and momentum["mocov3"] == 0.9  # recipes: 0.99 and 0.96
    assert load_recipe("digits/dino").objective["momentum"] == 0.99
    assert "ijepa" not in jobs and "ijepa" in objectives.names()  # opt-in: no room in the demo's 10 minutes
    asked = demo_runs.demo_jobs("digits", 1.0, tmp_path, only=["ijepa", "mae"])
    assert [job.name for job in asked] == ["mae", "ijepa"]  # those with a demo budget first
    assert [job.name for job in jobs.values()] == list(demo_runs.DEMO_STEPS["digits"])  # longest first
    mine = demo_runs.demo_jobs("digits", 1.0, tmp_path, ["objective.momentum=0.995"], only=["dino"])
    assert load_recipe(mine[0].recipe, mine[0].overrides).objective["momentum"] == 0.995


def test_full_demo_runs_each_recipe_as_written_and_fine_tunes_to_convergence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssl_vit.eval.finetune import default_config

    import ssl_vit.figures
    from ssl_vit import api
    from ssl_vit.config import load_recipe

    jobs = demo_runs.demo_jobs("digits", 1.0, tmp_path, ["seed=3"], full=True)
    assert [job.name for job in jobs] == [
        n for n in demo_runs.FULL_ORDER["digits"] if n not in demo_runs.DEMO_OPT_IN
    ]
    for job in jobs:  # the recipe's budget and teacher momentum, the user's override on top
        assert load_recipe(job.recipe, job.overrides) == load_recipe(
            job.recipe, ["ckpt.keep_last=1", "seed=3"]
        )
    assert main(["demo", "--full", "--steps-scale", "0.5", "--out", str(tmp_path), "--quiet"]) == 2
    assert "--full runs each recipe's own" in capsys.readouterr().err

    seen: dict[str, object] = {}
    monkeypatch.setattr(demo_runs, "run_pretraining", lambda todo, *a: [job.out for job in todo])
    monkeypatch.setattr(
        api, "compare_protocol", lambda runs, out, protocol, cfg, *a: seen.update(cfg=cfg) or []
    )
    monkeypatch.setattr(ssl_vit.figures, "write_compare_figures", lambda *a, **k: None)
    api.demo(out=tmp_path, objectives=["mae"], full=True, quiet=True)
    assert seen["cfg"] == default_config(10)  # the protocol's converged steps, not the demo's 400
    api.demo(out=tmp_path, objectives=["mae"], quiet=True)
    assert seen["cfg"].steps == demo_runs.DEMO_FINETUNE_STEPS  # type: ignore[attr-defined]


def test_demo_on_digits_at_a_tiny_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real demo path (every objective pretrained in its own process, 2 at a time, evaluations in
    2 processes) with a tiny model and a cheaper probe grid, to keep the suite fast."""
    monkeypatch.setattr(
        demo_runs, "DEMO_PROTOCOL", {**demo_runs.DEMO_PROTOCOL, "seeds": 2, "probe_cs": [1.0]}
    )
    args = ["demo", *TINY, "--steps-scale", "0.02", "--jobs", "2", "--threads", "1", "--out", str(tmp_path)]
    assert main([*args, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("With 10 labels per class, ")  # the headline opens the report
    assert "raw pixels" in out and "supervised" in out and "fine-tune 10-shot" in out
    assert "demo finished" in out and "cores" in out
    rows = json.loads((tmp_path / "compare" / "results.json").read_text())
    pretrained = [n for n in objectives.names() if n not in demo_runs.DEMO_OPT_IN]
    assert [r["objective"] for r in rows] == ["raw_pixels", "random_init", *pretrained]
    assert all(r["finetune_top1"] is not None and r["lowshot_top1"] is not None for r in rows[2:])
    assert all(r["finetune_shots"] == 10 for r in rows[1:])
    assert (tmp_path / "supervised" / "backbone" / "config.json").is_file()
    assert {"curves.png", "embedding.png"} <= {p.name for p in (tmp_path / "compare" / "figures").iterdir()}


def test_parallel_demo_writes_the_figures_of_a_sequential_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same recipes and seeds, 2 processes at a time or 1: the same results.json figures."""
    monkeypatch.setattr(
        demo_runs, "DEMO_PROTOCOL", {**demo_runs.DEMO_PROTOCOL, "seeds": 2, "probe_cs": [1.0]}
    )
    results = []
    for jobs in ("2", "1"):
        out = tmp_path / f"jobs{jobs}"
        args = ["demo", *TINY, "--objectives", "supervised", "mae", "--steps-scale", "0.02"]
        assert main([*args, "--jobs", jobs, "--threads", "1", "--out", str(out), "--quiet"]) == 0
        rows = json.loads((out / "compare" / "results.json").read_text())
        results.append([{k: v for k, v in r.items() if k != "pretrain_seconds"} for r in rows])
    assert [r["objective"] for r in results[0]] == ["raw_pixels", "random_init", "mae", "supervised"]
    assert results[0] == results[1]


def test_demo_refuses_an_objective_without_a_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--objectives", "mae", "nope", "--out", "unused", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no digits recipe for nope" in err[0]
