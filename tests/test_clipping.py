"""Gradient clipping modes: one global norm (torch) or each parameter on its own (official DINO)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from ssl_vit.config import CkptConfig, LogConfig, OptimConfig, TrainConfig
from ssl_vit.engine.setup import check_config
from ssl_vit.engine.step import clip_per_param, grad_norm
from ssl_vit.errors import RecipeError


def two_layer_grads(norms: tuple[float, float]) -> nn.Module:
    """A module whose two parameters' gradients have exactly the given norms."""
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    for layer, norm in zip(model, norms, strict=True):
        g = torch.randn_like(layer.weight)
        layer.weight.grad = g * (norm / g.norm())
    return model


def test_each_gradient_is_clipped_on_its_own() -> None:
    grads = [torch.full((2,), 0.3), torch.tensor([3.0, 4.0]), torch.tensor([0.0, 30.0])]  # norms .42, 5, 30
    before = [g.clone() for g in grads]
    clip_per_param(grads, 3.0)
    torch.testing.assert_close(grads[0], before[0])  # under the bound: untouched
    torch.testing.assert_close(grads[1], before[1] * 3.0 / (5.0 + 1e-6))
    torch.testing.assert_close(grads[2], before[2] * 3.0 / (30.0 + 1e-6))


def test_per_param_and_global_modes_differ_and_report_the_norm_before_clipping() -> None:
    accelerator = Accelerator(cpu=True)
    per_param, global_ = two_layer_grads((1.0, 10.0)), two_layer_grads((1.0, 10.0))
    global_.load_state_dict(per_param.state_dict())
    for a, b in zip(per_param.parameters(), global_.parameters(), strict=True):
        b.grad = a.grad.clone()  # type: ignore[union-attr]
    total = (1.0**2 + 10.0**2) ** 0.5
    assert grad_norm(accelerator, per_param, 2.0, "per_param").item() == pytest.approx(total, rel=1e-5)
    assert grad_norm(accelerator, global_, 2.0, "global").item() == pytest.approx(total, rel=1e-5)
    per_norms = [p.grad.norm().item() for p in per_param.parameters()]  # type: ignore[union-attr]
    global_norms = [p.grad.norm().item() for p in global_.parameters()]  # type: ignore[union-attr]
    assert per_norms == pytest.approx([1.0, 2.0], rel=1e-5)  # the small one kept, the large one to 2
    assert global_norms == pytest.approx([2.0 / total, 20.0 / total], rel=1e-5)  # one common scale


def test_an_unknown_clip_mode_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="clip_mode"):
        check_config(OptimConfig(clip_mode="layerwise"), TrainConfig(), CkptConfig(), LogConfig())
