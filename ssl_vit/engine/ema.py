"""EMA (momentum) teachers: `teacher = m * teacher + (1 - m) * online`, after each optimiser step.

Objectives declare their (online, teacher) pairs through `ema_pairs()` and the momentum through
`ema_momentum(step, total)` (e.g. `optim.cosine_schedule(step, total, 0.996, 1.0)`, as BYOL, MoCo v3
and DINO schedule it); `fit` calls `Teacher.update` where a reader of the loop can see it, never
inside `forward`. Teachers must be submodules of the objective, so that they are in its state dict
and therefore in every checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ssl_vit.errors import TrainingError
from ssl_vit.objectives.base import Objective

Pairs = list[tuple[nn.Module, nn.Module]]


def check_pairs(objective: nn.Module, pairs: Pairs) -> None:
    """Teachers must be registered submodules (checkpointed) with the online module's parameters."""
    registered = {id(m) for m in objective.modules()}
    for online, teacher in pairs:
        if id(teacher) not in registered:
            raise TrainingError(
                f"{type(objective).__name__}.ema_pairs(): teacher {type(teacher).__name__} is not a "
                "submodule of the objective, so it would not be checkpointed"
            )
        missing = {n for n, _ in teacher.named_parameters()} - {n for n, _ in online.named_parameters()}
        if missing:
            raise TrainingError(
                f"{type(objective).__name__}.ema_pairs(): teacher has parameters the online module "
                f"lacks: {sorted(missing)[:3]}"
            )


@torch.no_grad()
def ema_update(pairs: Pairs, momentum: float) -> None:
    """Update every teacher parameter in place; buffers (e.g. norms' running stats) are copied.

    One multi-tensor `lerp` over all parameters (as timm's `ModelEmaV3`), not one kernel per tensor:
    MoCo v3 and DINO update as many teacher parameters as they train, every step.
    """
    teachers: list[torch.Tensor] = []
    onlines: list[torch.Tensor] = []
    for online, teacher in pairs:
        online_params = dict(online.named_parameters())
        for name, t_param in teacher.named_parameters():
            teachers.append(t_param)
            onlines.append(online_params[name].detach().to(t_param.dtype))
        online_buffers = dict(online.named_buffers())
        for name, t_buf in teacher.named_buffers():
            t_buf.copy_(online_buffers[name])
    if teachers:
        torch._foreach_lerp_(teachers, onlines, 1.0 - momentum)


class Teacher:
    """The objective's EMA teacher, stepped after each applied update (a no-op without one).

    `after_optimizer_step()` runs here too, teacher or not: it belongs right after the weights change,
    and a skipped (non-finite) step changes nothing, so neither runs then.
    """

    def __init__(self, objective: Objective) -> None:
        self.objective, self.pairs = objective, objective.ema_pairs()
        check_pairs(objective, self.pairs)

    def update(self, applied: bool, step: int, total_steps: int) -> float:
        """After update `step`: the momentum used, NaN when none was (no teacher, or update skipped)."""
        momentum = math.nan
        if applied:
            if self.pairs:
                momentum = self.objective.ema_momentum(step, total_steps)
                ema_update(self.pairs, momentum)
            self.objective.after_optimizer_step()
        else:
            self.objective.after_skipped_step()
        return momentum
