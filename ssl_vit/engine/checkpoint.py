"""Checkpoints: model weights as safetensors, the rest as a weights-only torch file.

A checkpoint is written to a temporary folder and then renamed, so a crash mid-write leaves the
previous checkpoint valid.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ssl_vit.errors import CheckpointError

PREFIX = "step-"


def _contiguous_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone so tied or expanded tensors save alone.
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    ckpt_dir: Path, step: int, model: nn.Module, extra: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """Write `ckpt_dir/step-XXXXXXXX/` atomically and return it."""
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{PREFIX}{step:08d}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(_contiguous_state(model), str(tmp / "model.safetensors"))
        torch.save(extra, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint in {ckpt_dir}: {err.strerror or err}") from None
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are not complete)."""
    if not ckpt_dir.is_dir():
        return []
    done = [
        p
        for p in ckpt_dir.glob(f"{PREFIX}*")
        if (p / "meta.json").is_file() and (p / "model.safetensors").is_file()
    ]
    return sorted(done, key=lambda p: p.name)


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    path = ckpt / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} holds no model.safetensors")
    return load_file(str(path))


def load_extra(ckpt: Path) -> dict[str, Any]:
    """Optimiser, scheduler and RNG state; `weights_only=True` so nothing is unpickled blindly."""
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)  # type: ignore[no-any-return]
