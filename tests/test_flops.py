from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssl_vit.config import load_recipe, save_recipe
from ssl_vit.flops import pretrain_flops, step_flops
from tests.conftest import TINY


def hand_count(batch: int) -> float:
    """Forward + backward of the tiny supervised ViT: 6 x matmul params x tokens plus attention.

    Width D=32, depth L=2, 16 patches of 4x4x1 plus CLS (T=17 tokens), MLP ratio 4, 10 classes.
    Forward: 2 FLOPs per weight per token in the blocks (qkv 3D^2, proj D^2, fc1/fc2 8D^2), QK^T and
    AV (2 x 2 T^2 D per block), the patch embedding (16 patches) and the head (CLS only); backward
    costs twice the forward.
    """
    d, depth, tokens, patches, patch_dim, classes = 32, 2, 17, 16, 16, 10
    blocks = depth * (2 * 12 * d * d * tokens + 4 * tokens * tokens * d)
    forward = blocks + 2 * patch_dim * d * patches + 2 * d * classes
    return 3.0 * forward * batch


def test_supervised_step_matches_a_hand_count() -> None:
    recipe = load_recipe("digits/supervised", TINY)
    counted = step_flops(recipe, batch_size=4)
    assert counted == pytest.approx(hand_count(4), rel=0.10)


def test_default_count_scales_a_small_batch_to_the_recipe_batch_and_accumulation() -> None:
    """Counted at batch 8 and scaled to the recipe's 32; two micro-batches per step cost twice."""
    recipe = load_recipe("digits/supervised", TINY)
    accumulated = load_recipe("digits/supervised", [*TINY, "optim.accum_steps=2"])
    assert step_flops(recipe) == pytest.approx(step_flops(recipe, batch_size=32), rel=1e-6)
    assert step_flops(accumulated) == pytest.approx(2 * step_flops(recipe), rel=1e-6)


def test_pretrain_flops_is_step_flops_times_steps(tmp_path: Path) -> None:
    recipe = load_recipe("digits/supervised", TINY)
    save_recipe(recipe, tmp_path / "recipe.yaml")
    assert pretrain_flops(tmp_path) is None  # no summary: the run did not finish
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 7}))
    assert pretrain_flops(tmp_path) == pytest.approx(7 * step_flops(recipe))
