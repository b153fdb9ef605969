"""One optimiser step: `accum_steps` forward/backward passes, then a guarded update.

Gradient accumulation is accelerate's: inside `accelerator.accumulate` the loss is divided by the
number of micro-batches and DDP skips the gradient all-reduce until the last one. The update is
skipped, on every process alike, when a loss or the gradient norm is not finite: gradients are
all-reduced before the check, and the loss flags are all-reduced with the stop request, so all
processes take the same decision from one small collective per step. `BadStepGuard` counts those
skipped steps and stops a run that keeps having them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

from ssl_vit.config import OptimConfig
from ssl_vit.engine.state import TrainState
from ssl_vit.errors import RecipeError, TrainingError
from ssl_vit.objectives.base import Objective
from ssl_vit.types import Batch

log = logging.getLogger(__name__)


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


def grad_norm(accelerator: Accelerator, model: nn.Module, clip: float | None, mode: str = "global") -> Tensor:
    """Total gradient norm before clipping; unscales fp16 gradients first. With `clip`, mode
    "global" scales all gradients together to norm `clip` (torch's `clip_grad_norm_`); "per_param"
    clips each parameter's gradient to norm `clip` on its own, as the official DINO code does."""
    per_param = mode == "per_param" and clip is not None
    if accelerator.distributed_type == DistributedType.FSDP:  # sharded gradients: FSDP's own norm
        if per_param:
            raise RecipeError("optim.clip_mode: per_param needs whole gradients, and FSDP shards them")
        return torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), clip or math.inf))
    if clip is not None and not per_param:
        return torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), clip))
    accelerator.unscale_gradients()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads)
    if clip is not None and per_param:
        clip_per_param(grads, clip)
    return total


@torch.no_grad()
def clip_per_param(grads: list[Tensor], clip: float) -> None:
    """g <- g * min(1, clip / (||g|| + 1e-6)) for each gradient on its own: facebookresearch/dino
    `utils.clip_gradients`, called on the student in `main_dino.py` `train_one_epoch`."""
    for g in grads:  # one small kernel pair per tensor, no host sync
        g.mul_((clip / (torch.linalg.vector_norm(g.float()) + 1e-6)).clamp(max=1.0).to(g.dtype))


def train_step(
    accelerator: Accelerator,
    model: nn.Module,
    inner: Objective,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    optim: OptimConfig,
    progress: tuple[int, int, int],
    hyper: tuple[float, float],
    stop_requested: bool,
) -> StepResult:
    """Accumulate `optim.accum_steps` micro-batches, then update with `hyper = (lr, weight_decay)`,
    clipping gradients to norm `optim.clip_grad` when set (`optim.clip_mode`: global or per_param)."""
    accum_steps = optim.accum_steps
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
    norm = grad_norm(accelerator, model, optim.clip_grad, optim.clip_mode)
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


class BadStepGuard:
    """Counts non-finite steps (`train_step` skipped their update) and stops a run that keeps having them.

    The counters live in `TrainState`, so they survive a resume. No checkpoint is written during a
    streak (`CheckpointPolicy`), so stopping loses nothing already saved: the last checkpoint holds
    finite weights.
    """

    def __init__(self, max_in_a_row: int, warn: bool) -> None:
        self.max_in_a_row, self.warn = max_in_a_row, warn  # warn: on the main process only

    def count(self, result: StepResult, state: TrainState) -> None:
        """After `state.step` has moved on: update the streak and the total; warn on a bad step."""
        state.bad_in_a_row = state.bad_in_a_row + 1 if result.non_finite else 0
        state.skipped_steps += int(result.non_finite)
        if result.non_finite and self.warn:
            log.warning(
                "step %d: non-finite loss or gradient (loss %.4g, grad norm %.4g); update skipped "
                "(%d in a row)",
                state.step,
                float(result.loss),
                result.grad_norm,
                state.bad_in_a_row,
            )

    def check(self, state: TrainState, last_saved: Path | None) -> None:
        """Raise a one-line `TrainingError` once `max_in_a_row` bad steps came in a row."""
        if state.bad_in_a_row >= self.max_in_a_row:
            good = f"; last good checkpoint {last_saved}" if last_saved else ""
            raise TrainingError(
                f"loss or gradient non-finite for {state.bad_in_a_row} steps in a row at step "
                f"{state.step}{good}; lower optim.lr or set optim.clip_grad"
            )
