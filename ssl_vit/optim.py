"""Parameter groups and schedules: pure functions, tested against hand-worked values."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn


def cosine_schedule(
    step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0, start: float = 0.0
) -> float:
    """Linear warmup from `start` to `base` over `warmup_steps`, then cosine decay to `final`.

    Used for the learning rate (start=0), the weight decay and the EMA momentum (warmup=0).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return start + (base - start) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def is_no_decay(name: str, param: nn.Parameter, extra: Iterable[str] = ()) -> bool:
    """Biases, norm weights (1-D) and named tokens/position embeddings get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or name in set(extra)


def param_groups(
    model: nn.Module, weight_decay: float, no_decay: Iterable[str] = ()
) -> list[dict[str, object]]:
    """Two AdamW groups: with and without decay. Frozen parameters are left out."""
    skip = set(no_decay)
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (plain if is_no_decay(name, param, skip) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "apply_wd": True},
        {"params": plain, "weight_decay": 0.0, "apply_wd": False},
    ]
