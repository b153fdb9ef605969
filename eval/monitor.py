"""Online monitor: k-NN top-1 and RankMe of the backbone while it pretrains, for `metrics.jsonl`.

A loss curve does not say whether the representation improves or collapses; these two do, cheaply:

- `knn_top1`: the frozen k-NN evaluator (`knn.knn_classify`, DINO's weighted vote) on a fixed, seeded,
  class-stratified subset of the TRAIN split, half memory bank and half queries. The test split is
  never read, so watching this number cannot leak test labels into choices made during a run.
  The subset's images are also in the pretraining stream (without labels); like the usual k-NN
  protocol's memory bank, they measure how features group classes, not how well unseen images do.
- `rankme`: the effective rank of the same features (Garrido et al. 2023, eq. 1), which needs no
  labels: a collapsing representation has a small rank long before its loss looks odd. Data without
  labels gets RankMe alone.

Features go through the evaluators' own extraction (`features.extract`: eval mode, inference mode,
the recipe's `eval.feature` pooling and the training normalisation, train mode restored after).
The images are read once, when the monitor is built; each call is one forward pass over them.
The whole train split is decoded once to draw the subset, so the monitor suits sets that fit in
memory (the built-in ones, small shard folders), not ImageNet.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ssl_vit.eval.features import extract
from ssl_vit.eval.knn import knn_classify
from torch import Tensor

from ssl_vit.backbone import Backbone
from ssl_vit.config import EvalConfig
from ssl_vit.data import load_images
from ssl_vit.errors import RecipeError

log = logging.getLogger(__name__)

SUBSET_SEED = 0  # not the recipe's seed: runs that differ only in seed are measured on the same images
RANKME_EPS = 1e-7  # the paper's epsilon


def rankme(feats: Tensor | np.ndarray, eps: float = RANKME_EPS) -> float:
    """RankMe (Garrido et al. 2023, eq. 1): exp of the entropy of the normalised singular values.

    feats (N, D). With sigma the singular values of the (uncentred) embedding matrix,
    p_k = sigma_k / ||sigma||_1 + eps and RankMe = exp(-sum_k p_k log p_k): 1 for rank-1 embeddings,
    min(N, D) when every direction carries the same energy. Float64, so tiny singular values of a
    collapsed representation are not lost to rounding.
    """
    z = torch.as_tensor(np.asarray(feats, dtype=np.float64))  # (N, D)
    sigma = torch.linalg.svdvals(z)  # (min(N, D),)
    p = sigma / sigma.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def stratified_order(labels: np.ndarray, seed: int = SUBSET_SEED) -> np.ndarray:
    """A seeded order of indices (N,) in which every prefix holds each class in proportion to its size.

    Each sample's key is (its rank within its class after a seeded shuffle + 0.5) / class size, so a
    class of n samples puts one sample in each 1/n of the order.
    """
    perm = np.random.default_rng(seed).permutation(len(labels))  # (N,)
    _, inverse, counts = np.unique(labels[perm], return_inverse=True, return_counts=True)
    return perm[np.argsort((_rank_in_class(inverse) + 0.5) / counts[inverse], kind="stable")]


def _rank_in_class(inverse: np.ndarray) -> np.ndarray:
    """For class ids (N,): each sample's position among the samples of its class, in array order."""
    by_class = np.argsort(inverse, kind="stable")  # (N,)
    starts = np.searchsorted(inverse[by_class], inverse[by_class], side="left")  # (N,)
    rank = np.empty(len(inverse), dtype=np.int64)
    rank[by_class] = np.arange(len(inverse)) - starts
    return rank


def bank_and_queries(
    labels: np.ndarray, samples: int, seed: int = SUBSET_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the memory bank and the queries: a stratified subset of `samples`, split per class
    alternately (bank gets the even ranks, so a class of one sample is in the bank only)."""
    chosen = stratified_order(labels, seed)[:samples]  # (S,)
    _, inverse = np.unique(labels[chosen], return_inverse=True)
    to_bank = _rank_in_class(inverse) % 2 == 0
    return np.sort(chosen[to_bank]), np.sort(chosen[~to_bank])


def online_every(cfg: EvalConfig) -> int:
    """`eval.online_every_steps` as an int (0: off), checked with `eval.online_samples`.

    Every process calls this, so a bad value stops all of them, not the main one alone.
    """
    every = cfg.online_every_steps or 0
    if every < 0:
        raise RecipeError(f"eval.online_every_steps must be >= 0 (0 or null: off), got {every}")
    if every and cfg.online_samples < 2:
        raise RecipeError(
            f"eval.online_samples must be >= 2 (a memory bank and queries), got {cfg.online_samples}"
        )
    return every


@dataclass
class OnlineMonitor:
    """Measures `backbone` on fixed images: call it for {"knn_top1", "rankme"} ({"rankme"}: no labels).

    `images` (M, C, H, W) in [0, 1] on the CPU; `bank` and `queries` index them; `labels` (M,) or None.
    `backbone` is watched, not copied: each call sees its current weights, on its current device.
    """

    backbone: Backbone
    images: Tensor
    labels: np.ndarray | None
    bank: np.ndarray
    queries: np.ndarray
    mean: Sequence[float]
    std: Sequence[float]
    feature: str = "cls"
    batch_size: int = 256
    ks: Sequence[int] = (20,)
    temperature: float = 0.07

    def __call__(self) -> dict[str, float]:
        device = next(self.backbone.parameters()).device
        feats = extract(
            self.backbone, self.images, self.feature, self.batch_size, self.mean, self.std, device
        )  # (M, D')
        measures = {"rankme": rankme(feats)}
        if self.labels is not None:
            knn = knn_classify(
                feats[self.bank],
                self.labels[self.bank],
                feats[self.queries],
                self.labels[self.queries],
                self.ks,
                self.temperature,
                device=device,
            )
            measures["knn_top1"] = float(knn["top1"])
        return measures


def online_monitor(
    backbone: Backbone,
    source: str,
    img_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    cfg: EvalConfig,
    cache_dir: str | None = None,
) -> OnlineMonitor:
    """Read the train split of `source` once and keep `cfg.online_samples` of its images (all when fewer).

    Only the `train` split is ever requested. Labels missing anywhere in the split (-1) mean RankMe
    alone, on a seeded random subset.
    """
    images, labels_t = load_images(source, "train", img_size, in_chans, cache_dir)  # (N, C, H, W), (N,)
    labels = labels_t.numpy()
    labelled = bool((labels >= 0).all())
    samples = min(cfg.online_samples, len(labels))
    bank, queries = bank_and_queries(labels if labelled else np.zeros_like(labels), samples)
    keep = np.sort(np.concatenate([bank, queries]))  # (S,) indices into the split
    position = np.full(len(labels), -1, dtype=np.int64)
    position[keep] = np.arange(len(keep))  # split index -> row of the kept images
    if not labelled:
        log.info("online monitor: %s has unlabelled train images; RankMe only", source)
    elif len(queries) == 0:
        log.warning("online monitor: %d train images leave no k-NN queries; RankMe only", samples)
        labelled = False
    log.info(
        "online monitor: %d train images of %s (%d bank, %d queries)",
        samples,
        source,
        len(bank),
        len(queries),
    )
    return OnlineMonitor(
        backbone,
        images[torch.as_tensor(keep)],  # (S, C, H, W), a copy: the whole split can go
        labels[keep] if labelled else None,
        position[bank],
        position[queries],
        list(mean),
        list(std),
        cfg.feature,
        cfg.batch_size,
        list(cfg.knn_k),
        cfg.knn_temperature,
    )
