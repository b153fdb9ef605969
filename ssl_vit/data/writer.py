"""Write splits as shards: images decoded in a process pool, the same bytes for any worker count,
and resumable.

The shards are planned before anything is decoded: shard k of a split holds the readable images
among a fixed range of source items (`shard_size` of them, fewer where their files reach
`MAX_SHARD_BYTES`), keyed `<split>-<position in the split>`, so a shard depends on its range alone
(an unreadable image leaves its shard one sample short). Workers decode and check the images
(`Item.load`) and make their tar members in chunks, each into a part file; the main process appends
the parts to their shards in order,
so the shards do not depend on the number of workers, and every member gets a fixed mtime, owner
and mode, so the bytes depend on the content only. The tars are what `tarfile` (and so
webdataset's TarWriter) writes.

Each shard is written as `NAME.tar.tmp` and renamed when complete, so no partial shard ever has a
final name; then the journal (`.journal.jsonl` in the output folder, one line per complete shard
with its image statistics) records it. A write that stops (kill -9, a full disk, `--strict` at a bad
image) and runs again on the same source with the same settings keeps every complete shard and
writes the others, ending with the shards an uninterrupted write gives.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import tarfile
from collections import deque
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_vit.errors import DataError

log = logging.getLogger(__name__)

JOURNAL = ".journal.jsonl"
PARTS = ".parts"  # workers' decoded chunks, on their way into a shard
MAX_SHARD_BYTES = 1e9  # of source files per shard (a built-in set's arrays count as 0)
MTIME = 946684800  # 2000-01-01: a fixed integer mtime (a float one costs a PAX header per member)
MAX_EXAMPLES = 20  # skipped images named per shard
CHUNK = 16  # images per task sent to a worker: fewer round trips, still a fine-grained balance
OWNER = "bigdata"  # the user and group names webdataset's TarWriter writes
BLOCK = tarfile.BLOCKSIZE
Encoded = tuple[bytes, str, tuple[int, int], str]  # (bytes, extension, (width, height), PIL mode)
Loaded = tuple[bytes, tuple[int, int], str]  # (tar members, (width, height), PIL mode)


@dataclass
class Item:
    """One source sample: `load()` gives it encoded; `where` names it in messages. Picklable."""

    load: Callable[[], Encoded]
    label: int
    where: str
    nbytes: int = 0  # the source file's size, for planning shards by bytes


@dataclass
class Task:
    """One shard to write: the items of its range; `first` is the range's start in the split."""

    split: str
    number: int
    first: int
    items: list[Item]

    @property
    def file(self) -> str:
        return f"{self.split}-{self.number:06d}.tar"


def plan(items: list[Item], shard_size: int) -> list[range]:
    """The item ranges of a split's shards: `shard_size` items, fewer where their bytes reach the cap."""
    ranges, start, nbytes = [], 0, 0
    for index, item in enumerate(items):
        nbytes += item.nbytes
        if index + 1 - start >= shard_size or nbytes >= MAX_SHARD_BYTES:
            ranges.append(range(start, index + 1))
            start, nbytes = index + 1, 0
    if start < len(items):
        ranges.append(range(start, len(items)))
    return ranges


def new_stats() -> dict[str, Any]:
    """Image statistics of one shard; JSON, so the journal keeps them."""
    return {
        "width": [math.inf, -math.inf, 0],  # min, max, sum
        "height": [math.inf, -math.inf, 0],
        "modes": {},
        "skipped": 0,
        "examples": [],  # of skipped images, at most MAX_EXAMPLES
    }


def _add(stats: dict[str, Any], size: tuple[int, int], mode: str) -> None:
    for key, value in zip(("width", "height"), size, strict=True):
        low, high, total = stats[key]
        stats[key] = [min(low, value), max(high, value), total + value]
    stats["modes"][mode] = stats["modes"].get(mode, 0) + 1


def _member(name: str, data: bytes) -> bytes:
    """One tar member as `tarfile` writes it: USTAR header, data, zeros to a 512-byte block."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), MTIME, 0o444, OWNER, OWNER
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") + data + bytes(-len(data) % BLOCK)


def _load(item: Item, key: str) -> Loaded | str:
    """The sample's tar members (`.cls` first, then the image, as webdataset's TarWriter orders them),
    its size and mode; or the error in one line (a worker must not die on a bad image). Made in the
    worker, so the main process only writes bytes."""
    try:
        data, ext, size, mode = item.load()
    except Exception as exn:
        return f"{type(exn).__name__}: {exn}"[:200]
    label = _member(f"{key}.cls", str(item.label).encode("ascii")) if item.label >= 0 else b""
    return label + _member(f"{key}.{ext}", data), size, mode


Outcome = tuple[tuple[int, int], str] | str  # an image's (width, height) and PIL mode, or its error
Piece = tuple[list[bytes] | Path, list[Outcome]]  # a chunk's tar members (or the part file holding them)


def _decode_chunk(work: list[tuple[Item, str]], part: Path | None) -> Piece:
    """`_load` of each (item, key): their members joined, and each item's outcome. In a worker
    (`part` given) the members go to a part file, so only a short list crosses back to the main
    process, which appends the file to its shard: sending the bytes through the pool's pipe cost the
    two processes about 0.5 ms per photo-sized image, a third of decoding it."""
    members: list[bytes] = []
    outcomes: list[Outcome] = []
    for item, key in work:
        loaded = _load(item, key)
        if isinstance(loaded, str):
            outcomes.append(loaded)
            continue
        data, size, mode = loaded
        members.append(data)
        outcomes.append((size, mode))
    if part is None:
        return members, outcomes
    with part.open("wb") as handle:
        handle.writelines(members)
    return part, outcomes


def _chunks(task: Task) -> list[list[tuple[Item, str]]]:
    """A shard's (item, key) pairs, CHUNK at a time (a chunk never spans two shards)."""
    keyed = [(item, f"{task.split}-{task.first + i:08d}") for i, item in enumerate(task.items)]
    return [keyed[i : i + CHUNK] for i in range(0, len(keyed), CHUNK)]


def pieces(tasks: list[Task], workers: int, parts: Path) -> Generator[Piece, None, None]:
    """Each task's chunks decoded, in order; with `workers` > 1 in a process pool (forked where the
    platform has fork: workers start at once and only run PIL). At most 4 chunks per worker are in
    flight, so memory and part files stay bounded when writing is slower than decoding."""
    chunks = [chunk for task in tasks for chunk in _chunks(task)]
    if workers <= 1:
        yield from (_decode_chunk(chunk, None) for chunk in chunks)
        return
    parts.mkdir(exist_ok=True)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        pending: deque[Any] = deque()
        for number, chunk in enumerate(chunks):
            pending.append(pool.apply_async(_decode_chunk, (chunk, parts / f"{number:08d}.part")))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _write_shard(out: Path, task: Task, decoded: Iterator[Piece], strict: bool) -> dict[str, Any]:
    """Write one shard from the next pieces (one per chunk of the task); its journal entry."""
    final = out / task.file
    tmp = final.with_name(final.name + ".tmp")
    stats, count = new_stats(), 0
    with tmp.open("wb") as handle:
        for chunk in _chunks(task):
            members, outcomes = next(decoded)
            for (item, _), outcome in zip(chunk, outcomes, strict=True):
                if isinstance(outcome, str):
                    if strict:
                        raise DataError(
                            f"{item.where}: unreadable image ({outcome}); the complete shards are kept"
                        )
                    stats["skipped"] += 1
                    if len(stats["examples"]) < MAX_EXAMPLES:
                        stats["examples"].append({"path": item.where, "error": outcome})
                    continue
                count += 1
                _add(stats, *outcome)
            if isinstance(members, Path):
                with members.open("rb") as part:
                    shutil.copyfileobj(part, handle, 1 << 20)
                members.unlink()
            else:
                handle.writelines(members)
        end = handle.tell() + 2 * BLOCK  # two zero blocks end the archive, then zeros to a whole record
        handle.write(bytes(2 * BLOCK + -end % tarfile.RECORDSIZE))
    os.replace(tmp, final)
    entry = {"split": task.split, "number": task.number, "file": task.file, "count": count}
    return {**entry, "bytes": final.stat().st_size, "stats": stats}


class Journal:
    """The complete shards of an unfinished write: a first line with the write's key, then one line
    per shard. A journal with another key belongs to another write, which must not be continued."""

    def __init__(self, out: Path, key: str) -> None:
        self.path = out / JOURNAL
        self.done: dict[str, dict[str, Any]] = {}
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        if lines and _json(lines[0]).get("key") != key:
            raise DataError(
                f"{out} holds an unfinished write of another source or other settings; rerun "
                "it with the same source and options to continue, or remove the folder"
            )
        for line in lines[1:]:
            entry = _json(line)  # a line cut by a kill is not JSON: that shard is written again
            path = out / str(entry.get("file"))
            if "file" in entry and path.is_file() and path.stat().st_size == entry["bytes"]:
                self.done[entry["file"]] = entry
        out.mkdir(parents=True, exist_ok=True)
        if not lines:
            self.path.write_text(json.dumps({"key": key}) + "\n")

    def add(self, entry: dict[str, Any]) -> None:
        self.done[entry["file"]] = entry
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")


def _json(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def write_splits(
    splits: dict[str, list[Item]],
    shard_sizes: dict[str, int],
    out: Path,
    strict: bool,
    workers: int,
    journal: Journal,
    advance: Callable[[int], None],
) -> dict[str, list[dict[str, Any]]]:
    """Write every split's shards not yet in `journal`; every split's entries, in shard order."""
    tasks = [
        Task(split, number, span.start, items[span.start : span.stop])
        for split, items in splits.items()
        for number, span in enumerate(plan(items, shard_sizes[split]))
    ]
    todo = [t for t in tasks if t.file not in journal.done]
    if len(todo) < len(tasks):
        log.info(
            "continuing an unfinished write: %d of %d shards are complete", len(tasks) - len(todo), len(tasks)
        )
        advance(sum(len(t.items) for t in tasks if t.file in journal.done))
    parts = out / PARTS
    try:
        with closing(pieces(todo, workers, parts)) as decoded:
            for task in todo:
                entry = _write_shard(out, task, decoded, strict)
                journal.add(entry)
                advance(len(task.items))
                _report_skipped(entry)
    except OSError as exn:  # a full disk, a folder gone: keep what is complete, say how to go on
        raise DataError(
            f"writing shards into {out}: {exn.strerror or exn}; fix that and rerun to continue"
        ) from None
    finally:
        for tmp in out.glob("*.tar.tmp"):  # a shard cut short by an error: written again on a rerun
            tmp.unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
    return {split: [journal.done[t.file] for t in tasks if t.split == split] for split in splits}


def _report_skipped(entry: dict[str, Any]) -> None:
    stats = entry["stats"]
    if stats["skipped"]:
        example = stats["examples"][0]
        log.warning(
            "%s: skipped %d unreadable image(s), e.g. %s (%s)",
            entry["file"],
            stats["skipped"],
            example["path"],
            example["error"].split(":")[0],
        )
