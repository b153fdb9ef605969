"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers")."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.errors import RecipeError
from ssl_vit.objectives import register
from ssl_vit.objectives._shared import cosine_momentum, gather_with_grad, mlp, rank
from ssl_vit.objectives.base import Objective
from ssl_vit.types import Batch, ViewSpec


@dataclass
class MoCoV3Config:
    """Defaults are sized for the small recipes (the paper: mlp_dim 4096, dim 256)."""

    temperature: float = 0.2
    dim: int = 256
    mlp_dim: int = 1024
    momentum: float = 0.99  # base momentum, raised to 1 along a cosine
    freeze_patch_proj: bool = False  # the paper's stability trick (sec. 4.2)
    # BatchNorm statistics over every process's images: the official `main_moco.py` applies
    # `torch.nn.SyncBatchNorm.convert_sync_batchnorm` to the whole model, momentum branch included
    global_bn: bool = True


def moco_loss(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """InfoNCE of queries against keys from every process, scaled by 2 * tau (MoCo v3 Alg. 1).

    q: (n, d) predictions of this process, k: (n, d) momentum keys of the other view. The positive
    of q[i] is its own image's key; the negatives are the other N - 1 keys of the global batch. The
    2 * tau factor makes the gradient's scale independent of tau (the paper's `ctr`).
    """
    n = q.shape[0]
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    keys = gather_with_grad(k)  # (N, d); keys carry no gradient, gathering keeps the code one path
    logits = q @ keys.T / temperature  # (n, N)
    labels = torch.arange(n, device=q.device) + rank() * n
    return F.cross_entropy(logits, labels) * (2 * temperature)


@register("mocov3")
class MoCoV3(Objective):
    """Base encoder + projector + predictor against a momentum encoder + projector.

    Symmetric loss ctr(q1, k2) + ctr(q2, k1). The momentum branch (a copy of the backbone and the
    projector, together) is an EMA the engine updates from `ema_pairs()`, with momentum rising from
    0.99 to 1 along a cosine (sec. 4, "momentum coefficient"). `freeze_patch_proj` fixes the patch
    projection at a random init, the paper's cure for training instability (sec. 4.2, Fig. 4).
    Projector and predictor MLPs end with affine-free BatchNorm as in the official `_build_mlp`.
    """

    Config = MoCoV3Config
    # The official `main_lincls.py` evaluates the base (online) encoder, not the momentum one.
    export_weights = "student"
    view_spec: ClassVar[ViewSpec] = ViewSpec(kind="contrastive", global_views=2, global_scale=(0.08, 1.0))

    def __init__(self, backbone: Backbone, cfg: MoCoV3Config) -> None:
        super().__init__(backbone)
        if cfg.temperature <= 0 or not 0.0 <= cfg.momentum <= 1.0:
            raise RecipeError("objective.temperature must be positive and objective.momentum in [0, 1]")
        self.cfg = cfg
        if cfg.freeze_patch_proj:
            backbone.freeze_patch_embed(reinit=True)
        head = partial(mlp, last_norm=True, bias=False, global_bn=cfg.global_bn)
        self.projector = head(backbone.embed_dim, cfg.mlp_dim, cfg.dim, 3)
        self.predictor = head(cfg.dim, cfg.mlp_dim, cfg.dim, 2)
        self.momentum_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.momentum_backbone), (self.projector, self.momentum_projector)]

    def ema_momentum(self, step: int, total_steps: int) -> float:
        return cosine_momentum(self.cfg.momentum, step, total_steps)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        # One backbone pass over both views (LayerNorm only, so this changes nothing), but the
        # BatchNorm heads see each view as its own batch (over all processes with global_bn), as in
        # the official code.
        both = torch.cat([batch.views[0], batch.views[1]])  # (2B, C, H, W)
        h1, h2 = self.backbone(both).chunk(2)  # (B, D) each
        q1, q2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))  # (B, d)
        with torch.no_grad():
            g1, g2 = self.momentum_backbone(both).chunk(2)
            k1, k2 = self.momentum_projector(g1), self.momentum_projector(g2)  # (B, d)
        tau = self.cfg.temperature
        return moco_loss(q1, k2, tau) + moco_loss(q2, k1, tau), {}
