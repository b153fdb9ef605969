"""From a recipe's `data.train` string to a list of shard URLs, checked before training starts.

A source is one of:
- a built-in name (`digits`, `shapes`, `shapes:TRAIN:TEST`): its shards are written once into a
  cache folder (`data.cache_dir`, else `$SSL_VIT_CACHE`, else `$XDG_CACHE_HOME/ssl_vit` or
  `~/.cache/ssl_vit`) named after the set and a hash of the code that generates it;
- a folder of shards: the split's shards listed in its `manifest.json`, or every `*.tar` in it;
- WebDataset URLs: brace patterns (`DIR/train-{000000..000099}.tar`), several joined by `::`,
  `pipe:` commands, `file:` or plain paths. Local paths must exist.

The manifest next to local shards (if any) gives class names and sample counts.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import braceexpand
from webdataset.tariterators import base_plus_ext

from ssl_vit.data import digits, shapes
from ssl_vit.data import shards as shards_module
from ssl_vit.data.builtin import BuiltinSpec, parse_builtin
from ssl_vit.data.safety import IMAGE_EXTS
from ssl_vit.data.shards import read_manifest, write_shards
from ssl_vit.errors import DataError

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}


@dataclass
class ShardSet:
    """The shards of one split, with what a manifest knows about them (None where unknown)."""

    urls: list[str]
    count: int | None
    classes: list[str] | None
    source: str


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("SSL_VIT_CACHE"):
        return Path(os.environ["SSL_VIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ssl_vit"


def _code_hash(spec: BuiltinSpec) -> str:
    """Changes whenever the generator or the shard format changes, so a stale cache is never read."""
    digest = hashlib.sha256(spec.tag.encode())
    for module in (digits, shapes, shards_module):
        assert module.__file__ is not None
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def builtin_shards(spec: BuiltinSpec, cache_dir: str | None) -> Path:
    """The cached shard folder of a built-in set, written on first use.

    Written into a private temporary folder and renamed into place: two processes (DDP ranks, or two
    runs) that miss the cache at once both write, one rename wins, the other discards its copy.
    """
    root = cache_root(cache_dir)
    final = root / f"{spec.tag}-{_code_hash(spec)}"
    if (final / shards_module.MANIFEST).is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exn:
        raise DataError(f"cannot create the data cache {root} ({exn}); set data.cache_dir") from None
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log.info("writing %s shards once into %s", spec.tag, final)
    try:
        write_shards(spec.source, tmp)
        os.rename(tmp, final)
    except OSError:
        if not (final / shards_module.MANIFEST).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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
        raise DataError(f"'{source}' has no '{split}' split (its manifest lists {', '.join(splits)})")
    entry = splits[name]
    urls = [str(folder / s["file"]) for s in entry["shards"]]
    if not urls:
        raise DataError(f"'{source}': split '{name}' has no shards")
    return ShardSet(urls, int(entry["count"]), list(manifest.get("classes") or []) or None, source)


def resolve(source: str, split: str = "train", cache_dir: str | None = None) -> ShardSet:
    """The shards of `split` in `source`; a one-line `DataError` if there are none."""
    if not source or not source.strip():
        raise DataError("data.train is empty; name a built-in set (digits, shapes) or shard URLs")
    spec = parse_builtin(source)
    if spec is not None:
        folder = builtin_shards(spec, cache_dir)
        return _from_manifest(folder, read_manifest(folder) or {}, split, source)
    folder = Path(source).expanduser()
    if folder.is_dir():
        manifest = read_manifest(folder)
        if manifest is not None:
            return _from_manifest(folder, manifest, split, source)
        urls = sorted(str(p) for p in folder.glob("*.tar"))
        if not urls:
            raise DataError(f"'{source}' is a folder without manifest.json or *.tar shards")
        return ShardSet(urls, None, None, source)
    urls = expand(source)
    if not urls:
        raise DataError(f"data source '{source}' expands to no shard URL")
    missing = [u for u in urls if is_local(u) and not local_path(u).is_file()]
    if missing:
        raise DataError(
            f"data source '{source}': {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})"
        )
    if split != "train":
        return _split_of_pattern(urls, split, source)
    return _with_manifest_facts(urls, source)


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
    return ShardSet(urls, total, list(manifest.get("classes") or []) or None, source)


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
