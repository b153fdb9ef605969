"""Linear probe: logistic regression on standardised frozen features.

The regularisation strength is chosen on a held-out part of the training split (never on test),
then the classifier is refitted on all training features and scored once on test. scikit-learn runs
under `threadpool_limits(1)`: measured here, its BLAS threads fighting torch's made a fit ~35x slower.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0)


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> Any:
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    return clf.fit(x, y)


def choose_c(x: np.ndarray, y: np.ndarray, cs: Sequence[float], seed: int, holdout: float = 0.2) -> float:
    """The C with the best accuracy on a stratified held-out part of the training data."""
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 and int(len(y) * holdout) >= len(counts) else None
    x_fit, x_val, y_fit, y_val = train_test_split(
        x, y, test_size=holdout, random_state=seed, stratify=stratify
    )
    scores = [float(_fit(x_fit, y_fit, c, seed).score(x_val, y_val)) for c in cs]
    return float(cs[int(np.argmax(scores))])


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
) -> dict[str, Any]:
    """Top-1 on test of a logistic regression whose C was chosen on train only."""
    with threadpool_limits(1):
        c = choose_c(train_x, train_y, cs, seed) if len(cs) > 1 else float(cs[0])
        clf = _fit(train_x, train_y, c, seed)
        top1 = float(clf.score(test_x, test_y))
    return {
        "top1": top1,
        "n_train": int(len(train_y)),
        "n_test": int(len(test_y)),
        "C": c,
        "dim": int(train_x.shape[1]),
    }
