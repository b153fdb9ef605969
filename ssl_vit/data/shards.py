"""Write WebDataset shards and their `manifest.json` from what users have.

Sources: a built-in set (`digits`, `shapes`), an ImageFolder tree (`class_name/*.jpg|png|webp`) or a
CSV/TSV of `path,label` (label optional, for unlabelled data; paths relative to the file). Shards are
`DIR/<split>-%06d.tar` written by `webdataset.ShardWriter`; each sample is `__key__` (unique in its
split), one encoded image (`.jpg`, `.png` or `.webp` bytes as found, other formats re-encoded once as
PNG, arrays as PNG) and `.cls` (the class index as ASCII digits; absent for unlabelled samples).
Plain webdataset code reads them; ssl-vit reads shards written the same way by plain webdataset.

Sources are written in a seeded random order: consecutive samples of a shard mix classes, so the
streaming shuffle (shard order plus a sample buffer) need not do all the mixing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from ssl_vit import __version__
from ssl_vit.data.builtin import SPLITS, builtin_arrays, builtin_classes, parse_builtin
from ssl_vit.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "ssl-vit-shards/1"
MANIFEST = "manifest.json"
SOURCE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as found; others re-encoded
MAX_SHARD_BYTES = 1e9
BUILTIN_SHARDS_PER_SPLIT = 16
Encoded = tuple[bytes, str, tuple[int, int], str]  # (bytes, extension, (width, height), PIL mode)


@dataclass
class Item:
    """One source sample: `load()` gives it encoded; `where` names it in messages."""

    load: Callable[[], Encoded]
    label: int
    where: str


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


def _class_index(labels: Sequence[str]) -> list[str]:
    """Class names in index order: numeric order when every label is an integer, else sorted."""
    unique = sorted(set(labels))
    if all(lab.lstrip("-").isdigit() for lab in unique):
        unique = sorted(unique, key=int)
    return unique


def folder_items(root: Path) -> tuple[list[Item], list[str]]:
    """ImageFolder: every class is a sub-folder; images anywhere below it."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = [
        Item(partial(encode_file, path), index, str(path))
        for index, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in SOURCE_EXTS
    ]
    if not items:
        raise DataError(f"{root}: no images found under class folders ({', '.join(SOURCE_EXTS)})")
    return items, classes


def table_items(table: Path) -> tuple[list[Item], list[str]]:
    """CSV/TSV of `path[,label]`; a first row `path,label` is a header; paths relative to the file."""
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    with table.open(newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r and r[0].strip()]
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
        rows = rows[1:]
    if not rows:
        raise DataError(f"{table}: no rows of path[,label]")
    labelled = [len(r) > 1 and r[1].strip() != "" for r in rows]
    if any(labelled) and not all(labelled):
        raise DataError(f"{table}: some rows have a label and some do not; label all rows or none")
    classes = _class_index([r[1].strip() for r in rows]) if all(labelled) else []
    index = {name: i for i, name in enumerate(classes)}
    items = []
    for row in rows:
        path = Path(row[0].strip())
        path = path if path.is_absolute() else table.parent / path
        label = index[row[1].strip()] if classes else -1
        items.append(Item(partial(encode_file, path), label, str(path)))
    return items, classes


def source_splits(src: str, val_fraction: float, seed: int) -> tuple[dict[str, list[Item]], list[str]]:
    """Items per split (`train`, and `val` or a built-in's `test`) plus class names."""
    spec = parse_builtin(src)
    if spec is not None:
        if val_fraction:
            raise DataError(f"built-in set '{src}' has a fixed test split; drop --val-fraction")
        splits = {}
        for split in SPLITS:
            images, labels = builtin_arrays(spec, split)
            splits[split] = [
                Item(partial(encode_array, img), int(lab), f"{src}/{split}/{i}")
                for i, (img, lab) in enumerate(zip(images, labels, strict=True))
            ]
        return splits, builtin_classes(spec)
    path = Path(src)
    if path.is_dir():
        items, classes = folder_items(path)
    elif path.is_file() and path.suffix.lower() in (".csv", ".tsv", ".txt"):
        items, classes = table_items(path)
    else:
        raise DataError(
            f"shards source '{src}' is neither a built-in set (digits, shapes), a folder nor a .csv/.tsv file"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = int(round(len(items) * val_fraction))
    splits = {"train": [items[i] for i in order[n_val:]]}
    if n_val:
        splits["val"] = [items[i] for i in order[:n_val]]
    return splits, classes


def _write_split(
    items: list[Item], out: Path, split: str, shard_size: int, strict: bool, stats: dict[str, Any]
) -> dict[str, Any]:
    shards: list[dict[str, Any]] = []
    written = 0

    def closed(fname: str) -> None:  # ShardWriter's `post`: called as each shard closes
        shards.append({"file": Path(fname).name, "count": sink.count})

    sink = wds.ShardWriter(
        str(out / f"{split}-%06d.tar"),
        maxcount=shard_size,
        maxsize=MAX_SHARD_BYTES,
        post=closed,
        verbose=0,
        mtime=int(time.time()),  # an integer: TarWriter's default float mtime costs a PAX header per member
    )
    with sink:
        for item in items:
            try:
                data, ext, size, mode = item.load()
            except Exception as exn:
                if strict:
                    raise DataError(f"{item.where}: unreadable image ({type(exn).__name__}: {exn})") from None
                log.warning("skipping unreadable image %s (%s)", item.where, type(exn).__name__)
                stats["skipped"].append({"path": item.where, "error": f"{type(exn).__name__}: {exn}"[:200]})
                continue
            sample = {"__key__": f"{split}-{written:08d}", ext: data}
            if item.label >= 0:
                sample["cls"] = str(item.label).encode("ascii")
            sink.write(sample)
            written += 1
            stats["sizes"].append(size)
            stats["modes"][mode] += 1
    if not written:  # ShardWriter opens its first shard before any write
        (out / f"{split}-000000.tar").unlink(missing_ok=True)
        return {"count": 0, "pattern": "", "shards": []}
    return {"count": written, "pattern": f"{split}-{{000000..{len(shards) - 1:06d}}}.tar", "shards": shards}


def write_shards(
    src: str,
    out: Path,
    shard_size: int | None = None,
    val_fraction: float = 0.0,
    strict: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Write `out/<split>-%06d.tar` and `out/manifest.json`; returns the manifest.

    `shard_size` None: 1000 samples per shard, or 16 shards per split for built-in sets (so up to 16
    processes x workers can read a split without resampling).
    """
    if shard_size is not None and shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    if (out / MANIFEST).exists() or any(out.glob("*.tar")):
        raise DataError(f"{out} already holds shards; choose another --out or remove them")
    splits, classes = source_splits(src, val_fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {"sizes": [], "modes": Counter(), "skipped": []}
    start = time.perf_counter()
    written = {}
    for split, items in splits.items():
        size = shard_size or (
            math.ceil(len(items) / BUILTIN_SHARDS_PER_SPLIT) if parse_builtin(src) else 1000
        )
        written[split] = _write_split(items, out, split, max(size, 1), strict, stats)
    if not any(s["count"] for s in written.values()):
        raise DataError(f"'{src}': no readable image; nothing written")
    sizes = np.array(stats["sizes"], dtype=np.float64).reshape(-1, 2)
    manifest = {
        "format": FORMAT,
        "source": src,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ssl_vit_version": __version__,
        "params": {"shard_size": shard_size, "val_fraction": val_fraction, "seed": seed, "strict": strict},
        "classes": classes,
        "splits": written,
        "images": {
            "width": _summary(sizes[:, 0]),
            "height": _summary(sizes[:, 1]),
            "modes": dict(stats["modes"]),
        },
        "skipped": {"count": len(stats["skipped"]), "examples": stats["skipped"][:20]},
        "write_seconds": round(time.perf_counter() - start, 3),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {"min": float(values.min()), "max": float(values.max()), "mean": round(float(values.mean()), 2)}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None where there is none (shards written by other tools)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exn:
        raise DataError(f"{path}: not readable JSON ({exn})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{path}: not an ssl-vit manifest (no 'splits')")
    return manifest
