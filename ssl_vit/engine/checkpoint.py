"""Checkpoint folders on disk: atomic writes, discovery of the latest valid one, pruning.

A checkpoint is `checkpoints/step-XXXXXXXX/` holding `model.safetensors` (the objective's state
dict: backbone, heads, EMA teacher), weights-only torch files for the rest (`optimizer.pt`,
`rng.pt`, ...) and `meta.json`, written last, which lists every file with its size. The folder is
written as `.tmp-step-XXXXXXXX/`, fsynced, then renamed: a crash or a full disk mid-write leaves
only a temporary folder, which is ignored, and the previous checkpoint stays the latest valid one.

This module writes, prunes and loads them (which are valid is `ssl_vit.rundir`'s rule); what goes
in them is `state.py`'s business.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ssl_vit.errors import CheckpointError
from ssl_vit.rundir import (
    CKPT_META_FILE,
    CKPT_MODEL_FILE,
    CKPT_PREFIX,
    CKPT_TMP_PREFIX,
    list_checkpoints,
)


def contiguous_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage; clone so tied or expanded tensors save alone."""
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    ckpt_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    blobs: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write `ckpt_dir/step-XXXXXXXX/` atomically and return it.

    `blobs` maps a file name (`optimizer.pt`) to an object of tensors and plain values that
    `torch.load(weights_only=True)` can read back.
    """
    final = ckpt_dir / f"{CKPT_PREFIX}{step:08d}"
    tmp = ckpt_dir / f"{CKPT_TMP_PREFIX}{CKPT_PREFIX}{step:08d}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(contiguous_state(model_state), str(tmp / CKPT_MODEL_FILE))
        for name, obj in blobs.items():
            torch.save(obj, tmp / name)
        files = {p.name: p.stat().st_size for p in tmp.iterdir()}
        (tmp / CKPT_META_FILE).write_text(json.dumps({"step": step, "files": files, **meta}, indent=2))
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp)
        if final.exists():  # only when a finished run is resumed and saved again at the same step
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(ckpt_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {err.strerror or err}") from None
    return final


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (at least one) and no temporary folders."""
    for old in list_checkpoints(ckpt_dir)[: -max(keep_last, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in ckpt_dir.glob(f"{CKPT_TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    path = ckpt / CKPT_MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} holds no {CKPT_MODEL_FILE}")
    return load_file(str(path))


def load_blob(ckpt: Path, name: str) -> Any:
    """A torch file of the checkpoint; `weights_only=True` so nothing is unpickled blindly."""
    path = ckpt / name
    if not path.is_file():
        raise CheckpointError(f"{ckpt} holds no {name}")
    return torch.load(path, map_location="cpu", weights_only=True)
