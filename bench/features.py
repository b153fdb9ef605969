"""Feature-extraction throughput: `ssl_vit.eval.features.extract` against a bare timm loop.

Both sides get the same normalised images and batch size, and both return features on the host:
the bare loop is `vit.forward_head(vit.forward_features(x), pre_logits=True).cpu()` under
`torch.inference_mode`; ours adds the eval-mode switch, the batch loop and the writes into a
preallocated array. Runs alternate (bare, ours, bare, ...) after a warm-up so that a machine
shared with other work penalises both alike; the median of each is reported. Target: ours >= 0.95x.

    python bench/features.py                         # ViT-S/16 at 96 px, 512 images, on CPU or CUDA
    python bench/features.py --model vit_base_patch16_224 --img-size 224 --images 2048 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import timm
import torch
from ssl_vit.eval.features import extract

from ssl_vit.backbone import Backbone
from ssl_vit.config import ModelConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(vit: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> None:
    outputs = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device, non_blocking=True)
            outputs.append(vit.forward_head(vit.forward_features(x), pre_logits=True).cpu())  # type: ignore[operator]


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = Backbone.from_config(ModelConfig(name=args.model, img_size=args.img_size)).to(device).eval()
    images = torch.randn(args.images, 3, args.img_size, args.img_size)
    if device.type == "cuda":
        images = images.pin_memory()

    def ours() -> None:
        extract(backbone, images, "cls", args.batch_size, device=device)

    def bare() -> None:
        bare_loop(backbone.vit, images, args.batch_size, device)

    timed(bare, device), timed(ours, device)  # warm-up (allocator, kernels, caches)
    bare_s, ours_s = [], []
    for _ in range(args.repeats):
        bare_s.append(timed(bare, device))
        ours_s.append(timed(ours, device))
    bare_ips = args.images / statistics.median(bare_s)
    ours_ips = args.images / statistics.median(ours_s)
    result = {
        "bench": "features",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "model": args.model,
        "img_size": args.img_size,
        "images": args.images,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "bare_images_per_sec": round(bare_ips, 1),
        "ssl_vit_images_per_sec": round(ours_ips, 1),
        "ratio": round(ours_ips / bare_ips, 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
