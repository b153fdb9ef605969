"""Pretraining compute: forward + backward FLOPs of one optimiser step, counted, times the steps.

The count comes from `torch.utils.flop_counter.FlopCounterMode` on one real step of the recipe's
objective (teacher forwards, decoders, projectors and every view included), not from a formula, so
that MAE's cheaper encoder (25% of tokens) and DINO's extra local crops show up as measured. The
step is counted at a small batch and scaled linearly to the recipe's batch: the terms quadratic in
the batch (contrastive similarity matrices) are a negligible share at these sizes. Used by the CLI
to fill `pretrain_flops` in `compare`; it imports the objectives, so no evaluator imports it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ssl_vit import objectives
from ssl_vit.backbone import Backbone
from ssl_vit.config import Recipe
from ssl_vit.data import class_names
from ssl_vit.rundir import RunDir
from ssl_vit.types import Batch

COUNT_BATCH = 8


def _cpu_attention(
    query: tuple[int, ...], key: tuple[int, ...], value: tuple[int, ...], *args: object, **kwargs: object
) -> int:
    return int(sdpa_flop_count(query, key, value))


def _cpu_attention_backward(
    grad_out: tuple[int, ...],
    query: tuple[int, ...],
    key: tuple[int, ...],
    value: tuple[int, ...],
    *args: object,
    **kwargs: object,
) -> int:
    return int(sdpa_backward_flop_count(grad_out, query, key, value))


# torch's counter knows the CUDA attention kernels but not the CPU one that timm's fused attention
# dispatches to here, which would silently drop every QK^T and AV product from the count.
_ATEN = torch.ops.aten
CPU_ATTENTION = {
    _ATEN._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    _ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def step_flops(recipe: Recipe, batch_size: int | None = None) -> float:
    """FLOPs of one optimiser step (forward + backward over every micro-batch) of this recipe.

    With `batch_size`, the count is exact for that batch; by default it is counted at
    `min(train.batch_size, 8)` and scaled to `train.batch_size`.
    """
    target = recipe.train.batch_size
    counted = batch_size or min(target, COUNT_BATCH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = Backbone.from_config(recipe.model)
        num_classes = len(class_names(recipe.data.train))
        objective = objectives.build(recipe.objective, backbone, num_classes=num_classes)
        spec = objective.views()
        size, chans = recipe.model.img_size, recipe.model.in_chans
        local = spec.local_size or size
        views = [torch.randn(counted, chans, size, size) for _ in range(spec.global_views)]
        views += [torch.randn(counted, chans, local, local) for _ in range(spec.local_views)]
        batch = Batch(views=views, labels=torch.randint(0, num_classes, (counted,)))
        objective.train()
        objective.set_progress(0, 1, 1)
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            loss, _ = objective(batch)
            loss.backward()
    flops = float(counter.get_total_flops())
    scale = 1.0 if batch_size else target / counted
    return flops * scale * recipe.optim.accum_steps


def pretrain_flops(run_dir: Path) -> float | None:
    """Step FLOPs × the run's optimiser steps, from `recipe.yaml` and `summary.json`; None if unfinished."""
    run = RunDir(run_dir)
    steps = (run.summary() or {}).get("steps") if run.exists() else None
    if not steps:
        return None
    return step_flops(run.recipe()) * int(steps)
