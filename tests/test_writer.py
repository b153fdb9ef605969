"""The shard writer: the same bytes for any worker count, and a killed or stopped write that continues."""

from __future__ import annotations

import multiprocessing
import os
import signal
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from ssl_vit.data import inputs
from ssl_vit.data.inputs import encode_array
from ssl_vit.data.shards import write_shards
from ssl_vit.data.writer import JOURNAL, MTIME, Item, Journal, write_splits
from ssl_vit.errors import DataError
from tests.conftest import write_images

SHARD = 6


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 images in two folders (so labels) and 2 corrupt ones."""
    root = tmp_path_factory.mktemp("photos")
    write_images(root / "cat", 20)
    write_images(root / "dog", 20, start=20)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "dog" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def reference(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted one-process write."""
    out = tmp_path_factory.mktemp("reference") / "out"
    write_shards(str(photos), out, shard_size=SHARD, val_fraction=0.2, workers=1)
    return out


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.endswith(".tar")}


def test_parallel_write_is_byte_identical_to_one_process(
    photos: Path, reference: Path, tmp_path: Path
) -> None:
    manifest = write_shards(str(photos), tmp_path / "out", shard_size=SHARD, val_fraction=0.2, workers=2)
    expected = shard_bytes(reference)
    assert len(expected) >= 7 and shard_bytes(tmp_path / "out") == expected  # 40 samples, 6 per shard
    assert manifest["skipped"]["count"] == 2 and manifest["classes"] == ["cat", "dog"]
    assert not list((tmp_path / "out").glob("*.tmp")) and not (tmp_path / "out" / JOURNAL).exists()
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:  # bytes depend on content only
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in tar} == {(MTIME, 0, 0, "bigdata", 0o444)}


def _write_and_die(photos: Path, out: Path, after: int) -> None:
    """In a forked child: SIGKILL itself while loading image number `after` + 1 (mid-shard)."""
    loaded = [0]
    real = inputs.encode_file

    def dying(path: Path) -> inputs.Encoded:
        loaded[0] += 1
        if loaded[0] > after:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path)

    inputs.encode_file = dying  # type: ignore[assignment]
    write_shards(str(photos), out, shard_size=SHARD, val_fraction=0.2, workers=1)


def test_a_write_killed_mid_way_continues_to_the_same_shards(
    photos: Path, reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    child = multiprocessing.get_context("fork").Process(target=_write_and_die, args=(photos, out, 16))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    finals = sorted(p.name for p in out.glob("*.tar"))
    assert finals and len(finals) < len(shard_bytes(reference)) and list(out.glob("*.tar.tmp"))
    assert not (out / "manifest.json").exists() and (out / JOURNAL).exists()
    complete = {name: (out / name).read_bytes() for name in finals}
    assert complete == {name: shard_bytes(reference)[name] for name in finals}  # no partial shard
    caplog.set_level("INFO")
    write_shards(str(photos), out, shard_size=SHARD, val_fraction=0.2, workers=2)
    assert f"{len(finals)} of {len(shard_bytes(reference))} shards are complete" in caplog.text
    assert shard_bytes(out) == shard_bytes(reference)
    assert not list(out.glob("*.tmp")) and not (out / JOURNAL).exists()


def test_a_strict_stop_continues_without_strict_and_other_settings_are_refused(
    photos: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError, match="unreadable image.*the complete shards are kept") as err:
        write_shards(str(photos), out, shard_size=SHARD, val_fraction=0.2, strict=True, workers=1)
    assert "\n" not in str(err.value) and not list(out.glob("*.tmp"))
    with pytest.raises(DataError, match="unfinished write of another source or other settings"):
        write_shards(str(photos), out, shard_size=SHARD + 1, val_fraction=0.2, workers=1)
    write_shards(str(photos), out, shard_size=SHARD, val_fraction=0.2, workers=1)
    assert shard_bytes(out) == shard_bytes(reference)
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(str(photos), out, shard_size=SHARD, val_fraction=0.2, workers=1)


def test_shards_hold_the_bytes_webdataset_tarwriter_writes(tmp_path: Path) -> None:
    """Members are made in the workers; the tar must still be exactly what plain webdataset writes."""
    items = [Item(partial(encode_array, np.full((5, 7, 1), i, np.uint8)), i - 3, f"a{i}") for i in range(6)]
    write_splits({"train": items}, {"train": 4}, tmp_path, False, 1, Journal(tmp_path, "k"), lambda n: None)
    with (
        (tmp_path / "ref.tar").open("wb") as handle,
        wds.TarWriter(handle, encoder=False, mtime=MTIME) as sink,
    ):
        for i, item in enumerate(items[4:], start=4):
            data, ext, _, _ = item.load()
            sink.write({"__key__": f"train-{i:08d}", ext: data, "cls": str(i - 3).encode()})
    assert (tmp_path / "train-000001.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    with tarfile.open(tmp_path / "train-000000.tar") as tar:  # labels -3..0: only the last has a .cls
        assert [m.name for m in tar] == [f"train-{i:08d}.png" for i in range(3)] + [
            "train-00000003.cls",
            "train-00000003.png",
        ]
