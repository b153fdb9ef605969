"""What a checkpoint holds, and how every process saves and restores it.

A checkpoint holds the objective's state dict (backbone, heads, EMA teacher, buffers), the optimiser
(the lr and weight-decay schedules are pure functions of the step, so they need no state), the
fp16 grad scaler, the RNG states of every process (torch, CUDA, numpy, python) and `TrainState`:
the step, the data position and the counters. With these, a resumed run takes the same steps on the
same batches with the same random draws as the run that was never stopped.

Model and optimiser go through `torch.distributed.checkpoint.state_dict` with full state dicts, so
the same code serves one process, DDP and FSDP (which gathers shards on save and re-shards on load).
Only the main process writes; a failed write is broadcast so that no rank waits for a checkpoint
that will never come.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ssl_vit.engine.checkpoint import (
    load_blob,
    load_model_weights,
    prune_checkpoints,
    write_checkpoint,
)
from ssl_vit.errors import CheckpointError
from ssl_vit.rundir import read_checkpoint_meta

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
SCALER_FILE = "scaler.pt"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class TrainState:
    """Counters that change every step; `meta.json` of each checkpoint holds them."""

    step: int = 0  # optimiser steps taken (a skipped non-finite step counts: its data is consumed)
    epoch: int = 0  # data position: the epoch being read ...
    batch_in_epoch: int = 0  # ... and how many of its global micro-batches have been consumed
    images_seen: int = 0  # over all processes
    bad_in_a_row: int = 0  # consecutive non-finite steps
    skipped_steps: int = 0  # non-finite steps skipped in total
    train_seconds: float = 0.0  # wall time of the training loop over every (re)start
    num_processes: int = 1

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with `weights_only=True`)."""
    np_state: Any = np.random.get_state()  # ('MT19937', keys, pos, has_gauss, gauss)
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_state[0]),
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": py_state[2],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    py = tuple(int(v) for v in state["python_state"].tolist())
    random.setstate((state["python_version"], py, state["python_gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_training_state(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: Any,
    state: TrainState,
    ckpt_dir: Path,
    keep_last: int,
    meta: dict[str, Any],
) -> Path:
    """Every process calls this; the main process writes `ckpt_dir/step-XXXXXXXX/` atomically."""
    model_state: dict[str, Any] = get_model_state_dict(model, options=_FULL)
    optim_state = get_optimizer_state_dict(model, _raw(optimizer), options=_FULL)
    rng = gather_object([capture_rng(accelerator.device)])  # one entry per process, rank order
    outcome: list[Any] = [None]
    if accelerator.is_main_process:
        blobs: dict[str, Any] = {OPTIMIZER_FILE: optim_state, RNG_FILE: rng}
        if accelerator.scaler is not None:
            blobs[SCALER_FILE] = accelerator.scaler.state_dict()
        try:
            path = write_checkpoint(
                ckpt_dir, state.step, model_state, blobs, {"train_state": asdict(state), **meta}
            )
            prune_checkpoints(ckpt_dir, keep_last)
            outcome = [str(path)]
        except CheckpointError as err:
            outcome = [err]
    outcome = broadcast_object_list(outcome)
    if isinstance(outcome[0], CheckpointError):
        raise outcome[0]
    return Path(outcome[0])


def load_training_state(
    accelerator: Accelerator, model: nn.Module, optimizer: Any, ckpt: Path
) -> tuple[TrainState, dict[str, Any]]:
    """Restore model, optimiser, scaler and this process's RNG from `ckpt`; return its `TrainState`."""
    meta = read_checkpoint_meta(ckpt)
    state = TrainState.from_dict(meta.get("train_state", {}))
    try:
        weights: dict[str, Any] = load_model_weights(ckpt)
        set_model_state_dict(model, weights, options=_FULL)
        set_optimizer_state_dict(model, _raw(optimizer), load_blob(ckpt, OPTIMIZER_FILE), options=_FULL)
    except (RuntimeError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{ckpt} does not fit this model/recipe: {first}") from None
    if accelerator.scaler is not None and (ckpt / SCALER_FILE).is_file():
        accelerator.scaler.load_state_dict(load_blob(ckpt, SCALER_FILE))
    rng: list[dict[str, Any]] = load_blob(ckpt, RNG_FILE)
    rank, world = accelerator.process_index, accelerator.num_processes
    if len(rng) != world:  # the sample order stays (same global batch: see `engine.stream`)
        log.warning(
            "checkpoint %s was written by %d processes, resuming on %d: the samples and their order "
            "stay those of the uninterrupted run, random draws (augmentations, masks) differ",
            ckpt.name,
            len(rng),
            world,
        )
        state.num_processes = world
    restore_rng(rng[rank % len(rng)], accelerator.device)
    return state, meta


def _raw(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)  # type: ignore[no-any-return]
