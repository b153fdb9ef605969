"""Turn one image into the views an objective asks for (its `ViewSpec`).

Built on torchvision.transforms.v2 over (C, H, W) tensors, uint8 from the shards or float in [0, 1].
Per objective family (`ViewSpec.kind`): `supervised` random resized crop + flip; `masked` (MPP, MAE)
the same light geometry only; `contrastive` (SimCLR, MoCo v3, DINO) adds colour jitter, grayscale,
blur and, on the second view, solarize; DINO's local crops come from `ViewSpec.local_views`. The
recipe scales colour strength (`data.aug_strength`). Single-channel data keeps only the colour
operations that mean something on one channel. Normalisation comes last, with the recipe's mean/std
(which the export records).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2

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


def _colour(
    strength: float,
    in_chans: int,
    size: int,
    solarize: float,
    blur: float,
    jitter: Sequence[float] = BYOL_JITTER,
) -> list[Transform]:
    """SimCLR/BYOL colour distortion; on one channel, the parts that mean something there.

    Grayscale data (digits) keeps brightness/contrast jitter, blur and solarize; saturation, hue and
    random grayscale need colour and are left out.
    """
    if strength <= 0:
        return []
    b, c, s, h = (v * strength for v in jitter)
    colour = v2.ColorJitter(b, c, s, min(h, 0.5)) if in_chans == 3 else v2.ColorJitter(b, c)
    steps: list[Transform] = [v2.RandomApply([colour], p=0.8)]
    if in_chans == 3:
        steps.append(v2.RandomGrayscale(p=0.2))
    steps.append(v2.RandomApply([v2.GaussianBlur(_blur_kernel(size), sigma=(0.1, 2.0))], p=blur))
    if solarize > 0:
        steps.append(v2.RandomSolarize(0.5, p=solarize))
    return steps


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
) -> Transform:
    """One augmentation pipeline: (C, H, W) uint8 or float in [0, 1] -> (C, size, size) float, normalised.

    Geometry runs first, on whatever dtype arrives (cropping uint8 is cheaper), then the conversion
    to float in [0, 1], colour, and normalisation.
    """
    crop = v2.RandomResizedCrop(size, scale=scale, antialias=True)
    flip: list[Transform] = [v2.RandomHorizontalFlip()] if hflip else []
    to_float = v2.ToDtype(torch.float32, scale=True)
    steps: list[Transform]
    if kind == "eval":
        steps = [v2.Resize((size, size), antialias=True), to_float]
    elif kind in ("supervised", "masked"):
        steps = [crop, *flip, to_float]
    elif kind == "contrastive":
        # BYOL / MoCo v3 / DINO asymmetry (Grill et al. 2020, Table 6): view 1 always blurred, view 2
        # rarely blurred but sometimes solarized; DINO's local crops blur half the time (Caron et al. 2021).
        blur, solarize = (0.5, 0.0) if local else (0.1, 0.2) if second_view else (1.0, 0.0)
        steps = [crop, *flip, to_float, *_colour(strength, in_chans, size, solarize, blur, jitter)]
    else:
        raise RecipeError(f"unknown view kind '{kind}' (supervised, masked, contrastive, eval)")
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


class MultiView:
    """Callable image -> list of views, global views first (what `Batch.views` holds)."""

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
        self.transforms: list[Transform] = [
            view_transform(
                spec.kind, img_size, global_scale, in_chans, mean, std, strength, i == 1, hflip, jitter=jitter
            )
            for i in range(spec.global_views)
        ]
        local_size = spec.local_size or max(img_size // 2, 1)
        self.transforms += [
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

    def __call__(self, image: Tensor) -> list[Tensor]:
        return [t(image) for t in self.transforms]


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> Transform:
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
