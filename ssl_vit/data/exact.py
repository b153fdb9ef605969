"""The exact stream: an epoch's global sample order is a function of (seed, epoch) alone.

Local shards are indexed (`tarindex`) and read at random, so the order need not follow the tar
files, nor who reads them:

- **order** (`epoch_order`): shuffle the shard list with (seed, epoch), cut it into blocks of shards
  holding at least `data.shuffle_block` samples, permute the samples inside each block, concatenate.
  A block bounds how many shards a batch reads from; the default, 2^18 samples, is MosaicML
  Streaming's `shuffle_block_size` floor (`py1br`/`py1e`), and a smaller set is one block.
- **split**: the epoch is cut into global micro-batches of G = batch x processes samples; rank r
  of micro-batch k takes positions [k*G + r*B, k*G + (r+1)*B). Concatenating the ranks of one
  micro-batch gives the one-process order at any number of processes with the same G, and the
  dropped remainder (the last N mod G positions) is the same too.
- **workers** take whole batches round-robin (worker w: batches w, w+W, ...); torch's DataLoader
  returns an iterable dataset's items in worker round-robin order, so the rank's order is kept.
- **resume** starts at any batch without reading the ones before (`ExactStream.start`).
- **augmentations** of batch k of rank r draw from a generator seeded with (seed, epoch, k, rank):
  independent of the number of workers and of a resume; they do depend on the number of processes
  (the batch a rank augments changes with it).

A sample that cannot be used is handled by position too, so that every process count sees the same:
members that say so from their names alone (a pickle payload, no image) never get a position; an
image or label that fails to decode is replaced by the next good sample in the epoch's order (a
repeat: the batch keeps its size, which DDP and gathered negatives need). Both are counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from ssl_vit.data.safety import IMAGE_EXTS, BadSample, SkipCounter, decode_sample, image_member, record
from ssl_vit.data.stream import Failure, Packed, Views, augmented_batch, make_seed
from ssl_vit.data.tarindex import FileReader, load_index
from ssl_vit.errors import DataError

EXTS = (*IMAGE_EXTS, "npy")  # image members, coded as int8 in a `Catalog`
# Decoded images are kept between epochs where the whole set would fit in this many bytes, read in
# the main process (`data.num_workers: 0`): decoding a digits PNG costs more than cropping it.
KEEP_DECODED_BYTES = 256 << 20


@dataclass
class Catalog:
    """The usable samples of local shards, as flat arrays (shared by forked workers without copies):
    shard s holds ids `starts[s]` to `starts[s+1]`-1; sample i's image member `EXTS[ext[i]]` and its
    `.cls` (size -1: none) lie at (offset, size) in its shard."""

    paths: list[str]
    starts: np.ndarray  # (S+1,) int64
    image: np.ndarray  # (N, 2) int64: offset, size
    label: np.ndarray  # (N, 2) int64: offset, size
    ext: np.ndarray  # (N,) int8
    keys: np.ndarray  # (N,) bytes: the samples' keys, UTF-8

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    @property
    def counts(self) -> list[int]:
        return np.diff(self.starts).tolist()  # type: ignore[no-any-return]

    def read(self, files: FileReader, sample_id: int) -> dict[str, object]:
        """The sample as webdataset yields it, with only the members decoding needs:
        `{__key__, __url__, <image ext>: bytes[, cls: bytes]}`."""
        shard = int(np.searchsorted(self.starts, sample_id, side="right")) - 1
        raw: dict[str, object] = {"__key__": self.keys[sample_id].decode(), "__url__": self.paths[shard]}
        raw[EXTS[self.ext[sample_id]]] = files.read(shard, *self.image[sample_id].tolist())
        if self.label[sample_id, 1] >= 0:
            raw["cls"] = files.read(shard, *self.label[sample_id].tolist())
        return raw


def build_catalog(paths: list[str], cache: Path | None, strict: bool) -> Catalog:
    """Index every shard (cached) and screen its samples by member names; count what is left out.

    Counts go to this process's skip totals (`safety.record`) each time a loader is built.
    """
    counter = SkipCounter(strict)
    counts: list[int] = []
    image: list[tuple[int, int]] = []
    label: list[tuple[int, int]] = []
    ext: list[int] = []
    keys: list[bytes] = []
    for path in paths:
        index = load_index(path, cache)
        if index.error is not None:
            counter.skip(BadSample("bad_shard", path, index.error))
        kept = len(keys)
        for i, key in enumerate(index.keys):
            members = {e: (offset, size) for e, offset, size in index.members(i)}
            try:
                chosen = image_member(list(members), f"{path}: sample '{key}'")
            except BadSample as bad:
                counter.skip(bad)
                continue
            image.append(members[chosen])
            label.append(members.get("cls", (0, -1)))
            ext.append(EXTS.index(chosen))
            keys.append(key.encode())
        counts.append(len(keys) - kept)
    record(*counter.take())
    return Catalog(
        paths,
        np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        np.asarray(image, np.int64).reshape(-1, 2),
        np.asarray(label, np.int64).reshape(-1, 2),
        np.asarray(ext, np.int8),
        np.asarray(keys, dtype=bytes),
    )


def block_size(counts: list[int], shuffle_block: int) -> int:
    """Shards per block: enough to hold `shuffle_block` samples on average (at least one)."""
    mean = max(sum(counts) / max(len(counts), 1), 1.0)
    return max(1, int(np.ceil(shuffle_block / mean)))


def epoch_order(counts: list[int], seed: int, epoch: int, block: int, shuffle: bool = True) -> np.ndarray:
    """(N,) int64: the epoch's global order of sample ids (shard s holds ids starts[s]..starts[s+1]-1).

    Shards shuffled with (seed, epoch), grouped `block` at a time, samples permuted within each block
    (not with `shuffle=False`, i.e. `data.shuffle_block` <= 1).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**32, epoch, 0x5EED]))
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    shards = rng.permutation(len(counts))
    parts = []
    for b in range(0, len(shards), block):
        ids = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in shards[b : b + block]])
        parts.append(rng.permutation(ids) if shuffle else ids)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class ExactStream(IterableDataset[Packed | Failure]):
    """Per worker: its batches of this rank's share of the epoch's order -> read -> decode -> batch ->
    crops and colour (`Views.batch_crops`, `Views.finish`). `start`: the first batch of the epoch to
    produce. A small set read in the main process stays decoded in memory (`KEEP_DECODED_BYTES`)."""

    def __init__(
        self,
        catalog: Catalog,
        views: Views,
        in_chans: int,
        batch_size: int,
        seed: int,
        shuffle_block: int,
        strict: bool,
        rank: int,
        world: int,
    ) -> None:
        super().__init__()
        self.catalog, self.views, self.in_chans = catalog, views, in_chans
        self.batch_size, self.seed, self.strict, self.rank, self.world = batch_size, seed, strict, rank, world
        self.block = block_size(catalog.counts, shuffle_block)
        self.shuffle = shuffle_block > 1
        self.batches = catalog.total // (world * batch_size)  # per rank, per epoch
        self.epoch, self.start = 0, 0
        self.decoded: dict[int, tuple[Tensor, int, str]] = {}

    def positions(self, batch: int) -> slice:
        """This rank's slice of the epoch's order for its `batch`-th micro-batch."""
        first = batch * self.world * self.batch_size + self.rank * self.batch_size
        return slice(first, first + self.batch_size)

    def _batches(self) -> Iterator[Packed]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = epoch_order(self.catalog.counts, self.seed, self.epoch, self.block, self.shuffle)
        files = FileReader(self.catalog.paths)
        counter = SkipCounter(self.strict)
        try:
            for k in range(self.start + worker, self.batches, workers):
                span = self.positions(k)
                with torch.random.fork_rng(devices=[]):  # the main process's RNG stays untouched
                    torch.manual_seed(make_seed(self.seed, self.epoch, k, self.rank, 1))
                    items = [self._item(files, order, p, counter) for p in range(span.start, span.stop)]
                    images, labels, keys = (list(column) for column in zip(*items, strict=True))
                    batch = augmented_batch(self.views, images, labels, keys)
                yield batch, *counter.take()
        finally:
            files.close()

    def _item(
        self, files: FileReader, order: np.ndarray, position: int, counter: SkipCounter
    ) -> tuple[Tensor, int, str]:
        """The sample at `position`, or the next good one in the order after it (wrapping): its image
        (C, H, W) uint8, label and key."""
        for p in range(position, position + len(order)):
            sample_id = int(order[p % len(order)])
            try:
                return self._decode(files, sample_id)
            except BadSample as bad:
                counter.skip(bad)
            except OSError as exn:
                counter.skip(BadSample("bad_shard", f"sample {sample_id}", f"unreadable ({exn})"))
        raise DataError("no sample of the epoch decodes; check the shards (data.train)")

    def _decode(self, files: FileReader, sample_id: int) -> tuple[Tensor, int, str]:
        """Read and decode one sample, or take it from `decoded` (bad samples are never kept, so they
        are skipped and counted again each epoch, as without it)."""
        kept = self.decoded.get(sample_id)
        if kept is not None:
            return kept
        raw = self.catalog.read(files, sample_id)
        image, label = decode_sample(raw, self.in_chans)
        item = (image, label, str(raw["__key__"]))
        if get_worker_info() is None and image.nbytes * self.catalog.total <= KEEP_DECODED_BYTES:
            self.decoded[sample_id] = item
        return item

    def __iter__(self) -> Iterator[Packed | Failure]:
        try:
            yield from self._batches()
        except DataError as err:
            yield Failure(str(err))
