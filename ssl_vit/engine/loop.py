"""The training loop on accelerate: devices, processes, precision, schedules, safety, logs, resume.

It knows objectives only through the `Objective` protocol: `forward(batch) -> (loss, logs)` plus the
named hooks. One loop for every objective; no `if objective == ...` here. The pieces it strings
together live next to it: `step.py` (accumulation and the guarded update), `stream.py` (data
position), `state.py` (what a checkpoint holds), `ema.py`, `metrics.py`, `signals.py`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    gather_object,
    is_tensorboard_available,
    set_seed,
)

from ssl_vit.config import CkptConfig, LogConfig, OptimConfig, TrainConfig
from ssl_vit.engine.ema import check_pairs, ema_update
from ssl_vit.engine.metrics import MetricsWriter, peak_memory_mb, progress_bar, write_json
from ssl_vit.engine.signals import StopRequest, TrainingInterrupted
from ssl_vit.engine.state import TrainState, load_training_state, save_training_state
from ssl_vit.engine.step import StepResult, train_step
from ssl_vit.engine.stream import BatchStream
from ssl_vit.errors import CheckpointError, RecipeError, TrainingError
from ssl_vit.objectives.base import Objective
from ssl_vit.optim import cosine_schedule, param_groups, scaled_lr
from ssl_vit.types import Batch

log = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"


@dataclass
class FitResult:
    steps: int
    images_seen: int
    seconds: float  # training-loop wall time over every (re)start of the run
    final_loss: float
    checkpoint: Path | None


@dataclass
class Plan:
    """Numbers derived once from the recipe and the world size; recorded in `train_state.json`."""

    num_processes: int
    per_device_batch: int
    accum_steps: int
    global_batch: int  # per-device batch x processes x accumulation
    lr_scaling: str
    recipe_lr: float
    lr: float  # peak lr after scaling
    min_lr: float
    warmup_steps: int
    total_steps: int
    batches_per_epoch: int  # per process
    updates_per_epoch: int
    mixed_precision: str
    device: str
    distributed_type: str


def _check(optim: OptimConfig, train: TrainConfig, ckpt: CkptConfig, logcfg: LogConfig) -> None:
    if train.mixed_precision not in ("no", "bf16", "fp16"):
        raise RecipeError(f"train.mixed_precision must be no, bf16 or fp16, not '{train.mixed_precision}'")
    if optim.accum_steps < 1:
        raise RecipeError(f"optim.accum_steps must be at least 1, got {optim.accum_steps}")
    if optim.lr_scaling not in ("none", "linear"):
        raise RecipeError(f"optim.lr_scaling must be 'none' or 'linear', not '{optim.lr_scaling}'")
    if train.max_bad_steps < 1:
        raise RecipeError(f"train.max_bad_steps must be at least 1, got {train.max_bad_steps}")
    if ckpt.every_steps is not None and ckpt.every_steps < 1:
        raise RecipeError(f"ckpt.every_steps must be at least 1 (or null), got {ckpt.every_steps}")
    if logcfg.every_steps < 1:
        raise RecipeError(f"log.every_steps must be at least 1, got {logcfg.every_steps}")
    if logcfg.tensorboard and not is_tensorboard_available():
        raise RecipeError("log.tensorboard=true needs the tensorboard package (pip install tensorboard)")


def use_cpu(train: TrainConfig) -> bool:
    """CPU when asked or when there is no accelerator.

    accelerate treats `torchrun` on CPUs as multi-CPU (gloo) only when told `cpu=True`; otherwise
    every process silently trains alone.
    """
    return train.cpu or not torch.accelerator.is_available()


def processes(train: TrainConfig) -> PartialState:
    """The process group as accelerate sees it (under torchrun: this rank among all)."""
    return PartialState(cpu=use_cpu(train))


def _accelerator(
    train: TrainConfig, optim: OptimConfig, logcfg: LogConfig, run_dir: Path, seed: int
) -> Accelerator:
    return Accelerator(
        cpu=use_cpu(train),
        mixed_precision=train.mixed_precision,
        # Accumulation windows run across epoch ends: a step is always `accum_steps` micro-batches.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=optim.accum_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        log_with="tensorboard" if logcfg.tensorboard else None,
        project_dir=str(run_dir),
    )


def _plan(accelerator: Accelerator, stream: BatchStream, optim: OptimConfig, train: TrainConfig) -> Plan:
    updates_per_epoch = max(stream.batches_per_epoch // optim.accum_steps, 1)
    total = train.max_steps if train.max_steps is not None else train.epochs * updates_per_epoch
    if total <= 0:
        raise RecipeError("train.max_steps (or train.epochs) must give at least one step")
    global_batch = train.batch_size * accelerator.num_processes * optim.accum_steps
    warmup = (
        optim.warmup_steps if optim.warmup_steps is not None else int(optim.warmup_epochs * updates_per_epoch)
    )
    return Plan(
        num_processes=accelerator.num_processes,
        per_device_batch=train.batch_size,
        accum_steps=optim.accum_steps,
        global_batch=global_batch,
        lr_scaling=optim.lr_scaling,
        recipe_lr=optim.lr,
        lr=scaled_lr(optim.lr, global_batch, optim.lr_scaling),
        min_lr=optim.min_lr,
        warmup_steps=warmup,
        total_steps=total,
        batches_per_epoch=stream.batches_per_epoch,
        updates_per_epoch=updates_per_epoch,
        mixed_precision=accelerator.mixed_precision,
        device=str(accelerator.device),
        distributed_type=str(accelerator.distributed_type.value),
    )


def ensure_writable(run_dir: Path) -> None:
    """Fail before training when nothing can be written there (a full disk shows up at save time)."""
    probe = run_dir / ".write-test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"run directory {run_dir} is not writable: {err.strerror or err}") from None


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
) -> FitResult:
    """Train `objective`; write `metrics.jsonl`, `train_state.json` and `checkpoints/` into `run_dir`.

    `steps_per_epoch` is the loader's batches per epoch on this process (a map-style DataLoader is
    re-sharded by accelerate, and its sharded length wins). `resume` is a checkpoint folder to
    continue from exactly. `data_stats`, when given, returns counters (e.g. skipped corrupt
    samples) logged with each metrics record. Raises `TrainingError` after `train.max_bad_steps`
    non-finite steps in a row and `TrainingInterrupted` after SIGTERM/SIGINT (checkpoint written).
    """
    _check(optim, train, ckpt, logcfg)
    accelerator = _accelerator(train, optim, logcfg, run_dir, seed)
    if accelerator.is_main_process:
        ensure_writable(run_dir)
    set_seed(seed, device_specific=True)  # each process its own augmentation/masking draws
    stream = BatchStream(accelerator, loader, steps_per_epoch, seed)
    plan = _plan(accelerator, stream, optim, train)
    groups = param_groups(objective, optim.weight_decay, objective.no_weight_decay(), optim.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=plan.lr, betas=(optim.betas[0], optim.betas[1]))  # type: ignore[arg-type]
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
    metrics = MetricsWriter(run_dir / "metrics.jsonl", accelerator.is_main_process)
    metrics.truncate_after(state.step)
    if accelerator.is_main_process:
        write_json(run_dir / TRAIN_STATE_FILE, {**asdict(plan), "history": history})
    if logcfg.tensorboard:
        accelerator.init_trackers("tensorboard")

    def save() -> Path:
        meta = {"plan": asdict(plan), "history": history}
        return save_training_state(
            accelerator, model, optimizer, state, run_dir / "checkpoints", ckpt.keep_last, meta
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
            if state.step % logcfg.every_steps == 0 or state.step == plan.total_steps:
                now = time.perf_counter()
                record = _record(
                    accelerator, result, state, lr, wd, momentum, images_since_log / max(now - tick, 1e-9)
                )
                if data_stats is not None:
                    record.update({f"data_{k}": v for k, v in data_stats().items()})
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
    if accelerator.num_processes > 1:
        _record_rank_digests(accelerator, inner, run_dir, plan, history)
    if logcfg.tensorboard:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    final_loss = float(result.loss) if result is not None else math.nan
    return FitResult(state.step, state.images_seen, state.train_seconds, final_loss, last_saved)


def _record(
    accelerator: Accelerator,
    result: StepResult,
    state: TrainState,
    lr: float,
    wd: float,
    momentum: float,
    images_per_sec: float,
) -> dict[str, Any]:
    """One metrics record; loss and logs are averaged over processes (every process calls this)."""
    names = sorted(result.logs)
    values = torch.stack([result.loss.float(), *(result.logs[k].float() for k in names)])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
    loss, *logs = values.tolist()
    record: dict[str, Any] = {
        "step": state.step,
        "epoch": state.epoch,
        "loss": loss,
        "lr": lr,
        "weight_decay": wd,
        "grad_norm": result.grad_norm,
        "images_per_sec": images_per_sec,
        "images_seen": state.images_seen,
        "skipped_steps": state.skipped_steps,
        "peak_mem_mb": peak_memory_mb(accelerator.device),
    }
    if not math.isnan(momentum):
        record["ema_momentum"] = momentum
    record.update(dict(zip(names, logs, strict=True)))
    return record


def _record_rank_digests(
    accelerator: Accelerator, inner: Objective, run_dir: Path, plan: Plan, history: list[dict[str, Any]]
) -> None:
    """Hash every process's final weights; DDP keeps them identical, anything else is a bug."""
    digest = hashlib.sha256()
    for name, tensor in sorted(inner.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    if accelerator.is_main_process:
        if len(set(digests)) > 1:
            log.error("processes ended with different weights: %s", digests)
        write_json(
            run_dir / TRAIN_STATE_FILE, {**asdict(plan), "history": history, "weights_sha256": digests}
        )
