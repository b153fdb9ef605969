from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ssl_vit.backbone import Backbone
from ssl_vit.export import export_backbone, load_backbone

PLAIN_TIMM = """
import sys, json, numpy as np, timm, torch
assert "ssl_vit" not in sys.modules
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
cfg = model.pretrained_cfg
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], model.forward_features(x).numpy())
print(json.dumps({"mean": list(cfg["mean"]), "std": list(cfg["std"]), "input_size": list(cfg["input_size"]),
                  "heads": [k for k in model.state_dict() if k.startswith("head.")]}))
assert "ssl_vit" not in sys.modules
"""


def test_export_loads_in_plain_timm_with_equal_features(tiny_backbone: Backbone, tmp_path: Path) -> None:
    tiny_backbone.eval()
    out = export_backbone(
        tiny_backbone, tmp_path / "export", mean=[0.25], std=[0.5], extra={"objective": "test"}
    )
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    x = torch.randn(3, 1, 16, 16)
    np.save(tmp_path / "x.npy", x.numpy())
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_TIMM, str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,  # not the repo root, so ssl_vit cannot be imported by accident
    )
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"mean": [0.25], "std": [0.5], "input_size": [1, 16, 16], "heads": []}
    with torch.no_grad():
        expected = tiny_backbone.forward_features(x).numpy()
    assert np.abs(np.load(tmp_path / "y.npy") - expected).max() <= 1e-5


def test_load_backbone_round_trip(tiny_backbone: Backbone, tmp_path: Path) -> None:
    export_backbone(tiny_backbone, tmp_path / "e", mean=[0.5], std=[0.5])
    loaded, cfg = load_backbone(tmp_path / "e")
    x = torch.randn(2, 1, 16, 16)
    tiny_backbone.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), tiny_backbone(x), rtol=0, atol=1e-6)
    assert cfg["tag"] == "ssl_vit"
