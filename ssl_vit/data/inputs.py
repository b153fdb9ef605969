"""What a source holds before it becomes shards: a built-in set, a folder of images or a table.

Each image is an `Item` whose `load()` decodes it fully once (so a corrupt file is found when
writing, not when training) and returns the bytes to store: JPEG, PNG and WebP as found, other
formats re-encoded once as PNG, arrays as PNG. A `Source` also carries a fingerprint of its
content, which the shard writer's resume journal and the data cache are keyed by.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_vit.data.builtin import SPLITS, builtin_arrays, builtin_classes, parse_builtin
from ssl_vit.data.folder import LABEL_MODES, folder_labels, list_images
from ssl_vit.data.writer import Encoded, Item
from ssl_vit.errors import DataError

log = logging.getLogger(__name__)

TABLE_EXTS = (".csv", ".tsv", ".txt")
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as found; others re-encoded


def encode_array(array: np.ndarray) -> Encoded:
    """(H, W, C) uint8 -> PNG bytes (lossless, so small built-in images keep every pixel)."""
    image = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png", image.size, image.mode


def encode_file(path: Path) -> Encoded:
    """Decode a file fully once (to reject corrupt ones); keep JPEG/PNG/WebP bytes as they are."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        size, mode, fmt = image.size, image.mode, image.format or ""
        if fmt in KEPT_FORMATS:
            return data, KEPT_FORMATS[fmt], size, mode
        buffer = io.BytesIO()
        image.convert("RGBA" if "A" in mode else "RGB" if mode not in ("L", "RGB") else mode).save(
            buffer, format="PNG"
        )
    return buffer.getvalue(), "png", size, mode


def _class_index(labels: list[str]) -> list[str]:
    """Class names in index order: numeric order when every label is an integer, else sorted."""
    unique = sorted(set(labels))
    if all(lab.lstrip("-").isdigit() for lab in unique):
        unique = sorted(unique, key=int)
    return unique


@dataclass
class Source:
    """A source before writing: items per natural split, class names, and what identifies its content."""

    name: str
    splits: dict[str, list[Item]]
    classes: list[str]
    labelled: bool
    fingerprint: str  # changes whenever the content may have (a folder: any path, size or mtime)
    builtin: bool = False
    listing: dict[str, int] = field(default_factory=dict)  # what a folder walk skipped, by reason
    note: str = ""  # one line on what the walk found and the labels decided


def folder_source(root: Path, labels: str) -> Source:
    """A folder of images: every image below it, labelled by class folders or not (`--labels`)."""
    listing = list_images(root)
    index, classes, decision = folder_labels(listing, labels)
    items = [
        Item(partial(encode_file, root / path), label, str(root / path), nbytes)
        for (path, nbytes, _), label in zip(listing.files, index, strict=True)
    ]
    note = f"{listing.report()}; {decision}"
    fingerprint = listing.fingerprint()
    return Source(
        str(root), {"train": items}, classes, bool(classes), fingerprint, False, listing.skipped(), note
    )


def table_source(table: Path, labels: str) -> Source:
    """CSV/TSV of `path[,label]`; a first row `path,label` is a header; paths relative to the file."""
    if labels == "folders":
        raise DataError(
            f"{table}: --labels folders needs a folder of class folders; a table's labels are its 2nd column"
        )
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    with table.open(newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r and r[0].strip()]
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
        rows = rows[1:]
    if not rows:
        raise DataError(f"{table}: no rows of path[,label]")
    labelled = [len(r) > 1 and r[1].strip() != "" for r in rows]
    if any(labelled) and not all(labelled) and labels != "none":
        raise DataError(f"{table}: some rows have a label and some do not; label all rows or none")
    classes = _class_index([r[1].strip() for r in rows]) if all(labelled) and labels != "none" else []
    index = {name: i for i, name in enumerate(classes)}
    items, listing = [], []
    for row in rows:
        path = Path(row[0].strip())
        path = path if path.is_absolute() else table.parent / path
        label = index[row[1].strip()] if classes else -1
        nbytes, mtime = _size_and_mtime(path)
        items.append(Item(partial(encode_file, path), label, str(path), max(nbytes, 0)))
        listing.append([str(path), label, nbytes, mtime])
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return Source(str(table), {"train": items}, classes, bool(classes), digest)


def _size_and_mtime(path: Path) -> tuple[int, int]:
    try:
        info = path.stat()
    except OSError:
        return -1, -1  # missing: skipped as unreadable when written
    return info.st_size, info.st_mtime_ns


def builtin_source(src: str, labels: str) -> Source | None:
    """A built-in set (fixed train and test splits), or None when `src` names none."""
    spec = parse_builtin(src)
    if spec is None:
        return None
    keep = labels != "none"
    splits = {}
    for split in SPLITS:
        images, targets = builtin_arrays(spec, split)
        splits[split] = [
            Item(partial(encode_array, img), int(lab) if keep else -1, f"{src}/{split}/{i}")
            for i, (img, lab) in enumerate(zip(images, targets, strict=True))
        ]
    classes = builtin_classes(spec) if keep else []
    return Source(src, splits, classes, keep, f"builtin:{spec.tag}", builtin=True)


def load_source(src: str, labels: str = "auto") -> Source:
    """What `src` holds; a one-line `DataError` for what is neither a built-in set, a folder nor a table."""
    if labels not in LABEL_MODES:
        raise DataError(f"--labels must be one of {', '.join(LABEL_MODES)}, not '{labels}'")
    source = builtin_source(src, labels)
    if source is not None:
        return source
    path = Path(src).expanduser()
    if path.is_dir():
        return folder_source(path, labels)
    if path.is_file() and path.suffix.lower() in TABLE_EXTS:
        return table_source(path, labels)
    raise DataError(
        f"shards source '{src}' is neither a built-in set (digits, shapes), a folder nor a .csv/.tsv file"
    )
