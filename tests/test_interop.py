"""Starting from existing checkpoints (`model.init_from`) and evaluating timm folders that are not ours."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from timm.models import save_for_hf

from ssl_vit.backbone import Backbone
from ssl_vit.config import ModelConfig
from ssl_vit.errors import CheckpointError
from ssl_vit.pretrained import backbone_from_config, load_into_backbone
from tests.conftest import run_backbone, tiny_model_config

ARCH = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


def source_vit(img_size: int = 32, seed: int = 0, **kw: Any) -> torch.nn.Module:
    """A timm ViT like the ones official checkpoints were trained with (3 channels, no classifier)."""
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=img_size, num_classes=0, **{**ARCH, **kw}
    ).eval()


def target(img_size: int = 32, in_chans: int = 3, **kw: Any) -> Backbone:
    torch.manual_seed(123)  # weights unlike the source's, so a key that is not loaded shows up
    return Backbone.from_config(ModelConfig(img_size=img_size, in_chans=in_chans, **{**ARCH, **kw})).eval()


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items()}


def official_layout(layout: str, vit: torch.nn.Module, other: torch.nn.Module) -> dict[str, Any]:
    """Key layouts of the official releases; `other` stands for the weights that must NOT be loaded."""
    sd, od = vit.state_dict(), other.state_dict()
    args = argparse.Namespace(arch="vit_small", lr=1.5e-4)  # the training scripts save their args
    if layout == "mae":  # main_pretrain.py: {"model": encoder + decoder, "optimizer", "epoch", "args"}
        decoder = {"decoder_embed.weight": torch.zeros(16, 32), "decoder_pred.bias": torch.zeros(192)}
        return {"model": {**sd, **decoder, "mask_token": torch.zeros(1, 1, 16)}, "epoch": 799, "args": args}
    if layout == "dino":  # main_dino.py: DDP student, plain teacher, each backbone + DINOHead
        head = {"head.last_layer.weight_g": torch.ones(64, 1), "head.mlp.0.weight": torch.zeros(8, 32)}
        return {
            "student": {**prefixed(od, "module.backbone."), **prefixed(head, "module.")},
            "teacher": {**prefixed(sd, "backbone."), **head},
            "epoch": 100,
            "args": args,
        }
    if layout == "mocov3":  # main_moco.py: base / momentum encoders, projector in their `head`
        projector = {"head.0.weight": torch.zeros(64, 32), "head.1.running_mean": torch.zeros(64)}
        state = {
            **prefixed({**sd, **projector}, "module.base_encoder."),
            **prefixed({**od, **projector}, "module.momentum_encoder."),
            "module.predictor.0.weight": torch.zeros(64, 256),
        }
        return {"state_dict": state, "arch": "vit_small", "epoch": 300}
    assert layout == "timm"
    return dict(sd)


@pytest.mark.parametrize("layout", ["mae", "dino", "mocov3", "timm"])
def test_official_layouts_load_with_no_missing_backbone_keys(layout: str, tmp_path: Path) -> None:
    vit, other = source_vit(seed=0), source_vit(seed=1)
    path = tmp_path / f"{layout}.pth"
    checkpoint = official_layout(layout, vit, other)
    torch.save(checkpoint, path)
    backbone = target()
    report = load_into_backbone(backbone, path)
    assert report.missing == []
    assert len(report.loaded) == len(backbone.vit.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the teacher (DINO) / base encoder (MoCo v3) arrived, nothing else
        torch.testing.assert_close(backbone.forward_features(x), vit.forward_features(x), rtol=0, atol=1e-6)
    ignored = {
        "mae": {"decoder_embed.weight", "decoder_pred.bias", "mask_token"},
        "dino": {"head.last_layer.weight_g", "head.mlp.0.weight"},  # the teacher's DINOHead
        "mocov3": set(checkpoint.get("state_dict", {}))
        - {f"module.base_encoder.{k}" for k in vit.state_dict()},
        "timm": set(),
    }[layout]
    assert set(report.ignored) == ignored
    if layout == "mocov3":
        assert (
            "module.momentum_encoder.pos_embed" in ignored and "module.base_encoder.head.0.weight" in ignored
        )


def test_dino_student_on_request(tmp_path: Path) -> None:
    vit, other = source_vit(seed=0), source_vit(seed=1)
    torch.save(official_layout("dino", vit, other), tmp_path / "dino.pth")
    backbone = target()
    load_into_backbone(backbone, tmp_path / "dino.pth", checkpoint_key="student")
    torch.testing.assert_close(backbone.vit.pos_embed, other.pos_embed)


def test_32_to_48_resamples_the_position_embedding(tmp_path: Path) -> None:
    vit = source_vit(img_size=32)
    save_file(vit.state_dict(), str(tmp_path / "w.safetensors"))
    backbone = target(img_size=48)
    report = load_into_backbone(backbone, tmp_path / "w.safetensors")
    assert report.missing == [] and any("4x4 to a 6x6" in note for note in report.adapted)
    pos = backbone.vit.pos_embed
    assert pos.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(pos[:, :1], vit.pos_embed[:, :1])  # the CLS position is kept as is
    grid = rearrange(vit.pos_embed[:, 1:], "1 (h w) d -> 1 d h w", h=4)  # (1, D, 4, 4)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(pos[:, 1:], rearrange(want, "1 d h w -> 1 (h w) d"))
    assert backbone(torch.randn(2, 3, 48, 48)).shape == (2, 32)


def test_rgb_to_one_channel_sums_the_patch_filters(tmp_path: Path) -> None:
    vit = source_vit()
    torch.save(vit.state_dict(), tmp_path / "w.pth")
    backbone = target(in_chans=1)
    report = load_into_backbone(backbone, tmp_path / "w.pth")
    assert report.missing == [] and any("3 -> 1 channels" in note for note in report.adapted)
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():  # a grey image seen in RGB by the source = the grey image seen by the target
        torch.testing.assert_close(
            backbone.forward_features(grey),
            vit.forward_features(grey.expand(-1, 3, -1, -1)),
            rtol=1e-5,
            atol=1e-5,
        )


def test_unresolvable_shape_is_one_line_naming_the_key(tmp_path: Path) -> None:
    torch.save(source_vit().state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as err:
        load_into_backbone(target(mlp_ratio=2.0), tmp_path / "w.pth")
    assert "'blocks.0.mlp.fc1.weight'" in str(err.value) and "\n" not in str(err.value)


def test_nothing_matching_and_unreadable_files_are_errors(tmp_path: Path) -> None:
    torch.save({"classifier.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="none of its 1 tensors"):
        load_into_backbone(target(), tmp_path / "other.pth")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_into_backbone(target(), tmp_path / "junk.pt")


class _WritesMarker:
    """Unpickling this runs `open(marker, "w")`: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_a_pickle_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    control = tmp_path / "control.pth"
    torch.save({"model": source_vit().state_dict(), "x": _WritesMarker(tmp_path / "control-ran")}, control)
    torch.load(control, weights_only=False)  # proves the payload is live when unpickled blindly
    assert (tmp_path / "control-ran").exists()

    evil = tmp_path / "evil.pth"
    torch.save({"model": source_vit().state_dict(), "x": _WritesMarker(tmp_path / "marker")}, evil)
    with pytest.raises(CheckpointError) as err:
        load_into_backbone(target(), evil)
    assert "refused" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "marker").exists()


def test_recipe_init_from_a_timm_folder_and_the_log_block(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vit = source_vit(depth=1)
    save_for_hf(vit, str(tmp_path / "folder"), safe_serialization=True)
    with caplog.at_level(logging.INFO, logger="ssl_vit"):
        backbone = backbone_from_config(ModelConfig(img_size=32, init_from=str(tmp_path / "folder"), **ARCH))
    record = [r for r in caplog.records if r.name == "ssl_vit.pretrained"]
    assert len(record) == 1 and record[0].levelno == logging.WARNING  # depth 2 from depth 1: blocks missing
    text = record[0].getMessage()
    assert "missing (kept at init): blocks.1.* (" in text and "loaded" in text
    torch.testing.assert_close(backbone.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


def test_cli_init_from_missing_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from ssl_vit.cli import main

    assert main(["pretrain", "digits/supervised", "model.init_from=/no/such.pth", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "init_from /no/such.pth does not exist" in err[0]


def test_probe_loads_a_timm_folder_that_is_not_ours(tmp_path: Path) -> None:
    """A folder from `timm.models.save_for_hf` on a plain timm model: no `ssl_vit` key, a classifier
    head, registers, average pooling, weights in `pytorch_model.bin` (save_for_hf's default)."""
    from ssl_vit.eval.features import extract, load_eval_model

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, num_classes=10, global_pool="avg", reg_tokens=2, **ARCH
    )
    save_for_hf(vit.eval(), str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "pytorch_model.bin").is_file()
    model = load_eval_model(tmp_path / "plain")
    assert (model.img_size, model.in_chans, model.data) == (32, 3, "digits")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = vit.forward_head(vit.forward_features(x), pre_logits=True)
    torch.testing.assert_close(torch.from_numpy(extract(model.backbone, x)), want, rtol=0, atol=1e-6)


def test_init_from_our_own_run_directory(shared_untrained_run: Path) -> None:
    run = shared_untrained_run
    backbone = Backbone.from_config(tiny_model_config())
    load_into_backbone(backbone, next((run / "checkpoints").iterdir()))  # `backbone.vit.` keys
    torch.testing.assert_close(backbone.vit.pos_embed, run_backbone(run).vit.pos_embed)
