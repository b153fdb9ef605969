"""What the run tells its user: `metrics.jsonl`, `train_state.json`, TensorBoard and a progress bar.

Only the main process writes or draws; the other processes hold disabled instances.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ssl_vit.config import LogConfig
from ssl_vit.engine.state import TrainState
from ssl_vit.engine.step import StepResult
from ssl_vit.errors import CheckpointError
from ssl_vit.rundir import RunDir


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Replace `path` atomically (write a sibling, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from None


class MetricsWriter:
    """Appends one JSON object per line to `metrics.jsonl`; a no-op on non-main processes."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise CheckpointError(f"cannot write {self.path}: {err.strerror or err}") from None

    def truncate_after(self, step: int) -> None:
        """On resume: drop the records a killed run wrote after its last checkpoint."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line + "\n")
            except ValueError:  # a line cut short by the kill
                continue
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: allocated tensors on CUDA, the process's resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:  # type: ignore[type-arg]
    """tqdm's bar (its own ETA) on the main process, when asked for and stderr is a terminal."""
    return tqdm(
        total=total,
        initial=initial,
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
        unit="step",
    )


def metrics_record(
    accelerator: Accelerator,
    result: StepResult,
    state: TrainState,
    schedules: tuple[float, float, float],
    images_per_sec: float,
) -> dict[str, Any]:
    """One metrics record; loss and logs are averaged over processes (every process calls this).

    `schedules` is (lr, weight decay, EMA momentum or NaN without a teacher).
    """
    lr, wd, momentum = schedules
    names = sorted(result.logs)
    values = torch.stack([result.loss.float(), *(result.logs[k].float() for k in names)])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
    loss, *logs = values.tolist()
    record: dict[str, Any] = {
        "step": state.step,
        "epoch": state.epoch,
        "loss": loss,
        "lr": lr,
        "weight_decay": wd,
        "grad_norm": result.grad_norm,
        "images_per_sec": images_per_sec,
        "images_seen": state.images_seen,
        "skipped_steps": state.skipped_steps,
        "peak_mem_mb": peak_memory_mb(accelerator.device),
    }
    if not math.isnan(momentum):
        record["ema_momentum"] = momentum
    record.update(dict(zip(names, logs, strict=True)))
    return record


def monitor_record(monitor: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The monitor's measures of the current weights, plus `monitor_seconds`: what they cost."""
    start = time.perf_counter()
    measures = dict(monitor())
    measures["monitor_seconds"] = time.perf_counter() - start
    return measures


@dataclass
class Reporting:
    """What a run reports besides its own numbers, and whether it draws a progress bar.

    `data_stats` returns counters (e.g. skipped corrupt samples), logged as `data_<name>`. `monitor`,
    given to the main process only, measures the current weights (e.g. online k-NN and RankMe) every
    `monitor_every` steps and at the last; every process gets the same `monitor_every`, so all of them
    write that record (off the `log.every_steps` grid too) and join its all-reduce, the others
    waiting there while the main process measures. Its time is in the run's seconds, not in
    `images_per_sec`.
    """

    progress: bool = True
    data_stats: Callable[[], dict[str, float]] | None = None
    monitor: Callable[[], dict[str, float]] | None = None
    monitor_every: int = 0


class Reporter:
    """After each step: the progress bar; every `log.every_steps`, at the last step and at monitor
    steps, a record to `metrics.jsonl` and TensorBoard. `images_per_sec` is over the steps since the
    previous record."""

    def __init__(
        self,
        accelerator: Accelerator,
        run: RunDir,
        cfg: LogConfig,
        total_steps: int,
        state: TrainState,
        reporting: Reporting,
    ) -> None:
        self.accelerator, self.cfg, self.reporting = accelerator, cfg, reporting
        self.total_steps = total_steps
        self.metrics = MetricsWriter(run.metrics_file, accelerator.is_main_process)
        self.metrics.truncate_after(state.step)
        if cfg.tensorboard:
            accelerator.init_trackers("tensorboard")
        self.bar = progress_bar(total_steps, state.step, reporting.progress and accelerator.is_main_process)
        self.tick, self.images_at_tick = time.perf_counter(), state.images_seen

    def step(self, result: StepResult, state: TrainState, schedules: tuple[float, float, float]) -> None:
        """Every process calls this after each step (a record is all-reduced); see `metrics_record`."""
        self.bar.update(1)
        every, last = self.reporting.monitor_every, state.step == self.total_steps
        measure = every > 0 and (state.step % every == 0 or last)
        if not (state.step % self.cfg.every_steps == 0 or last or measure):
            return
        now = time.perf_counter()
        rate = (state.images_seen - self.images_at_tick) / max(now - self.tick, 1e-9)
        record = metrics_record(self.accelerator, result, state, schedules, rate)
        if self.reporting.data_stats is not None:
            record.update({f"data_{k}": v for k, v in self.reporting.data_stats().items()})
        if measure and self.reporting.monitor is not None:
            record.update(monitor_record(self.reporting.monitor))
            now = time.perf_counter()  # measuring is not training throughput
        self.metrics.write(record)
        if self.cfg.tensorboard:
            self.accelerator.log(record, step=state.step)
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{schedules[0]:.2e}", img_s=f"{record['images_per_sec']:.0f}"
        )
        self.tick, self.images_at_tick = now, state.images_seen

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the progress bar (before a save or an error message that should not share its line)."""
        self.bar.close()

    def end(self) -> None:
        if self.cfg.tensorboard:
            self.accelerator.end_training()
