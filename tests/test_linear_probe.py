from __future__ import annotations

import inspect

import numpy as np
from ssl_vit.eval import linear_probe as lp


def clusters(
    n_per_class: int, n_classes: int, dim: int, spread: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 10
    y = np.repeat(np.arange(n_classes), n_per_class)
    return centres[y] + rng.normal(size=(len(y), dim)) * spread, y


def test_separable_clusters_reach_full_accuracy() -> None:
    x, y = clusters(60, 5, 16, 0.5, seed=0)
    xt, yt = clusters(20, 5, 16, 0.5, seed=0)  # same centres (same seed), new noise below
    xt = xt + np.random.default_rng(1).normal(size=xt.shape) * 0.1
    result = lp.linear_probe(x, y, xt, yt)
    assert result["top1"] == 1.0
    assert result["n_train"] == 300 and result["n_test"] == 100


def test_shuffled_labels_stay_near_chance() -> None:
    x, y = clusters(100, 5, 16, 0.5, seed=0)
    rng = np.random.default_rng(0)
    y_train = rng.permutation(y)
    xt, yt = clusters(60, 5, 16, 0.5, seed=0)
    result = lp.linear_probe(x, y_train, xt, rng.permutation(yt))
    assert result["top1"] < 0.35  # chance is 0.2


def test_regularisation_is_chosen_without_test_data() -> None:
    """`choose_c` only ever receives training data: the API has no way to pass test labels."""
    assert list(inspect.signature(lp.choose_c).parameters)[:2] == ["x", "y"]
    x, y = clusters(40, 3, 8, 3.0, seed=2)
    c1 = lp.choose_c(x, y, lp.DEFAULT_CS, seed=0)
    result = lp.linear_probe(x, y, x[:10], np.zeros(10, dtype=int))  # absurd test labels
    assert result["C"] == c1
