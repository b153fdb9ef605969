"""Colour distortion and normalisation of a collated batch of views (`BatchColour`).

SimCLR/BYOL's distortion (Chen et al. 2020, appendix A; Grill et al. 2020, table 6) with torchvision's
formulas, written for the CPU of a loader worker at any view size:

- All random draws of a batch are made first (`Draws`), then the pixels are processed in chunks of
  about `CHUNK` values (one 224-px view, a few 96-px views, the whole batch of 16-32 px views), so that
  an image stays in the core's cache through all its operations and no batch-sized temporary is made.
- Each operation runs only on the samples that drew it (blur on view 2 has p=0.1), in place.
- Only float kernels: on the CPU, torch's bool tensors (`torch.where`, masks, `x > y`), `%` and
  `max(dim)` cost 8-80x an add (torch 2.14, AVX-512), so selections are `lerp`s by float masks and
  `mod` is `x - floor(x)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK = 1 << 18  # values per chunk: 1 MB of float32, in a core's L2 with its temporaries
BLUR_TAIL = 1e-6  # blur taps whose weights sum to less than this are skipped
_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, torchvision's weights


@dataclass
class Draws:
    """A batch's random draws, in the order they are made; masks (B,) bool, factors (B,).

    `order` lists the jitter operations (0 brightness, 1 contrast, 2 saturation, 3 hue) in this batch's
    order, `factors[i]` is the factor of `order[i]` (hue: a shift in turns). A mask is None where the
    operation is off.
    """

    jitter: Tensor | None
    order: list[int]
    factors: list[Tensor]
    gray: Tensor | None
    blur: Tensor | None
    sigma: Tensor | None
    solarize: Tensor | None


@dataclass
class BatchColour:
    """A view's colour distortion and normalisation, applied to a whole batch at once.

    Colour jitter with probability `jitter_p` (brightness, contrast, saturation, hue, in an order drawn
    per batch), grayscale with `grayscale_p`, Gaussian blur (sigma 0.1-2, `kernel_size` taps) with
    `blur_p`, solarize with `solarize_p`; each sample draws whether an operation applies and its
    strength on its own. Per batch rather than per image because torchvision's per-image transforms
    cost ~1-4 ms per small view in Python dispatch, more than the model step for 16-32 px images.
    `jitter` of None or all zeros means no jitter. One-channel data keeps brightness/contrast, blur and
    solarize.
    """

    mean: Sequence[float]
    std: Sequence[float]
    jitter: tuple[float, float, float, float] | None = None
    jitter_p: float = 0.8
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    kernel_size: int = 3
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        # (1, C, 1, 1) each, made once: per batch they would cost as much as normalising digits' pixels
        self._mean_std = tuple(
            torch.tensor(list(v), dtype=torch.float32).view(1, -1, 1, 1) for v in (self.mean, self.std)
        )

    def __call__(self, views: Tensor) -> Tensor:
        """(B, C, H, W) uint8 or float in [0, 1] -> float32, distorted and normalised (a new tensor)."""
        batch, chans = views.shape[:2]
        draws = self.draw(batch, chans)
        mean, std = self._mean_std
        step, scratch = max(1, CHUNK // max(1, math.prod(views.shape[1:]))), Scratch()
        distorts = any(m is not None for m in (draws.jitter, draws.gray, draws.blur, draws.solarize))
        if step >= batch:  # one chunk: the whole batch
            out = views.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        else:
            out = torch.empty(views.shape)
        for start in range(0, batch, step):
            chunk = out if step >= batch else out[start : start + step].copy_(views[start : start + step])
            if views.dtype == torch.uint8:  # chunk: (n, C, H, W)
                chunk.div_(255.0)
            if distorts:
                self.distort(chunk, draws, torch.arange(start, start + len(chunk)), scratch)
            chunk.sub_(mean).div_(std)
        return out

    def draw(self, batch: int, chans: int) -> Draws:
        """Every random number the batch needs; factors are drawn for all samples, used by those chosen."""
        jitter, order, factors = None, [], []
        if self.jitter is not None and self.jitter_p > 0:
            jitter = torch.rand(batch) < self.jitter_p
            b, c, s, h = self.jitter
            colour = chans == 3
            ops = [i for i, v in enumerate((b, c, s if colour else 0.0, h if colour else 0.0)) if v > 0]
            for op in torch.randperm(len(ops)).tolist():
                order.append(ops[op])
                v = self.jitter[ops[op]]
                low, high = (-v, v) if ops[op] == 3 else (max(0.0, 1 - v), 1 + v)
                factors.append(torch.rand(batch) * (high - low) + low)
        gray = torch.rand(batch) < self.grayscale_p if self.grayscale_p > 0 and chans == 3 else None
        blur, sigma = None, None
        if self.blur_p > 0:
            blur = torch.rand(batch) < self.blur_p
            sigma = torch.rand(batch) * 1.9 + 0.1
        solarize = torch.rand(batch) < self.solarize_p if self.solarize_p > 0 else None
        return Draws(jitter, order, factors, gray, blur, sigma, solarize)

    def distort(self, x: Tensor, draws: Draws, rows: Tensor, scratch: Scratch | None = None) -> None:
        """Distort `x` (n, C, H, W) in [0, 1] in place; `rows` (n,) are its samples' places in the batch."""
        scratch = scratch or Scratch()

        def jitter(y: Tensor, rows: Tensor) -> None:
            for op, factor in zip(draws.order, draws.factors, strict=True):
                f = factor[rows].view(-1, 1, 1, 1)  # (n, 1, 1, 1)
                if op == 0:
                    y.mul_(f)
                elif op == 1:
                    mean = gray(y, scratch).mean(dim=(1, 2, 3), keepdim=True)  # (n, 1, 1, 1)
                    y.mul_(f).add_((1 - f) * mean)
                elif op == 2:
                    grey = gray(y, scratch).mul_(1 - f)  # (n, 1, H, W), before y changes
                    y.mul_(f).add_(grey)
                else:
                    shift_hue(y, f, scratch)
                y.clamp_(0.0, 1.0)

        def blur_rows(y: Tensor, rows: Tensor) -> None:
            assert draws.sigma is not None
            blur(y, draws.sigma[rows], self.kernel_size, scratch)

        def solarize(y: Tensor, _: Tensor) -> None:  # x >= 0.5: 1 - x, else x
            torch.minimum(y, torch.mul(y, -1.0, out=scratch.get("full", y.shape)).add_(1.0), out=y)

        steps: list[tuple[Tensor | None, Callable[[Tensor, Tensor], object]]] = [
            (draws.jitter, jitter),
            (draws.gray, lambda y, _: y.copy_(gray(y, scratch).expand_as(y))),
            (draws.blur, blur_rows),
            (draws.solarize, solarize),
        ]
        for chosen, op in steps:  # each on the samples that drew it, and on no other
            if chosen is None:
                continue
            which = chosen[rows].nonzero()[:, 0]
            if len(which) == len(rows):
                op(x, rows)
            elif len(which) > 0:  # on a copy of the chosen samples, written back
                y = torch.index_select(x, 0, which, out=scratch.get("chosen", (len(which), *x.shape[1:])))
                op(y, rows[which])
                x.index_copy_(0, which, y)


class Scratch:
    """Temporaries by name, reused across a batch's chunks and operations.

    glibc gives freed blocks above its trim threshold back to the OS, so a fresh 200 KB temporary per
    kernel costs page faults, which in a loaded VM cost as much as the arithmetic (measured: jitter of
    a 224-px view 1.3-2.3 ms with fresh temporaries, 0.6-1.0 ms with glibc told to keep its memory).
    """

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: Sequence[int]) -> Tensor:
        """A float32 tensor of `shape` (uninitialised), the same memory each time `name` is asked for."""
        size = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[name] = torch.empty(size)
        return buffer[:size].view(*shape)


def gray(x: Tensor, scratch: Scratch | None = None) -> Tensor:
    """(n, C, H, W) -> (n, 1, H, W): luma as torchvision's `rgb_to_grayscale` (one channel: a copy)."""
    out = (scratch or Scratch()).get("gray", (x.shape[0], 1, *x.shape[2:]))
    if x.shape[1] == 1:
        return out.copy_(x)
    torch.mul(x[:, 0:1], _LUMA[0], out=out)
    return out.add_(x[:, 1:2], alpha=_LUMA[1]).add_(x[:, 2:3], alpha=_LUMA[2])


def shift_hue(x: Tensor, shift: Tensor, scratch: Scratch | None = None) -> Tensor:
    """Rotate the hue of RGB `x` (n, 3, H, W) in [0, 1] by `shift` (n, 1, 1, 1) turns, in place.

    torchvision's `adjust_hue` (RGB -> HSV, h + shift mod 1, HSV -> RGB) without building S or the six
    sectors: with v = max, d = max - min and hue H in [0, 6), each channel comes back as
    v - d * clamp(2 - |k - 2|, 0, 1), k = (H + n) mod 6, n = 5, 3, 1 for R, G, B.
    """
    scratch = scratch or Scratch()
    plane = (x.shape[0], *x.shape[2:])
    value, delta, hue, other, is_r, is_g = (scratch.get(f"hue{i}", plane) for i in range(6))
    r, g, b = x[:, 0], x[:, 1], x[:, 2]  # (n, H, W) each
    torch.amax(x, dim=1, out=value)
    torch.sub(value, torch.amin(x, dim=1, out=delta), out=delta)
    torch.eq(value, r, out=is_r)  # float masks: bool tensors are slow
    torch.eq(value, g, out=is_g)
    # H = (g - b) / d if R is the max, 2 + (b - r) / d if G, else 4 + (r - g) / d
    torch.lerp(torch.sub(r, g, out=hue), torch.sub(b, r, out=other), is_g, out=hue)
    torch.lerp(hue, torch.sub(g, b, out=other), is_r, out=hue)
    hue.div_(torch.clamp(delta, min=1e-12, out=other))
    hue.add_(is_g.mul_(-2.0).add_(4.0).mul_(is_r.neg_().add_(1.0))).add_(6.0 * shift[:, 0])
    turns = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.add(hue[:, None], turns, out=x).div_(6.0)  # r, g, b are spent: overwrite x
    k.sub_(torch.floor(k, out=scratch.get("full", k.shape))).mul_(6.0)  # mod 6, as x - floor(x)
    k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return k.mul_(delta[:, None]).neg_().add_(value[:, None])  # (n, 3, H, W)


def blur(x: Tensor, sigma: Tensor, size: int, scratch: Scratch | None = None) -> Tensor:
    """Gaussian blur of `x` (n, C, H, W) with `sigma` (n,) and `size` taps, in place: separable, reflect
    padding, as torchvision's `gaussian_blur`.

    Outer taps whose weights sum to less than `BLUR_TAIL` are left out (for sigma 0.5, 19 of 23), which
    moves each output by less than 2 * BLUR_TAIL for inputs in [0, 1]. The taps are summed as shifted
    slices: a grouped `conv2d` with a kernel per sample is ~10x slower on the CPU.
    """
    scratch = scratch or Scratch()
    pad = size // 2
    offsets = torch.arange(-pad, pad + 1, dtype=x.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))  # (n, size)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True))[:, pad:]  # (n, pad + 1): offsets 0..pad
    beyond = 2 * kernel.flip(1).cumsum(1).flip(1)[:, 1:]  # (n, pad): weight at |offset| >= j
    radius = int((beyond >= BLUR_TAIL).sum(dim=1).max()) if pad > 0 else 0
    weights = kernel.T[:, :, None, None, None]  # (pad + 1, n, 1, 1, 1)
    rows = scratch.get("blur", x.shape)
    for dim, source, target in ((2, x, rows), (3, rows, x)):
        length = x.shape[dim]
        shape = [*x.shape]
        shape[dim] += 2 * radius
        padded = scratch.get(f"pad{dim}", shape)  # reflect padding, as F.pad(mode="reflect")
        padded.narrow(dim, radius, length).copy_(source)
        padded.narrow(dim, 0, radius).copy_(source.narrow(dim, 1, radius).flip(dim))
        padded.narrow(dim, radius + length, radius).copy_(
            source.narrow(dim, length - 1 - radius, radius).flip(dim)
        )
        torch.mul(padded.narrow(dim, radius, length), weights[0], out=target)
        for j in range(1, radius + 1):
            target.addcmul_(padded.narrow(dim, radius - j, length), weights[j])
            target.addcmul_(padded.narrow(dim, radius + j, length), weights[j])
    return x
