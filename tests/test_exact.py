"""The exact stream: an epoch's order from (seed, epoch) alone, at any number of processes and
workers; random access into tar shards that reads what webdataset reads."""

from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ssl_vit.data.exact import build_catalog, epoch_order
from ssl_vit.data.loader import StreamLoader, build_loader
from ssl_vit.data.tarindex import FileReader, load_index, scan_tar


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value % 256, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class NoisyViews:
    """One view: the image plus noise from torch's RNG, so augmentation draws show in the output."""

    def batch_crops(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.stack([image.float() + torch.rand(image.shape) for image in images])]

    def finish(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        return views


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """60 samples (label = sample id, key s<id>) in 7 shards of 3 to 14 samples."""
    folder = tmp_path_factory.mktemp("exact")
    urls, start = [], 0
    for i, n in enumerate([3, 14, 5, 9, 12, 7, 10]):
        url = str(folder / f"train-{i:06d}.tar")
        with wds.TarWriter(url, mtime=0) as sink:
            for label in range(start, start + n):
                sink.write({"__key__": f"s{label:06d}", "png": png(label), "cls": str(label).encode()})
        urls.append(url)
        start += n
    return urls


def loaders(
    urls: list[str], world: int, workers: int, global_batch: int, seed: int = 3, count: int | None = None
) -> list[StreamLoader]:
    """One loader per rank; the global micro-batch `global_batch` split among `world` processes."""
    return [
        build_loader(
            urls,
            count,
            NoisyViews(),
            1,
            global_batch // world,
            seed,
            num_workers=workers,
            shuffle_buffer=16,
            rank=r,
            world=world,
        )  # fmt: skip
        for r in range(world)
    ]


def global_order(ranks: list[StreamLoader], epoch: int = 0, start: int = 0) -> list[str]:
    """Keys of one epoch from `start`, rank 0's batch then rank 1's ..., step by step."""
    per_rank = []
    for loader in ranks:
        loader.seek(epoch, start)
        per_rank.append([batch.keys for batch in loader])
    return [key for step in zip(*per_rank, strict=True) for keys in step for key in keys]


def test_epoch_order_is_a_permutation_from_seed_and_epoch_read_a_few_shards_at_a_time() -> None:
    counts = [3, 9, 0, 4, 8, 5, 7, 6, 6]
    orders = {(s, e): epoch_order(counts, s, e, block=2) for s in (0, 1) for e in (0, 1)}
    for order in orders.values():
        assert sorted(order.tolist()) == list(range(48))
    assert len({o.tobytes() for o in orders.values()}) == 4  # differs between epochs and seeds
    assert np.array_equal(orders[0, 0], epoch_order(counts, 0, 0, block=2))
    shard_of = np.repeat(np.arange(len(counts)), counts)
    shards_per_window = [len(set(shard_of[orders[0, 0][i : i + 4]])) for i in range(0, 44)]
    assert max(shards_per_window) <= 4  # 4 consecutive samples span at most 2 blocks of 2 shards
    unshuffled = epoch_order(counts, 0, 0, block=1, shuffle=False)  # data.shuffle_buffer <= 1
    assert all(np.all(np.diff(unshuffled[shard_of[unshuffled] == s]) == 1) for s in range(9) if counts[s] > 1)


def test_the_global_order_is_the_same_at_any_number_of_processes_and_workers(shards: list[str]) -> None:
    one = global_order(loaders(shards, 1, 0, 8))
    assert len(one) == 56 and len(set(one)) == 56  # 60 // 8 steps of 8; the last 4 dropped
    for world, workers in [(2, 0), (2, 2), (4, 1), (1, 2)]:
        ranks = loaders(shards, world, workers, 8)
        assert [len(loader) for loader in ranks] == [7] * world
        assert global_order(ranks) == one, f"{world} processes x {workers} workers"
    assert global_order(loaders(shards, 2, 0, 8), epoch=1) != one
    assert global_order(loaders(shards, 1, 0, 8, seed=4)) != one


def test_seek_starts_mid_epoch_without_reading_the_batches_before(
    shards: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = global_order(loaders(shards, 2, 0, 8))
    reads: list[int] = []
    original = FileReader.read
    monkeypatch.setattr(FileReader, "read", lambda self, *a: reads.append(1) or original(self, *a))
    assert global_order(loaders(shards, 2, 0, 8), start=5) == whole[5 * 8 :]
    assert len(reads) == 2 * 8 * 2  # image and label of the 2 batches read, none of the 5 skipped


def test_augmentations_do_not_depend_on_workers_or_a_resume(shards: list[str]) -> None:
    def views(workers: int, start: int) -> list[torch.Tensor]:
        (loader,) = loaders(shards, 1, workers, 4)
        loader.seek(0, start)
        return [batch.views[0] for batch in loader]

    torch.manual_seed(0)
    rng = torch.get_rng_state()
    plain = views(0, 0)
    assert torch.equal(torch.get_rng_state(), rng)  # the main process's RNG is not touched
    assert all(torch.equal(a, b) for a, b in zip(plain, views(2, 0), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain[6:], views(2, 6), strict=True))


def test_random_access_reads_what_webdataset_reads_sequentially(tmp_path: Path) -> None:
    url = str(tmp_path / "mixed.tar")
    members = [("dir/k0.png", png(0)), ("dir/k0.cls", b"0"), ("__meta__", b"{}"), ("README", b"no dot")]
    members += [("dir/k1.PNG", png(1)), ("dir/k1.seg.json", b"{}"), ("dir/k1.JPG", b"x" * 700)]
    members += [
        ("dir/k2.cls", b"2"),
        ("dir/k2.png", png(2)),
        ("__key__/k3.png", png(3)),
        ("k4.npy", b"\0" * 5),
    ]
    with tarfile.open(url, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("dir"))  # not a regular file
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a float mtime: a PAX header per member
            tar.addfile(info, io.BytesIO(data))
    plain = list(wds.WebDataset(url, shardshuffle=False))
    index = scan_tar(url)
    files = FileReader([url])
    assert index.error is None
    assert index.keys == [s["__key__"] for s in plain] == ["dir/k0", "dir/k1", "dir/k2", "k4"]
    for i, sample in enumerate(plain):
        got = {ext: files.read(0, offset, size) for ext, offset, size in index.members(i)}
        assert got == {k: v for k, v in sample.items() if not k.startswith("__")}
    catalog = build_catalog([url], None, strict=False)  # what training reads: image and label only
    for i, sample in enumerate(plain):
        image = "jpg" if "jpg" in sample else "png" if "png" in sample else "npy"
        want = {k: sample[k] for k in ("__key__", image, "cls") if k in sample}
        assert {k: v for k, v in catalog.read(files, i).items() if k != "__url__"} == want
    files.close()


def test_indexes_are_cached_and_renewed_when_a_shard_changes(shards: list[str], tmp_path: Path) -> None:
    url = str(tmp_path / "copy.tar")
    shutil.copy(shards[1], url)
    cache = tmp_path / "index"
    first = load_index(url, cache)
    (entry,) = cache.iterdir()
    assert len(first) == 14 and load_index(url, cache).keys == first.keys
    shutil.copy(shards[0], url)
    os.utime(url, ns=(1, 1))
    assert len(load_index(url, cache)) == 3 and len(list(cache.iterdir())) == 2
    assert entry.is_file()


def test_remote_and_compressed_shards_stream_resampled(
    shards: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    packed = tmp_path / "train-000000.tar.gz"
    packed.write_bytes(gzip.compress(Path(shards[1]).read_bytes()))
    caplog.set_level(logging.INFO)
    for urls in ([str(packed)], [f"pipe:cat {shards[1]}"]):
        (loader,) = loaders(urls, 1, 0, 2, count=14)
        assert not loader.exact and len(loader) == 7
        assert "cannot be read at random" in caplog.text
        caplog.clear()
    assert loaders(shards, 1, 0, 2)[0].exact
