"""Masked patch prediction (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", appendix B.1.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from ssl_vit.backbone import Backbone
from ssl_vit.errors import RecipeError
from ssl_vit.objectives import register
from ssl_vit.objectives._shared import draw, patchify, unpatchify
from ssl_vit.objectives.base import Objective
from ssl_vit.types import Batch, ViewSpec

TARGETS = ("mean_color", "downsized", "pixels")

# What happened to each patch, as returned by `MPP.corruption`.
UNTOUCHED, MASKED, RANDOM, KEPT = 0, 1, 2, 3


@dataclass
class MPPConfig:
    corrupt_ratio: float = 0.5
    mask_prob: float = 0.8  # of the corrupted: replaced by the learned mask embedding
    random_prob: float = 0.1  # ... by another patch's embedding; the rest is kept as is
    target: str = "mean_color"  # mean_color | downsized (4x4 cells, 3-bit each) | pixels (L2)
    bits: int = 3
    downsize: int = 4  # cells per side for target: downsized
    pixel_mean: list[float] | None = None  # the data's normalisation; filled from data.mean/std
    pixel_std: list[float] | None = None


@register("mpp")
class MPP(Objective):
    """BERT-style corruption of patch embeddings; predict each corrupted patch's 3-bit mean colour.

    Of all patches, `corrupt_ratio` (50%) are corrupted: 80% of these get the learned mask
    embedding, 10% the embedding of a random other patch (drawn from the whole batch), 10% stay as
    they are. From each corrupted patch's output token a linear head predicts its mean colour with
    every channel quantised to `bits` bits: 512 classes for RGB, 8 for one channel, by cross-entropy.
    The paper's alternatives are options: `downsized` predicts a 4x4 downsized patch in 3-bit colours
    (16 parallel 512-way predictions), `pixels` regresses the full (normalised) patch by L2; the
    mean colour worked best in the paper. The colour bins are taken in [0, 1] pixel space, so the
    objective needs the data's normalisation (`pixel_mean`/`pixel_std`, filled from the recipe).
    """

    Config = MPPConfig
    pixel_mean: Tensor  # buffers (1, C, 1, 1)
    pixel_std: Tensor
    view_spec: ClassVar[ViewSpec] = ViewSpec(kind="masked", global_scale=(0.2, 1.0))

    def __init__(self, backbone: Backbone, cfg: MPPConfig) -> None:
        super().__init__(backbone)
        chans, patch = backbone.in_chans, backbone.patch_size
        if not 0.0 < cfg.corrupt_ratio <= 1.0:
            raise RecipeError(f"objective.corrupt_ratio must be in (0, 1], got {cfg.corrupt_ratio}")
        if cfg.mask_prob < 0 or cfg.random_prob < 0 or cfg.mask_prob + cfg.random_prob > 1:
            raise RecipeError("objective.mask_prob and random_prob must be >= 0 and sum to at most 1")
        if cfg.target not in TARGETS:
            raise RecipeError(f"objective.target must be one of {', '.join(TARGETS)}, not '{cfg.target}'")
        if not 1 <= cfg.bits <= 8 or (cfg.target == "downsized" and patch % cfg.downsize):
            raise RecipeError(
                f"objective.bits must be 1..8 and downsize ({cfg.downsize}) divide the patch ({patch})"
            )
        mean = cfg.pixel_mean if cfg.pixel_mean is not None else [0.5] * chans
        std = cfg.pixel_std if cfg.pixel_std is not None else [0.5] * chans
        if len(mean) != chans or len(std) != chans:
            raise RecipeError(f"objective.pixel_mean/pixel_std need {chans} values (model.in_chans)")
        self.cfg = cfg
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, chans, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, chans, 1, 1), persistent=False)
        self.levels = 2**cfg.bits
        self.classes = self.levels**chans  # 512 for RGB at 3 bits
        self.cells = 1 if cfg.target == "mean_color" else cfg.downsize**2
        out = patch * patch * chans if cfg.target == "pixels" else self.cells * self.classes
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))
        self.head = nn.Linear(backbone.embed_dim, out)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def corruption(
        self, batch: int, n: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """What happens to each patch: (B, N) of UNTOUCHED, MASKED, RANDOM or KEPT.

        Exactly round(N * corrupt_ratio) patches per sample are corrupted (argsort of noise); each
        corrupted one independently becomes MASKED / RANDOM / KEPT with 80/10/10%.
        """
        count = round(n * self.cfg.corrupt_ratio)
        order = torch.argsort(draw((batch, n), device, generator), dim=1)  # (B, N)
        corrupted = torch.zeros(batch, n, dtype=torch.bool, device=device)
        corrupted.scatter_(1, order[:, :count], True)
        u = draw((batch, n), device, generator)
        kind = torch.full((batch, n), KEPT, dtype=torch.long, device=device)
        kind[u < self.cfg.mask_prob + self.cfg.random_prob] = RANDOM
        kind[u < self.cfg.mask_prob] = MASKED
        return torch.where(corrupted, kind, torch.full_like(kind, UNTOUCHED))

    def corrupt(self, tokens: Tensor, kind: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Apply `kind` (B, N) to patch embeddings (B, N, D): mask token, or another patch's embedding."""
        batch, n, _ = tokens.shape
        flat = rearrange(tokens, "b n d -> (b n) d")
        # A uniformly drawn *other* patch of the batch: draw from B*N - 1 slots, skip oneself.
        own = torch.arange(batch * n, device=tokens.device)
        other = (draw((batch * n,), tokens.device, generator) * (batch * n - 1)).long()
        other = other + (other >= own).long()
        others = rearrange(flat[other], "(b n) d -> b n d", b=batch)  # (B, N, D)
        tokens = torch.where((kind == RANDOM).unsqueeze(-1), others, tokens)
        return self.backbone.replace_tokens(tokens, kind == MASKED, self.mask_token)

    def pixels01(self, imgs: Tensor) -> Tensor:
        """Normalised input back to [0, 1] pixels: (B, C, H, W)."""
        return (imgs.float() * self.pixel_std + self.pixel_mean).clamp(0.0, 1.0)

    def colour_classes(self, imgs: Tensor) -> Tensor:
        """Target classes (B, N, cells): each cell's mean colour, every channel quantised to `bits`.

        Class = sum_c level_c * levels**(C-1-c), i.e. (r, g, b) in base 8 for RGB.
        """
        patch, side = self.backbone.patch_size, 1 if self.cfg.target == "mean_color" else self.cfg.downsize
        pix = self.pixels01(imgs)
        cells = F.avg_pool2d(pix, patch // side)  # (B, C, h*side, w*side)
        cells = rearrange(cells, "b c (h s) (w t) -> b (h w) (s t) c", s=side, t=side)  # (B, N, cells, C)
        level = (cells * self.levels).floor().clamp(max=self.levels - 1).long()
        weights = self.levels ** torch.arange(level.shape[-1] - 1, -1, -1, device=level.device)  # (C,)
        return (level * weights).sum(-1)  # (B, N, cells)

    def predict(self, imgs: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Head outputs for every patch (B, N, out) and the corruption kinds (B, N)."""
        tokens = self.backbone.embed(imgs)  # (B, N, D)
        kind = self.corruption(tokens.shape[0], tokens.shape[1], tokens.device, generator)
        tokens = self.corrupt(tokens, kind, generator)
        out = self.backbone.encode(tokens, grid=self.backbone.grid_of(imgs))  # (B, P + N, D)
        return self.head(self.backbone.patch_tokens(out)), kind

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        imgs = batch.views[0]  # (B, C, H, W)
        out, kind = self.predict(imgs)
        corrupted = kind != UNTOUCHED  # (B, N)
        out = out[corrupted].float()  # (M, out)
        if self.cfg.target == "pixels":
            target = patchify(imgs.float(), self.backbone.patch_size)[corrupted]  # (M, p*p*C)
            return F.mse_loss(out, target), {}
        target = self.colour_classes(imgs)[corrupted]  # (M, cells)
        logits = rearrange(out, "m (s k) -> (m s) k", k=self.classes)  # (M*cells, K)
        loss = F.cross_entropy(logits, target.flatten())
        acc = (logits.argmax(-1) == target.flatten()).float().mean()
        return loss, {"acc": acc.detach()}

    def _decode_levels(self, classes: Tensor) -> Tensor:
        """Class indices (...,) -> bin-centre colours (..., C) in [0, 1]."""
        chans = self.backbone.in_chans
        weights = self.levels ** torch.arange(chans - 1, -1, -1, device=classes.device)  # (C,)
        level = (classes.unsqueeze(-1) // weights) % self.levels  # (..., C)
        return (level.float() + 0.5) / self.levels

    @torch.no_grad()
    def reconstruct(self, imgs: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """What the model predicts for the corrupted patches, for figures.

        imgs: (B, C, H, W), normalised as the model's input. Returns `mask` (B, N) bool, True where a
        patch was corrupted (masked, swapped or kept), and `pred` (B, C, H, W) in the same normalised
        space: each corrupted patch painted with its predicted colour (the centre of the predicted
        3-bit bin, per 4x4 cell for `downsized`; the regressed pixels for `pixels`), every other patch
        left as the input. The same seeded `generator` gives the same mask every time. Eval mode.
        """
        was_training = self.training
        self.eval()
        out, kind = self.predict(imgs, generator)
        self.train(was_training)
        bb, mask = self.backbone, kind != UNTOUCHED
        patch, chans = bb.patch_size, bb.in_chans
        if self.cfg.target == "pixels":
            painted = out.float()  # (B, N, p*p*C), normalised space already
        else:
            classes = rearrange(out, "b n (s k) -> b n s k", k=self.classes).argmax(-1)  # (B, N, cells)
            colour = self._decode_levels(classes)  # (B, N, cells, C) in [0, 1]
            side = round(self.cells**0.5)
            cell_px = patch // side
            colour = rearrange(colour, "b n (s t) c -> b n s t c", s=side)
            painted = repeat(colour, "b n s t c -> b n (s p) (t q) c", p=cell_px, q=cell_px)
            painted = rearrange(painted, "b n p q c -> b n (p q c)")  # (B, N, p*p*C) in [0, 1]
            mean = repeat(self.pixel_mean.flatten(), "c -> (pq c)", pq=patch * patch)
            std = repeat(self.pixel_std.flatten(), "c -> (pq c)", pq=patch * patch)
            painted = (painted - mean) / std
        patches = torch.where(mask.unsqueeze(-1), painted, patchify(imgs.float(), patch))
        return {"mask": mask, "pred": unpatchify(patches, patch, bb.grid_of(imgs), chans)}
