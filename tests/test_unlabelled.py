"""Unlabelled pretraining data, labelled evaluation data: from a folder of images to a probed export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssl_vit.cli import main
from ssl_vit.data import eval_split
from tests.conftest import TINY, records, write_images

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


def test_pretrain_on_an_unlabelled_folder_then_probe_and_export_on_a_labelled_one(
    folders: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    photos, labelled = folders
    run = tmp_path / "mae"
    assert main(["pretrain", "digits/mae", *SMALL, f"data.train={photos}", "--out", str(run), "--quiet"]) == 0
    last = records(run)[-1]
    assert "rankme" in last and "knn_top1" not in last  # no labels: RankMe only
    assert main(["probe", str(run)]) == 2
    assert "set eval.train=LABELLED_DATA in the recipe" in one_error_line(capsys)
    assert main(["finetune", str(run), "--steps", "1"]) == 2 and "eval.train" in one_error_line(capsys)
    assert main(["probe", str(run), "--data", str(labelled), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["n_train"], result["n_test"]) == (24, 6)  # a seeded 20% held out
    assert main(["export", str(run), "--out", str(tmp_path / "exp")]) == 0
    assert main(["knn", str(tmp_path / "exp"), "--data", str(labelled), "--k", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_test"] == 6
    assert main(["show", str(run), "--embedding", "pca"]) == 0
    drawn = {p.name for p in (run / "figures").glob("*.png")}
    assert drawn == {"curves.png", "attention.png", "reconstruction.png"}  # a map needs labels


def test_eval_train_and_eval_test_feed_the_monitor_the_evaluators_and_the_card(
    folders: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    photos, labelled = folders
    tests = tmp_path / "tests"  # without the class `light`: `mid` is its class 1 but eval.train's 2
    write_images(tests / "dark", 3, start=100, value=60)
    write_images(tests / "mid", 4, start=110, value=125)
    _, labels = eval_split(str(labelled), str(tests), "test", 8, 3)
    assert sorted(labels.tolist()) == [0] * 3 + [2] * 4
    run = tmp_path / "simclr"
    evals = [f"eval.train={labelled}", f"eval.test={tests}"]
    argv = ["pretrain", "digits/simclr", *SMALL, f"data.train={photos}", *evals, "--out", str(run), "--quiet"]
    assert main(argv) == 0
    assert {"rankme", "knn_top1"} <= set(records(run)[-1])  # k-NN on eval.train's images
    assert main(["probe", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["n_train"], result["n_test"]) == (30, 7) and result["test_data"] == str(tests)
    card = (run / "backbone" / "README.md").read_text()
    assert f"| evaluation data | `{labelled}` |" in card
    assert "| labelled | false |" in card  # the cached folder's manifest
