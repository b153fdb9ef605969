"""Frozen feature extraction shared by the frozen evaluators (linear probe, k-NN, compare).

One pass of the backbone over a split under `torch.inference_mode`, batch by batch on the
accelerator, always in eval mode: dropout and drop-path active during extraction make the features
noisy, a classic bug of published probe code. Each batch's features go straight into a preallocated
array (a `.npy` memory map when cached), so memory grows with the batch, not with the split.

The cache key hashes the weights, the data, the split, the feature kind and the input pipeline
(size, channels, mean, std): change any of them and the features are extracted again.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssl_vit.backbone import Backbone
from ssl_vit.data import eval_split, evaluation_data
from ssl_vit.errors import DataError, RecipeError
from ssl_vit.rundir import RunDir, weights_digest
from ssl_vit.timm_export import load_backbone, read_export_config

log = logging.getLogger(__name__)

FEATURE_KINDS = ("cls", "avg", "cls4")
CACHE_VERSION = 2  # bump when extraction changes what a cached file means

Allocate = Callable[[tuple[int, int]], np.ndarray]


@dataclass
class EvalModel:
    """A frozen backbone with the input pipeline recorded in its export, and where it came from."""

    backbone: Backbone
    img_size: int
    in_chans: int
    mean: list[float]
    std: list[float]
    data: str  # the evaluators' train source: eval.train, else the run's data.train, else `digits`
    name: str = "model"
    objective: str = "unknown"
    source: Path | None = None  # the run directory or folder it was loaded from
    info: dict[str, Any] = field(default_factory=dict)  # `ssl_vit` block of the export's config.json
    feature: str = "cls"  # the recipe's `eval.feature`: what the objective trains (MPP: patch tokens)
    test_data: str | None = None  # a separate test source (eval.test); None: `data`'s test split

    @property
    def run_dir(self) -> Path | None:
        """The run directory, where evaluators write `eval/<name>.json`; None for other folders."""
        if self.source is not None and RunDir(self.source).exists():
            return self.source
        return None


def load_eval_model(path: Path, data: str | None = None) -> EvalModel:
    """From a run directory, an export folder or any timm-loadable folder.

    The evaluation data: `data` (`--data`); else the recipe's (or export's) `eval.train` and
    `eval.test`, `eval.train` defaulting to the pretraining data; else `digits`.
    """
    backbone, pretrained_cfg = load_backbone(path)
    ours = read_export_config(path).get("ssl_vit", {})
    run = RunDir(path)
    recipe = run.recipe() if run.exists() else None
    _, height, _ = pretrained_cfg.get("input_size", (backbone.in_chans, 224, 224))
    if data:
        train, test = data, None
    elif recipe:
        train, test = recipe.eval.train or recipe.data.train, recipe.eval.test
    else:
        train, test = ours.get("eval_train") or ours.get("data") or "digits", ours.get("eval_test")
    train, test = evaluation_data(train, test)
    return EvalModel(
        backbone=backbone,
        img_size=int(height),
        in_chans=backbone.in_chans,
        mean=list(pretrained_cfg.get("mean", [0.5] * backbone.in_chans)),
        std=list(pretrained_cfg.get("std", [0.5] * backbone.in_chans)),
        data=train,
        name=path.resolve().name,
        objective=(recipe.objective["name"] if recipe else None) or ours.get("objective") or "unknown",
        source=path,
        info=ours,
        feature=(recipe.eval.feature if recipe else None) or ours.get("feature") or "cls",
        test_data=test,
    )


def random_init_model(model: EvalModel, seed: int = 0) -> EvalModel:
    """The same architecture and input pipeline with fresh random weights (a baseline row)."""
    backbone = copy.deepcopy(model.backbone)
    backbone.reset_parameters(seed)
    return EvalModel(
        backbone,
        model.img_size,
        model.in_chans,
        model.mean,
        model.std,
        model.data,
        "random init",
        "random_init",
        feature=model.feature,
        test_data=model.test_data,
    )


def save_result(model: EvalModel, name: str, result: dict[str, Any]) -> Path | None:
    """Write `RUN_DIR/eval/<name>.json` when the model came from a run directory."""
    if model.run_dir is None:
        return None
    out = RunDir(model.run_dir).eval_result(name)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_cache_dir() -> Path:
    """`features/` under the data cache root: `$SSL_VIT_CACHE`, else `$XDG_CACHE_HOME/ssl_vit` or
    `~/.cache/ssl_vit` (the root the built-in sets' shards use)."""
    if os.environ.get("SSL_VIT_CACHE"):
        return Path(os.environ["SSL_VIT_CACHE"]).expanduser() / "features"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssl_vit" / "features"


def normalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(N, C, H, W) in [0, 1] -> normalised with per-channel mean/std."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


@functools.lru_cache(maxsize=2)
def split_images(
    data: str, split: str, img_size: int, in_chans: int, test_data: str | None = None
) -> tuple[Tensor, Tensor]:
    """`eval_split` (labelled images of the evaluators' train or test split), remembered for the
    last two splits: `compare` evaluates many backbones on the same images. Read-only."""
    return eval_split(data, test_data, split, img_size, in_chans)


def _pooled(backbone: Backbone, imgs: Tensor, kind: str) -> Tensor:
    """(B, C, H, W) -> (B, D') for one feature kind."""
    if kind == "cls4":
        return backbone.last_blocks_cls(imgs)  # (B, 4*D)
    tokens = backbone.forward_features(imgs)  # (B, P+N, D)
    return backbone.pool(tokens) if kind == "cls" else backbone.patch_tokens(tokens).mean(1)


def extract(
    backbone: Backbone,
    images: Tensor,
    kind: str = "cls",
    batch_size: int = 256,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: torch.device | None = None,
    allocate: Allocate | None = None,
) -> np.ndarray:
    """Features (N, D') of images (N, C, H, W), in eval mode, written batch by batch.

    `cls` uses timm's own pooling (CLS token, or the mean where the model pools by average); `avg`
    is the mean of patch tokens; `cls4` concatenates the CLS token of the last 4 blocks (DINO).
    With `mean`/`std`, images in [0, 1] are normalised one batch at a time. `allocate(shape)` gives
    the output array (default: in memory). The backbone stays on `device` afterwards.
    """
    if kind not in FEATURE_KINDS:
        raise RecipeError(f"eval.feature must be one of {', '.join(FEATURE_KINDS)}, not '{kind}'")
    if images.shape[0] == 0:
        raise DataError("no images to extract features from")
    device = device or default_device()
    was_training = backbone.training
    backbone.to(device).eval()  # outside inference_mode: moved weights must stay trainable
    out: np.ndarray | None = None
    try:
        for start in range(0, images.shape[0], batch_size):
            with torch.inference_mode():
                batch = images[start : start + batch_size].to(device, non_blocking=True)
                if mean is not None and std is not None:
                    batch = normalise(batch, mean, std)
                feats = _pooled(backbone, batch, kind).float().cpu().numpy()  # (b, D')
            if out is None:
                shape = (images.shape[0], feats.shape[1])
                out = allocate(shape) if allocate else np.empty(shape, dtype=np.float32)
            out[start : start + len(feats)] = feats
    finally:
        backbone.train(was_training)
    assert out is not None
    return out


def feature_key(model: EvalModel, split: str, kind: str) -> str:
    """The cache key: weights, data, split, feature kind and input pipeline."""
    data = [model.data, model.test_data] if split == "test" and model.test_data else model.data
    parts = [CACHE_VERSION, weights_digest(model.backbone), data, split, kind]
    parts += [model.img_size, model.in_chans, list(model.mean), list(model.std)]
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=16).hexdigest()


def split_features(
    model: EvalModel,
    split: str,
    kind: str = "cls",
    batch_size: int = 256,
    cache_dir: Path | None = None,
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D') and labels (N,) of one split of the model's data; cached when `cache_dir` is set.

    A cached split comes back as a read-only memory map. The file is written under a temporary name
    and renamed when complete, so an interrupted extraction never leaves a partial cache entry.
    """
    if kind not in FEATURE_KINDS:
        raise RecipeError(f"eval.feature must be one of {', '.join(FEATURE_KINDS)}, not '{kind}'")
    path = labels_path = tmp = None
    if cache_dir is not None:
        key = feature_key(model, split, kind)
        path, labels_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.labels.npy"
        if path.is_file() and labels_path.is_file():
            log.info("features of %s/%s (%s) from cache %s", model.data, split, kind, path)
            return np.load(path, mmap_mode="r"), np.load(labels_path)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".{key}.{os.getpid()}.tmp.npy"
    images, labels = split_images(model.data, split, model.img_size, model.in_chans, model.test_data)

    def to_disk(shape: tuple[int, int]) -> np.ndarray:
        assert tmp is not None
        return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)

    feats = extract(
        model.backbone, images, kind, batch_size, model.mean, model.std, device, to_disk if tmp else None
    )
    if path is None or labels_path is None or tmp is None:
        return feats, labels.numpy()
    if isinstance(feats, np.memmap):
        feats.flush()
    del feats
    np.save(labels_path, labels.numpy())
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r"), labels.numpy()


def raw_pixel_features(
    data: str, split: str, img_size: int, in_chans: int, test_data: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The raw-pixel baseline: flattened images in [0, 1]."""
    images, labels = split_images(data, split, img_size, in_chans, test_data)
    return images.flatten(1).numpy(), labels.numpy()
