"""`data.train=DIR`: a folder (or a table) of images written into the data cache once, reused while
unchanged, written again when it changes; and the held-out copy the evaluators use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ssl_vit.data import evaluation_data, load_images
from ssl_vit.data.sources import resolve
from tests.conftest import write_images


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_folder_is_cached_once_reused_and_rewritten_when_a_file_is_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SSL_VIT_CACHE", str(tmp_path / "cache"))
    root = write_images(tmp_path / "photos", 10)
    caplog.set_level("INFO")
    first = resolve(str(root))
    cached = Path(first.urls[0]).parent
    assert cached.parent == tmp_path / "cache" and first.count == 10 and first.labelled is False
    assert f"writing shards of {root} once into {cached}" in caplog.text
    before = stamps(cached)
    caplog.clear()
    again = resolve(str(root))
    assert again.urls == first.urls and stamps(cached) == before  # read, not rewritten
    assert f"shards of {root} from the cache {cached}" in caplog.text and "writing" not in caplog.text
    info = (root / "img-0003.png").stat()
    os.utime(root / "img-0003.png", ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    changed = resolve(str(root))
    assert Path(changed.urls[0]).parent != cached and stamps(cached) == before
    assert "older shards of" in caplog.text
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [cached.name, Path(changed.urls[0]).parent.name]  # no lock or partial folder left behind
    )


def test_a_table_of_paths_is_cached_like_a_folder(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 4)
    table = tmp_path / "list.tsv"
    table.write_text("path\tlabel\n" + "".join(f"imgs/img-000{i}.png\t{'ab'[i % 2]}\n" for i in range(4)))
    shards = resolve(str(table), cache_dir=str(tmp_path / "cache"))
    assert shards.count == 4 and shards.classes == ["a", "b"] and shards.labelled is True
    assert resolve(str(table), cache_dir=str(tmp_path / "cache")).urls == shards.urls


def test_a_labelled_folder_as_evaluation_data_holds_out_a_test_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_VIT_CACHE", str(tmp_path / "cache"))
    write_images(tmp_path / "lab" / "cat", 10)
    write_images(tmp_path / "lab" / "dog", 10, start=10)
    train, test = evaluation_data(str(tmp_path / "lab"), None)
    assert test is None and Path(train).parent == tmp_path / "cache"
    (x_train, y_train), (x_test, y_test) = (load_images(train, s, 8, 3) for s in ("train", "test"))
    assert (len(y_train), len(y_test)) == (16, 4) and x_test.shape == (4, 3, 8, 8)
    assert evaluation_data("digits", None) == ("digits", None)
    unlabelled = write_images(tmp_path / "flat", 3)
    assert evaluation_data(str(unlabelled), "digits") == (str(unlabelled), "digits")
