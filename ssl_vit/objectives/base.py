"""The objective protocol: all the engine, export and figures know about an objective.

An objective is an `nn.Module` built from the shared backbone. It owns its heads, decoder, mask token
and teacher, and turns a `Batch` into `(loss, logs)`. State that changes outside gradient descent
(EMA teachers, DINO's centre) is updated in named hooks the engine calls, never inside `forward`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.errors import CheckpointError
from ssl_vit.types import Batch, ViewSpec

ExportWeights = Literal["student", "teacher"]


class Objective(nn.Module):
    """Base of every objective; the hooks default to doing nothing.

    Subclasses set `Config` (the dataclass of their recipe section, which `objectives.build` validates
    and passes to `__init__(backbone, cfg)`) and `view_spec` (what the data pipeline must produce),
    and implement `forward`. `export_weights` is the backbone an export writes by default: "teacher"
    only where the method's paper evaluates its EMA teacher.
    """

    Config: ClassVar[type[Any]]
    view_spec: ClassVar[ViewSpec] = ViewSpec()
    needs_labels: ClassVar[bool] = False
    export_weights: ClassVar[ExportWeights] = "student"
    # The EMA teacher backbone stays in eval mode while the student trains (no drop-path in it): the
    # official DINO, iBOT and I-JEPA code.
    teacher_in_eval: ClassVar[bool] = False

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def train(self, mode: bool = True) -> Objective:
        super().train(mode)
        teacher = self.ema_teacher() if self.teacher_in_eval else None
        if teacher is not None:
            teacher.train(False)
        return self

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

    def ema_teacher(self) -> Backbone | None:
        """The EMA teacher of `backbone` (its partner in `ema_pairs()`), or None without one."""
        for online, teacher in self.ema_pairs():
            if online is self.backbone:
                assert isinstance(teacher, Backbone), "a backbone's EMA partner must be a Backbone"
                return teacher
        return None

    def exported_backbone(self, weights: ExportWeights | None = None) -> Backbone:
        """The backbone an export writes: `weights`, by default `export_weights`.

        Raises `CheckpointError` when the teacher is asked of an objective that has none.
        """
        weights = weights or self.export_weights
        if weights not in ("student", "teacher"):
            raise CheckpointError(f"weights must be 'student' or 'teacher', not '{weights}'")
        if weights == "student":
            return self.backbone
        teacher = self.ema_teacher()
        if teacher is None:
            raise CheckpointError(
                f"objective {type(self).__name__} has no EMA teacher to export; export its student"
            )
        return teacher

    def ema_momentum(self, step: int, total_steps: int) -> float:
        """Teacher momentum at `step`; only used when `ema_pairs()` is not empty."""
        return 1.0

    def after_optimizer_step(self) -> None:
        """Called after the optimiser step and the EMA update (e.g. DINO's centre update)."""

    def after_skipped_step(self) -> None:
        """Called instead when a step was skipped as non-finite: forget what its forward recorded."""

    @property
    def num_layers(self) -> int:
        """The backbone's layers for layer-wise lr decay (`optim.param_groups`); the top one has full lr."""
        return self.backbone.num_layers

    def layer_id(self, name: str) -> int:
        """Layer of parameter `name` (relative to this module) for layer-wise lr decay: the backbone's
        `layer_id`; heads, decoders and the objective's tokens sit on top (`num_layers`)."""
        local = name.removeprefix("backbone.")
        return self.backbone.layer_id(local) if local != name else self.num_layers

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that get no weight decay beyond biases/norms."""
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}


@runtime_checkable
class Reconstructor(Protocol):
    """An objective that can show what it predicts for hidden patches (MAE, MPP); figures draw it.

    Test with `isinstance(objective, Reconstructor)`: the method is optional, so not on `Objective`.
    """

    def reconstruct(self, imgs: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """imgs (B, C, H, W), normalised as the model's input -> `mask` (B, N) bool, True = hidden, and
        `pred` (B, C, H, W) in the same space; a seeded `generator` gives the same mask every time."""
        ...
