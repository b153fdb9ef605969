"""Start a backbone from existing weights: official MAE, DINO and MoCo v3 checkpoints, timm or ssl-vit.

    report = load_into_backbone(backbone, Path("mae_pretrain_vit_base.pth"))

`model.init_from: PATH` in a recipe does this right after the backbone is built, for pretraining and
fine-tuning alike (`backbone_from_config`). PATH is a timm-loadable folder (`config.json` +
`model.safetensors` or `pytorch_model.bin`, e.g. an `ssl-vit export`), a run directory (its
`backbone/` export), a `.safetensors` file, or a torch file (`.pth`, `.pt`, `.pth.tar`, `.bin`).

Torch files are read with `torch.load(weights_only=True)`: tensors, plain containers and numbers only,
so a checkpoint that carries other pickled objects is refused before any of its code can run. The one
extra class allowed is `argparse.Namespace`, which the official MAE and DINO training scripts store as
`args`; it is rebuilt as plain attributes, nothing is called.

Layouts recognised (the part kept is the backbone; heads, decoders and momentum encoders are ignored):
  - official MAE (He et al. 2021, `main_pretrain.py`): `{"model": {...}}`, decoder keys alongside;
  - official DINO (Caron et al. 2021): full checkpoints `{"student": ..., "teacher": ...}` with
    `module.backbone.` / `backbone.` prefixes; the teacher is taken, as DINO's `eval_linear.py` does;
  - official MoCo v3 (Chen et al. 2021): `{"state_dict": ...}` with `module.base_encoder.`; the base
    (online) encoder is taken and its `head.` projector dropped, as MoCo v3's `main_lincls.py` does;
  - plain timm state dicts, and ssl-vit checkpoints (`backbone.vit.`).
`Backbone.load_timm_weights` copies the weights in: absolute position embeddings are resampled to the
recipe's grid, the patch embedding to the recipe's channel count (a sum over RGB for one channel) and
patch size (FlexiViT's pseudo-inverse resize). Any other shape mismatch is a one-line `CheckpointError`
naming the key.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from ssl_vit.backbone import Backbone
from ssl_vit.config import ModelConfig
from ssl_vit.errors import CheckpointError

log = logging.getLogger(__name__)

# Where the backbone sits in a checkpoint; on a tie in matched keys, the earlier prefix wins, so MoCo
# v3's base encoder beats its momentum encoder and an ssl-vit student beats `teacher_backbone.vit.`.
PREFIXES = (
    "",
    "module.",
    "backbone.",
    "module.backbone.",
    "base_encoder.",
    "module.base_encoder.",
    "backbone.vit.",
    "vit.",
    "model.",
    "encoder.",
    "module.encoder.",
)
# Top-level keys that hold the weights, in the order tried: DINO's teacher first (what DINO evaluates).
WRAPPERS = {"teacher": "DINO", "student": "DINO", "model": "MAE", "state_dict": "", "module": ""}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


@dataclass
class LoadReport:
    """What `load_into_backbone` did, for the log block and for tests."""

    source: str
    layout: str
    prefix: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # backbone tensors left at their initial values
    ignored: list[str] = field(default_factory=list)  # checkpoint tensors that are not the backbone's
    adapted: list[str] = field(default_factory=list)  # one line per resized or converted tensor

    def format(self) -> str:
        """One readable block: what was loaded, adapted, left at init and ignored."""
        lines = [
            f"init_from {self.source}: {self.layout} layout, prefix '{self.prefix}': "
            f"loaded {len(self.loaded)} of {len(self.loaded) + len(self.missing)} backbone tensors"
        ]
        lines += [f"  adapted: {note}" for note in self.adapted]
        if self.missing:
            lines.append(f"  missing (kept at init): {_summarise(self.missing)}")
        if self.ignored:
            lines.append(f"  ignored (not backbone): {_summarise(self.ignored)}")
        return "\n".join(lines)


def _summarise(keys: list[str], limit: int = 8) -> str:
    """`decoder_embed.* (2)`, `blocks.11.* (12)`: groups by module, so thousands of keys fit on a line."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        depth = 2 if len(parts) > 2 and (parts[0] == "module" or parts[1].isdigit()) else 1  # blocks.3
        group = ".".join(parts[:depth])
        groups.setdefault(group, []).append(key)
    parts = [f"{name}.* ({len(ks)})" if len(ks) > 1 else ks[0] for name, ks in groups.items()]
    more = f", ... {len(parts) - limit} more groups" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def read_checkpoint(path: Path) -> Any:
    """The raw object stored at `path` (see the module docstring for what PATH may be)."""
    if not path.exists():
        raise CheckpointError(f"init_from {path} does not exist")
    if path.is_dir():
        for folder in (path, path / "backbone"):
            for name in WEIGHT_FILES:
                if (folder / name).is_file():
                    return read_checkpoint(folder / name)
        raise CheckpointError(f"init_from {path}: folder holds no {' or '.join(WEIGHT_FILES)}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"init_from {path}: not a readable safetensors file ({err})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found is None:  # not a pickle the safe unpickler can read: corrupt, or not a checkpoint
            reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
            detail = reason.group(1) if reason else str(err).splitlines()[0]
            raise CheckpointError(f"init_from {path}: not a readable torch checkpoint ({detail})") from None
        raise CheckpointError(
            f"init_from {path}: refused, the file holds pickled objects other than tensors "
            f"({found.group(1)}); re-save only its state dict, or convert it to .safetensors, "
            "where you trust the source"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"init_from {path}: not a readable torch checkpoint ({str(err).splitlines()[0]})"
        ) from None


def unwrap(obj: Any, checkpoint_key: str | None = None) -> tuple[dict[str, Tensor], str]:
    """The tensor dict that holds the weights, and the name of the layout it came in."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    keys = [checkpoint_key] if checkpoint_key else [k for k in WRAPPERS if isinstance(obj.get(k), dict)]
    if checkpoint_key and not isinstance(obj.get(checkpoint_key), dict):
        top = ", ".join(sorted(str(k) for k in obj)[:8])
        raise CheckpointError(f"checkpoint has no '{checkpoint_key}' entry (top-level keys: {top})")
    if keys:
        inner, layout = obj[keys[0]], f"{WRAPPERS.get(keys[0], '')} ['{keys[0]}']".lstrip()
    else:
        inner, layout = obj, "state dict"
    tensors = {k: v for k, v in inner.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint entry for the {layout} layout holds no tensors")
    return tensors, layout


def find_prefix(state: dict[str, Tensor], target: set[str]) -> str:
    """The key prefix under which `state` holds the most of `target` (earlier `PREFIXES` win ties)."""
    scores = {p: sum(f"{p}{t}" in state for t in target) for p in PREFIXES}
    best = max(PREFIXES, key=lambda p: (scores[p], -PREFIXES.index(p)))
    if scores[best]:
        return best
    # Unknown wrapper (e.g. `visual.trunk.`): the most common prefix in front of a backbone key.
    found = Counter(k[: -len(t)] for k in state for t in target if k.endswith(f".{t}"))
    return found.most_common(1)[0][0] if found else ""


def load_into_backbone(backbone: Backbone, path: Path, checkpoint_key: str | None = None) -> LoadReport:
    """Copy the backbone weights found at `path` into `backbone` in place; log and return a report.

    checkpoint_key: the top-level entry to read (e.g. `student` for a DINO checkpoint); by default
        the first of `teacher`, `student`, `model`, `state_dict`, `module` present, else the top level.
    Raises `CheckpointError` (one line) when nothing matches, a file is unsafe or unreadable, or a shape
    cannot be adapted.
    """
    raw, layout = unwrap(read_checkpoint(path), checkpoint_key)
    own = backbone.vit.state_dict()
    prefix = find_prefix(raw, set(own))
    state = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix) and k[len(prefix) :] in own}
    if "base_encoder." in prefix:
        layout = f"MoCo v3 {layout}"
    report = LoadReport(str(path), layout, prefix, ignored=sorted(set(raw) - {prefix + k for k in state}))
    if not state:
        raise CheckpointError(
            f"init_from {path}: none of its {len(raw)} tensors are ViT backbone weights "
            f"(first keys: {', '.join(list(raw)[:3])})"
        )
    try:
        done = backbone.load_timm_weights(state)
    except CheckpointError as err:
        raise CheckpointError(f"init_from {path}: {err}") from None
    report.loaded, report.missing, report.adapted = done.loaded, done.missing, done.adapted
    log.log(logging.WARNING if report.missing else logging.INFO, report.format())
    return report


def backbone_from_config(cfg: ModelConfig) -> Backbone:
    """`Backbone.from_config`, then `model.init_from` when the recipe sets it."""
    backbone = Backbone.from_config(cfg)
    if cfg.init_from:
        load_into_backbone(backbone, Path(cfg.init_from).expanduser())
    return backbone
