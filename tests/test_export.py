from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_vit.backbone import Backbone
from ssl_vit.errors import CheckpointError
from ssl_vit.timm_export import backbone_state, export_backbone, load_backbone
from tests.conftest import make_run, registered_objective, run_backbone, tiny_model_config

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


def test_export_loads_in_plain_timm_with_equal_features(shared_untrained_run: Path, tmp_path: Path) -> None:
    """`ssl-vit export` output, model card included, loads in a process that never imports ssl_vit."""
    from ssl_vit.api import export

    out = export(shared_untrained_run, tmp_path / "export")
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
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
    assert info == {"mean": [0.5], "std": [0.5], "input_size": [1, 16, 16], "heads": []}
    with torch.no_grad():
        expected = run_backbone(shared_untrained_run).forward_features(x).numpy()
    assert np.abs(np.load(tmp_path / "y.npy") - expected).max() <= 1e-5


def test_load_backbone_round_trip(tiny_backbone: Backbone, tmp_path: Path) -> None:
    export_backbone(tiny_backbone, tmp_path / "e", mean=[0.5], std=[0.5])
    loaded, cfg = load_backbone(tmp_path / "e")
    x = torch.randn(2, 1, 16, 16)
    tiny_backbone.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), tiny_backbone(x), rtol=0, atol=1e-6)
    assert cfg["tag"] == "ssl_vit"


# ------------------------------------------------------------ run directories, cards, student/teacher
def _features(folder: Path, x: torch.Tensor) -> torch.Tensor:
    backbone, _ = load_backbone(folder)
    with torch.no_grad():
        return backbone.eval().forward_features(x)


def test_cli_export_writes_a_model_card_listing_the_runs_results(tmp_path: Path) -> None:
    import yaml

    from ssl_vit.cli import main

    run = make_run(tmp_path / "run")
    assert main(["export", str(run), "--out", str(tmp_path / "exp"), "--license", "mit"]) == 0
    card = (tmp_path / "exp" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "timm" and meta["license"] == "mit"
    assert {"timm", "ssl-vit", "supervised", "image-feature-extraction"} <= set(meta["tags"])
    for text in ("### linear_probe", "| top1 | 0.8765 |", "| n_test | 540 |", "### knn"):
        assert text in body, text
    assert "| k.10.top1 | 0.6543 |" in body and "| k.20.top1 | 0.5432 |" in body and "[0.25, 0.5]" in body
    assert "| images seen | 224 |" in body and "| pretraining time | 1 h 02 min |" in body
    assert "`vit_tiny_patch16_224`" in body and "| embed dim | 32 |" in body and "label_smoothing=0.1" in body
    assert "No `manifest.json`" in body  # digits has none; counts appear when shards bring one


def test_card_lists_manifest_counts_and_says_when_there_are_no_results(tmp_path: Path) -> None:
    import yaml

    from ssl_vit.model_card import render_card

    run = make_run(tmp_path / "run", evals=False)
    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = {"num_samples": 1234, "num_shards": 3, "splits": {"train": 1000, "val": 234}}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["data"]["train"] = str(shards / "train-{000000..000002}.tar")
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    export_backbone(Backbone.from_config(tiny_model_config()), tmp_path / "exp", [0.5], [0.5])
    card = render_card(tmp_path / "exp", run)
    for row in ("| num_samples | 1,234 |", "| num_shards | 3 |", "| splits.train | 1,000 |"):
        assert row in card, row
    assert "No evaluation results yet" in card


@pytest.mark.parametrize("teacher_at", ["teacher_backbone.vit.", "teacher.backbone.vit."])
def test_backbone_state_picks_student_or_teacher_by_prefix(teacher_at: str) -> None:
    student = {
        "backbone.vit.pos_embed": torch.zeros(1),
        "backbone.vit.patch_embed.proj.weight": torch.zeros(1),
    }
    teacher = {k.replace("backbone.vit.", teacher_at): torch.ones(1) for k in student}
    state = {**student, **teacher, "head.weight": torch.ones(1)}
    assert all(v.item() == 0 for v in backbone_state(state, "student").values())
    picked = backbone_state(state, "teacher")
    assert set(picked) == {"pos_embed", "patch_embed.proj.weight"} and all(
        v.item() == 1 for v in picked.values()
    )
    with pytest.raises(CheckpointError, match="no teacher backbone"):
        backbone_state(student, "teacher")


def test_export_weights_student_teacher_and_objective_default(tmp_path: Path) -> None:
    from ssl_vit.api import export
    from ssl_vit.objectives.supervised import Supervised

    run = make_run(tmp_path / "run", teacher=True)
    x = torch.randn(2, 1, 16, 16)
    ref = {}
    for weights in ("student", "teacher"):
        with torch.no_grad():
            ref[weights] = run_backbone(run, weights).forward_features(x)
        folder = export(run, tmp_path / weights, weights=weights)
        torch.testing.assert_close(_features(folder, x), ref[weights], rtol=0, atol=1e-6)
        assert f"| exported weights | {weights} |" in (folder / "README.md").read_text()
    assert not torch.allclose(ref["student"], ref["teacher"])
    torch.testing.assert_close(
        _features(export(run, tmp_path / "default"), x), ref["student"], rtol=0, atol=1e-6
    )

    class WithTeacher(Supervised):  # what DINO declares: its paper evaluates the EMA teacher
        export_weights = "teacher"

    with registered_objective("supervised", WithTeacher):
        folder = export(run, tmp_path / "dino_like")
    torch.testing.assert_close(_features(folder, x), ref["teacher"], rtol=0, atol=1e-6)
    assert json.loads((folder / "config.json").read_text())["ssl_vit"]["weights"] == "teacher"
