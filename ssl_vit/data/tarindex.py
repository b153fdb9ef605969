"""Random access into local tar shards: an index of member offsets, cached on disk, and a reader.

The exact stream (`ssl_vit.data.exact`) reads samples in an order that mixes shards, so it cannot
read a tar from start to end as webdataset does. Each shard is indexed once, from its headers only
(the standard `tarfile` module seeks over the data), into samples grouped by key exactly as
webdataset groups them (`tar_file_iterator` + `group_by_keys`: regular files, `__meta__` names
skipped, the key and extension split by `base_plus_ext`, extensions lower-cased, consecutive
members of one key form a sample). The index is cached as JSON under the data cache, named by the
shard's path, size and mtime, so a changed shard is indexed again and an ImageNet-size set is
indexed once. Samples are then read with `os.pread` (`FileReader`) from file descriptors kept open.

Compressed tars (`.tar.gz`, ...) and remote URLs cannot be read at random: `indexable` says so, and
the loader streams them instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

log = logging.getLogger(__name__)

FORMAT = "ssl-vit-tarindex/1"
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's `tar_file_iterator(skip_meta=...)`


@dataclass
class ShardIndex:
    """One shard's samples: sample i is `keys[i]` with members `first[i]:first[i+1]`, each an
    extension with the offset and size of its bytes in the file. `error`: why the shard could only
    be read in part (None when whole)."""

    path: str
    keys: list[str]
    first: np.ndarray  # (S+1,) int64
    exts: list[str]  # (M,)
    offsets: np.ndarray  # (M,) int64
    sizes: np.ndarray  # (M,) int64
    error: str | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def members(self, i: int) -> list[tuple[str, int, int]]:
        """Sample i's (extension, offset, size) in tar order."""
        lo, hi = int(self.first[i]), int(self.first[i + 1])
        return [(self.exts[m], int(self.offsets[m]), int(self.sizes[m])) for m in range(lo, hi)]


def indexable(path: str) -> bool:
    """A local, uncompressed file (tar or not: a broken one is indexed as empty, with its error)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return True  # unreadable: the index records the error, the stream counts the shard
    return not head.startswith(COMPRESSED_MAGIC)


def scan_tar(path: str) -> ShardIndex:
    """Index a tar from its headers, grouping members into samples as webdataset does."""
    keys: list[str] = []
    first: list[int] = []
    exts: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    error = None
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                name = info.name
                if not info.isreg() or _is_meta(name):
                    continue
                if info.offset_data + info.size > size:
                    error = f"truncated at member {name}"
                    break
                key, ext = base_plus_ext(name)
                if key is None:
                    continue
                ext = ext.lower()
                if not keys or key != keys[-1]:
                    keys.append(key)
                    first.append(len(exts))
                elif ext in exts[first[-1] :]:
                    error = error or f"duplicate member {name}"  # webdataset raises, then skips it
                    continue
                exts.append(ext)
                offsets.append(info.offset_data)
                sizes.append(info.size)
    except (tarfile.TarError, OSError, EOFError) as exn:
        error = f"unreadable ({type(exn).__name__}: {str(exn)[:120]})"
    first.append(len(exts))
    return ShardIndex(
        path, keys, np.asarray(first, np.int64), exts, np.asarray(offsets, np.int64),
        np.asarray(sizes, np.int64), error,
    )  # fmt: skip


def _is_meta(name: str) -> bool:
    return ("/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)) or bool(
        _SKIP_META.match(name)
    )


def _cache_file(path: str, cache: Path) -> Path:
    """Named by the shard's absolute path, size and mtime: a rewritten shard gets a new index."""
    stat = os.stat(path)
    ident = f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{FORMAT}"
    return cache / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.json"


def is_cached(path: str, cache: Path) -> bool:
    try:
        return _cache_file(path, cache).is_file()
    except OSError:
        return True  # nothing to index: the shard is missing or unreadable


def load_index(path: str, cache: Path | None) -> ShardIndex:
    """The shard's index from `cache` (a folder), else scanned and written there atomically.

    Several processes that miss the cache at once each scan and write; the last rename wins and
    every copy is the same.
    """
    try:
        where = _cache_file(path, cache) if cache is not None else None
    except OSError:
        return scan_tar(path)  # missing or unreadable: an empty index with its error
    if where is not None and where.is_file():
        try:
            return _from_json(path, json.loads(where.read_text()))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry: scan again
    index = scan_tar(path)
    if where is not None:
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            tmp = where.with_name(f".{where.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_to_json(index)))
            os.replace(tmp, where)
        except OSError as exn:
            log.warning("cannot cache the index of %s in %s (%s)", path, where.parent, exn)
    return index


def _to_json(index: ShardIndex) -> dict[str, object]:
    return {
        "format": FORMAT,
        "error": index.error,
        "keys": index.keys,
        "first": index.first.tolist(),
        "exts": index.exts,
        "offsets": index.offsets.tolist(),
        "sizes": index.sizes.tolist(),
    }


def _from_json(path: str, data: dict) -> ShardIndex:
    if data["format"] != FORMAT:
        raise ValueError(data["format"])
    as_int = lambda name: np.asarray(data[name], np.int64)  # noqa: E731
    return ShardIndex(
        path, data["keys"], as_int("first"), data["exts"], as_int("offsets"), as_int("sizes"), data["error"]
    )


class FileReader:
    """`os.pread` from shard files, keeping the last `keep` of them open (a batch of the exact stream
    reads from the shards of one or two blocks; reopening one costs microseconds)."""

    def __init__(self, paths: list[str], keep: int = 64) -> None:
        self.paths, self.keep = paths, keep
        self._open: OrderedDict[int, int] = OrderedDict()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._open.get(shard)
        if fd is None:
            fd = self._open[shard] = os.open(self.paths[shard], os.O_RDONLY)
            if len(self._open) > self.keep:
                os.close(self._open.popitem(last=False)[1])
        else:
            self._open.move_to_end(shard)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.paths[shard]}: {size} bytes expected at {offset}, {len(data)} read")
        return data

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()
