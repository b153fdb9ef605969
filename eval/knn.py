"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol).

Caron et al. 2021 (section 4.1, after Wu et al. 2018): features are L2-normalised, each test image
takes its k most cosine-similar training images, and each neighbour votes for its class with
weight exp(similarity / T); k = 20, T = 0.07. Nothing is trained, so the score reflects the feature
geometry alone, with no regularisation to tune.

Memory stays bounded: test images go in chunks, and each chunk meets the training features one
chunk at a time, keeping a running top-k, so neither the (N_test, N_train) similarity matrix nor the
whole training set is ever on the accelerator at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_vit.errors import RecipeError

DEFAULT_K = (20,)
DEFAULT_TEMPERATURE = 0.07


def _chunk(x: np.ndarray, start: int, size: int, device: torch.device) -> Tensor:
    """Rows [start, start + size) as L2-normalised float32 on `device`: (b, D)."""
    rows = torch.as_tensor(np.array(x[start : start + size], dtype=np.float32), device=device)
    return F.normalize(rows, dim=1)


def nearest(
    train_x: np.ndarray, queries: Tensor, k: int, chunk: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Top-k cosine similarities (b, k) and training indices (b, k) for normalised queries (b, D)."""
    best_sim = torch.empty(queries.shape[0], 0, device=device)
    best_idx = torch.empty(queries.shape[0], 0, dtype=torch.long, device=device)
    for start in range(0, len(train_x), chunk):
        sim = queries @ _chunk(train_x, start, chunk, device).T  # (b, c)
        idx = torch.arange(start, start + sim.shape[1], device=device).expand_as(sim)  # (b, c)
        sim, idx = torch.cat([best_sim, sim], 1), torch.cat([best_idx, idx], 1)  # (b, k + c)
        best_sim, top = sim.topk(min(k, sim.shape[1]), dim=1)  # sorted, most similar first
        best_idx = idx.gather(1, top)
    return best_sim, best_idx


def knn_classify(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    ks: Sequence[int] = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk: int = 1024,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Top-1 on test for each k in `ks`; `top1` is the first k's.

    train_x (N, D), train_y (N,), test_x (M, D), test_y (M,): numpy arrays or memory maps.
    """
    if not ks or min(ks) < 1:
        raise RecipeError(f"k-NN needs k >= 1, got {list(ks)}")
    if temperature <= 0:
        raise RecipeError(f"k-NN temperature must be positive, got {temperature}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    labels = torch.as_tensor(np.asarray(train_y), dtype=torch.long, device=device)  # (N,)
    num_classes = int(max(np.max(train_y), np.max(test_y))) + 1
    k_max = min(max(ks), len(train_y))
    correct = dict.fromkeys(ks, 0)
    with torch.inference_mode():
        for start in range(0, len(test_y), chunk):
            queries = _chunk(test_x, start, chunk, device)  # (b, D)
            truth = torch.as_tensor(np.asarray(test_y[start : start + chunk]), device=device)  # (b,)
            sim, idx = nearest(train_x, queries, k_max, chunk, device)  # (b, k_max) each
            neighbour_labels = labels[idx]  # (b, k_max)
            weights = (sim / temperature).exp()  # (b, k_max)
            for k in ks:
                votes = torch.zeros(len(queries), num_classes, device=device)  # (b, K)
                votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
                correct[k] += int((votes.argmax(1) == truth).sum())
    per_k = {str(k): correct[k] / len(test_y) for k in ks}
    return {
        "top1": per_k[str(ks[0])],
        "top1_per_k": per_k,
        "k": list(ks),
        "temperature": temperature,
        "n_train": int(len(train_y)),
        "n_test": int(len(test_y)),
        "dim": int(train_x.shape[1]),
    }
