"""The training loop on accelerate: devices, processes, precision, schedules, safety, logs, resume.

It knows objectives only through the `Objective` protocol: `forward(batch) -> (loss, logs)` plus the
named hooks. One loop for every objective; no `if objective == ...` here. `fit` strings together
the named parts that live next to it: `train_step` and `BadStepGuard` (`step.py`), `Teacher`
(`ema.py`), `Reporter` (`metrics.py`), `CheckpointPolicy` (`policy.py`), `BatchStream`
(`stream.py`, the data position), `StopRequest` (`signals.py`) and the set-up (`setup.py`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed

from ssl_vit.config import CkptConfig, LogConfig, OptimConfig, TrainConfig
from ssl_vit.engine.ema import Teacher
from ssl_vit.engine.metrics import Reporter, Reporting
from ssl_vit.engine.policy import CheckpointPolicy
from ssl_vit.engine.samples import SampleLog
from ssl_vit.engine.setup import (
    check_config,
    ensure_writable,
    make_accelerator,
    make_optimizer,
    make_plan,
    processes,
    schedules,
    use_cpu,
)
from ssl_vit.engine.signals import StopRequest, TrainingInterrupted
from ssl_vit.engine.step import BadStepGuard, StepResult, train_step
from ssl_vit.engine.stream import BatchStream, Loader
from ssl_vit.objectives.base import Objective
from ssl_vit.rundir import RunDir

__all__ = [
    "FitConfig",
    "FitResult",
    "Reporting",
    "TrainingInterrupted",
    "ensure_writable",
    "fit",
    "processes",
    "use_cpu",
]


@dataclass
class FitConfig:
    """The recipe's sections the engine reads, as they are, and the run's seed."""

    optim: OptimConfig
    train: TrainConfig
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0


@dataclass
class FitResult:
    steps: int
    images_seen: int
    seconds: float  # training-loop wall time over every (re)start of the run
    final_loss: float
    checkpoint: Path | None


def fit(
    objective: Objective,
    loader: Loader,
    cfg: FitConfig,
    run_dir: Path,
    *,
    resume: Path | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    report: Reporting | None = None,
) -> FitResult:
    """Train `objective`; write `metrics.jsonl`, `train_state.json` and `checkpoints/` into `run_dir`.

    `len(loader)` is its batches per epoch on this process (a map-style DataLoader is re-sharded by
    accelerate, and its sharded length wins). `resume` is a checkpoint folder to continue from
    exactly. `optimizer`, when given, replaces AdamW over `param_groups` (fine-tuning passes timm's
    layer-decay groups); a group's `lr_scale` multiplies the scheduled lr either way. `report` adds
    counters, an online monitor and the progress bar (`Reporting`). Raises `TrainingError` after
    `train.max_bad_steps` non-finite steps in a row and `TrainingInterrupted` after SIGTERM/SIGINT
    (checkpoint written).
    """
    optim, train = cfg.optim, cfg.train
    check_config(optim, train, cfg.ckpt, cfg.log)
    accelerator = make_accelerator(train, optim, cfg.log, run_dir, cfg.seed)
    if accelerator.is_main_process:
        ensure_writable(run_dir)
    set_seed(cfg.seed, device_specific=True)  # each process its own augmentation/masking draws
    stream = BatchStream(accelerator, loader, len(loader), cfg.seed)
    plan = make_plan(accelerator, stream, optim, train)
    if optimizer is None:  # a caller's own keeps its groups (fine-tuning: timm's layer-decay factory)
        optimizer = make_optimizer(objective, optim, plan.lr)
    model, optimizer = accelerator.prepare(objective, optimizer)
    inner: Objective = accelerator.unwrap_model(model)
    teacher = Teacher(inner)
    run = RunDir(run_dir)
    saver = CheckpointPolicy(accelerator, model, optimizer, run, plan, cfg.ckpt)
    state = saver.start(resume)
    stream.seek(state.epoch, state.batch_in_epoch)  # where the checkpoint left the data
    samples = SampleLog(accelerator, run, cfg.log.sample_keys, state.step)
    reporter = Reporter(accelerator, run, cfg.log, plan.total_steps, state, report or Reporting())
    guard = BadStepGuard(train.max_bad_steps, warn=accelerator.is_main_process)
    result: StepResult | None = None
    lap = time.perf_counter()
    model.train()
    with StopRequest() as stop_request, reporter, samples:
        while state.step < plan.total_steps:
            step = state.step
            hyper = schedules(plan, optim, step)  # (lr, weight decay)
            at = (step, plan.total_steps, plan.updates_per_epoch)  # for Objective.set_progress
            stop = stop_request.signum is not None
            result = train_step(accelerator, model, inner, optimizer, stream, optim, at, hyper, stop)
            momentum = teacher.update(result.applied, step, plan.total_steps)
            state.step += 1
            state.epoch, state.batch_in_epoch = stream.epoch, stream.batch_in_epoch
            samples.write(state.step, stream.take_keys())  # before this step's checkpoint
            state.images_seen += result.images * accelerator.num_processes
            guard.count(result, state)
            reporter.step(result, state, (*hyper, momentum))
            guard.check(state, saver.last)
            state.train_seconds += time.perf_counter() - lap
            lap = time.perf_counter()
            if result.stop:  # every process saves, then stops
                reporter.close()
                raise TrainingInterrupted(stop_request.signum or 15, state.step, str(saver.save(state)))
            saver.periodic(state)
    state.train_seconds += time.perf_counter() - lap
    saver.finish(state, inner)
    reporter.end()
    accelerator.wait_for_everyone()
    final_loss = float(result.loss) if result is not None else math.nan
    return FitResult(state.step, state.images_seen, state.train_seconds, final_loss, saver.last)
