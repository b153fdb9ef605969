from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ssl_vit.eval import finetune as finetune_module
from ssl_vit.eval.features import EvalModel, split_images
from ssl_vit.eval.finetune import (
    LOWSHOT_DEFAULTS,
    FineTune,
    FinetuneConfig,
    build_optimizer,
    default_config,
    finetune,
    finetune_draws,
    lowshot_split,
    probe_head,
)
from ssl_vit.eval.linear_probe import few_shot_indices
from timm.layers import DropPath

from ssl_vit.backbone import Backbone
from ssl_vit.config import OptimConfig, TrainConfig
from ssl_vit.engine.loop import FitConfig, Reporting, fit
from ssl_vit.errors import DataError, RecipeError
from ssl_vit.types import Batch
from tests.conftest import tiny_model_config

DEPTH, DECAY, LR = 3, 0.5, 1e-3


def expected_scale(name: str) -> float:
    """Layer decay worked out by hand (BEiT/MAE rule, timm's grouping) for a depth-3 ViT."""
    if name.startswith("head."):
        return 1.0
    if name.startswith(("backbone.vit.cls_token", "backbone.vit.pos_embed", "backbone.vit.patch_embed")):
        return DECAY**4  # below block 0
    if name.startswith("backbone.vit.norm."):
        return DECAY  # timm puts the final norm with the last block
    block = int(name.split(".")[3])
    return {0: DECAY**3, 1: DECAY**2, 2: DECAY}[block]


def make(cfg: FinetuneConfig) -> FineTune:
    torch.manual_seed(0)
    return FineTune(Backbone.from_config(tiny_model_config(depth=DEPTH)), 10, cfg)


def test_layer_decay_gives_the_documented_lr_per_block(tmp_path: Path) -> None:
    cfg = FinetuneConfig(lr=LR, layer_decay=DECAY, warmup_steps=0)
    objective = make(cfg)
    optimizer = build_optimizer(objective, cfg)
    batch = Batch(views=[torch.randn(4, 1, 16, 16)], labels=torch.arange(4))
    fit(  # one engine step at the peak lr: each group's lr must be lr x its scale
        objective,
        [batch],
        FitConfig(
            OptimConfig(lr=LR, min_lr=LR, warmup_steps=0), TrainConfig(batch_size=4, max_steps=1, cpu=True)
        ),
        tmp_path,
        optimizer=optimizer,
        report=Reporting(progress=False),
    )
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(objective.named_parameters())
    assert len(names) == len(lr_of)
    for name, param in names.items():
        assert lr_of[id(param)] == pytest.approx(LR * expected_scale(name)), name
    assert decay_of[id(names["backbone.vit.pos_embed"])] == 0.0
    assert decay_of[id(names["backbone.vit.blocks.0.attn.qkv.bias"])] == 0.0
    assert decay_of[id(names["backbone.vit.blocks.0.attn.qkv.weight"])] == cfg.weight_decay


def test_drop_path_rises_linearly_over_blocks() -> None:
    backbone = Backbone.from_config(tiny_model_config(depth=DEPTH))
    backbone.set_drop_path(0.2)
    rates = [
        b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in backbone.vit.blocks
    ]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


def test_mixup_uses_soft_targets_and_needs_even_batches(tmp_path: Path) -> None:
    objective = make(FinetuneConfig(mixup=0.8, cutmix=1.0))
    batch = Batch(views=[torch.randn(4, 1, 16, 16)], labels=torch.tensor([0, 1, 2, 3]))
    loss, logs = objective(batch)
    assert torch.isfinite(loss) and objective.mixup is not None and "acc" in logs
    model = EvalModel(objective.backbone, 16, 1, [0.5], [0.5], "digits")
    with pytest.raises(RecipeError, match="even"):
        finetune(model, tmp_path, FinetuneConfig(mixup=0.8, batch_size=7))


def test_finetune_runs_on_the_engine_and_reports_test_top1(tmp_path: Path) -> None:
    backbone = Backbone.from_config(tiny_model_config())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = EvalModel(backbone, 16, 1, [0.5], [0.5], "digits")
    result = finetune(model, tmp_path / "ft", FinetuneConfig(steps=3, batch_size=32, warmup_steps=1))
    assert 0.0 <= result["top1"] <= 1.0 and result["steps"] == 3 and result["images_seen"] == 96
    assert list((tmp_path / "ft" / "checkpoints").glob("step-*"))
    lines = (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    for key, value in backbone.state_dict().items():  # the evaluated model itself is left untouched
        assert torch.equal(value, before[key]), key


def test_finetune_resumes_from_its_checkpoint_and_restarts_clean(tmp_path: Path) -> None:
    model = EvalModel(Backbone.from_config(tiny_model_config()), 16, 1, [0.5], [0.5], "digits")
    cfg = FinetuneConfig(steps=2, batch_size=16, warmup_steps=0)
    first = finetune(model, tmp_path, cfg)
    again = finetune(model, tmp_path, cfg, resume=True)  # finished: nothing left to train
    assert again["resumed_from"] == "step-00000002" and again["top1"] == first["top1"]
    fresh = finetune(model, tmp_path, cfg)  # no resume: a clean start, not appended logs
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert fresh["resumed_from"] is None and [json.loads(line)["step"] for line in lines] == [1, 2]


def test_lowshot_draw_is_k_per_class_from_train_seeded_and_the_probes_draw(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    splits: list[str] = []

    def recorded(data: str, split: str, img_size: int, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
        splits.append(split)
        return split_images(data, split, img_size, in_chans)

    monkeypatch.setattr(finetune_module, "split_images", recorded)
    images, labels, idx = lowshot_split("digits", 16, 1, 5, seed=0)
    train_images, train_labels = split_images("digits", "train", 16, 1)
    assert splits == ["train"]  # the test split is never read
    assert images.shape == (50, 1, 16, 16) and np.bincount(labels.numpy()).tolist() == [5] * 10
    assert len(set(idx.tolist())) == 50 and torch.equal(images, train_images[idx])
    assert torch.equal(labels, train_labels[idx])
    # the K-shot probe's draw of the same seed: probe and fine-tune train on the same images
    assert np.array_equal(idx, np.sort(few_shot_indices(train_labels.numpy(), 5, 0)))
    assert np.array_equal(lowshot_split("digits", 16, 1, 5, seed=0)[2], idx)  # deterministic per seed
    assert not np.array_equal(lowshot_split("digits", 16, 1, 5, seed=1)[2], idx)  # another seed, another draw
    with pytest.raises(DataError, match="shots 500"):
        lowshot_split("digits", 16, 1, 500, seed=0)


def test_lowshot_finetune_trains_on_the_draw_only(tmp_path: Path) -> None:
    model = EvalModel(Backbone.from_config(tiny_model_config()), 16, 1, [0.5], [0.5], "digits")
    result = finetune(model, tmp_path, FinetuneConfig(steps=3, batch_size=64, warmup_steps=1, shots=2))
    # 2 shots x 10 classes = 20 images: the batch shrinks to the draw, one batch per epoch
    assert result["shots"] == 2 and result["batch_size"] == 20 and result["images_seen"] == 60
    assert 0.0 <= result["top1"] <= 1.0
    with pytest.raises(RecipeError, match="shots"):
        finetune(model, tmp_path, FinetuneConfig(steps=1, shots=-1))


def test_probe_head_is_the_k_shot_logistic_regression_on_frozen_features(tmp_path: Path) -> None:
    from ssl_vit.eval.features import normalise
    from ssl_vit.eval.linear_probe import DEFAULT_CS, choose_c, fit_logistic

    model = EvalModel(Backbone.from_config(tiny_model_config()), 16, 1, [0.5], [0.5], "digits")
    objective = FineTune(model.backbone, 10, FinetuneConfig(shots=5))
    probe_head(objective, model, shots=5, seed=1)
    assert objective.training  # left in train mode for the fine-tune
    images, labels, _ = lowshot_split("digits", 16, 1, 5, seed=1)
    test_images, _ = split_images("digits", "test", 16, 1)
    objective.eval()
    with torch.no_grad():
        x = objective.backbone(normalise(images, [0.5], [0.5])).double().numpy()
        test_x = objective.backbone(normalise(test_images, [0.5], [0.5]))
        logits = objective.head(test_x).double().numpy()
    clf = fit_logistic(x, labels.numpy(), choose_c(x, labels.numpy(), DEFAULT_CS, 1), 1)
    # the head computes the probe's decision function, its standardisation folded into the weights
    np.testing.assert_allclose(logits, clf.decision_function(test_x.double().numpy()), rtol=1e-4, atol=1e-4)
    with pytest.raises(RecipeError, match="needs --shots"):
        finetune(model, tmp_path, FinetuneConfig(steps=1, head_init="probe"))
    with pytest.raises(RecipeError, match="random or probe"):
        finetune(model, tmp_path, FinetuneConfig(steps=1, shots=2, head_init="linear"))


def test_finetune_draws_reports_mean_and_std_over_seeded_draws(tmp_path: Path) -> None:
    model = EvalModel(Backbone.from_config(tiny_model_config()), 16, 1, [0.5], [0.5], "digits")
    cfg = FinetuneConfig(steps=2, batch_size=20, warmup_steps=0, shots=2, seed=3)
    result = finetune_draws(model, tmp_path, cfg, draws=2)
    assert result["seeds"] == [3, 4] and [r["seed"] for r in result["runs"]] == [3, 4]
    assert result["shots"] == 2 and result["draws"] == 2 and len(result["per_draw"]) == 2
    assert result["per_draw"] == [r["top1"] for r in result["runs"]]
    assert result["top1"] == pytest.approx(np.mean(result["per_draw"]))
    assert result["top1_std"] == pytest.approx(np.std(result["per_draw"], ddof=1))
    assert all((tmp_path / f"seed{s}" / "metrics.jsonl").is_file() for s in (3, 4))
    assert finetune_draws(model, tmp_path / "one", cfg, draws=1)["top1_std"] is None
    with pytest.raises(RecipeError, match="draws"):
        finetune_draws(model, tmp_path, cfg, draws=0)


def test_lowshot_defaults_apply_only_with_shots() -> None:
    assert default_config() == FinetuneConfig()  # all labels: today's protocol, unchanged
    lowshot = default_config(10)
    assert lowshot.shots == 10 and {k: getattr(lowshot, k) for k in LOWSHOT_DEFAULTS} == LOWSHOT_DEFAULTS
    full_budget = {k: getattr(FinetuneConfig(), k) for k in LOWSHOT_DEFAULTS}
    assert replace(lowshot, **full_budget) == FinetuneConfig(shots=10)  # only the budget differs
