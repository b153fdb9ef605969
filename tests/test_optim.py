from __future__ import annotations

import math

import pytest

from ssl_vit.objectives import build
from ssl_vit.optim import cosine_schedule, param_groups
from tests.conftest import tiny_model_config


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),
        (5, 0.5e-3),
        (10, 1e-3),
        (55, 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5))),
        (100, 1e-5),
        (150, 1e-5),
    ],
)
def test_warmup_cosine_closed_form(step: int, expected: float) -> None:
    assert cosine_schedule(step, 100, base=1e-3, final=1e-5, warmup_steps=10) == pytest.approx(expected)


def test_no_decay_on_biases_norms_and_tokens() -> None:
    from ssl_vit.backbone import Backbone

    objective = build({"name": "supervised"}, Backbone.from_config(tiny_model_config()), num_classes=10)
    groups = param_groups(objective, 0.05, objective.no_weight_decay())
    names = {id(p): n for n, p in objective.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}  # type: ignore[attr-defined]
    decay = {names[id(p)] for p in groups[0]["params"]}  # type: ignore[attr-defined]
    for name in (
        "backbone.vit.cls_token",
        "backbone.vit.pos_embed",
        "backbone.vit.norm.weight",
        "backbone.vit.blocks.0.attn.qkv.bias",
        "head.bias",
    ):
        assert name in no_decay
    for name in (
        "backbone.vit.blocks.0.attn.qkv.weight",
        "backbone.vit.patch_embed.proj.weight",
        "head.weight",
    ):
        assert name in decay
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.05
