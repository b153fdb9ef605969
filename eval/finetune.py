"""End-to-end fine-tuning of a pretrained backbone with a fresh linear head.

The recipe of BEiT/MAE fine-tuning (Bao et al. 2021; He et al. 2021, appendix A.3), built from timm's
own utilities rather than rewritten: layer-wise lr decay from `timm.optim.create_optimizer_v2`
(block i of L, counted from 0, gets lr x decay^(L - i); the patch embedding, class token and
position embedding decay^(L + 1); the new head the full lr; timm groups the final norm with the last
block, so it gets lr x decay), stochastic depth, label smoothing, and optional Mixup/CutMix (`timm.data.Mixup`)
with `timm.loss.SoftTargetCrossEntropy`. It runs on the engine's `fit` with the `supervised`
objective, so it logs, checkpoints and resumes like pretraining (STYLE.md lets this evaluator, and
no other, import the engine).
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ssl_vit.eval.features import EvalModel, normalise, split_images
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import Tensor

from ssl_vit.backbone import Backbone
from ssl_vit.config import CkptConfig, DataConfig, LogConfig, OptimConfig, TrainConfig
from ssl_vit.data import class_names, train_loader
from ssl_vit.engine.checkpoint import latest_checkpoint
from ssl_vit.engine.loop import fit
from ssl_vit.errors import RecipeError
from ssl_vit.objectives.supervised import Supervised, SupervisedConfig
from ssl_vit.types import Batch


@dataclass
class FinetuneConfig:
    """The fine-tuning protocol; `compare` uses one for every input."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 20
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(alpha, alpha) for Mixup; 0 turns it off
    cutmix: float = 0.0  # Beta(alpha, alpha) for CutMix; 0 turns it off
    clip_grad: float | None = None
    mixed_precision: str = "no"
    ckpt_every_steps: int | None = None  # periodic checkpoints (always one at the end)
    seed: int = 0


class FineTune(Supervised):
    """The supervised objective plus Mixup/CutMix and timm's layer grouping of its parameters.

    `group_matcher` is what `create_optimizer_v2(layer_decay=...)` reads to assign layers; the new
    head matches no pattern, so it lands in the top layer with the full lr.
    """

    def __init__(self, backbone: Backbone, num_classes: int, cfg: FinetuneConfig) -> None:
        super().__init__(
            backbone, SupervisedConfig(num_classes=num_classes, label_smoothing=cfg.label_smoothing)
        )
        self.mixup: Mixup | None = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                label_smoothing=cfg.label_smoothing,
                num_classes=num_classes,
            )
            self.soft_loss = SoftTargetCrossEntropy()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return self.backbone.group_matcher(prefix="backbone.")

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if self.mixup is None or not self.training:
            return super().forward(batch)
        imgs, target = self.mixup(batch.views[0], batch.labels)  # (B, C, H, W), (B, K) soft labels
        logits = self.head(self.backbone(imgs))  # (B, K)
        loss = self.soft_loss(logits.float(), target)
        return loss, {"acc": (logits.argmax(-1) == target.argmax(-1)).float().mean().detach()}


def build_optimizer(objective: FineTune, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW with layer-decay groups from timm's factory; each group carries its `lr_scale`."""
    return create_optimizer_v2(
        objective, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay
    )


@torch.inference_mode()
def evaluate(objective: FineTune, model: EvalModel, split: str = "test", batch_size: int = 256) -> float:
    """Top-1 of the fine-tuned classifier on one split, in eval mode."""
    images, labels = split_images(model.data, split, model.img_size, model.in_chans)
    device = next(objective.parameters()).device
    objective.eval()
    preds = []
    for start in range(0, len(labels), batch_size):
        imgs = normalise(images[start : start + batch_size].to(device), model.mean, model.std)
        preds.append(objective.head(objective.backbone(imgs)).argmax(-1).cpu())
    return float((torch.cat(preds) == labels).float().mean())


def finetune(
    model: EvalModel,
    out_dir: Path,
    cfg: FinetuneConfig,
    data: DataConfig | None = None,
    progress: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune a copy of `model.backbone` on its data's train split; top-1 on the test split.

    `data` sets the augmentation (crop scale, flips); mean and std always come from the model.
    Checkpoints and `metrics.jsonl` go into `out_dir`. With `resume`, the latest checkpoint there
    is continued exactly (the engine restores weights, optimiser, RNG and data position); without
    it, a previous fine-tune's files in `out_dir` are cleared first.
    """
    if cfg.steps < 1:
        raise RecipeError(f"fine-tune steps must be at least 1, got {cfg.steps}")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise RecipeError(f"Mixup/CutMix need an even fine-tune batch size, got {cfg.batch_size}")
    data = copy.deepcopy(data) if data is not None else DataConfig(hflip=False)
    data.train, data.mean, data.std = model.data, list(model.mean), list(model.std)
    backbone = copy.deepcopy(model.backbone).cpu()
    backbone.set_drop_path(cfg.drop_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        objective = FineTune(backbone, len(class_names(model.data)), cfg)
    loader = train_loader(data, objective.views(), model.img_size, model.in_chans, cfg.batch_size, cfg.seed)
    optim = OptimConfig(
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        clip_grad=cfg.clip_grad,
        layer_decay=cfg.layer_decay,
    )
    train = TrainConfig(batch_size=cfg.batch_size, max_steps=cfg.steps, mixed_precision=cfg.mixed_precision)
    ckpt = latest_checkpoint(out_dir / "checkpoints") if resume else None
    if not resume:
        _clear(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = fit(
        objective,
        loader,
        len(loader),
        optim,
        train,
        CkptConfig(every_steps=cfg.ckpt_every_steps, keep_last=1),
        LogConfig(every_steps=max(cfg.steps // 20, 1)),
        out_dir,
        cfg.seed,
        progress=progress,
        resume=ckpt,
        optimizer=build_optimizer(objective, cfg),
    )
    top1 = evaluate(objective, model)
    return {
        "top1": top1,
        "steps": result.steps,
        "images_seen": result.images_seen,
        "seconds": result.seconds,
        "final_loss": result.final_loss if np.isfinite(result.final_loss) else None,
        "seed": cfg.seed,
        "resumed_from": ckpt.name if ckpt else None,
        "layer_decay": cfg.layer_decay,
        "drop_path": cfg.drop_path,
        "mixup": cfg.mixup,
        "cutmix": cfg.cutmix,
        "out_dir": str(out_dir),
    }


def _clear(out_dir: Path) -> None:
    """A fresh fine-tune in a used folder: drop the engine files a previous one left."""
    for name in ("checkpoints", "metrics.jsonl", "train_state.json"):
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
