"""Pieces several objectives share: an MLP builder, global BatchNorm, cross-process gathers, patches,
schedules.

The gathers and the global BatchNorm work with or without `torch.distributed`: when no process group
is initialised (one process, tests, the CPU demo) they do what their local versions do, so
objectives never branch on it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction


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


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (B, D) whose training statistics are the global batch's, every process's rows.

    SimCLR aggregates "BN mean and variance over all devices" (Chen et al. 2020, sec. 2.3, "Global
    BN"; the official flag `global_bn`, default True): with per-process statistics the contrastive
    task can be solved from the statistics of the few images that share a process. The official
    MoCo v3 (`main_moco.py`) and DINO (`main_dino.py`, when the head has BatchNorm) convert their
    models with `torch.nn.SyncBatchNorm.convert_sync_batchnorm` for the same reason.

    A BatchNorm1d rather than an `nn.SyncBatchNorm`: DDP refuses SyncBatchNorm in a CPU model and the
    heads are built before their device is known. The parameters and buffers are BatchNorm1d's, so
    checkpoints and EMA pairs are unchanged. In training with more than one process, CUDA inputs under
    NCCL go through SyncBatchNorm's own autograd function (its fused kernels); elsewhere (gloo on CPU,
    where SyncBatchNorm does not run) each process's float32 mean and variance are all-gathered with
    gradients. Either way running_mean and running_var follow the global statistics. In eval mode, or
    alone, this is plain BatchNorm1d: one process's statistics are the global ones.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        momentum = self._count_batch()
        if x.is_cuda and dist.get_backend() == dist.Backend.NCCL:
            stats = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
            return SyncBatchNormFunction.apply(  # type: ignore[no-any-return]
                x, self.weight, self.bias, *stats, self.eps, momentum, dist.group.WORLD, dist.get_world_size()
            )
        return self._gathered(x, momentum)

    def _gathered(self, x: Tensor, momentum: float) -> Tensor:
        """Normalise x (B, D) with the mean and variance of every process's rows, all-gathered."""
        assert x.dim() == 2, f"GlobalBatchNorm1d normalises (B, D) features, got {tuple(x.shape)}"
        dim = x.shape[1]
        x32 = x.float()  # statistics in float32 under mixed precision
        var, mean = torch.var_mean(x32, dim=0, correction=0)  # (D,) each, this process's rows
        count = x32.new_full((1,), x.shape[0])
        stats = gather_with_grad(torch.cat([count, mean, var])[None])  # (W, 1 + 2D), with gradients
        counts, means, variances = stats.split([1, dim, dim], dim=1)  # (W, 1), (W, D), (W, D)
        total = counts.sum()
        mean = (counts * means).sum(0) / total  # (D,)
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / total  # (D,) biased (Chan et al.)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():  # as F.batch_norm: the unbiased variance goes into running_var
                self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var * total / (total - 1), alpha=momentum)
        out = (x32 - mean) * torch.rsqrt(var + self.eps)  # (B, D)
        if self.weight is not None and self.bias is not None:
            out = out * self.weight + self.bias
        return out.to(x.dtype)

    def _count_batch(self) -> float:
        """Count this batch in `num_batches_tracked`; the running-stat update weight, as `_BatchNorm`."""
        if not self.track_running_stats or self.num_batches_tracked is None:
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    layers: int,
    norm: bool = True,
    last_norm: bool = False,
    act: type[nn.Module] = nn.ReLU,
    bias: bool = True,
    global_bn: bool = False,
) -> nn.Sequential:
    """`layers` linear layers with (BatchNorm +) activation between them.

    `norm=True, last_norm=True, bias=False` is MoCo v3's projector/predictor (`_build_mlp`, the
    last BatchNorm without affine as in SimCLR); `norm=False, act=nn.GELU` is DINO's head MLP.
    `global_bn` makes the BatchNorms `GlobalBatchNorm1d` (statistics over every process's rows).
    """
    batch_norm = GlobalBatchNorm1d if global_bn else nn.BatchNorm1d
    if layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got {layers}")
    modules: list[nn.Module] = []
    for i in range(layers):
        dim_in = in_dim if i == 0 else hidden_dim
        dim_out = out_dim if i == layers - 1 else hidden_dim
        modules.append(nn.Linear(dim_in, dim_out, bias=bias))
        if i < layers - 1:
            if norm:
                modules.append(batch_norm(dim_out))
            modules.append(act())
        elif last_norm:
            modules.append(batch_norm(dim_out, affine=False))
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
