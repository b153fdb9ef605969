"""The objective protocol: all the engine knows about an objective.

An objective is an `nn.Module` built from the shared backbone. It owns its heads, decoder, mask token
and teacher, and turns a `Batch` into `(loss, logs)`. State that changes outside gradient descent
(EMA teachers, DINO's centre) is updated in named hooks the engine calls, never inside `forward`.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.types import Batch, ViewSpec


class Objective(nn.Module):
    """Base of every objective; the hooks default to doing nothing.

    Subclasses set `view_spec` (what the data pipeline must produce) and implement `forward`.
    """

    view_spec: ClassVar[ViewSpec] = ViewSpec()
    needs_labels: ClassVar[bool] = False

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss (a scalar) and detached logs for one batch."""
        raise NotImplementedError

    def views(self) -> ViewSpec:
        """The views this instance asks for (may depend on its config, e.g. DINO's local crops)."""
        return self.view_spec

    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Called before each step: schedules that depend on training progress (temperatures...)."""

    def after_backward(self) -> None:
        """Called after backward, before clipping: e.g. DINO cancels its last layer's gradients."""

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, teacher) module pairs the engine updates by EMA after each optimiser step."""
        return []

    def ema_momentum(self, step: int, total_steps: int) -> float:
        """Teacher momentum at `step`; only used when `ema_pairs()` is not empty."""
        return 1.0

    def after_optimizer_step(self) -> None:
        """Called after the optimiser step and the EMA update (e.g. DINO's centre update)."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that get no weight decay beyond biases/norms."""
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
