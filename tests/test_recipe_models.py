"""Every recipe builds its backbone and objective; the paper-scale ones on the meta device (no memory)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from ssl_vit import objectives
from ssl_vit.backbone import Backbone
from ssl_vit.config import RECIPES_DIR, load_recipe

RECIPES = sorted(RECIPES_DIR.glob("*/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_builds_its_model_and_objective(path: Path) -> None:
    recipe = load_recipe(path)  # needs no data: shapes recipes load before the shapes set exists
    paper_scale = path.parent.name == "imagenet"
    with torch.device("meta") if paper_scale else contextlib.nullcontext():
        backbone = Backbone.from_config(recipe.model)
        objective = objectives.build(
            recipe.objective,
            backbone,
            num_classes=1000 if paper_scale else 10,
            pixel_mean=recipe.data.mean,
            pixel_std=recipe.data.std,
        )
    assert objective.backbone is backbone and objective.views().global_views >= 1
    if paper_scale:
        n_params = sum(p.numel() for p in backbone.parameters())
        assert 85e6 < n_params < 88e6, n_params  # ViT-B/16
        assert all(p.is_meta for p in objective.parameters())


def test_every_objective_has_a_recipe_at_every_scale() -> None:
    for name in objectives.names():
        for scale in ("digits", "shapes"):
            assert (RECIPES_DIR / scale / f"{name}.yaml").is_file(), f"{scale}/{name}"
        assert (RECIPES_DIR / "imagenet" / f"vit_b16_{name}.yaml").is_file(), name
