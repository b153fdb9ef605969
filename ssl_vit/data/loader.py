"""One rank's batches of the training shards: the exact stream where shards can be read at random,
resampled streaming elsewhere, behind one loader the engine can position (`seek`).

- **exact** (`ssl_vit.data.exact`): local, uncompressed shards without `data.samples_per_epoch`.
  The epoch's order is a function of (seed, epoch) only, the same at any number of processes and
  workers; each epoch reads every usable sample once, less the last N mod (processes x batch).
- **resampled** (`ssl_vit.data.stream`): remote URLs, `pipe:` commands and compressed tars (they
  cannot be read at random), or `data.samples_per_epoch` set. Shards are drawn with replacement;
  the stream depends on the number of processes and workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from ssl_vit.data.cache import cache_root
from ssl_vit.data.exact import ExactStream, build_catalog
from ssl_vit.data.safety import record, skip_counts
from ssl_vit.data.sources import is_local, local_path, scan
from ssl_vit.data.stream import Failure, ShardStream, Views
from ssl_vit.data.tarindex import indexable, is_cached
from ssl_vit.errors import DataError
from ssl_vit.types import Batch

log = logging.getLogger(__name__)


class StreamLoader:
    """Batches of one rank's share of the stream; `len()` is the number of batches per epoch.

    Deliberately not a `torch.utils.data.DataLoader`: accelerate's `prepare()` re-shards a DataLoader
    over an iterable dataset (dispatching batches from rank 0), while this stream is already split by
    rank. `prepare()` passes other iterables through unchanged. Each `iter()` is one epoch, from where
    `seek(epoch, batch)` put it (then the next epoch from its start).
    """

    def __init__(self, stream: ExactStream | ShardStream, num_workers: int, batches_per_epoch: int) -> None:
        self.stream, self.num_workers, self.batches_per_epoch = stream, num_workers, batches_per_epoch
        self.epoch, self.start = 0, 0

    @property
    def exact(self) -> bool:
        return isinstance(self.stream, ExactStream)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.seek(epoch, 0)

    def seek(self, epoch: int, batch: int) -> None:
        """The next `iter()` starts `batch` batches into `epoch`: without reading them in exact mode,
        by reading and dropping them (under a forked RNG: no draws consumed) in resampled mode."""
        self.epoch, self.start = epoch, batch

    def skip_counts(self) -> dict[str, int]:
        """Bad samples skipped so far in this process, per reason (for the engine's metrics, which
        may not import `ssl_vit.data`)."""
        return skip_counts()

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self.epoch, self.start
        self.epoch, self.start = epoch + 1, 0
        self.stream.epoch = epoch
        if isinstance(self.stream, ExactStream):
            self.stream.start = start
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=4 if self.num_workers else None,
        )
        with torch.random.fork_rng(devices=[]):  # opening (a seed draw) and skipping draw nothing
            batches = iter(loader)
            for _ in range(0 if self.exact else start):
                _unpack(next(batches))
        emitted = start
        for item in batches:
            yield _unpack(item)  # on the CPU: the engine moves it to its device
            emitted += 1
            if emitted >= self.batches_per_epoch:
                return


def _unpack(item: tuple[Batch, dict[str, int], dict[str, str]] | Failure) -> Batch:
    if isinstance(item, Failure):
        raise DataError(item.message)
    batch, counts, notes = item
    record(counts, notes)
    return batch


def build_loader(
    urls: list[str],
    count: int | None,
    views: Views,
    in_chans: int,
    batch_size: int,
    seed: int,
    *,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    shuffle_block: int = 1 << 18,
    strict: bool = False,
    samples_per_epoch: int | None = None,
    rank: int = 0,
    world: int = 1,
    cache_dir: str | None = None,
) -> StreamLoader:
    """A `StreamLoader` over `urls` (`count` samples, or None where unknown: the exact mode counts
    them itself).

    `rank` of `world` processes is the caller's (under torchrun, the engine's `processes(...)`), so
    the data layer never asks accelerate. Shard indexes are cached under `cache_dir` (as
    `data.cache_dir`). Every problem is a one-line `DataError` here, before training starts.
    """
    if batch_size < 1 or num_workers < 0:
        raise DataError(
            f"train.batch_size must be >= 1 and data.num_workers >= 0 ({batch_size}, {num_workers})"
        )
    random_access = all(is_local(u) and indexable(str(local_path(u))) for u in urls)
    if samples_per_epoch is None and random_access:
        cache = cache_root(cache_dir) / "tar-index"  # beside the built-in sets' shards
        paths = [str(local_path(u)) for u in urls]
        missing = sum(not is_cached(p, cache) for p in paths)
        if missing:
            log.info("indexing %d shard(s) once, from their tar headers (cached in %s)", missing, cache)
        catalog = build_catalog(paths, cache, strict)
        exact = ExactStream(catalog, views, in_chans, batch_size, seed, shuffle_block, strict, rank, world)
        _check_epoch(catalog.total, world, batch_size)
        return StreamLoader(exact, num_workers, exact.batches)
    if samples_per_epoch is None:
        log.info(
            "data.train is remote or compressed: it cannot be read at random, so it streams resampled "
            "(the sample order depends on the number of processes and workers)"
        )
    readers = world * max(num_workers, 1)
    if len(urls) < readers:
        log.warning(
            "data.train has %d shard(s) but %d process(es) x %d worker(s) read it: workers share shards",
            len(urls),
            world,
            max(num_workers, 1),
        )
    total = samples_per_epoch if samples_per_epoch is not None else count
    if total is None:
        log.info("no manifest.json beside the shards: counting their samples")
        total, _ = scan(urls)  # remote ones: a one-line error asking for data.samples_per_epoch
    _check_epoch(total, world, batch_size)
    stream = ShardStream(urls, views, in_chans, batch_size, seed, shuffle_buffer, strict, rank)
    return StreamLoader(stream, num_workers, total // (world * batch_size))


def _check_epoch(total: int, world: int, batch_size: int) -> None:
    if total // (world * batch_size) < 1:
        raise DataError(
            f"an epoch has {total} samples, fewer than {world} process(es) x train.batch_size={batch_size}"
        )
