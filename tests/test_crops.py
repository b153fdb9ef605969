"""Batched random resized crops: torchvision's box distribution and fallback, its resampling where a crop
is upsampled, flips; MultiView's batched and per-image paths; decoded images kept between epochs."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ssl_vit.config import DataConfig
from ssl_vit.data import exact, train_loader
from ssl_vit.data.crops import RATIO, crop_boxes, random_resized_crops, resample
from ssl_vit.data.views import MultiView
from ssl_vit.types import ViewSpec


@pytest.mark.parametrize(("height", "width", "scale"), [(16, 16, (0.6, 1.0)), (20, 36, (0.08, 1.0))])
def test_boxes_are_drawn_as_torchvisions_crops(height: int, width: int, scale: tuple[float, float]) -> None:
    """Whole-pixel boxes inside the image with area and ratio in range (up to rounding), and the same
    distribution as `RandomResizedCrop.make_params` over 4,000 draws: mean area, width and offset."""
    torch.manual_seed(0)
    boxes = crop_boxes(4000, height, width, scale)
    x1, y1, x2, y2 = boxes.unbind(1)
    w, h = x2 - x1, y2 - y1
    assert torch.equal(boxes, boxes.round()) and (x1 >= 0).all() and (y1 >= 0).all()
    assert (x2 <= width).all() and (y2 <= height).all() and (w > 0).all() and (h > 0).all()
    area = w * h / (height * width)
    slack = 2 * (w + h + 1) / (height * width)  # rounding w and h to whole pixels
    assert (area >= scale[0] - slack).all() and (area <= scale[1] + slack).all()
    crop = v2.RandomResizedCrop(8, scale=scale)
    image = torch.zeros(1, height, width)
    theirs = torch.tensor(
        [
            [p["left"], p["top"], p["width"], p["height"]]
            for p in (crop.make_params([image]) for _ in range(4000))
        ],
        dtype=torch.float,
    )
    ours = torch.stack([x1, y1, w, h], dim=1)
    spread = theirs.std(0) / math.sqrt(4000)
    assert ((ours.mean(0) - theirs.mean(0)).abs() < 5 * spread + 1e-6).all(), (ours.mean(0), theirs.mean(0))
    assert abs((w * h).mean() - (theirs[:, 2] * theirs[:, 3]).mean()) < 0.03 * height * width


def test_no_try_that_fits_falls_back_to_torchvisions_centre_crop() -> None:
    """A 4x40 image at scale 1: no box of ratio 3/4-4/3 fits, so the centre crop at ratio 4/3."""
    boxes = crop_boxes(5, 4, 40, (1.0, 1.0))
    params = v2.RandomResizedCrop(8, scale=(1.0, 1.0)).make_params([torch.zeros(1, 4, 40)])
    left, top, w, h = params["left"], params["top"], params["width"], params["height"]
    assert torch.equal(boxes, torch.tensor([[left, top, left + w, top + h]] * 5, dtype=torch.float))


def test_crops_are_resampled_as_torchvisions_antialiased_resized_crop() -> None:
    """The same pixels as `resized_crop(..., antialias=True)` for crops smaller than the output (bilinear,
    edges clamped to the crop), larger (the antialiasing triangle filter) and at the image's borders."""
    torch.manual_seed(0)
    images = torch.rand(7, 3, 40, 36)
    boxes = [
        [0, 0, 36, 40],
        [2, 3, 10, 9],
        [1, 0, 5, 7],
        [0, 4, 36, 40],
        [3, 3, 4, 4],
        [5, 1, 31, 30],
        [30, 2, 36, 39],
    ]
    ours = resample(images, torch.tensor(boxes, dtype=torch.float), 16)
    for image, (x1, y1, x2, y2), out in zip(images, boxes, ours, strict=True):
        theirs = TF.resized_crop(image, y1, x1, y2 - y1, x2 - x1, [16, 16], antialias=True)
        torch.testing.assert_close(out, theirs, atol=1e-5, rtol=0)
    as_uint8 = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(
        resample(as_uint8, torch.tensor(boxes[:1], dtype=torch.float), 16)[0] * 255,
        TF.resized_crop(as_uint8[0], 0, 0, 40, 36, [16, 16], antialias=True).float(),
        atol=1.0,  # torchvision rounds each pass of a uint8 resize to uint8
        rtol=0,
    )


def test_uint8_batches_come_out_as_float_in_unit_range_and_flip_half_the_time() -> None:
    torch.manual_seed(0)
    ramp = torch.arange(16, dtype=torch.uint8).expand(400, 1, 16, 16) * 16  # brighter to the right
    whole = random_resized_crops(ramp, 16, (1.0, 1.0), hflip=False, ratio=(1.0, 1.0))
    torch.testing.assert_close(whole, ramp.float() / 255)
    flipped = random_resized_crops(ramp, 16, (1.0, 1.0), hflip=True, ratio=(1.0, 1.0))
    mirrored = (flipped[:, 0, 0, 0] > flipped[:, 0, 0, -1]).float().mean().item()
    assert abs(mirrored - 0.5) < 5 * math.sqrt(0.25 / 400)
    assert RATIO == (3 / 4, 4 / 3)


def test_multiview_crops_a_batch_at_once_or_image_by_image_when_sizes_differ() -> None:
    spec = ViewSpec(kind="contrastive", global_views=2, local_views=2, local_size=8)
    views = MultiView(spec, 16, 1, [0.5], [0.5])
    same = [torch.randint(0, 256, (1, 20, 20), dtype=torch.uint8) for _ in range(5)]
    mixed = [torch.randint(0, 256, (1, 20 + i, 24), dtype=torch.uint8) for i in range(5)]
    for images in (same, mixed):
        crops = views.batch_crops(images)
        assert [tuple(c.shape) for c in crops] == [(5, 1, 16, 16)] * 2 + [(5, 1, 8, 8)] * 2
        finished = views.finish(crops)
        assert all(f.dtype == torch.float32 and f.min() >= -1 and f.max() <= 1 for f in finished)


def test_decoded_images_are_kept_between_epochs_without_changing_a_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The digits set for two epochs in the main process: the same batches whether decoded images are
    kept or not; kept, no sample is read from its shard twice."""
    reads: list[int] = []
    read = exact.Catalog.read
    monkeypatch.setattr(exact.Catalog, "read", lambda self, files, i: reads.append(i) or read(self, files, i))

    def two_epochs(keep: int) -> list[torch.Tensor]:
        monkeypatch.setattr(exact, "KEEP_DECODED_BYTES", keep)
        reads.clear()
        data = DataConfig(train="digits", mean=[0.5], std=[0.5])
        loader = train_loader(data, ViewSpec(kind="masked", global_views=1), 16, 1, 64, 0)
        return [batch.views[0] for _ in range(2) for batch in loader]

    fresh = two_epochs(0)
    assert len(reads) == len(fresh) * 64 and len(set(reads)) < len(reads)
    kept = two_epochs(256 << 20)
    assert len(reads) == len(set(reads)) > 0.9 * 1257
    assert len(fresh) == len(kept) and all(torch.equal(a, b) for a, b in zip(fresh, kept, strict=True))
