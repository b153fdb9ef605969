"""Small value types shared by data, objectives and engine.

They live here, not in `data/` or `objectives/`, so that each side can name them without
importing the other (see the dependency table in STYLE.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class ViewSpec:
    """The views an objective asks the data pipeline for, per image.

    `global_views` crops at the model's image size; `local_views` small crops at `local_size`
    (DINO's multi-crop). `kind` picks the augmentation family: `supervised`, `masked`
    (light crop/flip) or `contrastive` (strong colour and blur).
    """

    kind: str = "supervised"
    global_views: int = 1
    local_views: int = 0
    local_size: int | None = None
    global_scale: tuple[float, float] = (0.35, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.35)


@dataclass
class Batch:
    """A batch as objectives receive it.

    `views[i]` is (B, C, H, W), normalised; global views first, then local views.
    `labels` is (B,) int64, -1 where a sample has no label. `keys` names the samples (their shard
    keys, for `log.sample_keys`), where the loader knows them; empty otherwise.
    """

    views: list[Tensor]
    labels: Tensor
    meta: dict[str, Tensor] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to `device` (accelerate's `send_to_device` calls this)."""
        return Batch(
            views=[v.to(device, non_blocking=True) for v in self.views],
            labels=self.labels.to(device, non_blocking=True),
            meta={k: v.to(device, non_blocking=True) for k, v in self.meta.items()},
            keys=self.keys,
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])
