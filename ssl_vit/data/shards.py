"""Write WebDataset shards and their `manifest.json` from what users have.

Sources (`ssl_vit.data.inputs`): a built-in set (`digits`, `shapes`), a folder of images (flat or
nested, with class folders or without labels: `ssl_vit.data.folder`) or a CSV/TSV of `path[,label]`
(label optional; paths relative to the file). Shards are `DIR/<split>-%06d.tar`, written in
parallel, deterministic and resumable (`ssl_vit.data.writer`); each sample is `__key__` (unique in
its split), one encoded image (`.jpg`, `.png` or `.webp` bytes as found, other formats re-encoded
once as PNG, arrays as PNG) and `.cls` (the class index as ASCII digits; absent for unlabelled
samples). Plain webdataset code reads them; ssl-vit reads shards written the same way by plain
webdataset.

Folders and tables are written in a seeded random order: consecutive samples of a shard mix
classes, so the streaming shuffle (shard order plus a sample buffer) need not do all the mixing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ssl_vit import __version__
from ssl_vit.data.inputs import Source, load_source
from ssl_vit.data.writer import JOURNAL, Item, Journal, write_splits
from ssl_vit.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "ssl-vit-shards/1"
MANIFEST = "manifest.json"
SHARD_SIZE = 1000
BUILTIN_SHARDS_PER_SPLIT = 16
MIN_IMAGES_PER_WORKER = 256  # with the default worker count, smaller sources are written in-process


def _ordered(source: Source, val_fraction: float, seed: int) -> dict[str, list[Item]]:
    """The splits to write: a built-in's own; a folder's or table's in a seeded order, `val` cut off."""
    if source.builtin:
        if val_fraction:
            raise DataError(f"built-in set '{source.name}' has a fixed test split; drop --val-fraction")
        return source.splits
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    items = source.splits["train"]
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = int(round(len(items) * val_fraction))
    splits = {"train": [items[i] for i in order[n_val:]]}
    if n_val:
        splits["val"] = [items[i] for i in order[:n_val]]
    return splits


def _shard_size(source: Source, split_items: list[Item], shard_size: int | None) -> int:
    if shard_size is not None:
        return shard_size
    return max(math.ceil(len(split_items) / BUILTIN_SHARDS_PER_SPLIT), 1) if source.builtin else SHARD_SIZE


def settings_key(source: Source, shard_size: int | None, val_fraction: float, seed: int) -> str:
    """What the shards' bytes depend on: the format, the source's content and the writer's settings.

    `strict` and the worker count are left out: they never change what is written.
    """
    parts = [FORMAT, source.fingerprint, source.classes, shard_size, val_fraction, seed]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, where the OS has one): the default number
    of shard-writing workers, and of the demo's jobs."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def write_source(
    source: Source,
    out: Path,
    shard_size: int | None = None,
    val_fraction: float = 0.0,
    strict: bool = False,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write a loaded source as `out/<split>-%06d.tar` plus `out/manifest.json`; returns the manifest.

    An unfinished write of the same source and settings in `out` is continued (`writer.Journal`).
    `workers` None: the available cores, or one process for small sources.
    """
    if shard_size is not None and shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if (out / MANIFEST).exists() or (any(out.glob("*.tar")) and not (out / JOURNAL).exists()):
        raise DataError(f"{out} already holds shards; choose another --out or remove them")
    if source.note:
        log.info("%s", source.note)
    splits = _ordered(source, val_fraction, seed)
    journal = Journal(out, settings_key(source, shard_size, val_fraction, seed))
    sizes = {split: _shard_size(source, items, shard_size) for split, items in splits.items()}
    total = sum(len(items) for items in splits.values())
    workers = workers or max(1, min(available_cores(), total // MIN_IMAGES_PER_WORKER))
    start = time.perf_counter()
    with tqdm(total=total, disable=not progress, unit="img", desc="shards", dynamic_ncols=True) as bar:
        written = write_splits(splits, sizes, out, strict, workers, journal, bar.update)
    manifest = _manifest(source, written, shard_size, val_fraction, seed, strict)
    if not any(s["count"] for s in manifest["splits"].values()):
        raise DataError(f"'{source.name}': no readable image; nothing written")
    manifest["write_seconds"] = round(time.perf_counter() - start, 3)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (out / JOURNAL).unlink(missing_ok=True)
    return manifest


def _manifest(
    source: Source,
    written: dict[str, list[dict[str, Any]]],
    shard_size: int | None,
    val_fraction: float,
    seed: int,
    strict: bool,
) -> dict[str, Any]:
    """The manifest of a complete write, its image statistics summed over every shard's."""
    shards = [s for entries in written.values() for s in entries]
    stats = [s["stats"] for s in shards if s["count"]]
    modes: dict[str, int] = {}
    for s in stats:
        for mode, n in s["modes"].items():
            modes[mode] = modes.get(mode, 0) + n
    splits = {}
    for split, entries in written.items():
        files = [{"file": s["file"], "count": s["count"]} for s in entries]
        pattern = f"{split}-{{000000..{len(entries) - 1:06d}}}.tar" if entries else ""
        splits[split] = {"count": sum(s["count"] for s in entries), "pattern": pattern, "shards": files}
    count = sum(s["count"] for s in shards)
    return {
        "format": FORMAT,
        "source": source.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ssl_vit_version": __version__,
        "params": {"shard_size": shard_size, "val_fraction": val_fraction, "seed": seed, "strict": strict},
        "labelled": source.labelled,
        "classes": source.classes,
        "splits": splits,
        "images": {
            "width": _summary([s["width"] for s in stats], count),
            "height": _summary([s["height"] for s in stats], count),
            "modes": modes,
        },
        "skipped": {
            "count": sum(s["stats"]["skipped"] for s in shards),
            "examples": [e for s in shards for e in s["stats"]["examples"]][:20],
            **source.listing,
        },
    }


def write_shards(
    src: str,
    out: Path,
    shard_size: int | None = None,
    val_fraction: float = 0.0,
    strict: bool = False,
    seed: int = 0,
    labels: str = "auto",
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write `out/<split>-%06d.tar` and `out/manifest.json` from `src`; returns the manifest.

    `shard_size` None: 1000 samples per shard, or 16 shards per split for built-in sets (so up to 16
    processes x workers can read a split without resampling). `labels`: auto, folders or none
    (`ssl_vit.data.folder`). A rerun after an interruption continues the unfinished write.
    """
    return write_source(
        load_source(src, labels), out, shard_size, val_fraction, strict, seed, workers, progress
    )


def _summary(parts: list[list[float]], count: int) -> dict[str, float]:
    """min, max and mean from per-shard [min, max, sum] triples."""
    if not count:
        return {}
    low, high, total = min(p[0] for p in parts), max(p[1] for p in parts), sum(p[2] for p in parts)
    return {"min": float(low), "max": float(high), "mean": round(total / count, 2)}


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
