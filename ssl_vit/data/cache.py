"""The data cache: shards written once from sources that are not shards yet, then reused.

Built-in sets, folders of images and CSV/TSV tables of paths are written as shards into
`data.cache_dir`, else `$SSL_VIT_CACHE`, else `$XDG_CACHE_HOME/ssl_vit` or `~/.cache/ssl_vit`. The
folder's name carries a hash of what the shards depend on: a built-in set's generating code; a
folder's listing (every image's path, size and modification time) or a table's rows and their
files, plus the writer's settings. So an unchanged folder is read from the cache, and a changed one
(an image added, removed or touched) is written again, into a new folder.

A cache folder is written under a hidden `.NAME.partial` name and renamed into place when complete.
A lock file makes processes that miss the cache at once (DDP ranks, two runs) write it once: the
others wait, then read it. An interrupted write (kill -9, a full disk) is continued by the next run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ssl_vit.data import digits, inputs, shapes, writer
from ssl_vit.data import shards as shards_module
from ssl_vit.data.builtin import BuiltinSpec
from ssl_vit.data.inputs import TABLE_EXTS, Source, load_source
from ssl_vit.data.shards import MANIFEST, settings_key, write_shards, write_source
from ssl_vit.errors import DataError

try:
    import fcntl
except ImportError:  # Windows: no lock; processes that miss the cache at once must not share it
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

EVAL_HOLDOUT = 0.2  # the test share of a folder or table used as evaluation data without a test set


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("SSL_VIT_CACHE"):
        return Path(os.environ["SSL_VIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ssl_vit"


def _ready(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def cached(final: Path, write: Callable[[Path], object]) -> Path:
    """`final`, written by `write(folder)` first where it is not there yet (once, whoever asks)."""
    if _ready(final):
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = (final.parent / f".{final.name}.lock").open("a")
    except OSError as exn:
        raise DataError(f"cannot write the data cache {final.parent} ({exn}); set data.cache_dir") from None
    with lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process writing it: wait, then read its copy
        if not _ready(final):
            partial = final.parent / f".{final.name}.partial"
            if not _ready(partial):  # else a write that stopped just before its rename
                write(partial)
            os.rename(partial, final)
    # Every holder checks `final` first, so the lock file may go once `final` is in place.
    (final.parent / f".{final.name}.lock").unlink(missing_ok=True)
    return final


def _code_hash(spec: BuiltinSpec) -> str:
    """Changes whenever the generator or the shard format changes, so a stale cache is never read."""
    digest = hashlib.sha256(spec.tag.encode())
    for module in (digits, shapes, inputs, shards_module, writer):
        assert module.__file__ is not None
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def builtin_shards(spec: BuiltinSpec, cache_dir: str | None) -> Path:
    """The cached shard folder of a built-in set, written on first use."""
    final = cache_root(cache_dir) / f"{spec.tag}-{_code_hash(spec)}"
    if not _ready(final):
        log.info("writing %s shards once into %s", spec.tag, final)
    return cached(final, lambda folder: write_shards(spec.source, folder, workers=1))


def is_image_source(path: Path) -> bool:
    """A folder that holds no shards (so: images), or a CSV/TSV table of image paths."""
    if path.is_dir():
        return not (path / MANIFEST).is_file() and not any(path.glob("*.tar"))
    return path.is_file() and path.suffix.lower() in TABLE_EXTS


def source_shards(
    src: str, cache_dir: str | None, holdout: bool = False, loaded: Source | None = None
) -> Path:
    """The cached shards of a folder of images or a table: written on first use, then reused while
    the source is unchanged. With `holdout`, a seeded `EVAL_HOLDOUT` of it is the `val` split (for
    evaluation data that has no test set of its own). `loaded`: `src` already loaded."""
    source = loaded or load_source(src)  # walks the folder: its listing is the cache key
    val_fraction = EVAL_HOLDOUT if holdout else 0.0
    key = settings_key(source, None, val_fraction, 0)
    where = Path(source.name).resolve()
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in where.name) or "data"
    use = "eval" if holdout else "train"  # a held-out copy is another cache entry of the same folder
    prefix = f"{name}-{hashlib.sha256(str(where).encode()).hexdigest()[:8]}-{use}-"
    final = cache_root(cache_dir) / f"{prefix}{key[:16]}"
    if _ready(final):
        log.info("shards of %s from the cache %s", src, final)
        return final
    log.info("writing shards of %s once into %s (reused while it is unchanged)", src, final)
    progress = sys.stderr.isatty()
    cached(final, lambda folder: write_source(source, folder, val_fraction=val_fraction, progress=progress))
    older = [p for p in final.parent.glob(f"{prefix}*") if p != final and _ready(p)]
    if older:
        log.info("older shards of %s remain in %s; delete them when no run reads them", src, older[0])
    return final
