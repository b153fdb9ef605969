"""The evaluators' data: whole splits in memory (`load_images`), and labelled train and test
images wherever the labels are.

Pretraining data is often unlabelled; the evaluators then need other data (`eval.train`,
`eval.test` in the recipe, or `--data`). A train source is read through its `train` split and, with
no separate test source, tested on its own `test` (or `val`) split. A folder or table of labelled
images has neither: `evaluation_data` gives the evaluators a cached copy of it with a seeded 20%
held out as the test split (`cache.EVAL_HOLDOUT`). A separate test source is read whole (its
`test` or `val` split where it has one) and its labels are renumbered by class name into the train
source's classes, so two folders of the same class folders agree even when one lacks a class.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from ssl_vit.data.builtin import parse_builtin
from ssl_vit.data.cache import EVAL_HOLDOUT, is_image_source, source_shards
from ssl_vit.data.inputs import load_source
from ssl_vit.data.sources import has_labels, resolve
from ssl_vit.data.stream import read_split
from ssl_vit.data.views import resize
from ssl_vit.errors import DataError

log = logging.getLogger(__name__)


def _square(image: Tensor, size: int) -> Tensor:
    """(C, h, w) float -> (C, size, size): resize the short side, centre-crop (square images: resize)."""
    if image.shape[-2] != image.shape[-1]:
        image = TF.center_crop(TF.resize(image, [size], antialias=True), [size, size])
    return resize(image[None], size)[0]


def load_images(
    source: str, split: str, img_size: int, in_chans: int, cache_dir: str | None = None
) -> tuple[Tensor, Tensor]:
    """A whole split in memory: images (N, C, S, S) in [0, 1] and labels (N,) int64.

    Read from the shards, built-in sets included, with the decoding training uses (so channels are
    converted the same way), skipping bad samples. `split` is `train` or `test` (a shard folder's
    `val` split stands in for a missing `test`).
    """
    shards = resolve(source, split, cache_dir)
    decoded = [
        (_square(img.float() / 255.0, img_size), lab) for img, lab in read_split(shards.urls, in_chans)
    ]
    if not decoded:
        raise DataError(f"'{source}' split '{split}' has no readable sample")
    return torch.stack([img for img, _ in decoded]), torch.tensor(
        [lab for _, lab in decoded], dtype=torch.long
    )


def require_labels(source: str, what: str = "eval.train", cache_dir: str | None = None) -> None:
    """A one-line `DataError` naming the option to set when `source` has no labels."""
    if not has_labels(source, "heldout" if what == "eval.test" else "train", cache_dir):
        raise DataError(
            f"'{source}' has no labels to evaluate with; set {what}=LABELLED_DATA in the recipe (class "
            "folders, labelled shards or digits) or pass --data LABELLED_DATA"
        )


def evaluation_data(train: str, test: str | None, cache_dir: str | None = None) -> tuple[str, str | None]:
    """(train source, test source or None) as the evaluators read them.

    A labelled folder or table without a separate test source becomes its cached copy with a seeded
    `EVAL_HOLDOUT` held out as the test split; everything else stays as named.
    """
    if test is not None or parse_builtin(train) or not is_image_source(Path(train).expanduser()):
        return train, test
    source = load_source(train)
    if not source.labelled:
        return train, test  # the evaluators say which option to set
    log.info(
        "'%s' has no test split: evaluating on a seeded %d%% of it held out (set eval.test for your own)",
        train,
        round(100 * EVAL_HOLDOUT),
    )
    return str(source_shards(train, cache_dir, holdout=True, loaded=source)), None


def _classes(source: str, split: str, cache_dir: str | None) -> list[str] | None:
    if parse_builtin(source) is not None:
        return None  # a built-in set's classes are fixed: no renumbering
    return resolve(source, split, cache_dir).classes


def _renumbered(labels: Tensor, test: str, train: str, cache_dir: str | None) -> Tensor:
    """Labels (N,) of the test source, as indices into the train source's class names."""
    test_classes = _classes(test, "heldout", cache_dir)
    train_classes = _classes(train, "train", cache_dir)
    if not test_classes or not train_classes or test_classes == train_classes:
        return labels
    index = {name: i for i, name in enumerate(train_classes)}
    missing = [name for name in test_classes if name not in index]
    if missing:
        raise DataError(
            f"eval.test '{test}' has class(es) {', '.join(missing[:3])} that eval.train '{train}' lacks; "
            "both must use the same class names"
        )
    return torch.tensor([index[name] for name in test_classes], dtype=torch.long)[labels]


def eval_split(
    train: str, test: str | None, split: str, img_size: int, in_chans: int, cache_dir: str | None = None
) -> tuple[Tensor, Tensor]:
    """Images (N, C, S, S) in [0, 1] and labels (N,) of the evaluators' `train` or `test` split."""
    if split not in ("train", "test"):
        raise DataError(f"evaluation splits are train and test, not '{split}'")
    if split == "test" and test is not None:
        require_labels(test, "eval.test", cache_dir)
        images, labels = load_images(test, "heldout", img_size, in_chans, cache_dir)
        return images, _renumbered(labels, test, train, cache_dir)
    require_labels(train, "eval.train", cache_dir)
    return load_images(train, split, img_size, in_chans, cache_dir)
