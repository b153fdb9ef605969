"""Stream WebDataset shards front to back: the resampled mode, and the pieces both modes share.

The loader (`ssl_vit.data.loader`) reads local, uncompressed shards at random in the exact mode
(`ssl_vit.data.exact`). What cannot be read at random (remote URLs, `pipe:` commands, compressed
tars), or any source with `data.samples_per_epoch` set, streams here in **resampled** mode: each
worker draws shards with replacement from an RNG seeded by (seed, epoch, rank, worker), without end,
through a shuffle buffer; the loader (not the dataset, whose count would be per worker) cuts the
epoch at samples_per_epoch / (ranks x batch) batches, so every rank runs the same number of steps
and DDP never waits on an exhausted rank. webdataset's own resampling seeds from time and pid; this
one does not, so a resumed run that calls `set_epoch` sees the same stream. The stream depends on
the number of processes and workers.

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
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ssl_vit.data.safety import BadSample, SkipCounter, decode_sample, record
from ssl_vit.errors import DataError
from ssl_vit.types import Batch

log = logging.getLogger(__name__)


class Views(Protocol):
    """What the stream asks of an augmentation (`ssl_vit.data.views.MultiView`): each view's crops of
    a batch's images, then the rest on those batches."""

    def batch_crops(self, images: list[Tensor]) -> list[Tensor]: ...

    def finish(self, views: list[Tensor]) -> list[Tensor]: ...


Packed = tuple[Batch, dict[str, int], dict[str, str]]  # a batch, the skip counts and notes since the last


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


def augmented_batch(
    views: Views, images: list[Tensor], labels: list[int], keys: list[str] | None = None
) -> Batch:
    """Decoded images (C, H, W) and their labels -> a Batch of each view's crops, colour-distorted and
    normalised: what both streams and the K-shot fine-tune yield."""
    crops = views.finish(views.batch_crops(images))
    return Batch(views=crops, labels=torch.tensor(labels, dtype=torch.long), keys=keys or [])


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
    """Per worker, endless: shards drawn with replacement -> tar members -> samples -> shuffle buffer
    -> decode -> batches -> crops and colour (`Views.batch_crops`, `Views.finish`)."""

    def __init__(
        self,
        urls: list[str],
        views: Views,
        in_chans: int,
        batch_size: int,
        seed: int,
        shuffle_buffer: int,
        strict: bool,
        rank: int,
    ) -> None:
        super().__init__()
        self.urls, self.views, self.in_chans, self.batch_size = urls, views, in_chans, batch_size
        self.seed, self.shuffle_buffer, self.strict = seed, shuffle_buffer, strict
        self.rank, self.epoch = rank, 0

    def shard_urls(self, worker: int) -> Iterator[str]:
        rng = random.Random(make_seed(self.seed, self.epoch, self.rank, worker, 0))
        while True:
            yield rng.choice(self.urls)

    def _batches(self) -> Iterator[Packed]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:  # augmentations draw from torch's RNG: seed it per (seed, epoch, rank, worker)
            torch.manual_seed(make_seed(self.seed, self.epoch, self.rank, worker, 1))
        counter = SkipCounter(self.strict)
        samples = raw_samples(self.shard_urls(worker), counter, give_up_after=max(8, 2 * len(self.urls)))
        if self.shuffle_buffer > 1:
            rng = random.Random(make_seed(self.seed, self.epoch, self.rank, worker, 2))
            samples = wds.filters.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(
                samples
            )
        images: list[Tensor] = []
        labels: list[int] = []
        keys: list[str] = []
        for sample in samples:
            try:
                image, label = decode_sample(sample, self.in_chans)  # (C, H, W) uint8
            except BadSample as bad:
                counter.skip(bad)
                continue
            images.append(image)
            labels.append(label)
            keys.append(str(sample["__key__"]))
            if len(images) == self.batch_size:
                yield augmented_batch(self.views, images, labels, keys), *counter.take()
                images, labels, keys = [], [], []

    def __iter__(self) -> Iterator[Packed | Failure]:
        try:
            yield from self._batches()
        except DataError as err:
            yield Failure(str(err))
