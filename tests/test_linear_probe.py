from __future__ import annotations

import inspect

import numpy as np
import pytest
from ssl_vit.eval import linear_probe as lp

from ssl_vit.errors import DataError
from tests.conftest import clusters


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
    assert result["chosen"] == {"C": c1} and result["method"] == "sklearn"


def test_torch_head_separable_clusters_reach_full_accuracy() -> None:
    x, y = clusters(60, 5, 16, 0.5, seed=0)
    xt, yt = clusters(20, 5, 16, 0.5, seed=0)
    result = lp.linear_probe(x, y, xt, yt, method="torch", lrs=(0.1,), epochs=10)
    assert result["top1"] == 1.0 and result["method"] == "torch" and result["chosen"] == {"lr": 0.1}
    assert set(result) == set(lp.linear_probe(x, y, xt, yt))  # same interface as the sklearn probe


def test_torch_head_shuffled_labels_stay_near_chance() -> None:
    x, y = clusters(100, 5, 16, 0.5, seed=0)
    rng = np.random.default_rng(0)
    xt, yt = clusters(60, 5, 16, 0.5, seed=0)
    result = lp.linear_probe(
        x, rng.permutation(y), xt, rng.permutation(yt), method="torch", lrs=(0.1,), epochs=5
    )
    assert result["top1"] < 0.35


def test_torch_head_chooses_lr_without_test_data() -> None:
    assert list(inspect.signature(lp.choose_lr).parameters)[:2] == ["x", "y"]
    x, y = clusters(40, 3, 8, 3.0, seed=2)
    lr = lp.choose_lr(x, y, (0.001, 0.1), seed=0, epochs=3)
    result = lp.linear_probe(
        x, y, x[:10], np.zeros(10, dtype=int), method="torch", lrs=(0.001, 0.1), epochs=3
    )
    assert result["chosen"] == {"lr": lr}


def test_torch_head_normalises_without_affine_parameters() -> None:
    probe = lp.TorchProbe(8, 3)
    assert not probe.norm.affine and [n for n, _ in probe.named_parameters()] == [
        "linear.weight",
        "linear.bias",
    ]


def test_auto_picks_by_training_set_size(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = clusters(20, 3, 4, 0.5, seed=0)
    assert lp.linear_probe(x, y, x, y)["method"] == "sklearn"
    monkeypatch.setattr(lp, "TORCH_MIN_SAMPLES", 10)
    assert lp.linear_probe(x, y, x, y, lrs=(0.1,), epochs=2)["method"] == "torch"


def test_few_shot_draws_take_k_per_class_and_differ_by_seed() -> None:
    labels = np.repeat(np.arange(4), 30)
    a, b = lp.few_shot_indices(labels, 5, seed=0), lp.few_shot_indices(labels, 5, seed=1)
    assert np.bincount(labels[a]).tolist() == [5, 5, 5, 5] and len(set(a)) == 20
    assert set(a) != set(b)
    with pytest.raises(DataError, match="shots 31"):
        lp.few_shot_indices(labels, 31, seed=0)


def test_lowshot_reaches_known_answers() -> None:
    x, y = clusters(30, 4, 16, 0.5, seed=0)
    xt, yt = clusters(10, 4, 16, 0.5, seed=0)
    sep = lp.lowshot_probe(x, y, xt, yt, shots=5, draws=3)
    assert sep["top1"] == 1.0 and sep["top1_std"] == 0.0 and len(sep["per_draw"]) == 3 and sep["shots"] == 5
    rng = np.random.default_rng(0)
    noise = lp.lowshot_probe(x, rng.permutation(y), xt, rng.permutation(yt), shots=5, draws=3)
    assert noise["top1"] < 0.5  # chance is 0.25
