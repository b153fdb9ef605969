"""Random resized crops and flips of a whole batch of equal-size images, in one call.

Per image, torchvision's `RandomResizedCrop` costs about 0.1 ms of Python and dispatch whatever the
image's size; on a small data set (digits, 128 images of 8x8 a batch) that is most of the data time.
Here the crop boxes are drawn as torchvision draws them (`crop_boxes`: the same distribution, not
the same draws) and every crop is resampled at once (`resample`) as two batched matrix products,
with the weights of torchvision's antialiased bilinear resize of the crop: the same pixels, up to
float rounding (torchvision rounds a uint8 crop to uint8; these stay float). The matrices are dense,
so `MultiView` takes this path for small images only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

RATIO = (3 / 4, 4 / 3)  # torchvision's default aspect-ratio range (w / h)
TRIES = 10  # torchvision's attempts before its centre-crop fallback


def crop_boxes(
    n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float] = RATIO
) -> Tensor:
    """(n, 4) float boxes (x1, y1, x2, y2), pixel edges, of random resized crops.

    As `RandomResizedCrop.make_params`: up to 10 tries of an area drawn uniformly from `scale` x H x W
    and an aspect ratio drawn log-uniformly from `ratio`, rounded to whole pixels; the first that fits
    is placed uniformly at random, and an image where none fits gets the centre crop at the nearest
    allowed ratio.
    """
    area = torch.empty(n, TRIES).uniform_(*scale) * (height * width)
    aspect = torch.exp(torch.empty(n, TRIES).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (0 if none)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    fw, fh = _fallback(height, width, ratio)
    found = fits.any(dim=1)
    w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
    top = torch.where(found, torch.floor(torch.rand(n) * (height - h + 1)), float((height - fh) // 2))
    left = torch.where(found, torch.floor(torch.rand(n) * (width - w + 1)), float((width - fw) // 2))
    return torch.stack([left, top, left + w, top + h], dim=1)


def _fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's centre crop (w, h) when no try fits: the whole image, cut to the nearest ratio."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return width, int(round(width / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(height * max(ratio))), height
    return width, height


def resize_weights(start: Tensor, length: Tensor, out: int, size: int) -> Tensor:
    """(B, out, size) weights resizing the span [start, start + length) of an axis of `size` pixels to
    `out` pixels, per image: torch's antialiased bilinear kernel (`_upsample_bilinear2d_aa`), a
    triangle of half-width max(scale, 1) input pixels around each output pixel's centre, cut to the
    span and normalised. Upsampling, that is bilinear interpolation with the edges clamped."""
    scale = (length / out)[:, None, None]  # (B, 1, 1)
    support = scale.clamp_min(1.0)
    center = scale * (torch.arange(out, dtype=torch.float32)[None, :, None] + 0.5)  # (B, out, 1)
    offset = torch.arange(size, dtype=torch.float32)[None, None, :] - start[:, None, None]  # (B, 1, size)
    first = torch.trunc(center - support + 0.5).clamp_min(0.0)
    last = torch.minimum(torch.trunc(center + support + 0.5), length[:, None, None])
    weights = (1.0 - ((offset - center + 0.5) / support).abs()).clamp_min(0.0)
    weights = weights * ((offset >= first) & (offset < last))
    return weights / weights.sum(-1, keepdim=True)


def to_unit(images: Tensor) -> Tensor:
    """uint8 in [0, 255] or float in [0, 1] -> float32 in [0, 1] (a new tensor for uint8)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def resample(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """images (B, C, H, W) uint8 or float in [0, 1], boxes (B, 4) of whole pixels -> each box resized to
    (C, size, size), float in [0, 1]: as `torchvision.transforms.v2.functional.resized_crop` with
    antialiasing, for the whole batch in two matrix products."""
    x = to_unit(images)
    x1, y1, x2, y2 = boxes.unbind(1)
    rows = resize_weights(y1, y2 - y1, size, images.shape[-2])  # (B, size, H)
    cols = resize_weights(x1, x2 - x1, size, images.shape[-1])  # (B, size, W)
    return torch.einsum("boh,bchw,bpw->bcop", rows, x, cols)


def random_resized_crops(
    images: Tensor, size: int, scale: tuple[float, float], hflip: bool, ratio: tuple[float, float] = RATIO
) -> Tensor:
    """A random resized crop of each image (B, C, H, W), then a horizontal flip with probability 1/2
    (`hflip`): (B, C, size, size) float in [0, 1]."""
    n, _, height, width = images.shape
    out = resample(images, crop_boxes(n, height, width, scale, ratio), size)
    if hflip:
        flip = torch.rand(n) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out
