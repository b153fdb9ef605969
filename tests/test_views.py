"""Views per objective family, on uint8 (shards) or float input, colour and grayscale."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from ssl_vit.data.views import MultiView, eval_transform, view_transform
from ssl_vit.errors import RecipeError
from ssl_vit.types import ViewSpec


def ops(transform: object) -> list[object]:
    """The flat list of operations inside a Compose (RandomApply unwrapped), with their probability."""
    found: list[object] = []
    for t in transform.transforms:  # type: ignore[attr-defined]
        found += (
            [(inner, t.p) for inner in t.transforms]
            if isinstance(t, v2.RandomApply)
            else [(t, getattr(t, "p", 1.0))]
        )
    return found


def kinds(transform: object) -> dict[str, float]:
    return {type(op).__name__: p for op, p in ops(transform)}


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
    assert set(kinds(view_transform("masked", 16, (0.3, 1.0), 3, [0.5] * 3, [0.5] * 3))) == {
        "RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"
    }  # fmt: skip
    first = kinds(view_transform("contrastive", 16, (0.3, 1.0), 3, [0.5] * 3, [0.5] * 3))
    second = kinds(view_transform("contrastive", 16, (0.3, 1.0), 3, [0.5] * 3, [0.5] * 3, second_view=True))
    local = kinds(view_transform("contrastive", 8, (0.05, 0.3), 3, [0.5] * 3, [0.5] * 3, local=True))
    assert {"ColorJitter", "RandomGrayscale", "GaussianBlur"} <= set(first) and "RandomSolarize" not in first
    assert second["RandomSolarize"] == 0.2 and second["GaussianBlur"] == 0.1 and first["GaussianBlur"] == 1.0
    assert local["GaussianBlur"] == 0.5 and "RandomSolarize" not in local  # DINO's local crops


def test_grayscale_keeps_only_one_channel_colour_ops() -> None:
    gray = view_transform("contrastive", 16, (0.3, 1.0), 1, [0.5], [0.5], second_view=True)
    jitter = next(op for op, _ in ops(gray) if isinstance(op, v2.ColorJitter))
    assert jitter.saturation is None and jitter.hue is None and jitter.brightness is not None
    assert "RandomGrayscale" not in kinds(gray) and "RandomSolarize" in kinds(gray)
    image = torch.rand(1, 16, 16)
    outputs = torch.stack([gray(image) for _ in range(20)])
    assert outputs.shape == (20, 1, 16, 16) and outputs.std(0).mean() > 0  # the augmentation does act


def test_strength_zero_turns_colour_off_and_blur_kernel_scales() -> None:
    plain = kinds(view_transform("contrastive", 16, (0.3, 1.0), 3, [0.5] * 3, [0.5] * 3, strength=0.0))
    assert "ColorJitter" not in plain and "GaussianBlur" not in plain
    big = next(
        op
        for op, _ in ops(view_transform("contrastive", 224, (0.3, 1.0), 3, [0.5] * 3, [0.5] * 3))
        if isinstance(op, v2.GaussianBlur)
    )
    assert tuple(big.kernel_size) == (23, 23)  # ~10% of the side, as SimCLR


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
