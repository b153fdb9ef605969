"""Per-core JPEG decode and augmentation rate at ImageNet size: what sizes the loader of a GPU.

Each image goes through what the shard stream does to it in a worker: `decode_sample` (PIL decode
of the JPEG bytes to a uint8 tensor) and the objective's crops (`MultiView.crops`), then the batched
colour and normalisation (`MultiView.finish`) per batch of 64. One process, one thread: the rate of
one loader worker on one core. Each objective's row is followed by the same views through the
official per-image pipelines (DINO's `DataAugmentationDINO`, MoCo v3's `main_moco.py`): torchvision
v1 transforms on PIL images (RandomResizedCrop, flip, ColorJitter, RandomGrayscale, PIL
`ImageFilter.GaussianBlur`, solarize, ToTensor, Normalize) with the same sizes, scales and
probabilities, bilinear crops as ours (DINO's code crops bicubic), after a PIL decode. Images:
procedural scenes (`shapes` upscaled, with noise so the JPEG is as large as a photo's), 500x375 at
quality 90 like the mean ImageNet-1k train image (~110 KB).

    python bench/decode.py --out bench/results/decode-cpu.json
    python bench/decode.py --images 200 --objectives mae dino

Results go to JSON with the machine's description; run it on a quiet machine (on a shared one, the
CPU-time rate is the steadier of the two).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ssl_vit import objectives  # noqa: E402
from ssl_vit.backbone import Backbone  # noqa: E402
from ssl_vit.config import DataConfig, ModelConfig  # noqa: E402
from ssl_vit.data.safety import decode_sample  # noqa: E402
from ssl_vit.data.shapes import render  # noqa: E402
from ssl_vit.data.views import MultiView, View  # noqa: E402

WIDTH, HEIGHT = 500, 375
BATCH = 64


def photo_like_jpegs(n: int, first: int = 0) -> list[bytes]:
    """`n` JPEGs of WIDTH x HEIGHT (numbers `first`...): a shapes scene upscaled, plus sensor-like
    noise, so the files are as large as photos'."""
    out = []
    for i in range(first, first + n):
        rng = np.random.default_rng([11, i])
        scene = Image.fromarray(render(i % 10, rng)).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
        noisy = np.asarray(scene, dtype=np.int16) + rng.normal(0, 25, (HEIGHT, WIDTH, 3)).astype(np.int16)
        buffer = io.BytesIO()
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def views_of(objective: str) -> MultiView:
    """The ImageNet recipes' views of `objective` at 224 px (DINO: 2 x 224 + 10 x 96)."""
    model = ModelConfig(name="vit_tiny_patch16_224", img_size=224, depth=1)
    options: dict[str, Any] = {"name": objective}
    if objective == "dino":
        options.update(local_crops=10, local_size=96, global_scale=[0.25, 1.0], local_scale=[0.05, 0.25])
    spec = objectives.build(options, Backbone.from_config(model), num_classes=1000).views()
    data = DataConfig(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    return MultiView.for_data(spec, 224, 3, data)


class PilBlur:
    """The official pipelines' blur: PIL's Gaussian blur with radius (sigma) ~ U(0.1, 2)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(1).uniform_(0.1, 2.0))))


def official(view: View) -> T.Compose:
    """`view` as the official per-image pipelines write it (torchvision v1 on PIL, bilinear crops)."""
    crop, colour = view.geometry.transforms[0], view.colour  # type: ignore[attr-defined]
    ops: list[Any] = [T.RandomResizedCrop(crop.size, scale=crop.scale), T.RandomHorizontalFlip()]
    if colour.jitter is not None:
        ops.append(T.RandomApply([T.ColorJitter(*colour.jitter)], p=colour.jitter_p))
    if colour.grayscale_p > 0:
        ops.append(T.RandomGrayscale(colour.grayscale_p))
    if colour.blur_p > 0:
        ops.append(T.RandomApply([PilBlur()], p=colour.blur_p))
    if colour.solarize_p > 0:
        ops.append(T.RandomSolarize(128, p=colour.solarize_p))
    return T.Compose([*ops, T.ToTensor(), T.Normalize(colour.mean, colour.std)])


def run_official(jpegs: list[bytes], views: list[T.Compose]) -> None:
    """PIL decode and the official per-image views, stacked per batch as a DataLoader collates."""
    pending: list[list[torch.Tensor]] = []
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as img:
            image = img.convert("RGB")
        pending.append([view(image) for view in views])
        if len(pending) == BATCH:
            [torch.stack(v) for v in zip(*pending, strict=True)]
            pending = []


def run(jpegs: list[bytes], views: MultiView | None) -> None:
    """Decode (+ crops + batched colour when `views` is given), as a loader worker does."""
    pending: list[list[torch.Tensor]] = []
    for i, data in enumerate(jpegs):
        image, _ = decode_sample({"__key__": str(i), "jpg": data}, 3)
        if views is not None:
            pending.append(views.crops(image))
            if len(pending) == BATCH:
                views.finish([torch.stack(v) for v in zip(*pending, strict=True)])
                pending = []


def rates(work: Callable[[], None], images: int) -> tuple[float, float]:
    """Images per second through `work`: by the wall clock, and by this process's CPU time (user +
    system, page faults included), which other processes on a shared machine disturb less."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--objectives", nargs="+", default=["supervised", "mae", "simclr", "dino"])
    parser.add_argument("--repeats", type=int, default=3, help="best of N passes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    jpegs = photo_like_jpegs(args.images)
    kb = sum(map(len, jpegs)) / len(jpegs) / 1024
    n = len(jpegs)
    pipelines: list[tuple[str, Callable[[], None]]] = [("decode only", partial(run, jpegs, None))]
    for name in args.objectives:
        views = views_of(name)
        baseline = [official(view) for view in views.views]
        pipelines.append((f"decode + {name} views", partial(run, jpegs, views)))
        pipelines.append(("  official per-image PIL", partial(run_official, jpegs, baseline)))
    measured: list[list[tuple[float, float]]] = [[] for _ in pipelines]
    for _ in range(args.repeats):  # taking turns, so that load from other processes hits all alike
        for (_, work), rate in zip(pipelines, measured, strict=True):
            rate.append(rates(work, n))
    rows = [
        {
            "pipeline": name,
            "images_per_s": max(wall for wall, _ in rate),
            "cpu_images_per_s": max(cpu for _, cpu in rate),
        }
        for (name, _), rate in zip(pipelines, measured, strict=True)
    ]
    print(f"{args.images} JPEGs of {WIDTH}x{HEIGHT}, mean {kb:.0f} KB; one thread; img/s per core,")
    print("by the wall clock and by the process's CPU time (best of --repeats each)")
    for row in rows:
        print(f"{row['pipeline']:<28} {row['images_per_s']:8.1f} wall {row['cpu_images_per_s']:8.1f} cpu")
    if args.out:
        record = {
            "images": args.images,
            "size": [WIDTH, HEIGHT],
            "mean_kb": kb,
            "threads": 1,
            "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
