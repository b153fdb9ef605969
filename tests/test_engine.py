"""The engine on digits: exact resume after SIGKILL, safety stops, accumulation, EMA, processes."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from ssl_vit.cli import main
from ssl_vit.config import LogConfig, OptimConfig, TrainConfig
from ssl_vit.engine.stream import BatchStream
from ssl_vit.types import Batch
from tests.conftest import REPO, TINY

# lr 1e-3, min_lr 1e-5 come from recipes/digits/supervised.yaml
RUN = [*TINY, "train.max_steps=30", "ckpt.every_steps=5", "optim.warmup_steps=5"]


def env_one_thread() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # as conftest sets in-process: same float results


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["pretrain", "digits/supervised", *RUN, "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_gives_the_uninterrupted_weights(
    reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "ssl_vit",
        "pretrain",
        "digits/supervised",
        *RUN,
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env_one_thread(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 7):  # past step-5
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts and "step-00000030" not in ckpts
    # A later checkpoint cut short mid-write must be ignored in favour of the previous one.
    last = int(ckpts[-1][len("step-") :])
    damaged = out / "checkpoints" / f"step-{last + 5:08d}"
    shutil.copytree(out / "checkpoints" / f"step-{last:08d}", damaged)
    (damaged / "optimizer.pt").write_bytes(b"cut short")
    partial = out / "checkpoints" / f".tmp-step-{last + 10:08d}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)

    assert (
        main(["pretrain", "digits/supervised", *RUN, "--out", str(out), "--resume", "auto", "--quiet"]) == 0
    )

    final, expected = weights(out, 30), weights(reference, 30)
    assert final.keys() == expected.keys()
    assert max((final[k] - expected[k]).abs().max().item() for k in final) <= 1e-6
    got, want = records(out), records(reference)
    assert [r["step"] for r in got] == list(
        range(1, 31)
    )  # what the killed run logged past its checkpoint is dropped
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-6)
    history = json.loads((out / "train_state.json").read_text())["history"]
    assert [h["start_step"] for h in history] == [0, last]  # resumed before the damaged one


def test_lr_follows_warmup_then_cosine(reference: Path) -> None:
    peak, floor, warmup, total = 1e-3, 1e-5, 5, 30

    def closed_form(s: int) -> float:
        if s < warmup:
            return peak * s / warmup
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))

    by_step = {r["step"]: r["lr"] for r in records(reference)}
    for step in (1, 3, 6, 7, 18, 30):  # record `step` holds the lr of update number step - 1
        assert by_step[step] == pytest.approx(closed_form(step - 1), rel=1e-12, abs=1e-15)
    state = json.loads((reference / "train_state.json").read_text())
    assert state["global_batch"] == 32 and state["lr"] == peak and state["total_steps"] == total


def test_non_finite_loss_is_skipped_then_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ssl_vit.objectives.supervised import Supervised

    real, calls = Supervised.forward, [0]

    def forward(self: Supervised, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        calls[0] += 1
        loss, logs = real(self, batch)
        return (loss * math.nan if calls[0] == 3 or calls[0] >= 6 else loss), logs

    monkeypatch.setattr(Supervised, "forward", forward)
    out = tmp_path / "run"
    args = ["train.max_steps=20", "ckpt.every_steps=2", "ckpt.keep_last=5", "train.max_bad_steps=3"]
    assert main(["pretrain", "digits/supervised", *TINY, *args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "non-finite for 3 steps in a row at step 8" in err[-1]
    assert [r["skipped_steps"] for r in records(out)] == [0, 0, 1, 1, 1, 2, 3, 4]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000002", "step-00000004"]  # none written during the bad streak
    last = weights(out, 4)
    assert all(torch.isfinite(t).all() for t in last.values())
    assert not (out / "summary.json").exists()


def test_sigterm_writes_a_checkpoint_and_exits_then_resume_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ssl_vit.data

    calls = [0]

    def skip_counts() -> dict[str, int]:  # the data module's counters, called at each log step
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"skipped": 0}

    monkeypatch.setattr(ssl_vit.data, "skip_counts", skip_counts, raising=False)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["pretrain", "digits/supervised", *TINY, "train.max_steps=8", "--out", str(out), "--quiet"])
    assert stopped.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SIGTERM at step 4" in err[0] and f"--resume {out}" in err[0]
    assert (out / "checkpoints" / "step-00000004" / "meta.json").is_file()
    assert records(out)[0]["data_skipped"] == 0

    # Without --resume, an unfinished run is not overwritten; a resume may not change the recipe.
    assert main(["pretrain", "digits/supervised", *TINY, "--out", str(out), "--quiet"]) == 2
    assert "unfinished run" in capsys.readouterr().err
    assert main(["pretrain", "--resume", str(out), "optim.lr=0.5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr" in err[0] and "only train.epochs and train.max_steps" in err[0]

    assert main(["pretrain", "--resume", str(out), "train.max_steps=8", "--quiet"]) == 0
    assert [r["step"] for r in records(out)] == list(range(1, 9))
    assert json.loads((out / "summary.json").read_text())["steps"] == 8


def test_accumulating_two_batches_of_8_gives_the_gradients_of_one_batch_of_16(tmp_path: Path) -> None:
    from ssl_vit.backbone import Backbone
    from ssl_vit.engine.setup import make_accelerator
    from ssl_vit.engine.step import forward_backward
    from ssl_vit.objectives import build
    from tests.conftest import tiny_model_config

    objective = build({"name": "supervised"}, Backbone.from_config(tiny_model_config()), num_classes=10)
    images, labels = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))

    def gradients(accum: int) -> dict[str, torch.Tensor]:
        optim = OptimConfig(accum_steps=accum)
        accelerator = make_accelerator(TrainConfig(cpu=True), optim, LogConfig(), tmp_path, 0)
        model = accelerator.prepare(copy.deepcopy(objective))
        size = 16 // accum
        for i in range(accum):
            part = slice(i * size, (i + 1) * size)
            forward_backward(accelerator, model, model, Batch([images[part]], labels[part]), (0, 1, 1))
            assert accelerator.sync_gradients == (i == accum - 1)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, accumulated = gradients(1), gradients(2)
    assert whole.keys() == accumulated.keys() and len(whole) > 10
    for name, grad in whole.items():
        torch.testing.assert_close(accumulated[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_ema_teacher_follows_the_scheduled_momentum_and_is_checkpointed(tmp_path: Path) -> None:
    from ssl_vit.backbone import Backbone
    from ssl_vit.config import DataConfig
    from ssl_vit.data import train_loader
    from ssl_vit.engine.loop import FitConfig, Reporting, fit
    from ssl_vit.objectives.supervised import Supervised, SupervisedConfig
    from ssl_vit.optim import cosine_schedule
    from tests.conftest import tiny_model_config

    class WithTeacher(Supervised):
        def __init__(self) -> None:
            super().__init__(Backbone.from_config(tiny_model_config()), SupervisedConfig(num_classes=10))
            self.teacher = copy.deepcopy(self.head).requires_grad_(False)

        def ema_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
            return [(self.head, self.teacher)]

        def ema_momentum(self, step: int, total_steps: int) -> float:
            return cosine_schedule(step, total_steps, 0.5, 1.0)

    objective = WithTeacher()
    snapshots = [(objective.head.weight.clone(), objective.teacher.weight.clone())]

    def snapshot() -> dict[str, float]:  # called after each step's update and EMA (log every step)
        snapshots.append((objective.head.weight.clone(), objective.teacher.weight.clone()))
        return {}

    loader = train_loader(DataConfig(hflip=False), objective.views(), 16, 1, 16, 0)
    cfg = FitConfig(OptimConfig(lr=1e-2), TrainConfig(max_steps=4, cpu=True), log=LogConfig(every_steps=1))
    fit(objective, loader, cfg, tmp_path, report=Reporting(progress=False, data_stats=snapshot))
    for step in range(1, 5):
        m = cosine_schedule(step - 1, 4, 0.5, 1.0)
        online, teacher = snapshots[step]
        torch.testing.assert_close(teacher, m * snapshots[step - 1][1] + (1 - m) * online)
    saved = weights(tmp_path, 4)
    torch.testing.assert_close(saved["teacher.weight"], snapshots[-1][1])
    assert records(tmp_path)[0]["ema_momentum"] == pytest.approx(0.5)


class _Indices(Dataset[int]):
    def __init__(self, n: int = 40) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def _batches(indices: list[int]) -> Batch:
    return Batch(views=[torch.zeros(len(indices), 1)], labels=torch.tensor(indices))


class _OneRank:
    """The part of an Accelerator that BatchStream uses, for rank `rank` of a pretend world."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.device = rank, world, torch.device("cpu")
        self.num_processes = world

    def prepare_data_loader(self, loader: DataLoader[int], device_placement: bool = False) -> Any:
        from accelerate.data_loader import prepare_data_loader

        return prepare_data_loader(
            loader, num_processes=self.world, process_index=self.rank, use_seedable_sampler=True, data_seed=7
        )

    def skip_first_batches(self, loader: Any, n: int) -> Any:
        from accelerate.data_loader import skip_first_batches

        return skip_first_batches(loader, n)


def _stream(rank: int = 0, world: int = 1, batch: int = 4, n: int = 40) -> BatchStream:
    loader = DataLoader(_Indices(n), batch_size=batch, shuffle=True, drop_last=True, collate_fn=_batches)
    return BatchStream(_OneRank(rank, world), loader, len(loader), seed=7)  # type: ignore[arg-type]


def _take(stream: Iterator[Batch], n: int) -> list[list[int]]:
    return [next(stream).labels.tolist() for _ in range(n)]


def test_stream_shards_ranks_and_resumes_at_any_position() -> None:
    ranks = [_stream(r, 2) for r in range(2)]
    assert ranks[0].batches_per_epoch == 5
    seen = [i for s in ranks for batch in _take(s, 5) for i in batch]
    assert sorted(seen) == list(range(40))  # each rank its own samples, together the epoch

    whole = _take(_stream(), 25)  # 2.5 epochs of 10 batches
    assert sorted(sum(whole[:10], [])) == sorted(sum(whole[10:20], [])) and whole[:10] != whole[10:20]
    for epoch, offset in [(0, 3), (1, 0), (1, 7), (0, 10)]:
        resumed = _stream()
        resumed.seek(epoch, offset)
        rng = torch.get_rng_state()
        start = epoch * 10 + offset
        assert _take(resumed, 5) == whole[start : start + 5]
        assert torch.equal(torch.get_rng_state(), rng)  # opening and skipping draw nothing


def test_map_style_order_and_position_are_the_same_at_any_number_of_processes() -> None:
    one = _take(_stream(batch=8, n=44), 10)  # 5 steps an epoch: 44 // 8, the last 4 dropped
    for world in (2, 4):
        ranks = [_stream(r, world, batch=8 // world, n=44) for r in range(world)]
        assert ranks[0].batches_per_epoch == 5  # accelerate would pad a 6th step from the start
        steps = zip(*(_take(s, 10) for s in ranks), strict=True)
        assert [sum(step, []) for step in steps] == one
        resumed = [_stream(r, world, batch=8 // world, n=44) for r in range(world)]
        for s in resumed:
            s.seek(0, 3)  # 3 micro-batches of 8 in, whatever the process count
        assert [sum(step, []) for step in zip(*(_take(s, 4) for s in resumed), strict=True)] == one[3:7]


class _Streaming:
    """An iterable loader in the style of WebDataset: set_epoch, len, augmentation from torch's RNG."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 3

    def __iter__(self) -> Iterator[Batch]:
        for i in range(3):
            yield Batch(views=[torch.rand(1)], labels=torch.tensor([self.epoch * 10 + i]))


def test_stream_skips_an_iterable_by_reading_it_without_moving_the_rng() -> None:
    stream = BatchStream(_OneRank(0, 1), _Streaming(), 3, seed=0)  # type: ignore[arg-type]
    stream.seek(1, 2)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    batch = next(stream)
    assert batch.labels.tolist() == [12] and torch.equal(batch.views[0], expected)
    assert next(stream).labels.tolist() == [20]


@pytest.mark.slow
def test_two_cpu_processes_under_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [
        "-m",
        "ssl_vit",
        "pretrain",
        "digits/supervised",
        *TINY,
        "train.batch_size=16",
        "train.max_steps=3",
    ]
    proc = subprocess.run(
        [*cmd, "--out", str(out), "--quiet"], cwd=REPO, env=env_one_thread(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "train_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_batch"] == 32
    assert state["batches_per_epoch"] == 1257 // 16 // 2  # accelerate shards the loader by rank
    digests = state["weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # identical weights on both ranks
    assert [r["step"] for r in records(out)] == [1, 2, 3]  # one writer
    assert [r["images_seen"] for r in records(out)] == [32, 64, 96]


def test_unwritable_run_dir_and_missing_tensorboard_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from accelerate.utils import is_tensorboard_available

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["pretrain", "digits/supervised", *TINY, "--out", str(blocker / "run"), "--quiet"]) == 2
    assert "not writable" in capsys.readouterr().err
    if not is_tensorboard_available():
        args = [*TINY, "log.tensorboard=true", "train.max_steps=1"]
        assert main(["pretrain", "digits/supervised", *args, "--out", str(tmp_path / "tb"), "--quiet"]) == 2
        assert "pip install tensorboard" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_cuda_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["digits/supervised", *TINY, "train.mixed_precision=bf16", "ckpt.every_steps=2"]
    assert main(["pretrain", *args, "train.max_steps=2", "--out", str(out), "--quiet"]) == 0
    assert main(["pretrain", "--resume", str(out), "train.max_steps=4", "--quiet"]) == 0
    state = json.loads((out / "train_state.json").read_text())
    assert state["device"].startswith("cuda") and state["mixed_precision"] == "bf16"
    got = records(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in got)
    assert got[-1]["peak_mem_mb"] > 0


def test_ema_update_matches_the_formula_and_copies_buffers() -> None:
    from ssl_vit.engine.ema import ema_update

    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    online[1].running_mean.fill_(0.5)
    expected = {
        name: 0.9 * t.detach().clone() + 0.1 * o.detach()
        for (name, t), (_, o) in zip(teacher.named_parameters(), online.named_parameters(), strict=True)
    }
    ema_update([(online, teacher)], momentum=0.9)
    for name, param in teacher.named_parameters():
        torch.testing.assert_close(param, expected[name])
    torch.testing.assert_close(teacher[1].running_mean, torch.full((3,), 0.5))
