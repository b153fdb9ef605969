from __future__ import annotations

import math

import numpy as np
import pytest
from ssl_vit.eval.knn import knn_classify

from ssl_vit.errors import RecipeError
from tests.conftest import clusters


def brute_force_knn(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int, temperature: float
) -> np.ndarray:
    """DINO's weighted vote written as loops over test points and neighbours."""
    preds = []
    for q in test_x:
        sims = [float(q @ t) / (np.linalg.norm(q) * np.linalg.norm(t)) for t in train_x]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes: dict[int, float] = {}
        for i in order:
            votes[int(train_y[i])] = votes.get(int(train_y[i]), 0.0) + math.exp(sims[i] / temperature)
        preds.append(max(votes, key=lambda c: votes[c]))
    return np.array(preds)


def test_separable_clusters_reach_full_accuracy() -> None:
    x, y = clusters(40, 5, 16, 0.5, seed=0)
    xt, yt = clusters(10, 5, 16, 0.5, seed=0)
    result = knn_classify(x, y, xt + np.random.default_rng(1).normal(size=xt.shape) * 0.1, yt)
    assert result["top1"] == 1.0 and result["top1_per_k"] == {"20": 1.0}


def test_random_labels_stay_near_chance() -> None:
    rng = np.random.default_rng(0)
    x, xt = rng.normal(size=(500, 16)), rng.normal(size=(300, 16))
    result = knn_classify(x, rng.integers(0, 5, 500), xt, rng.integers(0, 5, 300))
    assert 0.1 < result["top1"] < 0.32  # chance is 0.2


def test_k1_equals_brute_force_nearest_neighbour() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(120, 8)), rng.integers(0, 4, 120)
    xt, yt = rng.normal(size=(50, 8)), rng.integers(0, 4, 50)
    nearest = np.array([y[int(np.argmax([q @ t / np.linalg.norm(t) for t in x]))] for q in xt])
    result = knn_classify(x, y, xt, yt, ks=[1], chunk=16)
    assert result["top1"] == pytest.approx(float(np.mean(nearest == yt)))


def test_weighted_votes_match_the_loop_for_several_k_and_tiny_chunks() -> None:
    """Chunks of 7 (a running top-k across training chunks) give the loop's answer for each k."""
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(3, 6)) * 2
    y, yt = rng.integers(0, 3, 90), rng.integers(0, 3, 40)
    x, xt = centres[y] + rng.normal(size=(90, 6)), centres[yt] + rng.normal(size=(40, 6))
    result = knn_classify(x, y, xt, yt, ks=[5, 20], temperature=0.5, chunk=7)
    for k in (5, 20):
        expected = float(np.mean(brute_force_knn(x, y, xt, k, 0.5) == yt))
        assert result["top1_per_k"][str(k)] == pytest.approx(expected)
    assert result["top1"] == result["top1_per_k"]["5"]


@pytest.mark.parametrize("ks, temperature", [([0], 0.07), ([], 0.07), ([20], 0.0)])
def test_bad_settings_are_user_errors(ks: list[int], temperature: float) -> None:
    x, y = clusters(5, 2, 4, 0.5, seed=0)
    with pytest.raises(RecipeError):
        knn_classify(x, y, x, y, ks=ks, temperature=temperature)
