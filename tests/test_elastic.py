"""An elastic resume under torchrun on CPU: stopped mid-epoch on 2 processes and resumed on 1 (and
1 -> 2), the run consumes exactly the samples and the order of an uninterrupted 1-process run, and
`log.sample_keys` lists them. A global batch the new process count cannot divide exits with 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import webdataset as wds

from ssl_vit.cli import main
from ssl_vit.config import DataConfig
from ssl_vit.data import train_loader
from ssl_vit.data.sources import resolve
from ssl_vit.engine.policy import check_micro_batch, resume_batch
from ssl_vit.errors import CheckpointError, RecipeError
from ssl_vit.rundir import RunDir, read_sample_keys
from ssl_vit.types import ViewSpec
from tests.conftest import REPO

# digits: 1257 train images; a global batch of 32 gives 39 steps an epoch and drops 9 images.
ARGS = [
    "model.embed_dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "log.sample_keys=true",
    "log.every_steps=5",
    "ckpt.every_steps=10",
    "ckpt.keep_last=3",
    "eval.online_every_steps=0",
]
STOP, END, EPOCH_STEPS = 25, 45, 1257 // 32


def torchrun(args: list[str], nproc: int) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, "-m", "ssl_vit", *args], cwd=REPO, env=env, capture_output=True, text=True)


def pretrain(args: list[str], nproc: int) -> None:
    if nproc == 1:
        assert main(args) == 0
    else:
        proc = torchrun(args, nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]


def keys_by_rank(run: Path) -> dict[int, list[tuple[int, int, str]]]:
    return {int(p.stem[5:]): read_sample_keys(p) for p in RunDir(run).sample_files()}


def merged(run: Path) -> list[tuple[int, int, str]]:
    """The run's samples in global order: per step, rank 0's lines, then rank 1's."""
    ranks = keys_by_rank(run)
    steps = sorted({step for rows in ranks.values() for step, _, _ in rows})
    return [row for step in steps for r in sorted(ranks) for row in ranks[r] if row[0] == step]


@pytest.fixture(scope="module")
def train_keys() -> set[str]:
    urls = resolve("digits").urls
    return {s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, int, str]]:
    out = tmp_path_factory.mktemp("elastic") / "one"
    pretrain(["pretrain", "digits/supervised", *ARGS, "train.batch_size=32", f"train.max_steps={END}",
              "--out", str(out), "--quiet"], 1)  # fmt: skip
    return merged(out)


def stopped_then_resumed(
    tmp_path: Path, before: int, after: int
) -> tuple[Path, dict[int, int], dict[int, int]]:
    """Train to step STOP on `before` processes, drop its last checkpoint (as if killed after step 20's
    checkpoint, with 5 more steps in the sample files), resume to END on `after` processes."""
    out = tmp_path / "run"
    batch = 32 // before
    pretrain(["pretrain", "digits/supervised", *ARGS, f"train.batch_size={batch}", f"train.max_steps={STOP}",
              "--out", str(out), "--quiet"], before)  # fmt: skip
    lines_before = {r: len(rows) for r, rows in keys_by_rank(out).items()}
    shutil.rmtree(out / "checkpoints" / f"step-{STOP:08d}")
    pretrain(["pretrain", "--resume", str(out), f"train.max_steps={END}", "--quiet"], after)
    return out, lines_before, {r: len(rows) for r, rows in keys_by_rank(out).items()}


def check_exact(
    out: Path,
    want: list[tuple[int, int, str]],
    train_keys: set[str],
    before: dict[int, int],
    after: dict[int, int],
) -> None:
    got = merged(out)
    epoch0 = [key for _, epoch, key in got if epoch == 0]
    duplicates = sum(n - 1 for n in Counter(epoch0).values())
    missing = train_keys - set(epoch0)
    want_missing = train_keys - {key for _, epoch, key in want if epoch == 0}
    figures = (
        f"lines per rank before the resume {before}, after {after}; epoch 0: {len(epoch0)} keys, "
        f"{duplicates} duplicates, {len(missing)} missing (the dropped remainder; 1 process: {len(want_missing)})"
    )
    print(figures)
    assert duplicates == 0 and missing == want_missing and len(missing) == 1257 - 32 * EPOCH_STEPS, figures
    assert [key for _, _, key in got] == [key for _, _, key in want], figures  # the same order
    assert [(step, epoch) for step, epoch, _ in got] == [(step, epoch) for step, epoch, _ in want]


@pytest.mark.slow
def test_two_processes_stopped_mid_epoch_resume_on_one_exactly(
    tmp_path: Path, uninterrupted: list[tuple[int, int, str]], train_keys: set[str]
) -> None:
    out, before, after = stopped_then_resumed(tmp_path, 2, 1)
    assert before == {0: 16 * STOP, 1: 16 * STOP}
    assert after == {0: 16 * 20 + 32 * (END - 20), 1: 16 * 20}  # rank 1's steps 21-25 cut back
    check_exact(out, uninterrupted, train_keys, before, after)


@pytest.mark.slow
def test_one_process_stopped_mid_epoch_resumes_on_two_exactly(
    tmp_path: Path, uninterrupted: list[tuple[int, int, str]], train_keys: set[str]
) -> None:
    out, before, after = stopped_then_resumed(tmp_path, 1, 2)
    assert before == {0: 32 * STOP}
    assert after == {0: 32 * 20 + 16 * (END - 20), 1: 16 * (END - 20)}
    check_exact(out, uninterrupted, train_keys, before, after)


@pytest.mark.slow
def test_a_global_batch_the_new_process_count_cannot_divide_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "odd"
    pretrain(["pretrain", "digits/supervised", *ARGS, "train.batch_size=15", "train.max_steps=1",
              "--out", str(out), "--quiet"], 1)  # fmt: skip
    proc = torchrun(["pretrain", "--resume", str(out), "train.max_steps=2", "--quiet"], 2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]  # torchrun's report
    assert errors and len(set(errors)) == 1, proc.stderr[-3000:]  # one line (per process torchrun let finish)
    assert "global batch of 15 images per micro-batch" in errors[0] and "divides 15" in errors[0]


def test_sample_keys_are_written_per_optimiser_step_in_the_loaders_order(tmp_path: Path) -> None:
    out = tmp_path / "accum"
    args = [*ARGS, "train.batch_size=8", "optim.accum_steps=2", "train.max_steps=3"]
    assert main(["pretrain", "digits/supervised", *args, "--out", str(out), "--quiet"]) == 0
    rows = read_sample_keys(RunDir(out).sample_file(0))
    assert [step for step, _, _ in rows] == [1] * 16 + [2] * 16 + [3] * 16  # 2 micro-batches a step
    loader = train_loader(DataConfig(), ViewSpec(), 16, 1, 8, seed=0)
    first_six = [batch.keys for _, batch in zip(range(6), loader, strict=False)]
    assert [key for _, _, key in rows] == sum(first_six, [])


def test_a_resume_keeps_the_global_micro_batch_or_says_why_not(tmp_path: Path) -> None:
    saved, ckpt = {"per_device_batch": 16, "num_processes": 2}, tmp_path / "step-00000020"
    assert [resume_batch(saved, n, ckpt) for n in (1, 2, 4, 32)] == [32, 16, 8, 1]
    assert resume_batch({}, 3, ckpt) is None  # a checkpoint without a plan: the recipe's batch
    with pytest.raises(RecipeError, match=r"on 3 processes: its global batch of 32 .* divides 32$"):
        resume_batch(saved, 3, ckpt)
    plan: Any = SimpleNamespace(per_device_batch=16, num_processes=1)  # fit with the recipe's batch
    with pytest.raises(CheckpointError, match=r"2 process\(es\) x 16 images .* this run has 1 x 16"):
        check_micro_batch(saved, plan, ckpt)
