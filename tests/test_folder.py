"""Folders of images as they sit on disk: the walk, what it skips and counts, and labels or none."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import webdataset as wds

from ssl_vit.cli import main
from ssl_vit.data.folder import folder_labels, list_images
from ssl_vit.data.shards import write_shards
from ssl_vit.errors import DataError
from tests.conftest import write_images


def members(out: Path) -> list[dict[str, bytes]]:
    return [m for s in sorted(out.glob("*.tar")) for m in wds.WebDataset(str(s), shardshuffle=False)]


def test_a_flat_folder_with_junk_and_a_symlink_loop_gives_unlabelled_shards_and_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    root = write_images(tmp_path / "photos", 12)
    write_images(root / "2025" / "batch-a", 8, start=12)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "cut.png").write_bytes((root / "img-0000.png").read_bytes()[:60])  # a truncated PNG
    (root / "notes.txt").write_text("not an image")
    (root / "2025" / "meta.json").write_text("{}")
    write_images(root / ".thumbs", 2, start=50)  # a hidden folder: not entered
    (root / ".hidden.png").write_bytes((root / "img-0001.png").read_bytes())
    os.symlink("../..", root / "2025" / "batch-a" / "loop")  # back to photos/: entered once only
    os.symlink("nowhere.png", root / "dangling.png")
    caplog.set_level("INFO")
    assert (
        main(["shards", str(root), "--out", str(tmp_path / "out"), "--shard-size", "8", "--workers", "1"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "train 20 in 3 shards, no labels" in printed and "(skipped 2 unreadable)" in printed
    report = [r.message for r in caplog.records if r.message.startswith(str(root))]
    assert (
        len(report) == 1 and "22 images; skipped 2 hidden, 2 not images, 1 folder(s) seen before" in report[0]
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["labelled"] is False and manifest["classes"] == []
    skipped = manifest["skipped"]
    assert skipped["count"] == 2 and {e["path"] for e in skipped["examples"]} == {
        str(root / "broken.jpg"),
        str(root / "cut.png"),
    }
    assert (skipped["hidden"], skipped["not_images"], skipped["repeated_folders"]) == (2, 2, 1)
    assert skipped["unreadable_entries"] == 1  # the dangling link
    samples = members(tmp_path / "out")
    assert len(samples) == 20 and len({s["__key__"] for s in samples}) == 20
    assert not any("cls" in s for s in samples)


@pytest.mark.parametrize(
    "layout, labels, classes, count",
    [
        ({"cat": 3, "dog/old": 3}, "auto", ["cat", "dog"], 6),  # images anywhere below a class folder
        ({"": 2, "cat": 3, "dog": 3}, "auto", [], 8),  # top-level images: no labels, none dropped
        ({"": 2, "2025/batch-a": 5}, "auto", [], 7),  # the case: `2025` is no class
        ({"only": 4}, "auto", [], 4),  # one sub-folder is not a labelling
        ({"only": 4}, "folders", ["only"], 4),
        ({"cat": 3, "dog": 3}, "none", [], 6),
    ],
)
def test_labels_auto_picks_class_folders_or_none(
    tmp_path: Path, layout: dict[str, int], labels: str, classes: list[str], count: int
) -> None:
    start = 0
    for sub, n in layout.items():
        write_images(tmp_path / "src" / sub, n, start=start)
        start += n
    manifest = write_shards(str(tmp_path / "src"), tmp_path / "out", labels=labels, workers=1)
    assert manifest["classes"] == classes and manifest["labelled"] == bool(classes)
    assert manifest["splits"]["train"]["count"] == count
    got = sorted(int(s["cls"]) for s in members(tmp_path / "out") if "cls" in s)
    assert got == (
        sorted(classes.index(p.split("/")[0]) for p in layout for _ in range(layout[p])) if classes else []
    )


def test_labels_folders_refuses_images_at_the_top_level(tmp_path: Path) -> None:
    write_images(tmp_path / "src", 2)
    write_images(tmp_path / "src" / "cat", 2, start=2)
    with pytest.raises(DataError, match=r"2 image\(s\) sit at the top level.*--labels none") as err:
        folder_labels(list_images(tmp_path / "src"), "folders")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="no images found"):
        list_images(write_images(tmp_path / "empty", 0))


def test_a_linked_folder_inside_the_tree_keeps_its_real_name(tmp_path: Path) -> None:
    write_images(tmp_path / "src" / "dog", 2)
    write_images(tmp_path / "src" / "cat", 2, start=2)
    os.symlink("../dog", tmp_path / "src" / "cat" / "alias")  # walked after the real folders: a repeat
    listing = list_images(tmp_path / "src")
    assert [p for p, _, _ in listing.files] == [f"cat/img-000{i}.png" for i in (2, 3)] + [
        f"dog/img-000{i}.png" for i in (0, 1)
    ]
    assert listing.repeated_folders == 1
