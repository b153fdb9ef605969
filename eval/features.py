"""Frozen feature extraction shared by the frozen evaluators (linear probe, k-NN)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor

from ssl_vit.backbone import Backbone
from ssl_vit.data import load_images
from ssl_vit.errors import RecipeError
from ssl_vit.export import load_backbone

FEATURE_KINDS = ("cls", "avg")


@dataclass
class EvalModel:
    """A frozen backbone with the input pipeline recorded in its export."""

    backbone: Backbone
    img_size: int
    in_chans: int
    mean: list[float]
    std: list[float]
    data: str  # the data source the run trained on, or `digits`


def load_eval_model(path: Path, data: str | None = None) -> EvalModel:
    """From a run directory, an export folder or any timm-loadable folder."""
    backbone, pretrained_cfg = load_backbone(path)
    _, height, _ = pretrained_cfg.get("input_size", (backbone.in_chans, 224, 224))
    recipe_path = path / "recipe.yaml"
    if data is None and recipe_path.is_file():
        data = yaml.safe_load(recipe_path.read_text())["data"]["train"]
    return EvalModel(
        backbone=backbone,
        img_size=int(height),
        in_chans=backbone.in_chans,
        mean=list(pretrained_cfg.get("mean", [0.5] * backbone.in_chans)),
        std=list(pretrained_cfg.get("std", [0.5] * backbone.in_chans)),
        data=data or "digits",
    )


def normalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(N, C, H, W) in [0, 1] -> normalised with per-channel mean/std."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


@torch.inference_mode()
def extract(backbone: Backbone, images: Tensor, batch_size: int = 256, kind: str = "cls") -> np.ndarray:
    """Features (N, D) of normalised images (N, C, H, W), in eval mode (no dropout/drop-path).

    `cls` uses timm's own pooling (CLS token, or the mean where the model pools by average);
    `avg` is the mean of patch tokens.
    """
    if kind not in FEATURE_KINDS:
        raise RecipeError(f"eval.feature must be one of {', '.join(FEATURE_KINDS)}, not '{kind}'")
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        tokens = backbone.forward_features(images[start : start + batch_size].to(device))  # (b, P+N, D)
        pooled = backbone.pool(tokens) if kind == "cls" else backbone.patch_tokens(tokens).mean(1)  # (b, D)
        out.append(pooled.float().cpu())
    backbone.train(was_training)
    return torch.cat(out).numpy()


def split_features(
    model: EvalModel, split: str, kind: str = "cls", batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one split of the model's data."""
    images, labels = load_images(model.data, split, model.img_size, model.in_chans)
    feats = extract(model.backbone, normalise(images, model.mean, model.std), batch_size, kind)
    return feats, labels.numpy()


def raw_pixel_features(data: str, split: str, img_size: int, in_chans: int) -> tuple[np.ndarray, np.ndarray]:
    """The raw-pixel baseline: flattened images in [0, 1]."""
    images, labels = load_images(data, split, img_size, in_chans)
    return images.flatten(1).numpy(), labels.numpy()
