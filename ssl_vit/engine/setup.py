"""What the engine works out before the first step: checks, the accelerator, the plan, the run dir.

`Plan` holds the numbers derived once from the recipe and the world size (global batch, scaled lr,
steps); the engine writes it to `RUN_DIR/train_state.json` and into every checkpoint's meta.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    is_tensorboard_available,
)

from ssl_vit.config import CkptConfig, LogConfig, OptimConfig, TrainConfig
from ssl_vit.engine.stream import BatchStream
from ssl_vit.errors import CheckpointError, RecipeError
from ssl_vit.objectives.base import Objective
from ssl_vit.optim import NO_DECAY_RULES, adamw, cosine_schedule, param_groups, scaled_lr


@dataclass
class Plan:
    """Numbers derived once from the recipe and the world size; recorded in `train_state.json`."""

    num_processes: int
    per_device_batch: int
    accum_steps: int
    global_batch: int  # per-device batch x processes x accumulation
    lr_scaling: str
    recipe_lr: float
    lr: float  # peak lr after scaling
    min_lr: float
    warmup_steps: int
    total_steps: int
    batches_per_epoch: int  # per process
    updates_per_epoch: int
    mixed_precision: str
    device: str
    distributed_type: str


def check_config(optim: OptimConfig, train: TrainConfig, ckpt: CkptConfig, logcfg: LogConfig) -> None:
    """One-line errors for engine settings a recipe can get wrong, before any work."""
    if str(train.mixed_precision).lower() == "false":  # YAML reads a bare `no` as false
        train.mixed_precision = "no"
    if train.mixed_precision not in ("no", "bf16", "fp16"):
        raise RecipeError(f"train.mixed_precision must be no, bf16 or fp16, not '{train.mixed_precision}'")
    if optim.accum_steps < 1:
        raise RecipeError(f"optim.accum_steps must be at least 1, got {optim.accum_steps}")
    if optim.lr_scaling not in ("none", "linear"):
        raise RecipeError(f"optim.lr_scaling must be 'none' or 'linear', not '{optim.lr_scaling}'")
    if optim.clip_mode not in ("global", "per_param"):
        raise RecipeError(f"optim.clip_mode must be 'global' or 'per_param', not '{optim.clip_mode}'")
    if optim.no_decay not in NO_DECAY_RULES:
        raise RecipeError(
            f"optim.no_decay must be one of {', '.join(NO_DECAY_RULES)}, not '{optim.no_decay}'"
        )
    if train.strategy not in ("ddp", "fsdp"):
        raise RecipeError(f"train.strategy must be 'ddp' or 'fsdp', not '{train.strategy}'")
    if train.strategy == "fsdp" and use_cpu(train):
        raise RecipeError("train.strategy: fsdp needs GPUs (accelerate shards on CUDA devices only); use ddp")
    if train.max_bad_steps < 1:
        raise RecipeError(f"train.max_bad_steps must be at least 1, got {train.max_bad_steps}")
    if ckpt.every_steps is not None and ckpt.every_steps < 1:
        raise RecipeError(f"ckpt.every_steps must be at least 1 (or null), got {ckpt.every_steps}")
    if logcfg.every_steps < 1:
        raise RecipeError(f"log.every_steps must be at least 1, got {logcfg.every_steps}")
    if logcfg.tensorboard and not is_tensorboard_available():
        raise RecipeError("log.tensorboard=true needs the tensorboard package (pip install tensorboard)")


def use_cpu(train: TrainConfig) -> bool:
    """CPU when asked or when there is no accelerator.

    accelerate treats `torchrun` on CPUs as multi-CPU (gloo) only when told `cpu=True`; otherwise
    every process silently trains alone.
    """
    return train.cpu or not torch.accelerator.is_available()


def processes(train: TrainConfig) -> PartialState:
    """The process group as accelerate sees it (under torchrun: this rank among all)."""
    return PartialState(cpu=use_cpu(train))


def fsdp_plugin() -> FullyShardedDataParallelPlugin:
    """FSDP2 (`fully_shard`) with each timm transformer `Block` a unit, the student's and the
    teacher's alike; checkpoints gather full state dicts, so they resume on any process count and
    export to plain timm like DDP ones (`engine/state.py`)."""
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Block"],
        state_dict_type="FULL_STATE_DICT",
        reshard_after_forward=True,
        cpu_ram_efficient_loading=False,
    )


def make_accelerator(
    train: TrainConfig, optim: OptimConfig, logcfg: LogConfig, run_dir: Path, seed: int
) -> Accelerator:
    return Accelerator(
        cpu=use_cpu(train),
        fsdp_plugin=fsdp_plugin() if train.strategy == "fsdp" else None,
        mixed_precision=train.mixed_precision,
        # Accumulation windows run across epoch ends: a step is always `accum_steps` micro-batches.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=optim.accum_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        log_with="tensorboard" if logcfg.tensorboard else None,
        project_dir=str(run_dir),
    )


def make_plan(accelerator: Accelerator, stream: BatchStream, optim: OptimConfig, train: TrainConfig) -> Plan:
    updates_per_epoch = max(stream.batches_per_epoch // optim.accum_steps, 1)
    total = train.max_steps if train.max_steps is not None else train.epochs * updates_per_epoch
    if total <= 0:
        raise RecipeError("train.max_steps (or train.epochs) must give at least one step")
    global_batch = train.batch_size * accelerator.num_processes * optim.accum_steps
    warmup = (
        optim.warmup_steps if optim.warmup_steps is not None else int(optim.warmup_epochs * updates_per_epoch)
    )
    return Plan(
        num_processes=accelerator.num_processes,
        per_device_batch=train.batch_size,
        accum_steps=optim.accum_steps,
        global_batch=global_batch,
        lr_scaling=optim.lr_scaling,
        recipe_lr=optim.lr,
        lr=scaled_lr(optim.lr, global_batch, optim.lr_scaling),
        min_lr=optim.min_lr,
        warmup_steps=warmup,
        total_steps=total,
        batches_per_epoch=stream.batches_per_epoch,
        updates_per_epoch=updates_per_epoch,
        mixed_precision=accelerator.mixed_precision,
        device=str(accelerator.device),
        distributed_type=str(accelerator.distributed_type.value),
    )


def make_optimizer(objective: Objective, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW over `param_groups`: no weight decay where the objective says, optional layer decay."""
    groups = param_groups(
        objective, optim.weight_decay, objective.no_weight_decay(), optim.layer_decay, rule=optim.no_decay
    )
    return adamw(groups, lr, (optim.betas[0], optim.betas[1]))


def schedules(plan: Plan, optim: OptimConfig, step: int) -> tuple[float, float]:
    """(lr, weight decay) for update `step`: pure functions of the step, so checkpoints hold no
    scheduler. The lr warms up linearly, then both follow a cosine."""
    wd_end = optim.weight_decay if optim.weight_decay_end is None else optim.weight_decay_end
    lr = cosine_schedule(step, plan.total_steps, plan.lr, plan.min_lr, plan.warmup_steps)
    return lr, cosine_schedule(step, plan.total_steps, optim.weight_decay, wd_end)


def ensure_writable(run_dir: Path) -> None:
    """Fail before training when nothing can be written there (a full disk shows up at save time)."""
    probe = run_dir / ".write-test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"run directory {run_dir} is not writable: {err.strerror or err}") from None
