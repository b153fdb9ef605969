"""The run directory: its layout, and the readers every other module uses instead of file names.

    RUN/
      recipe.yaml            the resolved recipe the run trained with (`RunDir.recipe`)
      checkpoints/step-N/    checkpoints; one is valid once its meta.json lists every file at its size
      metrics.jsonl          one JSON object per logged step (`RunDir.metrics`)
      train_state.json       the engine's plan, history and per-process weights digests
      samples/rank-R.txt     with `log.sample_keys`: `step<TAB>epoch<TAB>key` per sample process R consumed
      summary.json           written when a (re)start ends (`RunDir.summary`)
      backbone/              the export plain timm loads
      eval/<name>.json       evaluator results (`RunDir.eval_result`)
      figures/               `ssl-vit show` output

A leaf module: it reads files and imports nothing of ssl-vit but `config` and `errors`, so the
evaluators, figures and model card can read runs without the engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_vit.errors import CheckpointError

if TYPE_CHECKING:
    from torch import nn

    from ssl_vit.config import Recipe

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TRAIN_STATE_FILE = "train_state.json"
SUMMARY_FILE = "summary.json"
BACKBONE_DIR = "backbone"
EVAL_DIR = "eval"
FIGURES_DIR = "figures"
SAMPLES_DIR = "samples"
# What a fresh start drops.
ENGINE_FILES = (CHECKPOINTS_DIR, METRICS_FILE, SUMMARY_FILE, TRAIN_STATE_FILE, SAMPLES_DIR)

CKPT_PREFIX = "step-"
CKPT_TMP_PREFIX = ".tmp-"
CKPT_MODEL_FILE = "model.safetensors"
CKPT_META_FILE = "meta.json"


@dataclass(frozen=True)
class RunDir:
    """A run directory (which need not exist yet): where each file lives and how to read it."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def train_state_file(self) -> Path:
        return self.path / TRAIN_STATE_FILE

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def backbone(self) -> Path:
        return self.path / BACKBONE_DIR

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_DIR

    @property
    def figures(self) -> Path:
        return self.path / FIGURES_DIR

    @property
    def samples(self) -> Path:
        return self.path / SAMPLES_DIR

    def sample_file(self, rank: int) -> Path:
        """Process `rank`'s keys of the samples it consumed (`log.sample_keys`)."""
        return self.samples / f"rank-{rank}.txt"

    def sample_files(self) -> list[Path]:
        """Every process's sample file, in rank order (ranks of earlier process counts included)."""
        if not self.samples.is_dir():
            return []
        found = [p for p in self.samples.glob("rank-*.txt") if p.stem[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.stem[5:]))

    def exists(self) -> bool:
        """A run directory is a folder with its `recipe.yaml`."""
        return self.recipe_file.is_file()

    def require(self) -> RunDir:
        """Self, or a one-line CheckpointError when `path` is not a run directory."""
        if not self.exists():
            raise CheckpointError(f"{self.path} is not a run directory (no {RECIPE_FILE})")
        return self

    def recipe(self) -> Recipe:
        """The typed recipe the run trained with."""
        from ssl_vit.config import load_recipe

        return load_recipe(self.require().recipe_file)

    def summary(self) -> dict[str, Any] | None:
        """`summary.json`, or None while the run is unfinished (or the file is unreadable)."""
        return _read_json_object(self.summary_file)

    def metrics(self) -> list[dict[str, float]]:
        return read_metrics(self.metrics_file)

    def eval_result(self, name: str) -> Path:
        """Where an evaluator writes its result, e.g. `eval/linear_probe.json`."""
        return self.eval_dir / f"{name}.json"

    def eval_results(self) -> list[Path]:
        return sorted(self.eval_dir.glob("*.json")) if self.eval_dir.is_dir() else []

    def list_checkpoints(self) -> list[Path]:
        return list_checkpoints(self.checkpoints)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoints)

    def clear_engine_files(self) -> list[str]:
        """Remove what a previous run's engine wrote (a fresh start in a used folder); the names removed."""
        removed = []
        for name in ENGINE_FILES:
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            removed.append(name)
        return removed


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The records of a `metrics.jsonl`; a half-written last line (a run still writing) is ignored."""
    records: list[dict[str, float]] = []
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def read_sample_keys(path: Path) -> list[tuple[int, int, str]]:
    """(step, epoch, key) per line of a `samples/rank-R.txt` file."""
    rows = []
    for line in path.read_text().splitlines():
        step, epoch, key = line.split("\t", 2)
        rows.append((int(step), int(epoch), key))
    return rows


def _read_json_object(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_checkpoint_meta(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's `meta.json` (written last: its files and sizes, the step, the engine's state)."""
    try:
        meta = json.loads((ckpt / CKPT_META_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{ckpt}: unreadable {CKPT_META_FILE} ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{ckpt}: {CKPT_META_FILE} is not a JSON object")
    return meta


def is_complete(ckpt: Path) -> bool:
    """Every file that `meta.json` lists is there with its recorded size."""
    try:
        meta = read_checkpoint_meta(ckpt)
        return all((ckpt / name).stat().st_size == size for name, size in meta["files"].items())
    except (CheckpointError, OSError, KeyError, AttributeError):
        return False


def checkpoint_step(path: Path) -> int:
    """The step in a `step-XXXXXXXX` folder name; -1 for any other name."""
    if not path.name.startswith(CKPT_PREFIX):
        return -1
    try:
        return int(path.name[len(CKPT_PREFIX) :])
    except ValueError:
        return -1


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Valid checkpoints under `ckpt_dir`, oldest first; temporary and damaged folders are left out."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob(f"{CKPT_PREFIX}*") if p.is_dir() and checkpoint_step(p) >= 0]
    valid = []
    for path in sorted(found, key=checkpoint_step):
        if is_complete(path):
            valid.append(path)
        else:
            log.warning("ignoring incomplete checkpoint %s", path)
    return valid


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest valid checkpoint under `ckpt_dir`, or None."""
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1] if ckpts else None


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict: every tensor's name, dtype, shape and bytes.

    The one digest of weights: the engine records it per process to show they agree, the feature
    cache keys on it.
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()
