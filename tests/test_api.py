"""The Python API: the README's example as written, the evaluators on one run, and the CLI's
override parsing for every command that takes overrides."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ssl_vit
from ssl_vit.cli import parse_args
from ssl_vit.errors import RecipeError
from ssl_vit.rundir import RunDir
from tests.conftest import REPO, copy_run


def readme_api_example() -> str:
    """The first ```python block after the README's "Python API" heading."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python API section has no python example"
    return match.group(1)


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path: Path) -> None:
    """Run in a fresh interpreter from a scratch folder: what a user pasting it would see."""
    proc = subprocess.run(
        [sys.executable, "-c", readme_api_example()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    top1 = float(proc.stdout.strip().splitlines()[-1])
    assert 0.0 <= top1 <= 1.0
    runs = [p for p in (tmp_path / "runs").iterdir() if RunDir(p).exists()]
    assert len(runs) == 1 and RunDir(runs[0]).summary()["steps"] == 5  # type: ignore[index]
    assert RunDir(runs[0]).eval_result("linear_probe").is_file()


def test_import_is_light_and_exposes_the_api() -> None:
    code = "import sys, ssl_vit; print('torch' in sys.modules, callable(ssl_vit.pretrain))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "True"]
    for name in ("pretrain", "export", "probe", "knn", "finetune", "compare", "demo", "shards"):
        assert (getattr(ssl_vit, name).__doc__ or "").strip(), name
    with pytest.raises(AttributeError):
        ssl_vit.nope  # noqa: B018


@pytest.fixture(scope="module")
def run(shared_supervised_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny supervised run (conftest); a copy, as the evaluators write into it."""
    return copy_run(shared_supervised_run, tmp_path_factory.mktemp("api") / "sup")


def test_evaluators_return_and_record_their_results(run: Path, tmp_path: Path) -> None:
    knn = ssl_vit.knn(run, k=[5, 20], cache_dir=tmp_path)
    assert set(knn["top1_per_k"]) == {"5", "20"} and knn["top1"] == knn["top1_per_k"]["5"]
    assert json.loads(RunDir(run).eval_result("knn").read_text())["top1"] == knn["top1"]
    shot = ssl_vit.probe(run, shots=2, seeds=2, cache=False)
    assert shot["draws"] == 2 and RunDir(run).eval_result("lowshot_2").is_file()
    tuned = ssl_vit.finetune(run, shots=2, seeds=1, steps=2, batch_size=8, warmup_steps=0)
    assert tuned["draws"] == 1 and Path(tuned["out_dir"]) == RunDir(run).eval_dir / "finetune_lowshot_2"
    with pytest.raises(RecipeError, match="unknown option"):
        ssl_vit.finetune(run, stpes=2)


def test_export_writes_a_timm_folder_and_refuses_unknown_formats(run: Path, tmp_path: Path) -> None:
    folder = ssl_vit.export(run, tmp_path / "exported")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    with pytest.raises(RecipeError, match="timm or onnx"):
        ssl_vit.export(run, tmp_path / "x", fmt="tflite")


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain", "digits/mae", "a.b=1", "--out", "r", "c.d=2", "--quiet", "e.f=3"],
        ["pretrain", "--out", "r", "digits/mae", "a.b=1", "c.d=2", "--quiet", "e.f=3"],
        ["pretrain", "--resume", "r", "a.b=1", "c.d=2", "e.f=3"],
        ["demo", "a.b=1", "--jobs", "2", "c.d=2", "--quiet", "e.f=3"],
        ["demo", "--objectives", "mae", "simclr", "--out", "r", "a.b=1", "c.d=2", "e.f=3"],
        ["demo", "--objectives", "mae", "simclr", "a.b=1", "c.d=2", "--quiet", "e.f=3"],
        ["demo", "a.b=1", "--objectives", "mae", "simclr", "c.d=2", "e.f=3"],
    ],
)
def test_overrides_and_options_in_any_order(argv: list[str]) -> None:
    args = parse_args(argv)
    words = [*(args.overrides or [])]
    if args.command == "pretrain" and args.recipe and "=" in args.recipe:
        words = [args.recipe, *words]  # `--resume RUN key=value`: the first override fills RECIPE
    assert words == ["a.b=1", "c.d=2", "e.f=3"]
    if args.command == "demo" and args.objectives:
        assert args.objectives == ["mae", "simclr"]
