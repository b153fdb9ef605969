"""The built-in sets that need no download: `digits` (scikit-learn) and `shapes` (procedural).

A name may carry split sizes for `shapes`: `shapes:8000:4000` is 8000 train and 4000 test images
(default `shapes` = `shapes:4000:2000`). Both sets have fixed `train` and `test` splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssl_vit.data.digits import CLASS_NAMES as DIGITS_CLASSES
from ssl_vit.data.digits import digits_split
from ssl_vit.data.shapes import CLASS_NAMES as SHAPES_CLASSES
from ssl_vit.data.shapes import DEFAULT_COUNTS, shapes_arrays
from ssl_vit.errors import DataError

BUILTIN = ("digits", "shapes")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class BuiltinSpec:
    name: str
    counts: tuple[int, int] | None = None  # (train, test) for shapes; None: the defaults

    @property
    def source(self) -> str:
        """The name as a user writes it (what `parse_builtin` reads back)."""
        return self.name if self.counts is None else f"{self.name}:{self.counts[0]}:{self.counts[1]}"

    @property
    def tag(self) -> str:
        """A file-name-safe identity: what the cache folder is named after."""
        return self.name if self.counts is None else f"{self.name}-{self.counts[0]}-{self.counts[1]}"


def parse_builtin(source: str) -> BuiltinSpec | None:
    """`digits`, `shapes` or `shapes:TRAIN:TEST` -> spec; anything else -> None (not built-in)."""
    name, _, sizes = source.partition(":")
    if name not in BUILTIN or (sizes and name != "shapes"):
        return None
    if not sizes:
        return BuiltinSpec(name)
    parts = sizes.split(":")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise DataError(f"'{source}': write shapes sizes as shapes:TRAIN:TEST, e.g. shapes:8000:4000")
    return BuiltinSpec(name, (int(parts[0]), int(parts[1])))


def builtin_classes(spec: BuiltinSpec) -> list[str]:
    return list(DIGITS_CLASSES if spec.name == "digits" else SHAPES_CLASSES)


def builtin_arrays(spec: BuiltinSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, C) uint8 and labels (N,) int64 of a built-in split."""
    if split not in SPLITS:
        raise DataError(f"built-in set '{spec.name}' has splits train and test, not '{split}'")
    if spec.name == "digits":
        images, labels = digits_split(split)  # (N, 1, 8, 8) float in [0, 1]
        pixels = np.rint(images.numpy() * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)  # (N, 8, 8, 1)
        return pixels, labels.numpy()
    counts = spec.counts or (DEFAULT_COUNTS["train"], DEFAULT_COUNTS["test"])
    return shapes_arrays(split, counts[SPLITS.index(split)])
