"""ONNX export: onnxruntime gives PyTorch's features on a batch size other than the traced one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_vit.backbone import Backbone
from ssl_vit.onnx_export import MissingExtraError, export_onnx, require_onnx
from tests.conftest import run_backbone, tiny_model_config


def test_cli_onnx_round_trip_with_a_dynamic_batch(shared_untrained_run: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip(
        "onnxruntime", reason="the onnx extra is not installed: pip install 'ssl-vit[onnx]'"
    )
    onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install 'ssl-vit[onnx]'")
    from ssl_vit.cli import main

    run = shared_untrained_run
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m" / "model.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "m" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert session.get_inputs()[0].shape[1:] == [1, 16, 16] and isinstance(
        session.get_inputs()[0].shape[0], str
    )
    expected_model = run_backbone(run)
    for batch in (1, 5):  # the export traced a batch of 2
        x = torch.randn(batch, 1, 16, 16)
        (got,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            want = expected_model(x).numpy()  # pooled (B, D): the CLS token after the final norm
        assert got.shape == (batch, 32) and np.abs(got - want).max() <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m" / "model.onnx")).metadata_props}
    assert json.loads(meta["mean"]) == [0.5] and json.loads(meta["input_size"]) == [1, 16, 16]
    assert meta["features"] == "pooled (token), width 32"


def test_missing_extra_is_one_line_naming_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(MissingExtraError) as err:
        require_onnx()
    assert "pip install 'ssl-vit[onnx]'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MissingExtraError):
        export_onnx(Backbone.from_config(tiny_model_config()), Path("never.onnx"), [0.5], [0.5])


def test_cli_missing_extra_exits_2(
    shared_untrained_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ssl_vit.cli import main

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    run = shared_untrained_run
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "model.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pip install 'ssl-vit[onnx]'" in err[0]
    assert not (tmp_path / "model.onnx").exists()
