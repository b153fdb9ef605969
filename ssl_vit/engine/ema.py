"""EMA (momentum) teachers: `teacher = m * teacher + (1 - m) * online`, after each optimiser step.

Objectives declare their (online, teacher) pairs through `ema_pairs()`; the engine calls
`ema_update` where a reader of the loop can see it, never inside `forward`.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(pairs: list[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """Update every teacher parameter in place; buffers (e.g. norms' running stats) are copied."""
    for online, teacher in pairs:
        online_params = dict(online.named_parameters())
        for name, t_param in teacher.named_parameters():
            t_param.lerp_(online_params[name].detach().to(t_param.dtype), 1.0 - momentum)
        online_buffers = dict(online.named_buffers())
        for name, t_buf in teacher.named_buffers():
            t_buf.copy_(online_buffers[name])
