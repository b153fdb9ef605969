"""One optimiser step: `accum_steps` forward/backward passes, then a guarded update.

Gradient accumulation is accelerate's: inside `accelerator.accumulate` the loss is divided by the
number of micro-batches and DDP skips the gradient all-reduce until the last one. The update is
skipped, on every process alike, when a loss or the gradient norm is not finite: gradients are
all-reduced before the check, and the loss flags are all-reduced with the stop request, so all
processes take the same decision from one small collective per step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

from ssl_vit.objectives.base import Objective
from ssl_vit.types import Batch


@dataclass
class StepResult:
    loss: Tensor  # mean loss over the step's micro-batches, on this process (detached)
    logs: dict[str, Tensor]  # the objective's logs, averaged over the micro-batches
    grad_norm: float  # before clipping
    applied: bool  # False when the update was skipped
    non_finite: bool  # a loss or the gradient was NaN/Inf (counts towards train.max_bad_steps)
    stop: bool  # a process received SIGTERM/SIGINT: every process stops after this step
    images: int  # samples on this process


def forward_backward(
    accelerator: Accelerator, model: nn.Module, inner: Objective, batch: Batch, progress: tuple[int, int, int]
) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch: forward and backward inside accelerate's accumulation context."""
    with accelerator.accumulate(model):
        inner.set_progress(*progress)
        loss, logs = model(batch)
        accelerator.backward(loss)
    return loss.detach(), logs


def grad_norm(accelerator: Accelerator, model: nn.Module, clip: float | None) -> Tensor:
    """Total gradient norm (clipping to `clip` when set); unscales fp16 gradients first."""
    if clip is not None or accelerator.distributed_type == DistributedType.FSDP:
        return torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), clip or math.inf))
    accelerator.unscale_gradients()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def train_step(
    accelerator: Accelerator,
    model: nn.Module,
    inner: Objective,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    accum_steps: int,
    progress: tuple[int, int, int],
    hyper: tuple[float, float],
    clip: float | None,
    stop_requested: bool,
) -> StepResult:
    """Accumulate `accum_steps` micro-batches, then update with `hyper = (lr, weight_decay)`."""
    losses: list[Tensor] = []
    sums: dict[str, Tensor] = {}
    images = 0
    for _ in range(accum_steps):
        batch = next(batches)
        loss, logs = forward_backward(accelerator, model, inner, batch, progress)
        losses.append(loss.float())
        for key, value in logs.items():
            mean = value.detach().float().mean() / accum_steps
            sums[key] = sums[key] + mean if key in sums else mean
        images += len(batch)
    assert accelerator.sync_gradients, "accumulation window out of step with accelerate's counter"
    inner.after_backward()
    norm = grad_norm(accelerator, model, clip)
    loss = torch.stack(losses).mean()
    flags = torch.stack(
        [
            (~torch.isfinite(loss)).float(),
            (~torch.isfinite(norm.to(loss.device))).float(),
            torch.tensor(float(stop_requested), device=loss.device),
        ]
    )
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    bad_loss, bad_grad, stop = (bool(v > 0) for v in flags.tolist())  # the step's one host sync
    scaler = accelerator.scaler is not None  # fp16: the scaler skips overflowing steps itself
    non_finite = bad_loss or (bad_grad and not scaler)
    applied = False
    if not non_finite:
        lr, wd = hyper
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if group.get("apply_wd"):
                group["weight_decay"] = wd
        optimizer.step()
        applied = not getattr(optimizer, "step_was_skipped", False)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, sums, float(norm), applied, non_finite, stop, images)
