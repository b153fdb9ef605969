from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ssl_vit.eval import features as ft

from ssl_vit.backbone import Backbone
from ssl_vit.errors import RecipeError
from ssl_vit.rundir import weights_digest
from tests.conftest import tiny_model_config


def model_of(backbone: Backbone) -> ft.EvalModel:
    return ft.EvalModel(backbone, 16, 1, [0.5], [0.5], "digits")


def test_features_are_extracted_in_eval_mode() -> None:
    """With drop-path on and the module left in train mode, two passes still agree exactly."""
    backbone = Backbone.from_config(tiny_model_config(drop_path_rate=0.5))
    backbone.train()
    images = torch.rand(40, 1, 16, 16)
    first = ft.extract(backbone, images, batch_size=16, mean=[0.5], std=[0.5])
    second = ft.extract(backbone, images, batch_size=16, mean=[0.5], std=[0.5])
    np.testing.assert_array_equal(first, second)
    assert backbone.training  # the caller's mode is restored
    backbone.eval()
    with torch.no_grad():
        expected = backbone.vit.forward_head(
            backbone.vit.forward_features((images - 0.5) / 0.5), pre_logits=True
        )
    np.testing.assert_allclose(first, expected.numpy(), atol=1e-5)


def test_feature_kinds_against_hand_computed_tokens(tiny_backbone: Backbone) -> None:
    tiny_backbone.eval()
    images = torch.randn(5, 1, 16, 16)
    outputs: list[torch.Tensor] = []
    hooks = [
        block.register_forward_hook(lambda m, i, o: outputs.append(o)) for block in tiny_backbone.vit.blocks
    ]
    with torch.no_grad():
        tokens = tiny_backbone.vit.forward_features(images)  # (B, 1 + N, D)
    for h in hooks:
        h.remove()
    avg = ft.extract(tiny_backbone, images, kind="avg")
    np.testing.assert_allclose(avg, tokens[:, 1:].mean(1).numpy(), atol=1e-5)
    cls4 = ft.extract(tiny_backbone, images, kind="cls4")  # depth 2: both blocks
    expected = torch.cat([tiny_backbone.vit.norm(o)[:, 0] for o in outputs], dim=-1)
    assert cls4.shape == (5, 2 * 32)
    np.testing.assert_allclose(cls4, expected.detach().numpy(), atol=1e-5)
    with pytest.raises(RecipeError, match="feature"):
        ft.extract(tiny_backbone, images, kind="patch")


def test_allocation_happens_once_for_the_whole_split(tiny_backbone: Backbone) -> None:
    shapes: list[tuple[int, int]] = []

    def allocate(shape: tuple[int, int]) -> np.ndarray:
        shapes.append(shape)
        return np.zeros(shape, dtype=np.float32)

    ft.extract(tiny_backbone, torch.rand(23, 1, 16, 16), batch_size=5, allocate=allocate)
    assert shapes == [(23, 32)]


def test_cache_returns_identical_features_and_is_invalidated_by_new_weights(
    tiny_backbone: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_of(tiny_backbone)
    feats, labels = ft.split_features(model, "test", cache_dir=tmp_path)
    assert feats.shape == (540, 32) and labels.shape == (540,)
    assert len(list(tmp_path.glob("*.npy"))) == 2 and not list(tmp_path.glob(".*tmp*"))

    def no_extraction(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("features should come from the cache")

    with monkeypatch.context() as m:
        m.setattr(ft, "extract", no_extraction)
        again, labels_again = ft.split_features(model, "test", cache_dir=tmp_path)
    np.testing.assert_array_equal(feats, again)
    np.testing.assert_array_equal(labels, labels_again)
    fresh, _ = ft.split_features(model, "test")  # no cache: same numbers
    np.testing.assert_array_equal(feats, fresh)

    with torch.no_grad():
        tiny_backbone.vit.blocks[1].mlp.fc2.weight[0, 0] += 1.0  # one weight changes
    changed, _ = ft.split_features(model, "test", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 4
    assert not np.array_equal(feats, changed)
    other_kind, _ = ft.split_features(model, "test", kind="avg", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 6 and not np.array_equal(other_kind, changed)


def test_random_init_model_keeps_architecture_and_changes_weights(tiny_backbone: Backbone) -> None:
    model = model_of(tiny_backbone)
    rand = ft.random_init_model(model, seed=0)
    assert rand.objective == "random_init" and weights_digest(rand.backbone) != weights_digest(tiny_backbone)
    assert weights_digest(ft.random_init_model(model, seed=0).backbone) == weights_digest(rand.backbone)
    assert {k: v.shape for k, v in rand.backbone.state_dict().items()} == {
        k: v.shape for k, v in tiny_backbone.state_dict().items()
    }


def test_any_timm_folder_loads_without_ssl_vit_metadata(tiny_backbone: Backbone, tmp_path: Path) -> None:
    """A folder written by plain timm (no `ssl_vit` block, no recipe) is evaluated on digits."""
    from timm.models import save_for_hf

    save_for_hf(tiny_backbone.vit, str(tmp_path), safe_serialization=True)
    model = ft.load_eval_model(tmp_path)
    assert (model.data, model.objective, model.name, model.run_dir) == (
        "digits",
        "unknown",
        tmp_path.name,
        None,
    )
    assert weights_digest(model.backbone) == weights_digest(tiny_backbone)
    assert ft.save_result(model, "knn", {"top1": 1.0}) is None  # not a run directory: nothing written
