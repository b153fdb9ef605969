"""Turn one image into the views an objective asks for (its `ViewSpec`).

Built on torchvision.transforms.v2 over float tensors in [0, 1]. Colour augmentations are skipped
for single-channel data, where they have no meaning. Normalisation comes last, with the recipe's
mean/std (which the export records).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2

from ssl_vit.errors import RecipeError
from ssl_vit.types import ViewSpec

Transform = Callable[[Tensor], Tensor]


def _colour(strength: float, in_chans: int, solarize: float, blur: float) -> list[Transform]:
    if in_chans != 3 or strength <= 0:
        return []
    s = strength
    return [
        v2.RandomApply([v2.ColorJitter(0.4 * s, 0.4 * s, 0.2 * s, 0.1 * s)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 2.0))], p=blur),
        v2.RandomSolarize(0.5, p=solarize),
    ]


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
) -> Transform:
    """One augmentation pipeline: (C, H, W) in [0, 1] -> (C, size, size), normalised."""
    crop = v2.RandomResizedCrop(size, scale=scale, antialias=True)
    flip: list[Transform] = [v2.RandomHorizontalFlip()] if hflip else []
    steps: list[Transform]
    if kind == "eval":
        steps = [v2.Resize((size, size), antialias=True)]
    elif kind in ("supervised", "masked"):
        steps = [crop, *flip]
    elif kind == "contrastive":
        # BYOL/MoCo v3 asymmetry: the second view gets solarize and less blur.
        steps = [crop, *flip] + _colour(
            strength, in_chans, solarize=0.2 if second_view else 0.0, blur=0.1 if second_view else 1.0
        )
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
    ) -> None:
        if len(mean) != in_chans or len(std) != in_chans:
            raise RecipeError(
                f"data.mean/std need {in_chans} values (model.in_chans), got {len(mean)}/{len(std)}"
            )
        global_scale = (crop_scale, spec.global_scale[1]) if crop_scale is not None else spec.global_scale
        self.transforms: list[Transform] = [
            view_transform(spec.kind, img_size, global_scale, in_chans, mean, std, strength, i == 1, hflip)
            for i in range(spec.global_views)
        ]
        local_size = spec.local_size or max(img_size // 2, 1)
        self.transforms += [
            view_transform(
                spec.kind, local_size, spec.local_scale, in_chans, mean, std, strength, hflip=hflip
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
