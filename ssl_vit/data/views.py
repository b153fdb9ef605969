"""Turn one image into the views an objective asks for (its `ViewSpec`).

Geometry (torchvision.transforms.v2 random resized crop, flip) runs per image on (C, H, W) tensors,
uint8 from the shards or float in [0, 1]; colour and normalisation run per batch (`BatchColour`). Per
objective family (`ViewSpec.kind`): `supervised` random resized crop + flip; `masked` (MPP, MAE)
the same light geometry only; `contrastive` (SimCLR, MoCo v3, DINO) adds colour jitter, grayscale,
blur and, on the second view, solarize; DINO's local crops come from `ViewSpec.local_views`. The
recipe scales colour strength (`data.aug_strength`). Single-channel data keeps only the colour
operations that mean something on one channel. Normalisation comes last, with the recipe's mean/std
(which the export records).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

from ssl_vit.config import DataConfig
from ssl_vit.errors import RecipeError
from ssl_vit.types import ViewSpec

Transform = Callable[[Tensor], Tensor]


def _blur_kernel(size: int) -> int:
    """An odd kernel about 10% of the view's side, as in SimCLR (3 px at 32 px, 23 px at 224 px)."""
    return max(3, (size // 10) // 2 * 2 + 1)


BYOL_JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue (Grill et al. 2020, B)


def check_jitter(jitter: Sequence[float]) -> tuple[float, float, float, float]:
    """`data.color_jitter`: four non-negative values, hue at most 0.5 (half the colour wheel)."""
    if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
        raise RecipeError(
            "data.color_jitter needs [brightness, contrast, saturation, hue], each >= 0 and hue <= 0.5, "
            f"got {list(jitter)}"
        )
    b, c, s, h = (float(v) for v in jitter)
    return b, c, s, h


@dataclass
class BatchColour:
    """A view's colour distortion and normalisation, applied to a whole batch at once.

    SimCLR/BYOL's distortion (Chen et al. 2020, appendix A; Grill et al. 2020, table 6): colour
    jitter with probability `jitter_p` (brightness, contrast, saturation, hue, in an order drawn per
    batch), grayscale with `grayscale_p`, Gaussian blur (sigma 0.1-2) with `blur_p`, solarize with
    `solarize_p`; each sample draws whether an operation applies and its strength on its own. Done on
    (B, C, H, W) rather than per image because torchvision's per-image transforms cost ~1-4 ms per
    small view in Python dispatch, more than the model step for 16-32 px images. `jitter` of None or
    all zeros means no jitter. One-channel data keeps brightness/contrast, blur and solarize.
    """

    mean: Sequence[float]
    std: Sequence[float]
    jitter: tuple[float, float, float, float] | None = None
    jitter_p: float = 0.8
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    kernel_size: int = 3
    solarize_p: float = 0.0

    def __call__(self, views: Tensor) -> Tensor:
        """(B, C, H, W) uint8 or float in [0, 1] -> float32, distorted and normalised."""
        x = views.float() / 255.0 if views.dtype == torch.uint8 else views.float()
        batch = x.shape[0]
        if self.jitter is not None and self.jitter_p > 0:
            x = _where(torch.rand(batch) < self.jitter_p, _jitter(x, self.jitter), x)
        if self.grayscale_p > 0 and x.shape[1] == 3:
            x = _where(torch.rand(batch) < self.grayscale_p, _gray(x).expand_as(x), x)
        if self.blur_p > 0:
            x = _where(torch.rand(batch) < self.blur_p, blur(x, self.kernel_size), x)
        if self.solarize_p > 0:
            x = _where((torch.rand(batch) < self.solarize_p).view(-1, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
        mean = torch.tensor(list(self.mean), dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(list(self.std), dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


def _where(apply: Tensor, changed: Tensor, x: Tensor) -> Tensor:
    """Per sample: `changed` where `apply` (B,) or (B, C, H, W) is True, else `x`."""
    return torch.where(apply.view(-1, 1, 1, 1) if apply.dim() == 1 else apply, changed, x)


def _uniform(batch: int, low: float, high: float) -> Tensor:
    return (torch.rand(batch) * (high - low) + low).view(-1, 1, 1, 1)  # (B, 1, 1, 1)


def _gray(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 1, H, W): ITU-R 601 luma, torchvision's weights (one channel: itself)."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.2989, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _jitter(x: Tensor, jitter: tuple[float, float, float, float]) -> Tensor:
    """torchvision's `ColorJitter` with a factor per sample: brightness, contrast and saturation
    blend with black, the mean grey level and the grey image; hue rotates H in HSV."""
    b, c, s, h = jitter
    batch, colour = x.shape[0], x.shape[1] == 3
    ops = [i for i, v in enumerate((b, c, s if colour else 0.0, h if colour else 0.0)) if v > 0]
    for op in torch.randperm(len(ops)).tolist():
        kind = ops[op]
        if kind == 0:
            x = x * _uniform(batch, max(0.0, 1 - b), 1 + b)
        elif kind == 1:
            f = _uniform(batch, max(0.0, 1 - c), 1 + c)
            x = f * x + (1 - f) * _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        elif kind == 2:
            f = _uniform(batch, max(0.0, 1 - s), 1 + s)
            x = f * x + (1 - f) * _gray(x)
        else:
            x = shift_hue(x, _uniform(batch, -h, h))
        x = x.clamp(0.0, 1.0)
    return x


def shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by `shift` (B, 1, 1, 1) turns of the colour wheel: RGB -> HSV -> RGB."""
    r, g, b = x.unbind(dim=1)  # (B, H, W) each
    value, _ = x.max(dim=1)
    delta = value - x.min(dim=1).values
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(
        value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    sat = delta / value.clamp(min=1e-12)  # 0 where value is 0 (then delta is 0 too)
    hue = (hue + shift[:, 0]) % 1.0
    # HSV -> RGB: each channel is v - v s max(0, min(k, 4 - k, 1)), k = (n + 6 h) mod 6, n = 5, 3, 1
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype).view(1, 3, 1, 1) + 6 * hue[:, None]) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0.0, 1.0)
    return value[:, None] - value[:, None] * sat[:, None] * ramp  # (B, 3, H, W)


def blur(x: Tensor, size: int) -> Tensor:
    """Gaussian blur with sigma ~ U(0.1, 2) per sample, separable, reflect padding (torchvision's)."""
    batch, chans, height, width = x.shape
    sigma = torch.rand(batch) * 1.9 + 0.1  # (B,)
    offsets = torch.arange(size, dtype=x.dtype) - (size - 1) / 2
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(chans, dim=0)  # (B*C, size)
    pad = size // 2
    flat = x.reshape(1, batch * chans, height, width)
    flat = F.conv2d(
        F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel[:, None, :, None], groups=batch * chans
    )
    flat = F.conv2d(
        F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=batch * chans
    )
    return flat.reshape(batch, chans, height, width)


def _colour(
    kind: str,
    mean: Sequence[float],
    std: Sequence[float],
    strength: float,
    in_chans: int,
    size: int,
    solarize: float,
    blur: float,
    jitter: Sequence[float] = BYOL_JITTER,
) -> BatchColour:
    """The batch part of a view: SimCLR/BYOL colour distortion for contrastive views, else only
    normalisation. Grayscale data (digits) keeps brightness/contrast jitter, blur and solarize;
    saturation, hue and random grayscale need colour and are left out (in `BatchColour`)."""
    if kind != "contrastive" or strength <= 0:
        return BatchColour(mean, std)
    b, c, s, h = (v * strength for v in jitter)
    return BatchColour(
        mean,
        std,
        jitter=(b, c, s, min(h, 0.5)),
        grayscale_p=0.2 if in_chans == 3 else 0.0,
        blur_p=blur,
        kernel_size=_blur_kernel(size),
        solarize_p=solarize,
    )


@dataclass
class View:
    """One view's pipeline: `geometry` per image (crop, flip; uint8 stays uint8), then `colour` on the
    batch (conversion to float, distortion, normalisation)."""

    geometry: Transform
    colour: BatchColour

    def __call__(self, image: Tensor) -> Tensor:
        """One image: (C, H, W) uint8 or float in [0, 1] -> (C, size, size) float, normalised."""
        return self.colour(self.geometry(image)[None])[0]


def view_transform(
    kind: str,
    size: int,
    scale: tuple[float, float],
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    strength: float = 1.0,
    second_view: bool = False,
    hflip: bool = True,
    local: bool = False,
    jitter: Sequence[float] = BYOL_JITTER,
) -> View:
    """One augmentation pipeline: (C, H, W) uint8 or float in [0, 1] -> (C, size, size) float, normalised.

    Geometry runs first, per image, on whatever dtype arrives (cropping uint8 is cheaper); the
    conversion to float, colour and normalisation run on the batch.
    """
    flip: list[Transform] = [v2.RandomHorizontalFlip()] if hflip else []
    geometry: list[Transform]
    if kind == "eval":
        geometry = [v2.Resize((size, size), antialias=True)]
    elif kind in ("supervised", "masked", "contrastive"):
        geometry = [v2.RandomResizedCrop(size, scale=scale, antialias=True), *flip]
    else:
        raise RecipeError(f"unknown view kind '{kind}' (supervised, masked, contrastive, eval)")
    # BYOL / MoCo v3 / DINO asymmetry (Grill et al. 2020, Table 6): view 1 always blurred, view 2
    # rarely blurred but sometimes solarized; DINO's local crops blur half the time (Caron et al. 2021).
    blur, solarize = (0.5, 0.0) if local else (0.1, 0.2) if second_view else (1.0, 0.0)
    colour = _colour(kind, mean, std, strength, in_chans, size, solarize, blur, jitter)
    return View(v2.Compose(geometry), colour)


class MultiView:
    """Image -> list of views, global views first (what `Batch.views` holds).

    `crops(image)` is the per-image part and `finish(views)` the batched part (what the shard stream
    runs on each collated batch); calling the object does both for one image.
    """

    def __init__(
        self,
        spec: ViewSpec,
        img_size: int,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        strength: float = 1.0,
        hflip: bool = True,
        crop_scale: float | None = None,
        color_jitter: Sequence[float] | None = None,
    ) -> None:
        if len(mean) != in_chans or len(std) != in_chans:
            raise RecipeError(
                f"data.mean/std need {in_chans} values (model.in_chans), got {len(mean)}/{len(std)}"
            )
        global_scale = (crop_scale, spec.global_scale[1]) if crop_scale is not None else spec.global_scale
        jitter = BYOL_JITTER if color_jitter is None else check_jitter(color_jitter)
        self.views: list[View] = [
            view_transform(
                spec.kind, img_size, global_scale, in_chans, mean, std, strength, i == 1, hflip, jitter=jitter
            )
            for i in range(spec.global_views)
        ]
        local_size = spec.local_size or max(img_size // 2, 1)
        self.views += [
            view_transform(
                spec.kind,
                local_size,
                spec.local_scale,
                in_chans,
                mean,
                std,
                strength,
                hflip=hflip,
                local=True,
                jitter=jitter,
            )
            for _ in range(spec.local_views)
        ]

    @classmethod
    def for_data(cls, spec: ViewSpec, img_size: int, in_chans: int, data: DataConfig) -> MultiView:
        """The views of `spec` with a recipe's `data` settings (normalisation, strength, flips,
        crop scale, colour jitter)."""
        return cls(
            spec,
            img_size,
            in_chans,
            data.mean,
            data.std,
            data.aug_strength,
            data.hflip,
            data.crop_scale,
            data.color_jitter,
        )

    def crops(self, image: Tensor) -> list[Tensor]:
        """(C, H, W) -> each view's crop (C, size_i, size_i), still in the input's dtype."""
        return [view.geometry(image) for view in self.views]

    def finish(self, views: list[Tensor]) -> list[Tensor]:
        """Each view's batch (B, C, size_i, size_i) -> float, colour-distorted, normalised."""
        return [view.colour(batch) for view, batch in zip(self.views, views, strict=True)]

    def __call__(self, image: Tensor) -> list[Tensor]:
        return [view(image) for view in self.views]


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> View:
    """Deterministic resize + normalise, for feature extraction."""
    return view_transform("eval", img_size, (1.0, 1.0), len(mean), mean, std)


def match_channels(image: Tensor, in_chans: int) -> Tensor:
    """Repeat a grayscale image to `in_chans` channels (or average RGB to one)."""
    if image.shape[0] == in_chans:
        return image
    if image.shape[0] == 1:
        return image.expand(in_chans, *image.shape[1:]).contiguous()
    if in_chans == 1:
        return image.mean(dim=0, keepdim=True)
    raise RecipeError(f"images have {image.shape[0]} channels but model.in_chans is {in_chans}")


def resize(images: Tensor, size: int) -> Tensor:
    """(N, C, h, w) -> (N, C, size, size), bilinear with antialias, clamped to [0, 1]."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.nn.functional.interpolate(
        images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return out.clamp_(0.0, 1.0)
