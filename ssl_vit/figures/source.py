"""What a figure can be drawn from: a run directory (finished or not) or an export folder.

A run directory gives its metrics, and, once it has a checkpoint, the objective rebuilt from
`recipe.yaml` with the checkpoint's weights (its backbone serves the attention and embedding maps).
A run without a checkpoint falls back on its `backbone/` export; an export folder gives the
backbone only. Whatever is missing is recorded with the reason, so `show` draws what it can.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ssl_vit import objectives
from ssl_vit.backbone import Backbone
from ssl_vit.data import class_names, load_images
from ssl_vit.errors import CheckpointError, MissingSplit, SslVitError
from ssl_vit.eval.features import EvalModel, load_eval_model, normalise
from ssl_vit.rundir import CKPT_MODEL_FILE, RunDir
from ssl_vit.timm_export import is_timm_folder, read_export_config


@dataclass
class Source:
    """One input of `show`: `model` and `objective` are None where `missing` says why."""

    path: Path
    name: str
    metrics: list[dict[str, float]]
    model: EvalModel | None = None
    objective: nn.Module | None = None
    missing: dict[str, str] = field(default_factory=dict)  # "model" / "objective" -> reason


def load_objective(run_dir: Path, ckpt: Path) -> tuple[nn.Module, Any]:
    """Rebuild the run's objective from its recipe and load the checkpoint's weights (strictly)."""
    recipe = RunDir(run_dir).recipe()
    torch.manual_seed(recipe.seed)
    backbone = Backbone.from_config(recipe.model)
    classes, mean, std = len(class_names(recipe.data.train)), recipe.data.mean, recipe.data.std
    objective = objectives.build(
        recipe.objective, backbone, num_classes=classes, pixel_mean=mean, pixel_std=std
    )
    try:
        objective.load_state_dict(load_file(str(ckpt / CKPT_MODEL_FILE)))
    except (RuntimeError, OSError) as err:
        raise CheckpointError(f"{ckpt}: weights do not fit the recipe: {str(err).splitlines()[0]}") from None
    return objective.eval(), recipe


def open_source(path: Path, name: str, with_model: bool = True) -> Source:
    """Read what `path` offers; raises only when it is neither a run directory nor an export folder."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    run = RunDir(path)
    source = Source(path, name, run.metrics())
    is_run = run.exists()
    if not is_run and not is_timm_folder(path):
        raise CheckpointError(f"{path} is neither a run directory (recipe.yaml) nor an export folder")
    if not with_model:
        return source
    if not is_run:
        data = read_export_config(path).get("ssl_vit", {}).get("data")
        source.model = load_eval_model(path, data)
        source.missing["objective"] = "an export folder holds the backbone only, no objective"
        return source
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        source.missing["objective"] = "the run has no checkpoint yet"
    else:
        try:
            objective, recipe = load_objective(path, ckpt)
            source.objective = objective
            backbone = objective.backbone
            assert isinstance(backbone, Backbone)
            source.model = EvalModel(
                backbone,
                recipe.model.img_size,
                backbone.in_chans,
                recipe.data.mean,
                recipe.data.std,
                recipe.data.train,
            )
        except SslVitError as err:
            source.missing["objective"] = str(err)
    if source.model is None and is_timm_folder(run.backbone):
        source.model = load_eval_model(path)
    if source.model is None:
        source.missing["model"] = source.missing["objective"]
    return source


def pick_images(model: EvalModel, n_images: int) -> tuple[Tensor, Tensor]:
    """A fixed set of test images, normalised (K, C, H, W), and labels (K,): the first of each class.
    Data with no test split (an unlabelled folder) gives its first training images.

    The same images for every run on the same data, so figures compare picture by picture.
    """
    try:
        images, labels = load_images(model.data, "test", model.img_size, model.in_chans)
    except MissingSplit:
        images, labels = load_images(model.data, "train", model.img_size, model.in_chans)
    chosen: list[int] = []
    for c in torch.unique(labels).tolist():
        chosen.append(int((labels == c).nonzero()[0, 0]))
    rest = [i for i in range(len(labels)) if i not in chosen]
    idx = torch.tensor((chosen + rest)[:n_images])
    return normalise(images[idx], model.mean, model.std), labels[idx]
