"""Checkpoint folders: atomic writes, damaged or partial folders ignored, pruning, RNG round trip."""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ssl_vit.engine import checkpoint
from ssl_vit.engine.checkpoint import (
    load_blob,
    load_model_weights,
    prune_checkpoints,
    write_checkpoint,
)
from ssl_vit.engine.state import TrainState, capture_rng, restore_rng
from ssl_vit.errors import CheckpointError
from ssl_vit.rundir import latest_checkpoint, list_checkpoints


def _write(ckpt_dir: Path, step: int) -> Path:
    state = {"w": torch.full((2, 3), float(step)), "tied": torch.ones(3).expand(2, 3)}
    blobs = {"optimizer.pt": {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 0.1}]}}
    return write_checkpoint(ckpt_dir, step, state, blobs, {"train_state": {"step": step}})


def test_write_then_read_back(tmp_path: Path) -> None:
    path = _write(tmp_path, 7)
    assert path.name == "step-00000007" and latest_checkpoint(tmp_path) == path
    assert torch.equal(load_model_weights(path)["w"], torch.full((2, 3), 7.0))
    assert load_blob(path, "optimizer.pt")["param_groups"] == [{"lr": 0.1}]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and set(meta["files"]) == {"model.safetensors", "optimizer.pt"}


def test_partial_and_damaged_checkpoints_are_ignored_in_favour_of_the_previous_one(tmp_path: Path) -> None:
    _write(tmp_path, 1)
    good = _write(tmp_path, 2)
    crashed = tmp_path / ".tmp-step-00000003"  # a kill mid-write leaves only the temporary folder
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"\0" * 8)
    truncated = _write(tmp_path, 4)  # a file cut short after the fact
    (truncated / "optimizer.pt").write_bytes(b"x")
    no_meta = tmp_path / "step-00000005"
    no_meta.mkdir()
    (no_meta / "model.safetensors").write_bytes(b"\0" * 8)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    assert latest_checkpoint(tmp_path) == good
    prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]
    assert not crashed.exists()


def test_disk_full_mid_write_is_a_clear_error_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous = _write(tmp_path, 1)

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        _write(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]  # no partial folder left


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    torch.save([capture_rng(torch.device("cpu"))], tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True)[0], torch.device("cpu"))
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_train_state_ignores_unknown_keys() -> None:
    state = TrainState.from_dict({"step": 4, "epoch": 1, "from_a_newer_version": True})
    assert state.step == 4 and state.epoch == 1 and state.batch_in_epoch == 0
