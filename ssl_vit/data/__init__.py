"""Data sources and loaders.

A source yields samples `{"image": (C, H, W) float in [0, 1], "label": int}`. The built-in `digits`
set needs no download. The loader applies the objective's views and batches into `Batch`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ssl_vit.config import DataConfig
from ssl_vit.data.digits import CLASS_NAMES as DIGITS_CLASSES
from ssl_vit.data.digits import digits_split
from ssl_vit.data.views import MultiView, match_channels, resize
from ssl_vit.errors import DataError
from ssl_vit.types import Batch, ViewSpec

BUILTIN = ("digits",)


def class_names(source: str) -> list[str]:
    if source == "digits":
        return list(DIGITS_CLASSES)
    raise DataError(f"data source '{source}' is not available; built-in sets: {', '.join(BUILTIN)}")


def load_images(source: str, split: str, img_size: int, in_chans: int) -> tuple[Tensor, Tensor]:
    """A whole split in memory: images (N, C, S, S) in [0, 1] and labels (N,) int64."""
    if source == "digits":
        images, labels = digits_split(split)
    else:
        raise DataError(f"data source '{source}' is not available; built-in sets: {', '.join(BUILTIN)}")
    images = resize(images, img_size)
    images = torch.stack([match_channels(img, in_chans) for img in images])
    return images, labels


class ViewDataset(Dataset[tuple[list[Tensor], int]]):
    """In-memory images, each turned into the objective's views on access."""

    def __init__(self, images: Tensor, labels: Tensor, views: MultiView) -> None:
        self.images, self.labels, self.views = images, labels, views

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[list[Tensor], int]:
        return self.views(self.images[index]), int(self.labels[index])


def collate(samples: Sequence[tuple[list[Tensor], int]]) -> Batch:
    """[(views, label)] -> Batch with views[i] of shape (B, C, H_i, W_i)."""
    n_views = len(samples[0][0])
    views = [torch.stack([s[0][i] for s in samples]) for i in range(n_views)]
    return Batch(views=views, labels=torch.tensor([s[1] for s in samples], dtype=torch.long))


def train_loader(
    cfg: DataConfig, spec: ViewSpec, img_size: int, in_chans: int, batch_size: int, seed: int
) -> DataLoader[tuple[list[Tensor], int]]:
    """Shuffled, augmented batches of the training split; the last incomplete batch is dropped."""
    images, labels = load_images(cfg.train, "train", img_size, in_chans)
    if len(labels) < batch_size:
        raise DataError(f"data.train has {len(labels)} images, fewer than train.batch_size={batch_size}")
    views = MultiView(
        spec, img_size, in_chans, cfg.mean, cfg.std, cfg.aug_strength, cfg.hflip, cfg.crop_scale
    )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        ViewDataset(images, labels, views),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=cfg.num_workers > 0,
    )
