"""From a recipe's `data.train` string to a list of shard URLs, checked before training starts.

A source is one of:
- a built-in name (`digits`, `shapes`, `shapes:TRAIN:TEST`), a folder of images (with class folders
  or without labels) or a CSV/TSV of image paths: its shards are written once into the data cache
  (`ssl_vit.data.cache`) and reused;
- a folder of shards: the split's shards listed in its `manifest.json`, or every `*.tar` in it;
- WebDataset URLs: brace patterns (`DIR/train-{000000..000099}.tar`), several joined by `::`,
  `pipe:` commands, `file:` or plain paths. Local paths must exist.

The manifest next to local shards (if any) gives class names, sample counts and whether there are
labels. The split `heldout` is what evaluators test on when a source is named as test data: its
`test` or `val` split, else all of it.
"""

from __future__ import annotations

import functools
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import braceexpand
from webdataset.tariterators import base_plus_ext

from ssl_vit.data.builtin import parse_builtin
from ssl_vit.data.cache import builtin_shards, is_image_source, source_shards
from ssl_vit.data.safety import IMAGE_EXTS
from ssl_vit.data.shards import read_manifest
from ssl_vit.errors import DataError, MissingSplit

log = logging.getLogger(__name__)

SPLIT_ALIASES = {
    "train": ("train",),
    "test": ("test", "val"),
    "val": ("val", "test"),
    "heldout": ("test", "val", "train"),
}


@dataclass
class ShardSet:
    """The shards of one split, with what a manifest knows about them (None where unknown)."""

    urls: list[str]
    count: int | None
    classes: list[str] | None
    source: str
    labelled: bool | None = None


def prepare(source: str, cache_dir: str | None = None) -> Path | None:
    """The cached shard folder of a built-in set, a folder of images or a table, written first where
    it is not there yet; None for shards, which need no preparing."""
    spec = parse_builtin(source)
    if spec is not None:
        return builtin_shards(spec, cache_dir)
    return source_shards(source, cache_dir) if is_image_source(Path(source).expanduser()) else None


def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def local_path(url: str) -> Path:
    return Path(urlparse(url).path) if url.startswith("file:") else Path(url)


def expand(pattern: str) -> list[str]:
    """`::`-joined brace patterns -> URLs (webdataset's syntax, without its `${WDS_...}` lookups)."""
    return [url for part in pattern.split("::") if part.strip() for url in braceexpand.braceexpand(part)]


def _from_manifest(folder: Path, manifest: dict, split: str, source: str) -> ShardSet:
    splits = manifest["splits"]
    name = next((s for s in SPLIT_ALIASES.get(split, (split,)) if s in splits), None)
    if name is None:
        raise MissingSplit(f"'{source}' has no '{split}' split (its manifest lists {', '.join(splits)})")
    entry = splits[name]
    urls = [str(folder / s["file"]) for s in entry["shards"]]
    if not urls:
        raise DataError(f"'{source}': split '{name}' has no shards")
    classes = list(manifest.get("classes") or []) or None
    labelled = bool(manifest.get("labelled", classes is not None))
    return ShardSet(urls, int(entry["count"]), classes, source, labelled)


def resolve(source: str, split: str = "train", cache_dir: str | None = None) -> ShardSet:
    """The shards of `split` in `source`; a one-line `DataError` if there are none."""
    if not source or not source.strip():
        raise DataError("data.train is empty; name a built-in set (digits, shapes), a folder or shard URLs")
    cache = prepare(source, cache_dir)
    if cache is not None:
        return _from_manifest(cache, read_manifest(cache) or {}, split, source)
    folder = Path(source).expanduser()
    if folder.is_dir():
        manifest = read_manifest(folder)
        if manifest is not None:
            return _from_manifest(folder, manifest, split, source)
        return ShardSet(sorted(str(p) for p in folder.glob("*.tar")), None, None, source)
    urls = expand(source)
    if not urls:
        raise DataError(f"data source '{source}' expands to no shard URL")
    missing = [u for u in urls if is_local(u) and not local_path(u).is_file()]
    if missing:
        raise DataError(
            f"data source '{source}': {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})"
        )
    if split == "heldout":  # URLs named as test data: those very shards
        return _with_manifest_facts(urls, source)
    if split != "train":
        return _split_of_pattern(urls, split, source)
    return _with_manifest_facts(urls, source)


def has_labels(source: str, split: str = "train", cache_dir: str | None = None) -> bool:
    """Whether `source` has labels: from its manifest, else a scan of local shards' `.cls` members.

    Remote shards without a manifest count as labelled (nothing to scan cheaply); the stream finds out.
    """
    if parse_builtin(source) is not None:
        return True
    shards = resolve(source, split, cache_dir)
    if shards.labelled is not None:
        return shards.labelled
    if not all(is_local(url) for url in shards.urls):
        return True
    return scan(shards.urls)[1] >= 0


def _manifest_near(urls: list[str]) -> tuple[Path, dict] | None:
    if not is_local(urls[0]):
        return None
    folder = local_path(urls[0]).parent
    manifest = read_manifest(folder)
    return (folder, manifest) if manifest is not None else None


def _with_manifest_facts(urls: list[str], source: str) -> ShardSet:
    """Counts and classes for an explicit URL list, from the manifest of their folder if any."""
    found = _manifest_near(urls)
    if found is None:
        return ShardSet(urls, None, None, source)
    folder, manifest = found
    counts = {
        str(folder / s["file"]): int(s["count"]) for e in manifest["splits"].values() for s in e["shards"]
    }
    total = (
        sum(counts[str(local_path(u))] for u in urls)
        if all(str(local_path(u)) in counts for u in urls)
        else None
    )
    classes = list(manifest.get("classes") or []) or None
    return ShardSet(urls, total, classes, source, bool(manifest.get("labelled", classes is not None)))


def _split_of_pattern(urls: list[str], split: str, source: str) -> ShardSet:
    """Another split of training shards given as URLs: only a manifest next to them can say where."""
    found = _manifest_near(urls)
    if found is None:
        raise DataError(
            f"'{source}' names shards without a manifest.json beside them, so its '{split}' split is "
            "unknown; pass a shard folder with a manifest (ssl-vit shards writes one) or the split's URLs"
        )
    return _from_manifest(found[0], found[1], split, source)


def scan(urls: list[str]) -> tuple[int, int]:
    """(samples, largest `.cls`) of local shards that have no manifest.

    Reads tar headers and the tiny `.cls` members only; an unreadable shard is passed over here (the
    stream counts it when it gets there). Remembered per URL list: class names and the epoch length
    both ask.
    """
    return _scan(tuple(urls))


@functools.lru_cache(maxsize=8)
def _scan(urls: tuple[str, ...]) -> tuple[int, int]:
    count, top = 0, -1
    for url in urls:
        if not is_local(url):
            raise DataError(
                f"'{url}' is remote and has no manifest.json to give its size; set data.samples_per_epoch"
            )
        try:
            with tarfile.open(local_path(url), "r:*") as tar:
                for member in tar:
                    _, ext = base_plus_ext(member.name)
                    if not member.isreg() or ext is None:
                        continue
                    ext = ext.lower()
                    if ext in IMAGE_EXTS or ext == "npy":
                        count += 1
                    elif ext == "cls" and (f := tar.extractfile(member)) is not None:
                        text = f.read(32).decode("ascii", "replace").strip()
                        top = max(top, int(text)) if text.lstrip("-").isdigit() else top
        except (tarfile.TarError, OSError, EOFError):
            continue
    return count, top
