"""Shared fixtures: tiny ViTs (width 32, depth 2) so the suite stays fast on two CPU cores."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from ssl_vit.backbone import Backbone
from ssl_vit.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
# Built-in sets are written to shards once; keep the tests' copy out of the user's cache.
os.environ.setdefault("SSL_VIT_CACHE", str(Path(tempfile.gettempdir()) / "ssl_vit_test_cache"))
# One intra-op thread: on a small shared machine, two OpenMP threads make tiny ops ~30x slower, and
# in-process runs then compute like the OMP_NUM_THREADS=1 subprocesses the tests start.
torch.set_num_threads(1)
TINY = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "train.batch_size=32",
    "log.every_steps=1",
]


def tiny_model_config(**overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def tiny_backbone() -> Backbone:
    torch.manual_seed(0)
    return Backbone.from_config(tiny_model_config())


@pytest.fixture(autouse=True)
def _single_thread_determinism() -> None:
    torch.manual_seed(0)
