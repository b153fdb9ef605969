"""Turn one image into the views an objective asks for (its `ViewSpec`).

Geometry (random resized crop, flip) runs on (C, H, W) tensors, uint8 from the shards or float in
[0, 1]: on a batch of small equal-size images at once (`crops.py`), else per image with
torchvision v2; colour and normalisation run per batch (`BatchColour`, in `colour.py`). Per
objective family (`ViewSpec.kind`): `supervised` random resized crop + flip; `masked` (MPP, MAE) the
same light geometry only; `contrastive` (SimCLR, MoCo v3, DINO) adds colour jitter, grayscale, blur
and, on the second view, solarize; DINO's local crops come from `ViewSpec.local_views`. The recipe
scales colour strength (`data.aug_strength`). Single-channel data keeps only the colour operations
that mean something on one channel. Normalisation comes last, with the recipe's mean/std (which the
export records).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor
from torchvision.transforms import v2

from ssl_vit.config import DataConfig
from ssl_vit.data.colour import BatchColour
from ssl_vit.data.crops import random_resized_crops, to_unit
from ssl_vit.errors import RecipeError
from ssl_vit.types import ViewSpec

Transform = Callable[[Tensor], Tensor]


def _blur_kernel(size: int) -> int:
    """An odd kernel about 10% of the view's side, as in SimCLR (3 px at 32 px, 23 px at 224 px)."""
    return max(3, (size // 10) // 2 * 2 + 1)


BATCH_CROP_PIXELS = 64 * 64  # images up to this size are cropped a batch at a time (`crops.py`)
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
    """One view's pipeline: `geometry` per image (crop, flip; uint8 stays uint8) or `batch_geometry` on
    a batch of equal-size images (float in [0, 1] out), then `colour` on the batch (conversion to
    float, distortion, normalisation)."""

    geometry: Transform
    batch_geometry: Transform
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
    batch_geometry: Transform
    if kind == "eval":
        geometry = [v2.Resize((size, size), antialias=True)]
        batch_geometry = partial(_resized, size=size)
    elif kind in ("supervised", "masked", "contrastive"):
        geometry = [v2.RandomResizedCrop(size, scale=scale, antialias=True), *flip]
        batch_geometry = partial(random_resized_crops, size=size, scale=scale, hflip=hflip)
    else:
        raise RecipeError(f"unknown view kind '{kind}' (supervised, masked, contrastive, eval)")
    # BYOL / MoCo v3 / DINO asymmetry (Grill et al. 2020, Table 6): view 1 always blurred, view 2
    # rarely blurred but sometimes solarized; DINO's local crops blur half the time (Caron et al. 2021).
    blur, solarize = (0.5, 0.0) if local else (0.1, 0.2) if second_view else (1.0, 0.0)
    colour = _colour(kind, mean, std, strength, in_chans, size, solarize, blur, jitter)
    return View(v2.Compose(geometry), batch_geometry, colour)


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

    def batch_crops(self, images: list[Tensor]) -> list[Tensor]:
        """[(C, H, W)] -> each view's crops (B, C, size_i, size_i): in one call per view where the images
        share their size and are small (the built-in sets, small shards written at one size), else image
        by image (the batched resize is dense in the image's side)."""
        shapes = {image.shape for image in images}
        if len(shapes) == 1 and images[0].shape[-1] * images[0].shape[-2] <= BATCH_CROP_PIXELS:
            stacked = torch.stack(images)
            return [view.batch_geometry(stacked) for view in self.views]
        per_image = [self.crops(image) for image in images]
        return [torch.stack([crops[i] for crops in per_image]) for i in range(len(self.views))]

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


def _resized(images: Tensor, size: int) -> Tensor:
    """(N, C, h, w) uint8 or float in [0, 1] -> (N, C, size, size) float in [0, 1]."""
    return resize(to_unit(images), size)


def resize(images: Tensor, size: int) -> Tensor:
    """(N, C, h, w) -> (N, C, size, size), bilinear with antialias, clamped to [0, 1]."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.nn.functional.interpolate(
        images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return out.clamp_(0.0, 1.0)
