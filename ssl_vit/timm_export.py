"""Export a backbone as a folder that plain timm loads, and load backbones back.

The folder holds `config.json` (architecture, `model_args`, `pretrained_cfg` with input size, mean
and std) and `model.safetensors`, written by timm's own `save_for_hf`, so that

    timm.create_model("local-dir:DIR", pretrained=True)

gives the same features without ssl-vit installed. No objective heads, decoder or teacher go in.

Student or teacher: a run's checkpoint holds the whole objective. By convention its online backbone is
the objective's `backbone` attribute (keys `backbone.vit.*`), and an objective with an EMA teacher
(DINO, MoCo v3) names the teacher's `Backbone` `teacher_backbone` (keys `teacher_backbone.vit.*`).
`backbone_state` picks one of the two by that prefix (a teacher stored elsewhere is still found when
exactly one other backbone's path names a teacher, momentum or EMA module). Which one a run exports by default is the
objective's `export_weights` (`Objective.exported_backbone` picks it): "teacher" where the paper
evaluates the teacher (DINO: Caron et al. 2021, sec. 3.1, "the teacher has better performance than
the student"; its `eval_linear.py` defaults to `--checkpoint_key teacher`), "student" otherwise
(MoCo v3's `main_lincls.py` evaluates the base encoder, not the momentum encoder).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
from timm.models import save_for_hf
from torch import Tensor

from ssl_vit.backbone import Backbone
from ssl_vit.errors import CheckpointError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
BACKBONE_PREFIXES = {"student": "backbone.vit.", "teacher": "teacher_backbone.vit."}


def backbone_state(state: dict[str, Tensor], weights: str = "student") -> dict[str, Tensor]:
    """The timm state dict of the student or teacher backbone in an ssl-vit checkpoint's state."""
    if weights not in BACKBONE_PREFIXES:
        raise CheckpointError(f"weights must be one of {', '.join(BACKBONE_PREFIXES)}, not '{weights}'")
    prefix = BACKBONE_PREFIXES[weights]
    if weights == "teacher" and not any(k.startswith(prefix) for k in state):
        prefix = _other_teacher_prefix(state) or prefix
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        hint = "; this objective has no EMA teacher, export the student" if weights == "teacher" else ""
        raise CheckpointError(f"the checkpoint holds no {weights} backbone (no keys '{prefix}*'){hint}")
    return picked


def _other_teacher_prefix(state: dict[str, Tensor]) -> str | None:
    """`P.vit.` for the one backbone at a path P naming a teacher (`teacher.backbone`, `momentum_...`)."""
    anchor = "vit.patch_embed.proj.weight"
    roots = {k[: -len(anchor)] for k in state if k.endswith(anchor)} - {BACKBONE_PREFIXES["student"][:-4]}
    named = [r for r in roots if any(word in r for word in ("teacher", "momentum", "ema"))]
    return f"{named[0]}vit." if len(named) == 1 else None


def export_backbone(
    backbone: Backbone,
    out_dir: Path,
    mean: Sequence[float],
    std: Sequence[float],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the timm folder; `extra` goes into `config.json` under `ssl_vit` (objective, recipe...)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data_config = {
        "input_size": (backbone.in_chans, *[g * backbone.patch_size for g in backbone.grid_size]),
        "mean": tuple(mean),
        "std": tuple(std),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    save_for_hf(backbone.vit, str(out_dir), safe_serialization=True, data_config=data_config)
    cfg_path = out_dir / CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg["pretrained_cfg"]["tag"] = "ssl_vit"  # not the timm default tag: these are our weights
    if extra:
        cfg["ssl_vit"] = extra
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out_dir


def is_timm_folder(path: Path) -> bool:
    return (path / CONFIG).is_file() and any((path / w).is_file() for w in (WEIGHTS, "pytorch_model.bin"))


def resolve_backbone_dir(path: Path) -> Path:
    """A run directory (its `backbone/` export) or a timm-loadable folder."""
    if is_timm_folder(path):
        return path
    if is_timm_folder(path / "backbone"):
        return path / "backbone"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    raise CheckpointError(
        f"{path} is neither a run directory with a finished backbone/ export nor a timm folder "
        "(config.json + model.safetensors); run `ssl-vit export RUN_DIR` first if the run stopped early"
    )


def load_backbone(path: Path) -> tuple[Backbone, dict[str, Any]]:
    """Load a backbone through timm's `local-dir:` source and return it with its `pretrained_cfg`."""
    folder = resolve_backbone_dir(path)
    try:
        vit = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True)
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"{folder}: timm cannot load this folder: {str(err).splitlines()[0]}") from None
    return Backbone(vit), dict(getattr(vit, "pretrained_cfg", {}))


def read_export_config(path: Path) -> dict[str, Any]:
    return json.loads((resolve_backbone_dir(path) / CONFIG).read_text())  # type: ignore[no-any-return]
