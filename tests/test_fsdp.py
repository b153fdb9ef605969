"""`train.strategy: fsdp`: accelerate's FSDP2 plugin. accelerate shards on GPUs only, so on the CPU
the choice is a one-line recipe error; the GPU tests run where a CUDA device is present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from ssl_vit.api import export
from ssl_vit.cli import main
from tests.conftest import TINY


def test_fsdp_on_the_cpu_is_a_one_line_recipe_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["digits/supervised", *TINY, "train.cpu=true", "train.strategy=fsdp", "train.max_steps=1"]
    assert main(["pretrain", *args, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.strategy: fsdp needs GPUs" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_strategy_is_a_one_line_recipe_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["digits/supervised", *TINY, "train.strategy=zero3", "train.max_steps=1"]
    assert main(["pretrain", *args, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "train.strategy must be 'ddp' or 'fsdp'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recipe", ["digits/supervised", "digits/dino"])
def test_fsdp_on_cuda_resumes_exactly_and_exports_to_timm(tmp_path: Path, recipe: str) -> None:
    common = [recipe, *TINY, "train.strategy=fsdp", "ckpt.every_steps=2", "eval.online_every_steps=0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["pretrain", *common, "train.max_steps=4", "--out", str(straight), "--quiet"]) == 0
    assert main(["pretrain", *common, "train.max_steps=2", "--out", str(resumed), "--quiet"]) == 0
    assert main(["pretrain", "--resume", str(resumed), "train.max_steps=4", "--quiet"]) == 0
    digests = [
        json.loads((run / "train_state.json").read_text())["weights_sha256"] for run in (straight, resumed)
    ]
    assert digests[0] == digests[1]
    state = json.loads((straight / "train_state.json").read_text())
    assert state["distributed_type"] == "FSDP"
    folder = export(straight, tmp_path / "export")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert model(torch.rand(2, 1, 16, 16)).isfinite().all()
