"""When a run saves: the checkpoint policy, and the run record (`train_state.json`) that goes with it.

`checkpoint.py` writes folders on disk and `state.py` says what goes in them; this module decides
when. A checkpoint is written every `ckpt.every_steps` steps, but never during a streak of
non-finite steps (so the latest one holds finite weights) nor at the last step (the final save
covers it); on a stop signal; and at the end, unless a finished run was resumed with nothing left to
do. Only the newest `ckpt.keep_last` are kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from ssl_vit.config import CkptConfig
from ssl_vit.engine.metrics import write_json
from ssl_vit.engine.setup import Plan
from ssl_vit.engine.state import TrainState, load_training_state, save_training_state
from ssl_vit.errors import CheckpointError, RecipeError
from ssl_vit.rundir import RunDir, read_checkpoint_meta, weights_digest

log = logging.getLogger(__name__)


class CheckpointPolicy:
    """Saves and restores the run; `last` is the newest checkpoint written or resumed from.

    `history` (one entry per (re)start of the run) goes into every checkpoint's meta and, with the
    `Plan`, into `train_state.json`. Every process calls every method (saving gathers from all).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: Any,
        run: RunDir,
        plan: Plan,
        cfg: CkptConfig,
    ) -> None:
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.run, self.plan, self.cfg = run, plan, cfg
        self.history: list[dict[str, Any]] = []
        self.last: Path | None = None
        self.start_step = 0

    def start(self, resume: Path | None) -> TrainState:
        """A fresh `TrainState`, or the one `resume` holds (with model, optimiser and RNG restored)."""
        state = TrainState(num_processes=self.accelerator.num_processes)
        if resume is not None:
            check_micro_batch(meta_plan(resume), self.plan, resume)
            state, meta = load_training_state(self.accelerator, self.model, self.optimizer, resume)
            self.history = list(meta.get("history", []))
            log.info("resumed from %s (step %d, epoch %d)", resume, state.step, state.epoch)
        self.last, self.start_step = resume, state.step
        start = {"start_step": state.step, "num_processes": self.plan.num_processes, "time": time.time()}
        self.history.append(start)
        if self.accelerator.is_main_process:
            write_json(self.run.train_state_file, {**asdict(self.plan), "history": self.history})
        return state

    def save(self, state: TrainState) -> Path:
        meta = {"plan": asdict(self.plan), "history": self.history}
        self.last = save_training_state(
            self.accelerator,
            self.model,
            self.optimizer,
            state,
            self.run.checkpoints,
            self.cfg.keep_last,
            meta,
        )
        return self.last

    def periodic(self, state: TrainState) -> None:
        """Save when `state.step` is on the `ckpt.every_steps` grid, before the last, in a good streak."""
        every = self.cfg.every_steps
        if (
            every
            and state.step % every == 0
            and state.step < self.plan.total_steps
            and state.bad_in_a_row == 0
        ):
            self.save(state)

    def finish(self, state: TrainState, objective: nn.Module) -> None:
        """The final save; with several processes, also check that all ended with the same weights
        (DDP keeps them equal) and record their digests in `train_state.json`."""
        if state.step > self.start_step or self.last is None:  # not when resuming a finished run
            self.save(state)
        if self.accelerator.num_processes == 1:
            return
        digests = gather_object([weights_digest(objective)])
        if self.accelerator.is_main_process:
            if len(set(digests)) > 1:
                log.error("processes ended with different weights: %s", digests)
            record = {**asdict(self.plan), "history": self.history, "weights_sha256": digests}
            write_json(self.run.train_state_file, record)


def meta_plan(ckpt: Path) -> dict[str, Any]:
    """The `Plan` a checkpoint was written under, as a dict ({} for checkpoints without one)."""
    plan = read_checkpoint_meta(ckpt).get("plan")
    return plan if isinstance(plan, dict) else {}


def micro_batch(saved: dict[str, Any]) -> int | None:
    """A saved plan's global micro-batch (per-process batch x processes); None without a plan."""
    return saved["per_device_batch"] * saved["num_processes"] if "per_device_batch" in saved else None


def check_micro_batch(saved: dict[str, Any], plan: Plan, ckpt: Path) -> None:
    """A resume must keep the global micro-batch: the data position in the checkpoint counts
    micro-batches of that size. `ssl_vit.pretrain` adapts the per-process batch to a new process
    count (`resume_batch`); this stops callers of `fit` that do not."""
    before = micro_batch(saved)
    if before is not None and before != plan.per_device_batch * plan.num_processes:
        raise CheckpointError(
            f"{ckpt} was trained with {saved['num_processes']} process(es) x {saved['per_device_batch']} "
            f"images per micro-batch, this run has {plan.num_processes} x {plan.per_device_batch}; "
            f"keep the {before} images per micro-batch (batch size = {before} / processes)"
        )


def resume_batch(saved: dict[str, Any], processes: int, ckpt: Path) -> int | None:
    """The per-process batch that keeps a checkpoint's global micro-batch on `processes` processes
    (None for checkpoints without a plan); a one-line `RecipeError` when it does not divide."""
    before = micro_batch(saved)
    if before is not None and before % processes:
        raise RecipeError(
            f"resuming {ckpt.name} on {processes} processes: its global batch of {before} images per "
            f"micro-batch ({saved['num_processes']} process(es) x {saved['per_device_batch']}) does not "
            f"divide among them; resume on a number of processes that divides {before}"
        )
    return None if before is None else before // processes
