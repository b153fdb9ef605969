"""Supervised pretraining: cross-entropy on a linear head, the ViT paper's baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.errors import RecipeError
from ssl_vit.objectives import register
from ssl_vit.objectives.base import Objective
from ssl_vit.types import Batch, ViewSpec


@dataclass
class SupervisedConfig:
    num_classes: int | None = None  # taken from the data when unset
    label_smoothing: float = 0.1


@register("supervised")
class Supervised(Objective):
    """Linear classifier over the backbone's pooled feature (CLS token by default).

    Dosovitskiy et al. 2020 pretrain this way; label smoothing as in DeiT/timm recipes.
    """

    Config = SupervisedConfig
    view_spec: ClassVar[ViewSpec] = ViewSpec(kind="supervised")
    needs_labels: ClassVar[bool] = True

    def __init__(self, backbone: Backbone, cfg: SupervisedConfig) -> None:
        super().__init__(backbone)
        if cfg.num_classes is None or cfg.num_classes < 2:
            raise RecipeError(f"objective.num_classes must be at least 2, got {cfg.num_classes}")
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise RecipeError(f"objective.label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
        self.cfg = cfg
        self.head = nn.Linear(backbone.embed_dim, cfg.num_classes)
        nn.init.zeros_(self.head.bias)
        nn.init.trunc_normal_(self.head.weight, std=0.02)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        imgs = batch.views[0]  # (B, C, H, W)
        logits = self.head(self.backbone(imgs))  # (B, K)
        loss = F.cross_entropy(logits.float(), batch.labels, label_smoothing=self.cfg.label_smoothing)
        acc = (logits.argmax(-1) == batch.labels).float().mean()
        return loss, {"acc": acc.detach()}
