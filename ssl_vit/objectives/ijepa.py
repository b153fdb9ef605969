"""I-JEPA (Assran et al. 2023, "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture")."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.errors import RecipeError
from ssl_vit.objectives import register
from ssl_vit.objectives._shared import init_linear, sincos_2d
from ssl_vit.objectives.base import Objective
from ssl_vit.objectives.mae import Block
from ssl_vit.objectives.masking import block_shapes, sample_blocks
from ssl_vit.types import Batch, ViewSpec


@dataclass
class IJEPAConfig:
    """Masking defaults are the paper's (sec. 3, Table 6: 4 targets of scale 0.15-0.2 and aspect
    0.75-1.5, a context block of scale 0.85-1); the predictor is sized for the small recipes (the
    paper: 384 wide, 6-12 deep)."""

    n_targets: int = 4
    target_scale: list[float] = field(default_factory=lambda: [0.15, 0.2])
    target_aspect: list[float] = field(default_factory=lambda: [0.75, 1.5])
    context_scale: list[float] = field(default_factory=lambda: [0.85, 1.0])
    predictor_dim: int = 64
    predictor_depth: int = 2
    predictor_heads: int = 4
    predictor_mlp_ratio: float = 4.0
    momentum: float = 0.996  # target-encoder EMA, raised linearly to 1 (appendix A.1)
    target_norm: str = "layer"  # layer (the paper) | layer+batch | layer+instance; see `normalise_targets`


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, D) gathered at idx (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def normalise_targets(out: Tensor, how: str) -> Tensor:
    """(B, N, D) target-encoder outputs -> regression targets.

    `layer`: each token layer-normed without affine, as the official `train.py`. A small random ViT
    gives nearly the same vector for every token of every image, which layer norm keeps, so the
    targets are almost constant and the predictor matches them without the encoder learning.
    `layer+batch` then standardises each channel over the batch's tokens, removing that shared
    component; `layer+instance` over each image's tokens (data2vec 2.0's target norm), removing each
    image's mean as well.
    """
    x = F.layer_norm(out, (out.shape[-1],))
    if how == "layer":
        return x
    dims = (0, 1) if how == "layer+batch" else (1,)
    mean, var = x.mean(dim=dims, keepdim=True), x.var(dim=dims, keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + 1e-6)


def ijepa_loss(pred: Tensor, target: Tensor, target_idx: Tensor) -> Tensor:
    """Squared error between predicted and target embeddings of the target patches (eq. 1), averaged
    over patches, blocks and channels, in float32.

    pred: (B, M, T, D); target: (B, N, D), the target encoder's layer-normed patch outputs; target_idx:
    (B, M, T). The paper writes an L2 loss; the official `train.py` uses `smooth_l1_loss`.
    """
    batch, blocks, per_block = target_idx.shape
    picked = _take(target.float(), rearrange(target_idx, "b m t -> b (m t)"))  # (B, M*T, D)
    picked = rearrange(picked, "b (m t) d -> b m t d", m=blocks, t=per_block)
    return (pred.float() - picked).pow(2).mean()


@register("ijepa")
class IJEPA(Objective):
    """Predict the EMA target encoder's embeddings of M target blocks from one context block.

    The context encoder (the shared backbone) sees only the context patches (`encode(keep_idx=...)`);
    the target encoder, an EMA of it, sees the full image and its patch outputs are layer-normed
    without affine (official `train.py`). A narrow predictor gets the context tokens projected to its
    width plus a shared mask token at each target position, both with fixed sin-cos positions, one
    sequence per target block, and predicts those positions' target embeddings. No hand-made
    augmentations beyond a random resized crop. Masks are drawn per image with the block shapes shared
    by the batch, and every context is cut to the batch's shortest, as the official `MaskCollator`.
    """

    Config = IJEPAConfig
    # "We use the target-encoder for evaluation and average pool its output" (appendix A.1).
    export_weights = "teacher"
    teacher_in_eval = True
    # One view, no augmentation beyond a random resized crop of 30-100% (official `crop_scale`).
    view_spec: ClassVar[ViewSpec] = ViewSpec(kind="masked", global_scale=(0.3, 1.0))
    predictor_pos: Tensor  # buffer (1, N, Dp), fixed 2-D sin-cos as the official predictor

    def __init__(self, backbone: Backbone, cfg: IJEPAConfig) -> None:
        super().__init__(backbone)
        ranges = (cfg.target_scale, cfg.target_aspect, cfg.context_scale)
        if any(len(r) != 2 or not 0 < r[0] <= r[1] for r in ranges):
            raise RecipeError(
                "objective: target_scale, target_aspect and context_scale are [min, max], min > 0"
            )
        if not 0 < cfg.n_targets < backbone.num_patches:
            raise RecipeError(
                f"objective.n_targets must be in 1..{backbone.num_patches - 1}, got {cfg.n_targets}"
            )
        if cfg.target_norm not in ("layer", "layer+batch", "layer+instance"):
            raise RecipeError(
                f"objective.target_norm must be layer, layer+batch or layer+instance, got {cfg.target_norm!r}"
            )
        if cfg.predictor_dim % cfg.predictor_heads or cfg.predictor_dim % 4:
            raise RecipeError(
                f"objective.predictor_dim ({cfg.predictor_dim}) must be divisible by predictor_heads and by 4"
            )
        self.cfg = cfg
        dim = cfg.predictor_dim
        self.teacher_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.predictor_embed = nn.Linear(backbone.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("predictor_pos", sincos_2d(dim, backbone.grid_size)[None], persistent=False)
        self.predictor = nn.Sequential(
            *[Block(dim, cfg.predictor_heads, cfg.predictor_mlp_ratio) for _ in range(cfg.predictor_depth)]
        )
        self.predictor_norm = nn.LayerNorm(dim, eps=1e-6)
        self.predictor_proj = nn.Linear(dim, backbone.embed_dim)
        for module in (self.predictor_embed, self.predictor, self.predictor_proj):
            init_linear(module)  # official predictor `_init_weights`: trunc-normal 0.02, zero bias
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone)]

    def ema_momentum(self, step: int, total_steps: int) -> float:
        """Linear from `momentum` to 1 over training (appendix A.1; official `momentum_scheduler`)."""
        progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return self.cfg.momentum + (1.0 - self.cfg.momentum) * progress

    def masks(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """context_idx (B, K) and target_idx (B, M, T): per-image blocks, shapes shared by the batch."""
        cfg, grid = self.cfg, self.backbone.grid_size
        scale, aspect, context = cfg.target_scale, cfg.target_aspect, cfg.context_scale
        ranges = (scale[0], scale[1]), (aspect[0], aspect[1]), (context[0], context[1])
        shapes = block_shapes(grid, cfg.n_targets, *ranges, generator=generator)
        drawn = [sample_blocks(grid, cfg.n_targets, generator=generator, shapes=shapes) for _ in range(batch)]
        keep = min(len(context) for context, _ in drawn)
        context_idx = torch.stack([context[:keep] for context, _ in drawn])  # (B, K)
        target_idx = torch.stack([torch.stack(targets) for _, targets in drawn])  # (B, M, T)
        return context_idx.to(device), target_idx.to(device)

    def predict(self, imgs: Tensor, context_idx: Tensor, target_idx: Tensor) -> Tensor:
        """Encode the context, predict each target block: (B, C, H, W) -> (B, M, T, D)."""
        bb, prefix = self.backbone, self.backbone.num_prefix_tokens
        assert bb.grid_of(imgs) == bb.grid_size, "I-JEPA's views are at the model's image size"
        batch, blocks, per_block = target_idx.shape
        context = bb.encode(bb.embed(imgs), keep_idx=context_idx)[:, prefix:]  # (B, K, D)
        pos = self.predictor_pos.to(context.dtype).expand(batch, -1, -1)  # (B, N, Dp)
        x = self.predictor_embed(context) + _take(pos, context_idx)  # (B, K, Dp)
        x = repeat(x, "b k d -> (b m) k d", m=blocks)  # one sequence per target block
        queries = _take(pos, rearrange(target_idx, "b m t -> b (m t)"))  # (B, M*T, Dp)
        queries = rearrange(queries, "b (m t) d -> (b m) t d", m=blocks) + self.mask_token.to(x.dtype)
        x = self.predictor_norm(self.predictor(torch.cat([x, queries], dim=1)))  # (B*M, K + T, Dp)
        pred = self.predictor_proj(x[:, -per_block:])  # (B*M, T, D)
        return rearrange(pred, "(b m) t d -> b m t d", m=blocks)

    @torch.no_grad()
    def targets(self, imgs: Tensor) -> Tensor:
        """The target encoder's patch outputs, normalised by `normalise_targets`: (B, N, D) float32."""
        out = self.teacher_backbone.forward_features(imgs)[:, self.backbone.num_prefix_tokens :]
        return normalise_targets(out.float(), self.cfg.target_norm)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        imgs = batch.views[0]  # (B, C, H, W)
        context_idx, target_idx = self.masks(imgs.shape[0], imgs.device)
        loss = ijepa_loss(self.predict(imgs, context_idx, target_idx), self.targets(imgs), target_idx)
        logs = {
            "context_tokens": torch.tensor(float(context_idx.shape[1])),
            "target_tokens": torch.tensor(float(target_idx.shape[2])),
        }
        return loss, logs
