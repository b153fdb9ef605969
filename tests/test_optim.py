from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ssl_vit.objectives import build
from ssl_vit.optim import adamw, cosine_schedule, param_groups, scaled_lr
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


class _WithTokens(torch.nn.Module):
    """A ViT-like naming: a backbone with tokens and two blocks, plus an objective's head and mask token."""

    def __init__(self) -> None:
        super().__init__()
        vit = torch.nn.Module()
        vit.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
        vit.pos_embed = torch.nn.Parameter(torch.zeros(1, 5, 4))
        vit.patch_embed = torch.nn.Conv2d(1, 4, 2)
        vit.blocks = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        vit.norm = torch.nn.LayerNorm(4)
        self.backbone = torch.nn.Module()
        self.backbone.vit = vit
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
        self.head = torch.nn.Linear(4, 3)
        self.frozen = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)


def _scale_and_decay(groups: list[dict[str, object]]) -> dict[str, tuple[float, bool]]:
    return {n: (g["lr_scale"], g["apply_wd"]) for g in groups for n in g["param_names"]}  # type: ignore[attr-defined, misc]


def test_tokens_are_not_decayed_by_name_whatever_their_shape() -> None:
    table = _scale_and_decay(param_groups(_WithTokens(), 0.05))
    for name in (
        "mask_token",
        "backbone.vit.cls_token",
        "backbone.vit.pos_embed",
        "backbone.vit.norm.weight",
    ):
        assert table[name][1] is False, name
    assert table["backbone.vit.patch_embed.weight"][1] is True and table["head.weight"][1] is True
    assert "frozen" not in table


def test_no_decay_rules_of_the_official_code() -> None:
    # 1d (MAE, DINO): only biases and <= 1-D tensors are exempt, so the 3-D tokens decay;
    # none (MoCo v3): everything decays, norms and biases included.
    one_d = _scale_and_decay(param_groups(_WithTokens(), 0.05, rule="1d"))
    exempt = {n for n, (_, decays) in one_d.items() if not decays}
    assert exempt == {
        "backbone.vit.patch_embed.bias",
        "backbone.vit.blocks.0.bias",
        "backbone.vit.blocks.1.bias",
    } | {
        "backbone.vit.norm.weight",
        "backbone.vit.norm.bias",
        "head.bias",
    }
    everything = _scale_and_decay(param_groups(_WithTokens(), 0.05, rule="none"))
    assert all(decays for _, decays in everything.values()) and len(everything) == len(one_d)
    with pytest.raises(ValueError, match="optim.no_decay"):
        param_groups(_WithTokens(), 0.05, rule="tokens")


def _tiny_supervised() -> torch.nn.Module:
    from ssl_vit.backbone import Backbone

    return build({"name": "supervised"}, Backbone.from_config(tiny_model_config()), num_classes=10)


def test_layer_wise_lr_decay_matches_hand_worked_values() -> None:
    # depth 2, decay 0.5: embeddings and tokens 0.5^3, block 0 0.5^2, block 1 0.5, norm and head 1.
    table = _scale_and_decay(param_groups(_tiny_supervised(), 0.05, layer_decay=0.5))
    expected = {
        "backbone.vit.cls_token": 0.125,
        "backbone.vit.pos_embed": 0.125,
        "backbone.vit.patch_embed.proj.weight": 0.125,
        "backbone.vit.patch_embed.proj.bias": 0.125,
        "backbone.vit.blocks.0.attn.qkv.weight": 0.25,
        "backbone.vit.blocks.0.norm1.bias": 0.25,
        "backbone.vit.blocks.1.mlp.fc2.weight": 0.5,
        "backbone.vit.norm.weight": 1.0,
        "head.weight": 1.0,
    }
    for name, scale in expected.items():
        assert table[name][0] == pytest.approx(scale), name
    assert {round(scale, 6) for scale, _ in table.values()} == {0.125, 0.25, 0.5, 1.0}


def test_layer_decay_needs_a_model_that_knows_its_layers() -> None:
    with pytest.raises(ValueError, match="layer_id"):
        param_groups(_WithTokens(), 0.05, layer_decay=0.5)


def test_param_groups_feed_adamw_and_the_linear_lr_rule() -> None:
    groups = param_groups(_tiny_supervised(), 0.05, layer_decay=0.5)
    optimizer = torch.optim.AdamW(groups, lr=1.0)  # type: ignore[arg-type]
    assert len(optimizer.param_groups) == len(groups) and all("lr_scale" in g for g in optimizer.param_groups)
    assert scaled_lr(1.5e-4, 4096, "linear") == pytest.approx(
        2.4e-3
    )  # MAE pretraining: base lr 1.5e-4 at batch 4096
    assert scaled_lr(1e-3, 4096, "none") == 1e-3


def test_adamw_is_fused_on_cpu_and_steps_like_the_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    groups = param_groups(model, weight_decay=0.05)
    opt = adamw(groups, lr=1e-2, betas=(0.9, 0.95))
    ref_opt = torch.optim.AdamW(
        param_groups(reference, weight_decay=0.05), lr=1e-2, betas=(0.9, 0.95), foreach=False
    )  # type: ignore[arg-type]
    assert opt.defaults["fused"] is True
    x = torch.randn(32, 8)
    for _ in range(5):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
