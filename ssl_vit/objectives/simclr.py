"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_vit.backbone import Backbone
from ssl_vit.errors import RecipeError
from ssl_vit.objectives import register
from ssl_vit.objectives._shared import gather_with_grad, mlp, rank
from ssl_vit.objectives.base import Objective
from ssl_vit.types import Batch, ViewSpec


@dataclass
class SimCLRConfig:
    """Defaults are sized for the small recipes (the paper: 2048-wide hidden layer, 128 out)."""

    temperature: float = 0.2
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    proj_layers: int = 2  # 2 in SimCLR v1, 3 in v2
    # BatchNorm statistics over every process's images, the paper's "global BN" (sec. 2.3)
    global_bn: bool = True


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent over 2N views (SimCLR eq. 1), negatives gathered from every process.

    z1, z2: (n, d) projections of the two views of this process's n images. Every one of the 2n
    local embeddings is an anchor; its positive is the other view of its image and its negatives
    are the other 2N - 2 embeddings of the global batch (N = n * processes). Returns the mean over
    local anchors; averaged over processes (as DDP does) it equals the loss on the whole batch.
    """
    n = z1.shape[0]
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    keys = torch.cat([gather_with_grad(z1), gather_with_grad(z2)])  # (2N, d): all view 1, then all view 2
    total = keys.shape[0] // 2
    queries = torch.cat([z1, z2])  # (2n, d)
    logits = queries @ keys.T / temperature  # (2n, 2N)
    own = torch.arange(n, device=z1.device) + rank() * n  # index of z1[i] among the gathered view 1
    self_idx = torch.cat([own, own + total])  # (2n,)
    positive = torch.cat([own + total, own])
    logits[torch.arange(2 * n, device=z1.device), self_idx] = float(
        "-inf"
    )  # an anchor is not its own negative
    return F.cross_entropy(logits, positive)


@register("simclr")
class SimCLR(Objective):
    """Two augmented views of each image, an MLP projector, and the NT-Xent loss.

    The backbone's pooled feature (CLS token) is the representation h; the loss acts on z = g(h)
    from the MLP projection head (sec. 2.1), which the paper shows improves h (Fig. 8).
    """

    Config = SimCLRConfig
    view_spec: ClassVar[ViewSpec] = ViewSpec(kind="contrastive", global_views=2, global_scale=(0.08, 1.0))

    def __init__(self, backbone: Backbone, cfg: SimCLRConfig) -> None:
        super().__init__(backbone)
        if cfg.temperature <= 0:
            raise RecipeError(f"objective.temperature must be positive, got {cfg.temperature}")
        if cfg.proj_layers < 1:
            raise RecipeError(f"objective.proj_layers must be at least 1, got {cfg.proj_layers}")
        self.cfg = cfg
        self.projector = mlp(
            backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, global_bn=cfg.global_bn
        )

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        x1, x2 = batch.views[0], batch.views[1]  # (B, C, H, W) each
        z = self.projector(self.backbone(torch.cat([x1, x2])))  # (2B, d): one pass, BN over both views
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.cfg.temperature), {}
