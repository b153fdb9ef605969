"""The training loop on accelerate: devices, processes, precision, schedules, safety, logs, resume.

It knows objectives only through the `Objective` protocol: `forward(batch) -> (loss, logs)` plus the
named hooks. One loop for every objective; no `if objective == ...` here. The pieces it strings
together live next to it: `step.py` (accumulation and the guarded update), `stream.py` (data
position), `state.py` (what a checkpoint holds), `ema.py`, `metrics.py`, `signals.py`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object, set_seed

from ssl_vit.config import CkptConfig, LogConfig, OptimConfig, TrainConfig
from ssl_vit.engine.ema import check_pairs, ema_update
from ssl_vit.engine.metrics import MetricsWriter, metrics_record, monitor_record, progress_bar, write_json
from ssl_vit.engine.setup import (
    check_config,
    ensure_writable,
    make_accelerator,
    make_plan,
    processes,
    use_cpu,
)
from ssl_vit.engine.signals import StopRequest, TrainingInterrupted
from ssl_vit.engine.state import TrainState, load_training_state, save_training_state
from ssl_vit.engine.step import StepResult, train_step
from ssl_vit.engine.stream import BatchStream
from ssl_vit.errors import TrainingError
from ssl_vit.objectives.base import Objective
from ssl_vit.optim import adamw, cosine_schedule, param_groups
from ssl_vit.rundir import RunDir, weights_digest
from ssl_vit.types import Batch

log = logging.getLogger(__name__)

__all__ = ["FitResult", "TrainingInterrupted", "ensure_writable", "fit", "processes", "use_cpu"]


@dataclass
class FitResult:
    steps: int
    images_seen: int
    seconds: float  # training-loop wall time over every (re)start of the run
    final_loss: float
    checkpoint: Path | None


def fit(
    objective: Objective,
    loader: Iterable[Batch],
    steps_per_epoch: int,
    optim: OptimConfig,
    train: TrainConfig,
    ckpt: CkptConfig,
    logcfg: LogConfig,
    run_dir: Path,
    seed: int,
    progress: bool = True,
    *,
    resume: Path | None = None,
    data_stats: Callable[[], dict[str, float]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    monitor: Callable[[], dict[str, float]] | None = None,
    monitor_every: int = 0,
) -> FitResult:
    """Train `objective`; write `metrics.jsonl`, `train_state.json` and `checkpoints/` into `run_dir`.

    `steps_per_epoch` is the loader's batches per epoch on this process (a map-style DataLoader is
    re-sharded by accelerate, and its sharded length wins). `resume` is a checkpoint folder to
    continue from exactly. `data_stats`, when given, returns counters (e.g. skipped corrupt
    samples) logged with each metrics record. `optimizer`, when given, replaces AdamW over
    `param_groups` (fine-tuning passes timm's layer-decay groups); a group's `lr_scale` multiplies
    the scheduled lr either way. `monitor`, when given (the caller passes it to the main process
    only), measures the current weights (e.g. online k-NN and RankMe) every `monitor_every` steps and
    at the last; its values join that step's metrics record, which is written even off the
    `log.every_steps` grid (every process gets the same `monitor_every`, so all of them take part in
    the record's all-reduce; the others wait there while the main process measures). Its time is in
    the run's seconds, not in `images_per_sec`. Raises `TrainingError` after `train.max_bad_steps`
    non-finite steps in a row and `TrainingInterrupted` after SIGTERM/SIGINT (checkpoint written).
    """
    check_config(optim, train, ckpt, logcfg)
    accelerator = make_accelerator(train, optim, logcfg, run_dir, seed)
    if accelerator.is_main_process:
        ensure_writable(run_dir)
    set_seed(seed, device_specific=True)  # each process its own augmentation/masking draws
    stream = BatchStream(accelerator, loader, steps_per_epoch, seed)
    plan = make_plan(accelerator, stream, optim, train)
    if optimizer is None:  # a caller's own keeps its groups (fine-tuning: timm's layer-decay factory)
        groups = param_groups(objective, optim.weight_decay, objective.no_weight_decay(), optim.layer_decay)
        optimizer = adamw(groups, plan.lr, (optim.betas[0], optim.betas[1]))
    model, optimizer = accelerator.prepare(objective, optimizer)
    inner: Objective = accelerator.unwrap_model(model)
    pairs = inner.ema_pairs()
    check_pairs(inner, pairs)

    state = TrainState(num_processes=accelerator.num_processes)
    history: list[dict[str, Any]] = []
    if resume is not None:
        state, meta = load_training_state(accelerator, model, optimizer, resume)
        history = list(meta.get("history", []))
        stream.seek(state.epoch, state.batch_in_epoch)
        log.info("resumed from %s (step %d, epoch %d)", resume, state.step, state.epoch)
    history.append({"start_step": state.step, "num_processes": plan.num_processes, "time": time.time()})
    run = RunDir(run_dir)
    metrics = MetricsWriter(run.metrics_file, accelerator.is_main_process)
    metrics.truncate_after(state.step)
    if accelerator.is_main_process:
        write_json(run.train_state_file, {**asdict(plan), "history": history})
    if logcfg.tensorboard:
        accelerator.init_trackers("tensorboard")

    def save() -> Path:
        meta = {"plan": asdict(plan), "history": history}
        return save_training_state(
            accelerator, model, optimizer, state, run.checkpoints, ckpt.keep_last, meta
        )

    wd_end = optim.weight_decay if optim.weight_decay_end is None else optim.weight_decay_end
    result: StepResult | None = None
    last_saved: Path | None = resume
    tick, images_since_log, start_step = time.perf_counter(), 0, state.step
    start = tick
    bar = progress_bar(plan.total_steps, state.step, progress and accelerator.is_main_process)
    model.train()
    with StopRequest() as stop_request:
        while state.step < plan.total_steps:
            step = state.step
            lr = cosine_schedule(step, plan.total_steps, plan.lr, plan.min_lr, plan.warmup_steps)
            wd = cosine_schedule(step, plan.total_steps, optim.weight_decay, wd_end)
            result = train_step(
                accelerator,
                model,
                inner,
                optimizer,
                stream,
                optim.accum_steps,
                (step, plan.total_steps, plan.updates_per_epoch),
                (lr, wd),
                optim.clip_grad,
                stop_request.signum is not None,
            )
            momentum = math.nan
            if result.applied:
                if pairs:
                    momentum = inner.ema_momentum(step, plan.total_steps)
                    ema_update(pairs, momentum)
                inner.after_optimizer_step()
            state.step += 1
            state.epoch, state.batch_in_epoch = stream.epoch, stream.batch_in_epoch
            state.images_seen += result.images * accelerator.num_processes
            images_since_log += result.images * accelerator.num_processes
            state.bad_in_a_row = state.bad_in_a_row + 1 if result.non_finite else 0
            state.skipped_steps += int(result.non_finite)
            if result.non_finite and accelerator.is_main_process:
                log.warning(
                    "step %d: non-finite loss or gradient (loss %.4g, grad norm %.4g); update skipped "
                    "(%d in a row)",
                    state.step,
                    float(result.loss),
                    result.grad_norm,
                    state.bad_in_a_row,
                )
            bar.update(1)
            last = state.step == plan.total_steps
            measure = monitor_every > 0 and (state.step % monitor_every == 0 or last)
            if state.step % logcfg.every_steps == 0 or last or measure:
                now = time.perf_counter()
                rate = images_since_log / max(now - tick, 1e-9)
                record = metrics_record(accelerator, result, state, (lr, wd, momentum), rate)
                if data_stats is not None:
                    record.update({f"data_{k}": v for k, v in data_stats().items()})
                if measure and monitor is not None:
                    record.update(monitor_record(monitor))
                    now = time.perf_counter()  # measuring is not training throughput
                metrics.write(record)
                if logcfg.tensorboard:
                    accelerator.log(record, step=state.step)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_sec']:.0f}"
                )
                tick, images_since_log = now, 0
            if state.bad_in_a_row >= train.max_bad_steps:
                bar.close()
                good = f"; last good checkpoint {last_saved}" if last_saved else ""
                raise TrainingError(
                    f"loss or gradient non-finite for {state.bad_in_a_row} steps in a row at step "
                    f"{state.step}{good}; lower optim.lr or set optim.clip_grad"
                )
            state.train_seconds += time.perf_counter() - start
            start = time.perf_counter()
            if result.stop:
                bar.close()
                path = save()
                raise TrainingInterrupted(stop_request.signum or 15, state.step, str(path))
            periodic = ckpt.every_steps and state.step % ckpt.every_steps == 0
            if periodic and state.step < plan.total_steps and state.bad_in_a_row == 0:
                last_saved = save()
    bar.close()
    state.train_seconds += time.perf_counter() - start
    if state.step > start_step or last_saved is None:  # not when resuming a finished run
        last_saved = save()
    if accelerator.num_processes > 1:  # DDP keeps every process's weights equal; check it
        digests = gather_object([weights_digest(inner)])
        if accelerator.is_main_process:
            if len(set(digests)) > 1:
                log.error("processes ended with different weights: %s", digests)
            train_state = {**asdict(plan), "history": history, "weights_sha256": digests}
            write_json(run.train_state_file, train_state)
    if logcfg.tensorboard:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    final_loss = float(result.loss) if result is not None else math.nan
    return FitResult(state.step, state.images_seen, state.train_seconds, final_loss, last_saved)
