"""End-to-end fine-tuning of a pretrained backbone with a fresh linear head.

The recipe of BEiT/MAE fine-tuning (Bao et al. 2021; He et al. 2021, appendix A.3), built from timm's
own utilities rather than rewritten: layer-wise lr decay from `timm.optim.create_optimizer_v2`
(block i of L, counted from 0, gets lr x decay^(L - i); the patch embedding, class token and
position embedding decay^(L + 1); the new head the full lr; timm groups the final norm with the last
block, so it gets lr x decay), stochastic depth, label smoothing, and optional Mixup/CutMix (`timm.data.Mixup`)
with `timm.loss.SoftTargetCrossEntropy`. It runs on the engine's `fit` with the `supervised`
objective, so it logs, checkpoints and resumes like pretraining (STYLE.md lets this evaluator, and
no other, import the engine).

Low-label fine-tuning (`cfg.shots = K`), the case self-supervision is for: K labelled training
images per class, drawn exactly as the K-shot probe draws them (`few_shot_indices`, the same seed
gives the same images whatever the backbone, so every input and the from-scratch baseline train on
one set), held in memory and augmented like the full stream; top-1 on the whole test split.
`finetune_draws` repeats it over seeded draws and reports mean ± std.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ssl_vit.eval.features import EvalModel, normalise, split_images
from ssl_vit.eval.linear_probe import DEFAULT_CS, choose_c, few_shot_indices, fit_logistic
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ssl_vit.backbone import Backbone
from ssl_vit.config import CkptConfig, DataConfig, LogConfig, OptimConfig, TrainConfig
from ssl_vit.data import class_names, require_labels, train_loader
from ssl_vit.data.stream import augmented_batch
from ssl_vit.data.views import MultiView
from ssl_vit.engine.loop import FitConfig, Reporting, fit, processes
from ssl_vit.engine.stream import Loader
from ssl_vit.errors import RecipeError
from ssl_vit.objectives.supervised import Supervised, SupervisedConfig
from ssl_vit.rundir import RunDir
from ssl_vit.types import Batch, ViewSpec


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
    seed: int = 0  # also picks the K-shot draw
    shots: int = 0  # K labelled training images per class; 0: the whole train split
    # random: a fresh head (trunc-normal); probe: the head starts as a logistic regression on the
    # frozen backbone's features of the K-shot draw, then everything trains (LP-FT, Kumar et al. 2022)
    head_init: str = "random"


# The K-shot budget, from the curve on digits 10-shot (100 images, the recipe's width-128 depth-4 ViT,
# batch 32, lr 3e-3), test top-1 over 3 draws: a backbone pretrained 200 supervised steps gets
# 83 / 85 / 87 / 90% after 200 / 300 / 400 / 800 steps; from random init 52 / 65 / 74% at 200-400,
# 85% at 800 and 86-88% at 1,200-1,600 (1-2 draws). A few hundred images need as many epochs as the
# full split, not fewer (800 x 32 is 256 epochs). lr 3e-3 beat 1e-3 and 6e-3 up to 250 steps and ties
# 1e-3 at 800; batch 16 gave no more accuracy per second than 32. About 55 s per fine-tune on one thread.
LOWSHOT_DEFAULTS: dict[str, Any] = {"steps": 800, "batch_size": 32, "warmup_steps": 10, "lr": 3e-3}


def default_config(shots: int = 0) -> FinetuneConfig:
    """The full-data protocol, or with `shots` > 0 the K-shot one (`LOWSHOT_DEFAULTS`): smaller
    batches and a higher lr, so that both a pretrained and a from-scratch backbone converge."""
    return FinetuneConfig(shots=shots, **(LOWSHOT_DEFAULTS if shots > 0 else {}))


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
    images, labels = split_images(model.data, split, model.img_size, model.in_chans, model.test_data)
    device = next(objective.parameters()).device
    objective.eval()
    preds = []
    for start in range(0, len(labels), batch_size):
        imgs = normalise(images[start : start + batch_size].to(device), model.mean, model.std)
        preds.append(objective.head(objective.backbone(imgs)).argmax(-1).cpu())
    return float((torch.cat(preds) == labels).float().mean())


class _InMemory(Dataset[tuple[Tensor, int]]):
    """Images (N, C, S, S) in [0, 1] -> (image, label); `collate` below makes the views per batch, as
    the shard stream does."""

    def __init__(self, images: Tensor, labels: Tensor, views: MultiView) -> None:
        self.images, self.labels, self.views = images, labels, views

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])

    def collate(self, items: list[tuple[Tensor, int]]) -> Batch:
        return augmented_batch(self.views, [image for image, _ in items], [label for _, label in items])


def lowshot_split(
    data: str, img_size: int, in_chans: int, shots: int, seed: int
) -> tuple[Tensor, Tensor, np.ndarray]:
    """K training images per class drawn with `seed`: images (K*C, C, S, S), labels, train indices.

    The K-shot probe's draw (`few_shot_indices`, sorted as it sorts them), so the probe and the
    fine-tune of seed s see the same images; it depends on the data and the seed only, never on the
    model. Only the train split is read.
    """
    images, labels = split_images(data, "train", img_size, in_chans)
    idx = np.sort(few_shot_indices(labels.numpy(), shots, seed))
    return images[idx], labels[idx], idx


@torch.no_grad()
def probe_head(objective: FineTune, model: EvalModel, shots: int, seed: int) -> None:
    """Set `objective.head` to a logistic regression on the frozen backbone's features of the K-shot
    draw (C chosen on a held-out fifth, as the K-shot probe chooses it), its standardisation folded
    into the weights: fine-tuning then starts from the probe's classifier, so the first gradients
    into the backbone are those of a fitted head, not of a random one (LP-FT, Kumar et al. 2022)."""
    images, labels, _ = lowshot_split(model.data, model.img_size, model.in_chans, shots, seed)
    objective.eval()
    x = objective.backbone(normalise(images, model.mean, model.std)).double().numpy()
    objective.train()
    y = labels.numpy()
    clf = fit_logistic(x, y, choose_c(x, y, DEFAULT_CS, seed), seed)
    scaler, logreg = clf.steps[0][1], clf.steps[1][1]
    weight = logreg.coef_ / scaler.scale_  # (K, d)
    bias = logreg.intercept_ - weight @ scaler.mean_
    objective.head.weight.copy_(torch.as_tensor(weight, dtype=objective.head.weight.dtype))
    objective.head.bias.copy_(torch.as_tensor(bias, dtype=objective.head.bias.dtype))


def lowshot_loader(
    model: EvalModel, data: DataConfig, spec: ViewSpec, shots: int, batch_size: int, seed: int
) -> DataLoader[tuple[Tensor, int]]:
    """A map-style loader over one K-shot draw, augmented like `train_loader` (the engine reshuffles
    it with seed + epoch). The batch shrinks to the draw's size when the draw is smaller."""
    images, labels, _ = lowshot_split(model.data, model.img_size, model.in_chans, shots, seed)
    dataset = _InMemory(images, labels, MultiView.for_data(spec, model.img_size, model.in_chans, data))
    return DataLoader(
        dataset,
        batch_size=min(batch_size, len(labels)),
        shuffle=True,
        drop_last=True,
        collate_fn=dataset.collate,
        generator=torch.Generator().manual_seed(seed),
    )


def finetune(
    model: EvalModel,
    out_dir: Path,
    cfg: FinetuneConfig,
    data: DataConfig | None = None,
    progress: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune a copy of `model.backbone` on its data's train split; top-1 on the test split.

    With `cfg.shots` > 0 only the K-shot draw of `cfg.seed` is trained on (`lowshot_split`). `data`
    sets the augmentation (crop scale, flips); mean and std always come from the model.
    Checkpoints and `metrics.jsonl` go into `out_dir`. With `resume`, the latest checkpoint there
    is continued exactly (the engine restores weights, optimiser, RNG and data position); without
    it, a previous fine-tune's files in `out_dir` are cleared first.
    """
    if cfg.steps < 1:
        raise RecipeError(f"fine-tune steps must be at least 1, got {cfg.steps}")
    if cfg.shots < 0:
        raise RecipeError(f"fine-tune shots must be 0 (all labels) or more, got {cfg.shots}")
    require_labels(model.data)
    data = copy.deepcopy(data) if data is not None else DataConfig(hflip=False)
    data.train, data.mean, data.std = model.data, list(model.mean), list(model.std)
    backbone = copy.deepcopy(model.backbone).cpu()
    backbone.set_drop_path(cfg.drop_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        objective = FineTune(backbone, len(class_names(model.data)), cfg)
    if cfg.head_init == "probe":
        if cfg.shots < 1:
            raise RecipeError("fine-tune head_init probe needs --shots K (a K-shot draw to fit it on)")
        probe_head(objective, model, cfg.shots, cfg.seed)
    elif cfg.head_init != "random":
        raise RecipeError(f"fine-tune head_init must be random or probe, got {cfg.head_init!r}")
    loader: Loader
    if cfg.shots > 0:
        shot_loader = lowshot_loader(model, data, objective.views(), cfg.shots, cfg.batch_size, cfg.seed)
        loader = shot_loader
        batch_size = shot_loader.batch_size or cfg.batch_size
    else:
        world = processes(TrainConfig(mixed_precision=cfg.mixed_precision))  # under torchrun: this rank
        stream = train_loader(
            data,
            objective.views(),
            model.img_size,
            model.in_chans,
            cfg.batch_size,
            cfg.seed,
            rank=world.process_index,
            world=world.num_processes,
        )
        loader, batch_size = stream, cfg.batch_size
    if (cfg.mixup > 0 or cfg.cutmix > 0) and batch_size % 2:
        raise RecipeError(f"Mixup/CutMix need an even fine-tune batch size, got {batch_size}")
    optim = OptimConfig(
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        clip_grad=cfg.clip_grad,
        layer_decay=cfg.layer_decay,
    )
    train = TrainConfig(batch_size=batch_size, max_steps=cfg.steps, mixed_precision=cfg.mixed_precision)
    ckpt = RunDir(out_dir).latest_checkpoint() if resume else None
    if not resume:
        RunDir(out_dir).clear_engine_files()
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_cfg = CkptConfig(every_steps=cfg.ckpt_every_steps, keep_last=1)
    fit_cfg = FitConfig(optim, train, ckpt_cfg, LogConfig(every_steps=max(cfg.steps // 20, 1)), cfg.seed)
    result = fit(
        objective,
        loader,
        fit_cfg,
        out_dir,
        resume=ckpt,
        optimizer=build_optimizer(objective, cfg),
        report=Reporting(progress=progress),
    )
    top1 = evaluate(objective, model)
    return {
        "top1": top1,
        "steps": result.steps,
        "images_seen": result.images_seen,
        "seconds": result.seconds,
        "final_loss": result.final_loss if np.isfinite(result.final_loss) else None,
        "seed": cfg.seed,
        "shots": cfg.shots,
        "batch_size": batch_size,
        "resumed_from": ckpt.name if ckpt else None,
        "layer_decay": cfg.layer_decay,
        "drop_path": cfg.drop_path,
        "mixup": cfg.mixup,
        "cutmix": cfg.cutmix,
        "out_dir": str(out_dir),
    }


def finetune_draws(
    model: EvalModel,
    out_dir: Path,
    cfg: FinetuneConfig,
    draws: int,
    data: DataConfig | None = None,
    progress: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """`draws` fine-tunes with seeds `cfg.seed`, `cfg.seed + 1`, ...; with `cfg.shots`, each on the
    K-shot draw of its seed. Mean and std of test top-1 over draws, as `lowshot_probe` reports them.

    Draw s goes into `out_dir/seed<s>`; `runs` holds each fine-tune's own result.
    """
    if draws < 1:
        raise RecipeError(f"fine-tune draws (--seeds) must be at least 1, got {draws}")
    seeds = [cfg.seed + i for i in range(draws)]
    runs = [
        finetune(model, out_dir / f"seed{s}", replace(cfg, seed=s), data, progress, resume) for s in seeds
    ]
    per_draw = [float(r["top1"]) for r in runs]
    return {
        "top1": float(np.mean(per_draw)),
        "top1_std": float(np.std(per_draw, ddof=1)) if draws > 1 else None,
        "shots": cfg.shots,
        "draws": draws,
        "seeds": seeds,
        "per_draw": per_draw,
        "steps": cfg.steps,
        "batch_size": runs[0]["batch_size"],
        "seconds": float(sum(r["seconds"] for r in runs)),
        "out_dir": str(out_dir),
        "runs": runs,
    }
