"""scikit-learn's digits: 1,797 grayscale 8x8 images of 10 classes, shipped inside scikit-learn.

The embedded default data: no download. A fixed, seeded, stratified split keeps every run and every
evaluator on the same train/test images.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

SPLIT_SEED = 0
TEST_FRACTION = 0.3
CLASS_NAMES = [str(i) for i in range(10)]


def digits_split(split: str) -> tuple[Tensor, Tensor]:
    """Images (N, 1, 8, 8) as float in [0, 1] (value / 16) and labels (N,) int64."""
    if split not in ("train", "test"):
        raise ValueError(f"digits has splits 'train' and 'test', not '{split}'")
    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    labels = data.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    idx = idx_train if split == "train" else idx_test
    return torch.from_numpy(images[idx]).unsqueeze(1), torch.from_numpy(labels[idx])
