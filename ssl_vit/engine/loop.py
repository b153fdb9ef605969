"""The training loop on accelerate: devices, precision, accumulation, logging, checkpoints.

It knows objectives only through the `Objective` protocol: `forward(batch) -> (loss, logs)` plus the
named hooks. One loop for every objective; no `if objective == ...` here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ssl_vit.config import CkptConfig, LogConfig, OptimConfig, TrainConfig
from ssl_vit.engine.checkpoint import prune_checkpoints, save_checkpoint
from ssl_vit.engine.ema import ema_update
from ssl_vit.errors import RecipeError, TrainingError
from ssl_vit.objectives.base import Objective
from ssl_vit.optim import cosine_schedule, param_groups
from ssl_vit.types import Batch

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    steps: int
    images_seen: int
    seconds: float
    final_loss: float
    checkpoint: Path | None


class MetricsWriter:
    """Appends one JSON object per line to `metrics.jsonl`; a no-op on non-main processes."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _scalar(value: Any) -> float:
    return float(value.detach().float().mean().item()) if isinstance(value, torch.Tensor) else float(value)


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
    optimizer: torch.optim.Optimizer | None = None,
) -> FitResult:
    """Train `objective` and write `metrics.jsonl` and `checkpoints/` into `run_dir`.

    `optimizer`: one built by the caller (fine-tuning's layer-decay groups from timm's factory);
    by default AdamW over `param_groups`. A group's `lr_scale` multiplies the scheduled lr.
    """
    if train.mixed_precision not in ("no", "bf16", "fp16"):
        raise RecipeError(f"train.mixed_precision must be no, bf16 or fp16, not '{train.mixed_precision}'")
    accelerator = Accelerator(
        cpu=train.cpu, mixed_precision=train.mixed_precision, gradient_accumulation_steps=optim.accum_steps
    )
    set_seed(seed)
    updates_per_epoch = max(steps_per_epoch // optim.accum_steps, 1)
    total_steps = train.max_steps if train.max_steps is not None else train.epochs * updates_per_epoch
    if total_steps <= 0:
        raise RecipeError("train.max_steps (or train.epochs) must give at least one step")
    global_batch = train.batch_size * accelerator.num_processes * optim.accum_steps
    base_lr = optim.lr * global_batch / 256 if optim.lr_scaling == "linear" else optim.lr
    warmup = (
        optim.warmup_steps if optim.warmup_steps is not None else int(optim.warmup_epochs * updates_per_epoch)
    )

    if optimizer is None:
        groups = param_groups(objective, optim.weight_decay, objective.no_weight_decay())
        optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=(optim.betas[0], optim.betas[1]))  # type: ignore[arg-type]
    model, optimizer, loader = accelerator.prepare(objective, optimizer, loader)
    inner: Objective = accelerator.unwrap_model(model)

    metrics = MetricsWriter(run_dir / "metrics.jsonl", accelerator.is_main_process)
    bar = tqdm(total=total_steps, disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    step, epoch, images_seen, bad_in_a_row, last_loss = 0, 0, 0, 0, math.nan
    start = tick = time.perf_counter()
    images_since_log, lr, grad_norm = 0, base_lr, math.nan
    model.train()
    while step < total_steps:
        for batch in loader:
            with accelerator.accumulate(model):
                inner.set_progress(step, total_steps, updates_per_epoch)
                loss, logs = model(batch)
                if not torch.isfinite(loss.detach()).item():
                    bad_in_a_row += 1
                    optimizer.zero_grad(set_to_none=True)
                    log.warning("non-finite loss at step %d (%d in a row); step skipped", step, bad_in_a_row)
                    if bad_in_a_row >= train.max_bad_steps:
                        raise TrainingError(
                            f"loss was non-finite for {bad_in_a_row} steps in a row at step {step}; "
                            "lower optim.lr or enable optim.clip_grad"
                        )
                    continue
                bad_in_a_row = 0
                accelerator.backward(loss)
                grad_norm = math.nan
                if accelerator.sync_gradients:
                    inner.after_backward()
                    if optim.clip_grad is not None:
                        grad_norm = _scalar(accelerator.clip_grad_norm_(model.parameters(), optim.clip_grad))
                    lr = cosine_schedule(step, total_steps, base_lr, optim.min_lr, warmup)
                    wd_end = optim.weight_decay if optim.weight_decay_end is None else optim.weight_decay_end
                    wd = cosine_schedule(step, total_steps, optim.weight_decay, wd_end)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                        if group.get("apply_wd"):
                            group["weight_decay"] = wd
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            images_seen += len(batch) * accelerator.num_processes
            images_since_log += len(batch) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            pairs = inner.ema_pairs()
            if pairs:
                ema_update(pairs, inner.ema_momentum(step, total_steps))
            inner.after_optimizer_step()
            step += 1
            last_loss = _scalar(loss)
            bar.update(1)
            if step % logcfg.every_steps == 0 or step == total_steps:
                now = time.perf_counter()
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": last_loss,
                    "lr": lr,
                    "images_per_sec": images_since_log / max(now - tick, 1e-9),
                    "images_seen": images_seen,
                }
                if not math.isnan(grad_norm):
                    record["grad_norm"] = grad_norm
                record.update({k: _scalar(v) for k, v in logs.items()})
                metrics.write(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                tick, images_since_log = now, 0
            if ckpt.every_steps and step % ckpt.every_steps == 0 and step < total_steps:
                _save(accelerator, inner, optimizer, step, epoch, run_dir, ckpt)
            if step >= total_steps:
                break
        epoch += 1
    bar.close()
    seconds = time.perf_counter() - start
    path = _save(accelerator, inner, optimizer, step, epoch, run_dir, ckpt)
    accelerator.wait_for_everyone()
    return FitResult(step, images_seen, seconds, last_loss, path)


def _save(
    accelerator: Accelerator,
    inner: Objective,
    optimizer: Any,
    step: int,
    epoch: int,
    run_dir: Path,
    ckpt: CkptConfig,
) -> Path | None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    ckpt_dir = run_dir / "checkpoints"
    path = save_checkpoint(ckpt_dir, step, inner, {"optimizer": optimizer.state_dict()}, {"epoch": epoch})
    prune_checkpoints(ckpt_dir, ckpt.keep_last)
    return path
