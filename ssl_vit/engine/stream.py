"""The training data as one stream of micro-batches with a position that a checkpoint can record.

What the engine needs from a loader (`data.train_loader` or any iterable of `Batch`):

- `len(loader)`: batches per epoch on this process;
- an epoch's order that depends only on (seed, epoch). For a `torch.utils.data.DataLoader` over a
  map-style dataset the engine gets this itself: accelerate re-shards it across processes and
  replaces its random sampler by a seedable one (`use_seedable_sampler`), which reshuffles with
  seed + epoch. Any other iterable (e.g. WebDataset streaming) must shard itself by rank and
  provide `seek(epoch, batch)` or `set_epoch(epoch)`, which the engine calls before each epoch;
- skipping the first N batches of an epoch on resume. A map-style DataLoader skips indices
  without reading a sample (accelerate's `SkipBatchSampler`); a loader with `seek` skips itself
  (`data.StreamLoader`: without reading in its exact mode); any other iterable is read and the
  first N batches dropped.

Elastic: in both exact cases (map-style, and `data.StreamLoader`'s exact mode) process r of W takes
the r-th slice of each global micro-batch of W x B samples, so with the same W x B the concatenated
order and the epoch's length are the same at any W, and `batch_in_epoch` (per-process micro-batches)
means the same data position (a map-style DataLoader needs `drop_last=True`: without it,
accelerate fills the last step with samples from the epoch's start).

Random draws: batches are fetched one at a time, without look-ahead, so the augmentations of
batch k (torch's global RNG in the main process when `num_workers=0`) see exactly the RNG state
that the checkpoint after the previous step recorded. Opening an epoch and skipping batches run
under a saved-and-restored RNG, so they consume no draws. With `num_workers > 0` the order stays
exact; workers' augmentation draws after a resume differ from the uninterrupted run, except in
`data.StreamLoader`'s exact mode, which seeds them per batch.

The keys of the samples consumed (`Batch.keys`) are kept, with their epoch, until `take_keys()`:
the engine writes them per optimiser step (`log.sample_keys`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, IterableDataset

from ssl_vit.errors import DataError
from ssl_vit.types import Batch


class Loader(Protocol):
    """What `fit` trains on: batches, and `len()` = batches per epoch on this process."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...


@contextmanager
def _rng_untouched() -> Iterator[None]:
    """Run a block without moving torch's, numpy's or python's global RNG."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        yield
    np.random.set_state(np_state)
    random.setstate(py_state)


class BatchStream:
    """Endless micro-batches on the accelerator's device; `epoch` and `batch_in_epoch` say where."""

    def __init__(self, accelerator: Accelerator, loader: Iterable[Batch], batches_per_epoch: int, seed: int):
        self.accelerator, self.seed = accelerator, seed
        self.shard: Any = None
        self.loader = loader
        if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
            self.shard = accelerator.prepare_data_loader(loader, device_placement=False)
            batches_per_epoch = len(self.shard)
        elif hasattr(loader, "__len__"):
            batches_per_epoch = len(loader)  # type: ignore[arg-type]
        if batches_per_epoch <= 0:
            raise DataError(
                "the training loader yields no batch per epoch (fewer images than train.batch_size?)"
            )
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.batch_in_epoch = 0
        self._it: Iterator[Any] | None = None
        self._keys: list[tuple[int, list[str]]] = []

    def seek(self, epoch: int, batch_in_epoch: int) -> None:
        """Continue from `batch_in_epoch` batches into `epoch` (what a checkpoint recorded)."""
        self.epoch, self.batch_in_epoch, self._it = epoch, batch_in_epoch, None

    def _open(self) -> Iterator[Any]:
        with _rng_untouched():
            if self.shard is not None:
                self.shard.set_epoch(self.epoch)  # the seedable sampler reshuffles with seed + epoch
                generator = getattr(self.shard, "generator", None)
                if generator is not None:  # workers' base seed: a function of (seed, epoch) too
                    generator.manual_seed(self.seed * 1_000_003 + self.epoch)
                skip = self.batch_in_epoch
                shard = self.accelerator.skip_first_batches(self.shard, skip) if skip else self.shard
                return iter(shard.base_dataloader)  # no look-ahead: see the module docstring
            seek = getattr(self.loader, "seek", None)
            if callable(seek):
                seek(self.epoch, self.batch_in_epoch)
                return iter(self.loader)
            set_epoch = getattr(self.loader, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(self.epoch)
            it = iter(self.loader)
            for _ in range(self.batch_in_epoch):
                if next(it, None) is None:
                    break
            return it

    def __iter__(self) -> BatchStream:
        return self

    def take_keys(self) -> list[tuple[int, list[str]]]:
        """(epoch, sample keys) of each micro-batch consumed since the last call, in order."""
        keys, self._keys = self._keys, []
        return keys

    def __next__(self) -> Batch:
        for _ in range(2):
            if self._it is None:
                self._it = self._open()
            batch = next(self._it, None)
            if batch is not None:
                self.batch_in_epoch += 1
                self._keys.append((self.epoch, list(getattr(batch, "keys", []))))
                return send_to_device(batch, self.accelerator.device)  # type: ignore[no-any-return]
            self._it = None
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        raise DataError(f"the training loader yielded no batch in epoch {self.epoch - 1}")
