"""Masked autoencoder (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.errors import RecipeError
from ssl_vit.objectives import register
from ssl_vit.objectives._shared import draw, patchify, sincos_2d, unpatchify
from ssl_vit.objectives.base import Objective
from ssl_vit.types import Batch, ViewSpec


@dataclass
class MAEConfig:
    """Defaults are sized for the small recipes; the paper's 8-block, 512-wide decoder is in
    `recipes/imagenet/vit_b16_mae.yaml`."""

    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp_ratio: float = 4.0
    decoder_pos_embed: str = "sincos"  # sincos (fixed, as the paper) | learned
    norm_pix_loss: bool = True


class Block(nn.Module):
    """Pre-norm transformer block, the ViT block that MAE's decoder stacks (timm's `Block` layout)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        qkv = rearrange(self.qkv(self.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, D/H)
        x = x + self.proj(rearrange(attn, "b h n d -> b n (h d)"))  # (B, N, D)
        return x + self.mlp(self.norm2(x))


def random_masking(
    batch: int, n: int, ratio: float, device: torch.device, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by sorting uniform noise (MAE's `random_masking`).

    Returns `keep_idx` (B, K) with K = floor(N * (1 - ratio)) (the visible patches, in shuffled
    order), `mask` (B, N) bool, True where hidden, and `restore_idx` (B, N), the inverse permutation:
    `cat([visible, hidden])` gathered with it is back in patch order.
    """
    keep = int(n * (1 - ratio))
    noise = draw((batch, n), device, generator)  # (B, N)
    shuffle_idx = torch.argsort(noise, dim=1)  # ascending: the first K are kept
    restore_idx = torch.argsort(shuffle_idx, dim=1)
    mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    mask[:, :keep] = False
    mask = torch.gather(mask, 1, restore_idx)  # (B, N) in patch order
    return shuffle_idx[:, :keep], mask, restore_idx


@register("mae")
class MAE(Objective):
    """Reconstruct the pixels of ~75% hidden patches from the visible rest.

    The encoder (the shared backbone) sees only the K visible tokens (`encode(keep_idx=...)`), so
    it costs ~K/N of a full pass; a light decoder gets the encoded tokens plus a shared mask token
    at every hidden position, with its own position embeddings, and predicts each patch's pixels.
    The loss is the MSE on hidden patches only (sec. 3, "reconstruction target"); with
    `norm_pix_loss` the target is each patch normalised by its own mean and variance, which the
    paper finds gives better representations (Table 1c). The loss is computed in float32 so an
    fp16 run does not overflow the squared error.
    """

    Config = MAEConfig
    view_spec: ClassVar[ViewSpec] = ViewSpec(kind="masked", global_scale=(0.2, 1.0))

    def __init__(self, backbone: Backbone, cfg: MAEConfig) -> None:
        super().__init__(backbone)
        if not 0.0 < cfg.mask_ratio < 1.0 or int(backbone.num_patches * (1 - cfg.mask_ratio)) < 1:
            raise RecipeError(
                f"objective.mask_ratio must leave at least one visible patch, got {cfg.mask_ratio}"
            )
        if cfg.decoder_pos_embed not in ("sincos", "learned"):
            raise RecipeError(
                f"objective.decoder_pos_embed must be sincos or learned, not '{cfg.decoder_pos_embed}'"
            )
        if cfg.decoder_dim % cfg.decoder_heads:
            raise RecipeError(
                f"objective.decoder_dim ({cfg.decoder_dim}) must be divisible by decoder_heads ({cfg.decoder_heads})"
            )
        self.cfg = cfg
        dim, prefix, n = cfg.decoder_dim, backbone.num_prefix_tokens, backbone.num_patches
        patch_dim = backbone.patch_size**2 * backbone.in_chans
        self.decoder_embed = nn.Linear(backbone.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        learned = cfg.decoder_pos_embed == "learned"
        self.decoder_pos = nn.Parameter(torch.zeros(1, prefix + n, dim), requires_grad=learned)
        self.decoder = nn.Sequential(
            *[Block(dim, cfg.decoder_heads, cfg.decoder_mlp_ratio) for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, patch_dim)
        self._init_weights(learned)

    def _init_weights(self, learned: bool) -> None:
        """MAE's `initialize_weights`: xavier-uniform linears, N(0, 0.02) mask token."""
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        with torch.no_grad():
            if learned:
                nn.init.trunc_normal_(self.decoder_pos, std=0.02)
            else:
                grid = sincos_2d(self.cfg.decoder_dim, self.backbone.grid_size)  # (N, Dd)
                self.decoder_pos[0, self.backbone.num_prefix_tokens :] = grid.to(self.decoder_pos.device)

    def predict(self, imgs: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Mask, encode the visible patches, decode all: pred (B, N, p*p*C) and mask (B, N)."""
        bb, prefix = self.backbone, self.backbone.num_prefix_tokens
        tokens = bb.embed(imgs)  # (B, N, D)
        batch, n, _ = tokens.shape
        keep_idx, mask, restore_idx = random_masking(batch, n, self.cfg.mask_ratio, tokens.device, generator)
        latent = bb.encode(tokens, keep_idx=keep_idx, grid=bb.grid_of(imgs))  # (B, P + K, D)
        x = self.decoder_embed(latent)  # (B, P + K, Dd)
        hidden = self.mask_token.to(x.dtype).expand(batch, n - keep_idx.shape[1], -1)  # (B, N - K, Dd)
        patches = torch.cat([x[:, prefix:], hidden], dim=1)  # (B, N, Dd), shuffled order
        patches = torch.gather(patches, 1, restore_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :prefix], patches], dim=1) + self.decoder_pos  # (B, P + N, Dd)
        x = self.decoder_norm(self.decoder(x))
        return self.decoder_pred(x[:, prefix:]), mask  # (B, N, p*p*C), (B, N)

    def target(self, imgs: Tensor) -> Tensor:
        """Per-patch pixels (B, N, p*p*C) in float32, normalised per patch with `norm_pix_loss`."""
        target = patchify(imgs.float(), self.backbone.patch_size)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE's code
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def patch_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error per patch, averaged over the hidden patches only (float32)."""
        per_patch = (pred.float() - self.target(imgs)).pow(2).mean(dim=-1)  # (B, N)
        weight = mask.float()
        return (per_patch * weight).sum() / weight.sum()

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        imgs = batch.views[0]  # (B, C, H, W)
        pred, mask = self.predict(imgs)
        return self.patch_loss(imgs, pred, mask), {}

    @torch.no_grad()
    def reconstruct(self, imgs: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The model's reconstruction, for figures.

        imgs: (B, C, H, W), normalised as the model's input. Returns `mask` (B, N) bool, True where a
        patch was hidden, and `pred` (B, C, H, W): the decoder's prediction of every patch (visible
        ones too) in the same normalised input space; with `norm_pix_loss` each predicted patch is
        un-normalised with the mean and variance of the true patch, as the paper's figures do. The
        same seeded `generator` gives the same mask every time. Runs in eval mode.
        """
        was_training = self.training
        self.eval()
        pred, mask = self.predict(imgs, generator)
        pred = pred.float()
        if self.cfg.norm_pix_loss:
            true = patchify(imgs.float(), self.backbone.patch_size)
            pred = pred * (true.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + true.mean(dim=-1, keepdim=True)
        self.train(was_training)
        bb = self.backbone
        return {"mask": mask, "pred": unpatchify(pred, bb.patch_size, bb.grid_of(imgs), bb.in_chans)}
