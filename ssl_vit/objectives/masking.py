"""Block masks of patch grids for the masked objectives: I-JEPA's context and target blocks
(`sample_blocks`) and BEiT's blockwise masks, which iBOT uses (`sample_masks`). Pure functions of a
grid shape and a seeded generator, tested on their own."""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor

Shape = tuple[int, int]


def _uniform(bounds: tuple[float, float], generator: torch.Generator | None) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * float(torch.rand(1, generator=generator))


def block_shape(
    grid: Shape, scale: tuple[float, float], aspect: tuple[float, float], generator: torch.Generator | None
) -> Shape:
    """(h, w) of a block whose area is a fraction `scale` of the grid and h / w = `aspect`, both drawn
    uniformly (the official `MaskCollator._sample_block_size`), rounded, clamped to 1..grid."""
    area = _uniform(scale, generator) * grid[0] * grid[1]
    ratio = _uniform(aspect, generator)
    h = min(max(round(math.sqrt(area * ratio)), 1), grid[0])
    w = min(max(round(math.sqrt(area / ratio)), 1), grid[1])
    return h, w


def block_shapes(
    grid: Shape,
    n_targets: int,
    target_scale: tuple[float, float],
    target_aspect: tuple[float, float],
    context_scale: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[Shape, Shape]:
    """Target and context block shapes. The targets are shrunk until `n_targets` of them cannot cover
    the grid, so some patch is always left for the context (only matters on tiny grids)."""
    if not 0 < n_targets < grid[0] * grid[1]:
        raise ValueError(f"n_targets must be in 1..{grid[0] * grid[1] - 1} on a {grid} grid, got {n_targets}")
    h, w = block_shape(grid, target_scale, target_aspect, generator)
    while n_targets * h * w >= grid[0] * grid[1]:
        h, w = (h - 1, w) if h >= w else (h, w - 1)
    return (h, w), block_shape(grid, context_scale, (1.0, 1.0), generator)


def _place(grid: Shape, shape: Shape, generator: torch.Generator | None) -> Tensor:
    """Flat row-major indices (h*w,) of a block of `shape` at a uniform position on `grid`."""
    top = int(torch.randint(grid[0] - shape[0] + 1, (1,), generator=generator))
    left = int(torch.randint(grid[1] - shape[1] + 1, (1,), generator=generator))
    rows, cols = torch.arange(top, top + shape[0]), torch.arange(left, left + shape[1])
    return (rows[:, None] * grid[1] + cols[None, :]).flatten()


def sample_blocks(
    grid: Shape,
    n_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    generator: torch.Generator | None = None,
    shapes: tuple[Shape, Shape] | None = None,
    tries: int = 20,
) -> tuple[Tensor, list[Tensor]]:
    """I-JEPA's multi-block masking for one image (sec. 3, fig. 4): (context_idx (K,), [target_idx (T,)]).

    `n_targets` blocks of one shape (possibly overlapping) at uniform positions, then a context block
    with the target patches removed. `shapes` (from `block_shapes`) fixes the block shapes, as the
    official collator does per batch. A context block that the targets cover entirely is redrawn up to
    `tries` times; after that the context is every patch outside the targets, which `block_shapes`
    guarantees is non-empty. Indices are row-major and sorted; every target has at least one patch.
    """
    if shapes is None:
        shapes = block_shapes(grid, n_targets, target_scale, target_aspect, context_scale, generator)
    target_shape, context_shape = shapes
    targets = [_place(grid, target_shape, generator) for _ in range(n_targets)]
    covered = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    covered[torch.cat(targets)] = True
    for _ in range(tries):
        block = torch.zeros_like(covered)
        block[_place(grid, context_shape, generator)] = True
        context = (block & ~covered).nonzero().flatten()
        if len(context):
            return context, targets
    return (~covered).nonzero().flatten(), targets


def block_mask(
    grid: tuple[int, int], ratio: float, aspect: tuple[float, float], rng: random.Random
) -> Tensor:
    """BEiT's blockwise masking (Bao et al. 2021, alg. 1) of one image: (h, w) bool, True = masked.

    Rectangles of area U(min_area, still to mask) and aspect ratio log-uniform in `aspect`, each
    smaller than the grid on both sides, go at uniform positions until `ratio` of the patches are
    masked. A rectangle that would add nothing or overshoot is redrawn, up to 10 times, and masking
    stops when none fits; so at most ratio * N patches are masked, a little fewer when the last
    rectangle does not fit. min_area = (shorter side // 3)^2 patches, as BEiT and iBOT's `loader.py`.
    """
    rows, cols = grid
    mask = torch.zeros(grid, dtype=torch.bool)
    target, count = ratio * rows * cols, 0
    min_area = (min(grid) // 3) ** 2
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    while count < target:
        room, added = target - count, 0
        for _ in range(10):
            area, r = rng.uniform(min_area, room), math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(area * r)), round(math.sqrt(area / r))
            if not (0 < h < rows and 0 < w < cols):
                continue
            top, left = rng.randint(0, rows - h), rng.randint(0, cols - w)
            block = mask[top : top + h, left : left + w]  # a view: filling it masks the grid
            new = h * w - int(block.sum())
            if 0 < new <= room:
                block.fill_(True)
                added = new
                break
        if not added:
            break
        count += added
    return mask


def sample_masks(
    n: int,
    grid: tuple[int, int],
    probability: float,
    ratio: tuple[float, float],
    aspect: tuple[float, float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """(n, h*w) bool masks, True = masked: each view masked with `probability`, its ratio ~ U(ratio).

    The blocks are drawn by Python's `random` seeded from torch's generator: reproducible under the
    run's seed, and many times faster than one torch call per draw.
    """
    rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
    masks = torch.zeros(n, grid[0] * grid[1], dtype=torch.bool)
    for i in range(n):
        if rng.random() < probability:
            masks[i] = block_mask(grid, rng.uniform(*ratio), aspect, rng).flatten()
    return masks
