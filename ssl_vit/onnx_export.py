"""Export a backbone's feature extractor to ONNX, for deployment without PyTorch.

The graph maps normalised images `images` (B, C, H, W) at the recipe's size to pooled features
`features` (B, D): timm's own pooling, the CLS token or the mean of patch tokens per
`model.global_pool`, which is what the linear probe and k-NN evaluate. The batch axis is dynamic. The
model is exported with torch's dynamo-based exporter (`torch.onnx.export(dynamo=True)`, the exporter
torch maintains; the TorchScript one is deprecated), then checked: onnxruntime on a batch of another
size than the traced one must match PyTorch. Input size, mean and std go into the model's metadata so
a consumer can rebuild the preprocessing.

Needs the optional extra: `pip install 'ssl-vit[onnx]'` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssl_vit.backbone import Backbone
from ssl_vit.errors import SslVitError

EXTRA_MODULES = ("onnx", "onnxscript", "onnxruntime")
TOLERANCE = 1e-4


class MissingExtraError(SslVitError):
    """An optional dependency group is not installed."""


@dataclass
class OnnxExport:
    path: Path
    max_abs_diff: float  # onnxruntime vs PyTorch on the check batch
    check_batch: int


def require_onnx() -> dict[str, Any]:
    """Import the extra's modules, or fail with one line naming the install command."""
    found: dict[str, Any] = {}
    for name in EXTRA_MODULES:
        try:
            found[name] = importlib.import_module(name)
        except ImportError:
            raise MissingExtraError(
                f"ONNX export needs the onnx extra ({name} is not installed): pip install 'ssl-vit[onnx]'"
            ) from None
    return found


def export_onnx(
    backbone: Backbone,
    out: Path,
    mean: Sequence[float],
    std: Sequence[float],
    trace_batch: int = 2,
    check_batch: int = 3,
) -> OnnxExport:
    """Write `out` (a .onnx file) and verify it with onnxruntime on a batch of `check_batch` images."""
    mods = require_onnx()
    height, width = (g * backbone.patch_size for g in backbone.grid_size)
    was_training = backbone.training
    backbone.eval()
    example = torch.randn(trace_batch, backbone.in_chans, height, width)
    batch = torch.export.Dim("batch", min=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(
        backbone,
        (example,),
        input_names=["images"],
        output_names=["features"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        verbose=False,
    )
    assert program is not None
    meta = {
        "producer": "ssl-vit",
        "input_size": json.dumps([backbone.in_chans, height, width]),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "features": f"pooled ({backbone.global_pool or 'token'}), width {backbone.embed_dim}",
    }
    program.model.metadata_props.update(meta)
    program.save(str(out))  # weights go to an external-data file only past protobuf's 2 GB limit

    check = torch.randn(check_batch, backbone.in_chans, height, width)
    session = mods["onnxruntime"].InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(["features"], {"images": check.numpy()})  # (check_batch, D)
    with torch.no_grad():
        expected = backbone(check).numpy()  # (check_batch, D)
    backbone.train(was_training)
    diff = float(abs(got - expected).max())
    return OnnxExport(out, diff, check_batch)
