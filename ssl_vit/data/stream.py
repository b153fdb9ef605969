"""Stream WebDataset shards into batches of views, split by process (rank) and DataLoader worker.

Two modes, both reproducible from (seed, epoch):

- **exact** (one process, the default there): each epoch shuffles the shard list with (seed, epoch)
  and deals it to ranks, then workers (`shards[rank::world][worker::workers]`); every sample is seen
  exactly once per epoch. webdataset splits per shard, so this needs at least ranks x workers shards:
  fewer leave a worker empty, and in DDP a rank with fewer batches hangs the others.
- **resampled** (several processes, or `data.samples_per_epoch` set): each worker draws shards with
  replacement from an RNG seeded by (seed, epoch, rank, worker), without end; the loader (not the
  dataset, whose count would be per worker) cuts the epoch at samples_per_epoch / (ranks x batch)
  batches, so every rank runs the same number of steps and DDP never waits on an exhausted rank.
  webdataset's own resampling seeds from time and pid; this one does not, so a resumed run that
  calls `set_epoch` sees the same stream.

Reading, decoding, views and batching all run in the workers. What goes back to the main process is
`(Batch, skip counts, notes)`; a fatal data error travels as a `Failure` and is raised there as a
one-line `DataError` (an exception raised in a worker would reach the user as a traceback dump).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ssl_vit.data.safety import BadSample, SkipCounter, decode_sample, record, skip_counts
from ssl_vit.errors import DataError
from ssl_vit.types import Batch

log = logging.getLogger(__name__)


class Views(Protocol):
    """What the stream asks of an augmentation (`ssl_vit.data.views.MultiView`): crops per image,
    then the rest on each collated batch."""

    def crops(self, image: Tensor) -> list[Tensor]: ...

    def finish(self, views: list[Tensor]) -> list[Tensor]: ...


Packed = tuple[Batch | None, dict[str, int], dict[str, str]]


def make_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (not Python's `hash`, not time, not pid)."""
    return int(np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(1)[0])


@dataclass
class Failure:
    """A fatal data error raised in a worker, carried to the main process as a value."""

    message: str


def collate(items: list[tuple[list[Tensor], int]]) -> Batch:
    """[(views, label)] -> Batch with views[i] of shape (B, C, H_i, W_i).

    `default_collate` stacks straight into shared memory inside a worker, saving the copy that
    sending a batch to the main process would otherwise make.
    """
    views = [default_collate([views[i] for views, _ in items]) for i in range(len(items[0][0]))]
    return Batch(views=views, labels=torch.tensor([label for _, label in items], dtype=torch.long))


def raw_samples(
    urls: Iterator[str], counter: SkipCounter, give_up_after: int | None = None
) -> Iterator[dict[str, object]]:
    """Shard URLs -> raw samples `{__key__, __url__, <ext>: bytes}`; bad shards go to `counter`.

    `give_up_after`: in an endless (resampled) stream, that many shards in a row without a readable
    member means the data is broken, not unlucky: stop with an error instead of spinning.
    """
    return group_by_keys(_members(urls, counter, give_up_after), handler=counter.handler)


def _members(
    urls: Iterator[str], counter: SkipCounter, give_up_after: int | None
) -> Iterator[dict[str, object]]:
    """Tar members as `{fname, data, __url__}`, with `{}` after each shard (webdataset's end-of-shard
    marker, so a truncated shard's last sample never merges with the next shard's first)."""
    empty_in_a_row = 0
    for url in urls:
        counter.start_shard(url)
        members = 0
        try:
            with wds.gopen(url, "rb") as stream:
                for member in tar_file_iterator(stream, handler=counter.handler):
                    member["__url__"] = url
                    members += 1
                    yield member
        except DataError:
            raise
        except Exception as exn:  # unreadable, truncated or not a tar at all
            counter.handler(exn)
        yield {}
        empty_in_a_row = 0 if members else empty_in_a_row + 1
        if give_up_after is not None and empty_in_a_row >= give_up_after:
            raise DataError(f"no readable sample in the last {empty_in_a_row} shards drawn; check {url}")


def read_split(urls: list[str], in_chans: int, strict: bool = False) -> Iterator[tuple[Tensor, int]]:
    """Every good sample of `urls` in order, decoded: image (C, H, W) uint8 and label (-1: none)."""
    counter = SkipCounter(strict)
    for sample in raw_samples(iter(urls), counter):
        try:
            yield decode_sample(sample, in_chans)
        except BadSample as bad:
            counter.skip(bad)
    record(*counter.take())


class ShardStream(IterableDataset[Packed | Failure]):
    """Per worker: shard URLs -> tar members -> samples -> shuffle buffer -> decode -> crops -> batches
    -> colour (`MultiView.finish`, on the whole batch)."""

    def __init__(
        self,
        urls: list[str],
        views: Views,
        in_chans: int,
        batch_size: int,
        seed: int,
        shuffle_buffer: int,
        strict: bool,
        resampled: bool,
        rank: int,
        world: int,
    ) -> None:
        super().__init__()
        self.urls, self.views, self.in_chans, self.batch_size = urls, views, in_chans, batch_size
        self.seed, self.shuffle_buffer, self.strict, self.resampled = seed, shuffle_buffer, strict, resampled
        self.rank, self.world, self.epoch = rank, world, 0

    def shard_urls(self, worker: int, workers: int) -> Iterator[str]:
        if self.resampled:
            rng = random.Random(make_seed(self.seed, self.epoch, self.rank, worker, 0))
            while True:
                yield rng.choice(self.urls)
        order = list(self.urls)
        random.Random(make_seed(self.seed, self.epoch)).shuffle(order)  # same order on every rank
        yield from order[self.rank :: self.world][worker::workers]

    def _packed(self, items: list[tuple[list[Tensor], int]] | None, counter: SkipCounter) -> Packed:
        counts, notes = counter.take()
        if not items:
            return None, counts, notes
        batch = collate(items)
        return Batch(views=self.views.finish(batch.views), labels=batch.labels), counts, notes

    def _batches(self) -> Iterator[Packed]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:  # augmentations draw from torch's RNG: seed it per (seed, epoch, rank, worker)
            torch.manual_seed(make_seed(self.seed, self.epoch, self.rank, worker, 1))
        counter = SkipCounter(self.strict)
        give_up = max(8, 2 * len(self.urls)) if self.resampled else None
        samples = raw_samples(self.shard_urls(worker, workers), counter, give_up)
        if self.shuffle_buffer > 1:
            rng = random.Random(make_seed(self.seed, self.epoch, self.rank, worker, 2))
            samples = wds.filters.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(
                samples
            )
        items: list[tuple[list[Tensor], int]] = []
        for sample in samples:
            try:
                image, label = decode_sample(sample, self.in_chans)  # (C, H, W) uint8
            except BadSample as bad:
                counter.skip(bad)
                continue
            items.append((self.views.crops(image), label))
            if len(items) == self.batch_size:
                yield self._packed(items, counter)
                items = []
        yield self._packed(items, counter)  # a partial batch (exact mode) and the last counts

    def __iter__(self) -> Iterator[Packed | Failure]:
        try:
            yield from self._batches()
        except DataError as err:
            yield Failure(str(err))


class StreamLoader:
    """Batches of one rank's share of the stream; `len()` is the number of batches per epoch.

    Deliberately not a `torch.utils.data.DataLoader`: accelerate's `prepare()` re-shards a DataLoader
    over an iterable dataset (dispatching batches from rank 0), while this stream is already split by
    rank. `prepare()` passes other iterables through unchanged. Each `iter()` is one epoch; call
    `set_epoch` on resume so the stream continues where it was.
    """

    def __init__(self, stream: ShardStream, num_workers: int, batches_per_epoch: int) -> None:
        self.stream, self.num_workers, self.batches_per_epoch = stream, num_workers, batches_per_epoch
        self.epoch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_counts(self) -> dict[str, int]:
        """Bad samples skipped so far in this process, per reason (for the engine's metrics, which
        may not import `ssl_vit.data`)."""
        return skip_counts()

    def __iter__(self) -> Iterator[Batch]:
        self.stream.epoch = self.epoch
        self.epoch += 1
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=4 if self.num_workers else None,
        )
        batch_size = self.stream.batch_size
        emitted, partial = 0, []
        for item in loader:
            if isinstance(item, Failure):
                raise DataError(item.message)
            batch, counts, notes = item
            record(counts, notes)
            if batch is None:
                continue
            if len(batch) < batch_size:  # workers' last partial batches (exact mode): merge them
                partial.append(batch)
                if sum(len(b) for b in partial) < batch_size:
                    continue
                batch, rest = _merge(partial, batch_size)
                partial = [rest] if rest is not None else []
            yield batch  # on the CPU: the engine moves it to its device
            emitted += 1
            if self.stream.resampled and emitted >= self.batches_per_epoch:
                return


def _merge(batches: list[Batch], size: int) -> tuple[Batch, Batch | None]:
    """Concatenate batches and split off the first `size` samples (the rest may be None)."""
    views = [torch.cat([b.views[i] for b in batches]) for i in range(len(batches[0].views))]
    labels = torch.cat([b.labels for b in batches])
    head = Batch(views=[v[:size] for v in views], labels=labels[:size])
    rest = Batch(views=[v[size:] for v in views], labels=labels[size:]) if len(labels) > size else None
    return head, rest


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
    strict: bool = False,
    samples_per_epoch: int | None = None,
    rank: int = 0,
    world: int = 1,
    resampled: bool | None = None,
) -> StreamLoader:
    """A `StreamLoader` over `urls` (`count` samples, or None where unknown).

    `rank` of `world` processes is the caller's (under torchrun, the engine's `processes(...)`), so
    the data layer never asks accelerate; `resampled` defaults to True when there are several
    processes or `samples_per_epoch` is set. Every problem is a one-line `DataError` here, before
    training starts.
    """
    if resampled is None:
        resampled = world > 1 or samples_per_epoch is not None
    if batch_size < 1 or num_workers < 0:
        raise DataError(
            f"train.batch_size must be >= 1 and data.num_workers >= 0 ({batch_size}, {num_workers})"
        )
    readers = world * max(num_workers, 1)
    if len(urls) < readers:
        message = (
            f"data.train has {len(urls)} shard(s) but {world} process(es) x {max(num_workers, 1)} worker(s) "
            f"read it; write at least {readers} shards (ssl-vit shards --shard-size) or lower data.num_workers"
        )
        if not resampled:
            raise DataError(message)
        log.warning("%s (resampled mode works, but workers share shards)", message)
    total = samples_per_epoch if resampled and samples_per_epoch is not None else count
    if total is None:
        raise DataError(
            "the number of training samples is unknown (no manifest.json); set data.samples_per_epoch"
        )
    batches = total // (world * batch_size)
    if batches < 1:
        raise DataError(
            f"an epoch has {total} samples, fewer than {world} process(es) x train.batch_size={batch_size}"
        )
    stream = ShardStream(
        urls, views, in_chans, batch_size, seed, shuffle_buffer, strict, resampled, rank, world
    )
    return StreamLoader(stream, num_workers, batches)
