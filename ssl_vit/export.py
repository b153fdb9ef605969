"""Export a backbone as a folder that plain timm loads, and load backbones back.

The folder holds `config.json` (architecture, `model_args`, `pretrained_cfg` with input size, mean
and std) and `model.safetensors`, written by timm's own `save_for_hf`, so that

    timm.create_model("local-dir:DIR", pretrained=True)

gives the same features without ssl-vit installed. No objective heads, decoder or teacher go in.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
from timm.models import save_for_hf

from ssl_vit.backbone import Backbone
from ssl_vit.errors import CheckpointError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


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
