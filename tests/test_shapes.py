"""The procedural `shapes` set: seeded, balanced, and every class tellable from shape alone."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import recall_score
from sklearn.preprocessing import StandardScaler

from ssl_vit.data.builtin import parse_builtin
from ssl_vit.data.shapes import CLASS_NAMES, shapes_arrays


def test_same_seed_same_images_and_any_subset_regenerates_alone() -> None:
    images, labels = shapes_arrays("train", 30)
    again, _ = shapes_arrays("train", 30)
    assert images.dtype == np.uint8 and images.shape == (30, 32, 32, 3) and np.array_equal(images, again)
    assert np.array_equal(shapes_arrays("train", 10)[0], images[:10])
    assert not np.array_equal(shapes_arrays("train", 10, seed=1)[0], images[:10])
    assert not np.array_equal(shapes_arrays("test", 10)[0], images[:10])


def test_classes_are_balanced_and_default_sizes() -> None:
    _, labels = shapes_arrays("train", 1000)
    assert len(CLASS_NAMES) == 10 and np.bincount(labels).tolist() == [100] * 10
    spec = parse_builtin("shapes")
    assert spec is not None and spec.counts is None and parse_builtin("shapes:80:40").counts == (80, 40)  # type: ignore[union-attr]


def silhouette_features(images: np.ndarray) -> np.ndarray:
    """Shape descriptors that ignore colour, position and rotation, written independently of the
    generator: threshold luminance halfway between the image's dark and bright ends, then Hu's first
    four moment invariants (Hu 1962), log-area and the radial fill profile around the centroid."""
    gray = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # (N, 32, 32)
    lo, hi = (
        np.percentile(gray, 5, axis=(1, 2), keepdims=True),
        np.percentile(gray, 95, axis=(1, 2), keepdims=True),
    )
    mask = (gray > (lo + hi) / 2).astype(np.float64)
    yy, xx = np.mgrid[:32, :32].astype(np.float64)
    m00 = mask.sum((1, 2))
    dx = xx[None] - ((mask * xx).sum((1, 2)) / m00)[:, None, None]
    dy = yy[None] - ((mask * yy).sum((1, 2)) / m00)[:, None, None]

    def eta(p: int, q: int) -> np.ndarray:
        return (mask * dx**p * dy**q).sum((1, 2)) / m00 ** (1 + (p + q) / 2)

    n20, n02, n11, n30, n03, n21, n12 = (
        eta(2, 0),
        eta(0, 2),
        eta(1, 1),
        eta(3, 0),
        eta(0, 3),
        eta(2, 1),
        eta(1, 2),
    )
    hu = [
        n20 + n02,
        (n20 - n02) ** 2 + 4 * n11**2,
        (n30 - 3 * n12) ** 2 + (3 * n21 - n03) ** 2,
        (n30 + n12) ** 2 + (n21 + n03) ** 2,
    ]
    radius = np.sqrt(dx**2 + dy**2)
    rings = [(radius >= r) & (radius < r + 2) for r in range(0, 14, 2)]
    radial = [(mask * ring).sum((1, 2)) / np.maximum(ring.sum((1, 2)), 1) for ring in rings]
    return np.column_stack([*hu, np.log(m00), *radial])


def test_every_class_is_distinguishable_by_shape() -> None:
    train_x, train_y = shapes_arrays("train", 1000)
    test_x, test_y = shapes_arrays("test", 500)
    scaler = StandardScaler().fit(silhouette_features(train_x))
    clf = LogisticRegression(max_iter=1000).fit(scaler.transform(silhouette_features(train_x)), train_y)
    predicted = clf.predict(scaler.transform(silhouette_features(test_x)))
    recall = recall_score(test_y, predicted, average=None)
    assert (predicted == test_y).mean() > 0.5 and recall.min() > 0.2, recall  # chance: 0.1
