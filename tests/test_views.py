"""Views per objective family, on uint8 (shards) or float input, colour and grayscale."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from ssl_vit.data import colour as colour_lib
from ssl_vit.data.colour import BatchColour, Draws, blur, shift_hue
from ssl_vit.data.views import MultiView, View, eval_transform, view_transform
from ssl_vit.errors import RecipeError
from ssl_vit.types import ViewSpec


def geometry(view: View) -> set[str]:
    return {type(op).__name__ for op in view.geometry.transforms}  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["supervised", "masked", "contrastive"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_views_from_uint8_and_float_agree(kind: str, in_chans: int) -> None:
    image = torch.randint(0, 256, (in_chans, 20, 24), dtype=torch.uint8)
    t = view_transform(kind, 16, (0.3, 1.0), in_chans, [0.5] * in_chans, [0.25] * in_chans)
    torch.manual_seed(0)
    from_uint8 = t(image)
    torch.manual_seed(0)
    from_float = t(image.float() / 255)
    assert from_uint8.shape == (in_chans, 16, 16) and from_uint8.dtype == torch.float32
    assert (from_uint8 - from_float).abs().max() < 0.05  # uint8 resampling rounds, nothing more


def test_masked_views_are_geometry_only_and_contrastive_views_are_asymmetric() -> None:
    masked = view_transform("masked", 16, (0.3, 1.0), 3, [0.5] * 3, [0.5] * 3)
    assert geometry(masked) == {"RandomResizedCrop", "RandomHorizontalFlip"}
    assert masked.colour.jitter is None and masked.colour.blur_p == masked.colour.solarize_p == 0
    first = view_transform("contrastive", 16, (0.3, 1.0), 3, [0.5] * 3, [0.5] * 3).colour
    second = view_transform("contrastive", 16, (0.3, 1.0), 3, [0.5] * 3, [0.5] * 3, second_view=True).colour
    local = view_transform("contrastive", 8, (0.05, 0.3), 3, [0.5] * 3, [0.5] * 3, local=True).colour
    assert first.jitter == (0.4, 0.4, 0.2, 0.1) and first.grayscale_p == 0.2 and first.solarize_p == 0
    assert second.solarize_p == 0.2 and second.blur_p == 0.1 and first.blur_p == 1.0
    assert local.blur_p == 0.5 and local.solarize_p == 0  # DINO's local crops


def test_grayscale_keeps_only_one_channel_colour_ops() -> None:
    gray = view_transform("contrastive", 16, (0.3, 1.0), 1, [0.5], [0.5], second_view=True)
    assert gray.colour.grayscale_p == 0 and gray.colour.solarize_p == 0.2
    torch.manual_seed(0)
    image = torch.rand(1, 16, 16)
    outputs = torch.stack([gray(image) for _ in range(20)])
    assert outputs.shape == (20, 1, 16, 16) and outputs.std(0).mean() > 0  # the augmentation does act
    # saturation and hue need colour: with only those asked for, one channel comes out unchanged
    only_hue = BatchColour([0.0], [1.0], jitter=(0.0, 0.0, 0.5, 0.5), jitter_p=1.0)
    assert torch.equal(only_hue(image[None]), image[None])


def test_strength_zero_turns_colour_off_and_blur_kernel_scales() -> None:
    plain = view_transform("contrastive", 16, (0.3, 1.0), 3, [0.5] * 3, [0.5] * 3, strength=0.0).colour
    assert plain.jitter is None and plain.blur_p == 0
    big = view_transform("contrastive", 224, (0.3, 1.0), 3, [0.5] * 3, [0.5] * 3).colour
    assert big.kernel_size == 23  # ~10% of the side, as SimCLR


def test_batch_colour_ops_match_torchvision_per_image() -> None:
    """Each batched operation, with its factor pinned, equals torchvision's per-image kernel."""
    torch.manual_seed(0)
    images = torch.rand(4, 3, 12, 12)
    # With strength 1 the factor is drawn as U(0, 2) = 2 * torch.rand; pinning torch.rand at factor / 2
    # pins it (and keeps the draw "apply with jitter_p = 1" true: factor / 2 < 1).
    for op, factor, kernel in [
        (0, 1.3, TF.adjust_brightness),
        (1, 0.6, TF.adjust_contrast),
        (2, 1.4, TF.adjust_saturation),
    ]:
        jitter = [0.0] * 4
        jitter[op] = 1.0
        with mock.patch("torch.rand", lambda *shape, f=factor, **kw: torch.full(shape, f / 2)):
            got = BatchColour([0.0] * 3, [1.0] * 3, jitter=tuple(jitter), jitter_p=1.0)(images)  # type: ignore[arg-type]
        want = torch.stack([kernel(img, factor) for img in images])
        assert (got - want).abs().max() < 1e-5, op
    ties = torch.randint(0, 4, (4, 3, 12, 12)) / 3  # grey, black, white, two channels sharing the max
    for shift in (-0.5, -0.2, 0.1, 0.45):
        for x in (images, ties):
            got = shift_hue(x.clone(), torch.full((4, 1, 1, 1), shift))  # in place
            want = torch.stack([TF.adjust_hue(img, shift) for img in x])
            assert (got - want).abs().max() < 1e-4, shift


def test_batch_blur_matches_torchvision_and_ops_apply_per_sample() -> None:
    torch.manual_seed(0)
    images = torch.rand(3, 3, 10, 10)
    sigma = torch.tensor([0.3, 1.0, 2.0])
    got = blur(images.clone(), sigma, 5)
    want = torch.stack(
        [TF.gaussian_blur(img, [5, 5], [float(s)] * 2) for img, s in zip(images, sigma, strict=True)]
    )
    assert (got - want).abs().max() < 1e-5
    # solarize with probability 0.5: some images come out inverted above 0.5, the others untouched
    solar = BatchColour([0.0] * 3, [1.0] * 3, solarize_p=0.5)
    batch = torch.full((64, 3, 4, 4), 0.8)
    out = solar(batch)[:, 0, 0, 0]
    assert set((out * 10).round().tolist()) == {2.0, 8.0}
    assert bool((batch == 0.8).all())  # the input batch is left as it was (the work is in place on a copy)
    assert 10 < int((out < 0.5).sum()) < 54


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.3, 2.0])
def test_blur_stays_within_its_tolerance_of_the_full_gaussian(sigma: float) -> None:
    """A 224-px view's 23 taps: `blur` skips outer taps worth < BLUR_TAIL, and stays within 2 * BLUR_TAIL
    (plus float32 rounding) of the full kernel, summed here in float64 over each reflect-padded window."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 40, 48)) / 255  # sharp edges: where skipped taps would show
    got = blur(images.clone(), torch.full((2,), sigma), 23)
    offsets = torch.arange(-11, 12, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(images.double(), (11, 11, 11, 11), mode="reflect")
    want = torch.zeros(images.shape, dtype=torch.float64)
    for i in range(23):
        for j in range(23):
            want += kernel[i] * kernel[j] * padded[:, :, i : i + 40, j : j + 48]
    assert (got.double() - want).abs().max() < 3e-6  # 2 * BLUR_TAIL (1e-6) + float32 rounding


def reference_colour(colour: BatchColour, views: Tensor, draws: Draws) -> Tensor:
    """Slow reference: torchvision's per-image kernels, one image at a time, as `draws` says."""
    jitter = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    size, out = colour.kernel_size, []
    for i, img in enumerate(views.float() / 255):
        if draws.jitter is not None and draws.jitter[i]:
            for op, factor in zip(draws.order, draws.factors, strict=True):
                img = jitter[op](img, float(factor[i]))
        if draws.gray is not None and draws.gray[i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if draws.blur is not None and draws.sigma is not None and draws.blur[i]:
            img = TF.gaussian_blur(img, [size, size], [float(draws.sigma[i])] * 2)
        if draws.solarize is not None and draws.solarize[i]:
            img = TF.solarize(img, 0.5)
        out.append(TF.normalize(img, list(colour.mean), list(colour.std)))
    return torch.stack(out)


@pytest.mark.parametrize("chunk", [1, 3 * 24 * 24 * 3, 1 << 30])  # one image, three, the whole batch
@pytest.mark.parametrize("in_chans", [1, 3])
def test_batch_colour_equals_torchvision_per_image_on_the_same_draws(chunk: int, in_chans: int) -> None:
    """Each operation runs on the samples that drew it and on no other, whether a chunk holds one
    image, a few (a subset copied out and back) or the whole batch: the result equals torchvision's
    per-image kernels with the same random draws."""
    colour = BatchColour(
        [0.4] * in_chans,
        [0.5] * in_chans,
        jitter=(0.4, 0.4, 0.2, 0.1),
        jitter_p=0.6,
        grayscale_p=0.4,
        blur_p=0.5,
        kernel_size=7,
        solarize_p=0.4,
    )
    views = torch.randint(0, 256, (10, in_chans, 24, 24), dtype=torch.uint8)
    torch.manual_seed(3)
    draws = colour.draw(10, in_chans)
    masks = [draws.jitter, draws.blur, draws.solarize] + ([draws.gray] if in_chans == 3 else [])
    assert all(m is not None and 0 < int(m.sum()) < 10 for m in masks)  # partial subsets throughout
    assert (draws.gray is None) == (in_chans == 1) and len(draws.order) == (4 if in_chans == 3 else 2)
    torch.manual_seed(3)
    with mock.patch.object(colour_lib, "CHUNK", chunk):
        got = colour(views)
    assert (got - reference_colour(colour, views, draws)).abs().max() < 1e-4


def test_draws_keep_the_probabilities_ranges_and_op_order() -> None:
    """SimCLR/BYOL's second view: jitter 0.8 (BYOL's ranges), grayscale 0.2, blur 0.1 with sigma in
    [0.1, 2], solarize 0.2; the jitter's order is drawn per batch and takes all 24 orders."""
    colour = view_transform("contrastive", 224, (0.3, 1.0), 3, [0.5] * 3, [0.5] * 3, second_view=True).colour
    torch.manual_seed(0)
    draws = colour.draw(40_000, 3)
    for mask, p in [(draws.jitter, 0.8), (draws.gray, 0.2), (draws.blur, 0.1), (draws.solarize, 0.2)]:
        assert mask is not None and abs(float(mask.float().mean()) - p) < 0.01
    ranges = {0: (0.6, 1.4), 1: (0.6, 1.4), 2: (0.8, 1.2), 3: (-0.1, 0.1)}
    assert sorted(draws.order) == [0, 1, 2, 3]
    for op, factor in zip(draws.order, draws.factors, strict=True):
        low, high = ranges[op]
        assert low <= float(factor.min()) < low + 0.01 and high - 0.01 < float(factor.max()) <= high
    assert draws.sigma is not None and 0.1 <= float(draws.sigma.min()) < 0.11
    assert 1.99 < float(draws.sigma.max()) <= 2.0
    assert len({tuple(colour.draw(1, 3).order) for _ in range(300)}) == 24


def test_dino_multiview_gives_global_then_local_views() -> None:
    spec = ViewSpec(kind="contrastive", global_views=2, local_views=4, local_size=8, local_scale=(0.05, 0.4))
    views = MultiView(spec, 16, 3, [0.5] * 3, [0.5] * 3)(
        torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    )
    assert [tuple(v.shape) for v in views] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 4


def test_eval_transform_and_bad_recipes() -> None:
    image = torch.rand(1, 8, 8)
    assert torch.allclose(eval_transform(8, [0.5], [0.5])(image), (image - 0.5) / 0.5)
    with pytest.raises(RecipeError, match="data.mean/std need 3 values"):
        MultiView(ViewSpec(), 16, 3, [0.5], [0.5])
    with pytest.raises(RecipeError, match="unknown view kind"):
        view_transform("nope", 16, (0.3, 1.0), 1, [0.5], [0.5])


def test_color_jitter_hue_half_spins_the_colour_wheel() -> None:
    """`data.color_jitter` hue 0.5 turns a red square green or blue in many views; BYOL's 0.1 never does."""
    red = torch.zeros(3, 16, 16, dtype=torch.uint8)
    red[0] = 200
    spec = ViewSpec(kind="contrastive", global_views=1)

    def not_red(jitter: list[float] | None) -> float:
        torch.manual_seed(0)
        views = MultiView(spec, 16, 3, [0.0] * 3, [1.0] * 3, color_jitter=jitter)
        means = torch.stack([views(red)[0].mean(dim=(1, 2)) for _ in range(200)])  # (200, 3)
        return float((means[:, 1:].max(dim=1).values > means[:, 0] + 0.05).float().mean())

    assert not_red(None) == 0.0
    assert not_red([0.0, 0.0, 0.0, 0.5]) > 0.3


@pytest.mark.parametrize("jitter", [[0.4, 0.4, 0.2], [0.4, 0.4, 0.2, 0.6], [-0.1, 0.4, 0.2, 0.1]])
def test_bad_color_jitter_is_a_recipe_error(jitter: list[float]) -> None:
    with pytest.raises(RecipeError, match="data.color_jitter"):
        MultiView(ViewSpec(kind="contrastive"), 16, 3, [0.5] * 3, [0.5] * 3, color_jitter=jitter)
