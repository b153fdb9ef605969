"""Data: WebDataset shards streamed into the views an objective asks for.

Every training source goes through shards, the built-in sets included: `digits` (scikit-learn, fast,
for tests), `shapes` (procedural RGB, where objectives differ), folders of images and tables of
paths are written once into a cache folder (`prepare`) and streamed like any shards. The evaluators
read whole splits into memory with `load_images`, their labelled splits with `eval_split`.
`skip_counts()` reports the bad samples skipped so far (for `metrics.jsonl`).
"""

from __future__ import annotations

import logging

from ssl_vit.config import DataConfig
from ssl_vit.data.builtin import BUILTIN, builtin_classes, parse_builtin
from ssl_vit.data.evalsets import eval_split, evaluation_data, load_images, require_labels
from ssl_vit.data.loader import StreamLoader, build_loader
from ssl_vit.data.safety import reset_skip_counts, skip_counts
from ssl_vit.data.sources import has_labels, is_local, prepare, resolve, scan
from ssl_vit.data.stream import collate
from ssl_vit.data.views import MultiView
from ssl_vit.types import ViewSpec

__all__ = [
    "BUILTIN",
    "StreamLoader",
    "class_names",
    "collate",
    "eval_split",
    "evaluation_data",
    "has_labels",
    "load_images",
    "prepare",
    "require_labels",
    "reset_skip_counts",
    "skip_counts",
    "train_loader",
]

log = logging.getLogger(__name__)


def class_names(source: str, cache_dir: str | None = None) -> list[str]:
    """Class names of a source: built-in, from the shards' manifest, else `0..max(.cls)` by a scan.

    Remote shards without a manifest give [] (nothing to scan cheaply); a supervised objective then
    asks for `objective.num_classes`.
    """
    spec = parse_builtin(source)
    if spec is not None:
        return builtin_classes(spec)
    shards = resolve(source, "train", cache_dir)
    if shards.classes is not None or shards.labelled is False:
        return shards.classes or []
    if not all(is_local(url) for url in shards.urls):
        log.warning("no manifest.json for %s: class names unknown", source)
        return []
    log.info("no manifest.json beside %s: scanning its .cls labels", source)
    _, top = scan(shards.urls)
    return [str(i) for i in range(top + 1)]


def train_loader(
    cfg: DataConfig,
    spec: ViewSpec,
    img_size: int,
    in_chans: int,
    batch_size: int,
    seed: int,
    *,
    rank: int = 0,
    world: int = 1,
) -> StreamLoader:
    """Shuffled, augmented batches of `cfg.train` read from shards; `len()` = batches per epoch.

    Incomplete batches are dropped. This process reads the share of `rank` among `world` processes:
    the caller says which (under torchrun, from the engine's `processes(...)`); one process by
    default. See `ssl_vit.data.loader` for the exact and resampled modes.
    """
    shards = resolve(cfg.train, "train", cfg.cache_dir)
    views = MultiView.for_data(spec, img_size, in_chans, cfg)
    return build_loader(
        shards.urls,
        shards.count,
        views,
        in_chans,
        batch_size,
        seed,
        num_workers=cfg.num_workers,
        shuffle_buffer=cfg.shuffle_buffer,
        shuffle_block=cfg.shuffle_block,
        strict=cfg.strict,
        samples_per_epoch=cfg.samples_per_epoch,
        rank=rank,
        world=world,
        cache_dir=cfg.cache_dir,
    )
