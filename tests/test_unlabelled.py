"""Unlabelled pretraining data, labelled evaluation data: from a folder of images to a probed export."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_vit.cli import main
from tests.conftest import TINY, write_images

SMALL = [*TINY, "model.depth=1", "train.max_steps=2", "train.batch_size=16", "eval.online_every_steps=2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An unlabelled flat folder of 40 images and a labelled one: dark, mid and light, 10 each."""
    root = tmp_path_factory.mktemp("own")
    for i, name in enumerate(["dark", "mid", "light"]):
        write_images(root / "labelled" / name, 10, start=10 * i, value=60 + 65 * i)
    return write_images(root / "photos", 40, start=30), root / "labelled"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test writes its data cache (and feature cache) afresh, under its own `SSL_VIT_CACHE`."""
    monkeypatch.setenv("SSL_VIT_CACHE", str(tmp_path / "cache"))


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_supervised_refuses_unlabelled_data_with_one_line(
    folders: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["pretrain", "digits/supervised", *SMALL, f"data.train={folders[0]}", "--out", str(tmp_path / "r")]
    assert main([*argv, "--quiet"]) == 2
    assert "objective 'supervised' needs labels" in one_error_line(capsys)
    assert not (tmp_path / "r").exists()
