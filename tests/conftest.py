"""Shared fixtures and helpers: tiny ViTs (width 32, depth 2) so the suite stays fast on two CPU cores.

Test files import the plain helpers from here (`from tests.conftest import make_run`), never from
each other, and never a private name of `ssl_vit`. Runs that several modules need are made once per
session (`shared_supervised_run`, `shared_untrained_run`); tests only read them, and the session
fails if one writes into them. A test that writes into a run works on `copy_run` of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

from ssl_vit import objectives
from ssl_vit.backbone import Backbone
from ssl_vit.cli import main
from ssl_vit.config import ModelConfig, load_recipe, save_recipe
from ssl_vit.engine.checkpoint import write_checkpoint
from ssl_vit.engine.ema import ema_update
from ssl_vit.objectives import Objective
from ssl_vit.types import Batch

REPO = Path(__file__).resolve().parent.parent
# Built-in sets are written to shards once; keep the tests' copy out of the user's cache.
os.environ.setdefault("SSL_VIT_CACHE", str(Path(tempfile.gettempdir()) / "ssl_vit_test_cache"))
# One intra-op thread: on a small shared machine, two OpenMP threads make tiny ops ~30x slower, and
# in-process runs then compute like the OMP_NUM_THREADS=1 subprocesses the tests start.
torch.set_num_threads(1)
TINY = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "train.batch_size=32",
    "log.every_steps=1",
]


def tiny_model_config(**overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def tiny_backbone() -> Backbone:
    torch.manual_seed(0)
    return Backbone.from_config(tiny_model_config())


@pytest.fixture(autouse=True)
def _single_thread_determinism() -> None:
    torch.manual_seed(0)


@contextmanager
def registered_objective(name: str, cls: type[Objective]) -> Iterator[None]:
    """`cls` is the objective `name` inside the block, in place of any class of that name.

    Afterwards the registry is as before (the replaced class back, a new name gone), so that
    `objectives.names()` in later tests, e.g. the demo's list of objectives, sees the real set.
    """
    previous = objectives.unregister(name) if name in objectives.names() else None
    objectives.register(name)(cls)
    try:
        yield
    finally:
        objectives.unregister(name)
        if previous is not None:
            objectives.register(name)(previous)


# ---------------------------------------------------------------- several processes
def run_processes(
    fn: Callable[..., None], world: int, tmp_path: Path, *args: Any, backend: str = "gloo"
) -> None:
    """`fn(rank, world, *args)` in `world` processes joined in one process group (file:// rendezvous).

    gloo forks where it can: the children reuse the imported modules (spawn re-imports torch and
    timm, ~30x slower). NCCL spawns, as CUDA does not survive a fork; there `fn` must be importable.
    """
    method = "fork" if backend == "gloo" and "fork" in mp.get_all_start_methods() else "spawn"
    init = str(tmp_path / f"init-{backend}")
    mp.start_processes(
        _in_group, args=(world, backend, init, fn, args), nprocs=world, join=True, start_method=method
    )


def _in_group(rank: int, world: int, backend: str, init: str, fn: Callable[..., None], args: tuple) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- synthetic features
def clusters(
    n_per_class: int, n_classes: int, dim: int, spread: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around centres ~10 apart: (n_classes * n_per_class, dim) features and labels.

    The centres depend on `seed` only, so two calls with one seed give train and test sets of the
    same classes.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 10
    y = np.repeat(np.arange(n_classes), n_per_class)
    return centres[y] + rng.normal(size=(len(y), dim)) * spread, y


# ---------------------------------------------------------------- image folders
def write_images(folder: Path, n: int, start: int = 0, value: int | None = None, size: int = 16) -> Path:
    """`n` small RGB PNGs `img-<i>.png` in `folder` (created): noise, around `value` where given."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        pixels = (
            rng.integers(0, 256, (size, size, 3))
            if value is None
            else value + rng.integers(-20, 21, (size, size, 3))
        )
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img-{i:04d}.png")
    return folder


# ---------------------------------------------------------------- run directories
def records(run: Path) -> list[dict[str, Any]]:
    """Every line of the run's metrics.jsonl (strict: a line that is not JSON fails the test)."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def make_run(run_dir: Path, teacher: bool = False, evals: bool = True) -> Path:
    """A run directory as `pretrain` leaves it, without training: recipe, one checkpoint, summary, evals.

    With `teacher`, the checkpoint also holds `teacher_backbone.vit.*` (the EMA-teacher convention)
    with weights other than the student's.
    """
    recipe = load_recipe("digits/supervised", TINY)
    torch.manual_seed(0)
    objective = objectives.build(recipe.objective, Backbone.from_config(recipe.model), num_classes=10)
    if teacher:
        torch.manual_seed(1)
        objective.teacher_backbone = Backbone.from_config(recipe.model)
    run_dir.mkdir(parents=True)
    save_recipe(recipe, run_dir / "recipe.yaml")
    write_checkpoint(run_dir / "checkpoints", 7, objective.state_dict(), {}, {"epoch": 1})
    summary = {"objective": "supervised", "steps": 7, "images_seen": 224, "pretrain_seconds": 3725.0}
    (run_dir / "summary.json").write_text(json.dumps({**summary, "final_loss": 1.25}))
    if evals:
        (run_dir / "eval").mkdir()
        (run_dir / "eval" / "linear_probe.json").write_text(json.dumps({"top1": 0.8765, "n_test": 540}))
        knn = {"k": {"10": {"top1": 0.6543}, "20": {"top1": 0.5432}}, "draws": [0.25, 0.5]}
        (run_dir / "eval" / "knn.json").write_text(json.dumps(knn))
    return run_dir


def train_history(objective: Objective, batch: Batch, steps: int, lr: float = 3e-3) -> dict[str, list[float]]:
    """Train on one fixed batch as the engine does (schedules, hooks, EMA): the loss and every logged
    value after each of `steps` steps."""
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    history: dict[str, list[float]] = {}
    for step in range(steps):
        objective.set_progress(step, steps, steps)
        loss, logs = objective(batch)
        opt.zero_grad()
        loss.backward()
        objective.after_backward()
        opt.step()
        if objective.ema_pairs():
            ema_update(objective.ema_pairs(), objective.ema_momentum(step, steps))
        objective.after_optimizer_step()
        for key, value in {"loss": loss, **logs}.items():
            history.setdefault(key, []).append(float(value.detach()))
    return history


def train_steps(
    objective: Objective, batch: Batch, steps: int, lr: float = 3e-3, track: str | None = None
) -> list[float]:
    """The loss after each of `steps` steps (or the log named `track`)."""
    return train_history(objective, batch, steps, lr)[track or "loss"]


def run_backbone(run_dir: Path, weights: str = "student") -> Backbone:
    """The run's student or teacher, read from its checkpoint independently of `ssl-vit export`."""
    state = load_file(str(next((run_dir / "checkpoints").iterdir()) / "model.safetensors"))
    prefix = {"student": "backbone.vit.", "teacher": "teacher_backbone.vit."}[weights]
    backbone = Backbone.from_config(tiny_model_config()).eval()
    backbone.vit.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return backbone


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of `run` at `dest`, for tests that write into a run (evaluators write RUN/eval/*.json).

    The copy's `backbone/` export still records the original's path as its run directory.
    """
    shutil.copytree(run, dest)
    return dest


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@contextmanager
def _kept_unchanged(run: Path) -> Iterator[Path]:
    """Yield `run`; at the end, fail if any test added, removed or rewrote a file in it."""
    before = _listing(run)
    yield run
    assert _listing(run) == before, f"a test wrote into the shared run {run}; give it copy_run(...)"


@pytest.fixture(scope="session")
def shared_supervised_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A finished supervised digits run named `sup`: TINY model, 3 steps of 32 images, `--quiet`.

    Made once per session for the modules that need a trained run (cli, api, eval_cli, figures).
    Only read it; a test that writes into it takes `copy_run` of it.
    """
    out = tmp_path_factory.mktemp("shared") / "sup"
    argv = ["pretrain", "digits/supervised", *TINY, "train.max_steps=3", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    with _kept_unchanged(out) as run:
        yield run


@pytest.fixture(scope="session")
def shared_untrained_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`make_run(..., evals=False)`, made once per session for the tests that export or load it."""
    with _kept_unchanged(make_run(tmp_path_factory.mktemp("shared") / "untrained", evals=False)) as run:
        yield run
