"""The command line end to end on digits, at a tiny budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_vit.cli import main
from tests.conftest import REPO, TINY, copy_run


def run_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ssl_vit", *args], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def supervised_run(shared_supervised_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ssl-vit pretrain digits/supervised`, 3 steps (conftest); a copy, as `probe` writes into it."""
    return copy_run(shared_supervised_run, tmp_path_factory.mktemp("runs") / "sup")


def test_pretrain_writes_the_run_directory(supervised_run: Path) -> None:
    assert (supervised_run / "recipe.yaml").is_file()
    assert (supervised_run / "backbone" / "config.json").is_file()
    assert list((supervised_run / "checkpoints").glob("step-*"))
    lines = [json.loads(line) for line in (supervised_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert {"step", "epoch", "loss", "lr", "images_per_sec"} <= set(lines[0])
    resolved = (supervised_run / "recipe.yaml").read_text()
    assert "max_steps: 3" in resolved and "embed_dim: 32" in resolved


def test_pretrain_export_has_a_model_card(supervised_run: Path) -> None:
    card = (supervised_run / "backbone" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "| images seen | 96 |" in card


def test_probe_json_and_eval_file(supervised_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", str(supervised_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["top1"] <= 1.0 and result["n_train"] == 1257 and result["n_test"] == 540
    assert json.loads((supervised_run / "eval" / "linear_probe.json").read_text())["top1"] == result["top1"]


def test_export_command(supervised_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(supervised_run), "--out", str(tmp_path / "exp")]) == 0
    assert main(["probe", str(tmp_path / "exp"), "--json"]) == 0
    from_export = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_export["n_test"] == 540


@pytest.mark.parametrize(
    "args, expected",
    [
        (["pretrain", "digits/supervised", "optim.lrr=1"], "did you mean 'optim.lr'"),
        (["pretrain", "digits/supervised", "optim.lr"], "key=value"),
        (["pretrain", "no/such"], "not found"),
        (["pretrain", "digits/supervised", "objective.name=nope"], "unknown"),
        (["probe", "/no/such/dir"], "does not exist"),
        (["export", "/no/such/dir", "--out", "x"], "not a run directory"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args: list[str], expected: str) -> None:
    proc = run_cli(args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in proc.stderr


def test_help_and_version() -> None:
    proc = run_cli(["--help"])
    assert proc.returncode == 0 and "pretrain" in proc.stdout and "probe" in proc.stdout
    assert run_cli(["--version"]).stdout.startswith("ssl-vit ")
    assert "key=value" in run_cli(["pretrain", "--help"]).stdout


def test_overrides_may_follow_options(tmp_path: Path) -> None:
    """`key=value` words after `--out` or `--quiet` are overrides too, as users write them."""
    out = tmp_path / "late"
    assert (
        main(["pretrain", "digits/supervised", "--out", str(out), *TINY, "--quiet", "train.max_steps=2"]) == 0
    )
    resolved = (out / "recipe.yaml").read_text()
    assert "max_steps: 2" in resolved and "embed_dim: 32" in resolved
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    with pytest.raises(SystemExit):  # anything else unknown is still refused
        main(["pretrain", "digits/supervised", "--out", str(out), "--bogus"])
