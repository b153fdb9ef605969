"""ssl-vit: self-supervised pretraining of Vision Transformers on one shared timm backbone.

The Python API (`ssl_vit.api`), one function per command:

    import ssl_vit
    run = ssl_vit.pretrain("digits/supervised", ["train.max_steps=5"], out="runs/api-demo")
    print(ssl_vit.probe(run)["top1"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

API = ("compare", "demo", "export", "finetune", "knn", "pretrain", "probe", "shards")

if TYPE_CHECKING:
    from ssl_vit.api import compare, demo, export, finetune, knn, pretrain, probe, shards


def __getattr__(name: str) -> Any:
    """The API on first use: `import ssl_vit` (and `ssl-vit --help`) does not import torch."""
    if name in API:
        from ssl_vit import api

        return getattr(api, name)
    raise AttributeError(f"module 'ssl_vit' has no attribute '{name}'")


__all__ = ["__version__", "compare", "demo", "export", "finetune", "knn", "pretrain", "probe", "shards"]
