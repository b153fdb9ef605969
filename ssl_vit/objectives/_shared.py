"""Pieces several objectives share: an MLP builder, cross-process gathers, patches, schedules.

The gathers work with or without `torch.distributed`: when no process group is initialised (one
process, tests, the CPU demo) they return their input, so objectives never branch on it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if _distributed() else 0


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` (n, ...) from every process along dim 0: (n * world, ...), rank order.

    Gradients flow back to every process's own slice (`torch.distributed.nn.functional.all_gather`
    sums them in backward), so a contrastive loss with gathered negatives trains exactly as the
    same loss on the concatenated batch would (Chen et al. 2020, SimCLR, sec. 2.2 "global BN" and
    the gathered negatives). A plain `dist.all_gather` would cut the graph and silently make the
    negatives of other processes constants.
    """
    if not _distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


@torch.no_grad()
def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of `x` over processes (no gradient); `x` itself when running alone."""
    if not _distributed():
        return x
    out = x.clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    layers: int,
    norm: bool = True,
    last_norm: bool = False,
    act: type[nn.Module] = nn.ReLU,
    bias: bool = True,
) -> nn.Sequential:
    """`layers` linear layers with (BatchNorm +) activation between them.

    `norm=True, last_norm=True, bias=False` is MoCo v3's projector/predictor (`_build_mlp`, the
    last BatchNorm without affine as in SimCLR); `norm=False, act=nn.GELU` is DINO's head MLP.
    """
    if layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got {layers}")
    modules: list[nn.Module] = []
    for i in range(layers):
        dim_in = in_dim if i == 0 else hidden_dim
        dim_out = out_dim if i == layers - 1 else hidden_dim
        modules.append(nn.Linear(dim_in, dim_out, bias=bias))
        if i < layers - 1:
            if norm:
                modules.append(nn.BatchNorm1d(dim_out))
            modules.append(act())
        elif last_norm:
            modules.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*modules)


def init_linear(module: nn.Module) -> None:
    """ViT-style init of every Linear in `module`: truncated normal (std 0.02), zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """EMA momentum rising from `base` to 1 along a half cosine (BYOL eq. in sec. 3.2; MoCo v3, DINO)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def patchify(imgs: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, N, patch*patch*C), patches in row-major order, pixels then channels (MAE)."""
    return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(patches: Tensor, patch: int, grid: tuple[int, int], chans: int) -> Tensor:
    """Inverse of `patchify`: (B, N, patch*patch*C) -> (B, C, H, W)."""
    return rearrange(
        patches, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=patch, q=patch, c=chans
    )


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos position embeddings (MAE's `get_2d_sincos_pos_embed`): (h*w, dim).

    Half the channels encode the row, half the column, each as sin/cos of geometric frequencies
    (Vaswani et al. 2017, sec. 3.5).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega  # (h*w, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (h*w, D/2)

    # MAE encodes the width coordinate first (its grid is meshgrid(w, h)).
    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (h*w, D)


def draw(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """Uniform noise in [0, 1) on `device`; drawn on the generator's device when one is given.

    Lets `reconstruct(..., generator=...)` give the same mask on any device.
    """
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)
