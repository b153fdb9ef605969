"""Loader throughput and memory: the full shard pipeline against a bare loop over the same files.

    python bench/loader.py --out bench/loader.json                # defaults: 4000 JPEGs of 96 px
    python bench/loader.py --images 2000 --image-size 160 --workers 1 2 4

Full pipeline: read tar -> group -> shuffle buffer -> safe decode -> two contrastive views -> batch
(`ssl_vit.data.stream`). Bare loop: a map-style dataset that seeks each image inside the same tar
files (index built before timing), PIL decode, the same views, a torch DataLoader with the same
batch size and worker count; no webdataset. Both run one epoch after a warm-up epoch.

Memory: peak resident anonymous memory (heap, tensors) of the process tree while the resampled stream delivers 1x and 10x the data set;
a flat peak means nothing grows with the amount of data streamed. Results go to JSON with the
machine's description; timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ssl_vit.data.safety import pil_to_tensor  # noqa: E402
from ssl_vit.data.shapes import render  # noqa: E402
from ssl_vit.data.stream import build_loader, collate  # noqa: E402
from ssl_vit.data.views import MultiView  # noqa: E402
from ssl_vit.types import ViewSpec  # noqa: E402


def write_jpeg_shards(folder: Path, n: int, size: int, per_shard: int) -> list[str]:
    """`n` shapes images upscaled to `size` px, JPEG q=90, in shards of `per_shard`."""
    pattern = str(folder / "bench-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, mtime=int(time.time())) as sink:
        for i in range(n):
            array = render(i % 10, np.random.default_rng([7, i]))
            buffer = io.BytesIO()
            Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR).save(
                buffer, "JPEG", quality=90
            )
            sink.write({"__key__": f"{i:08d}", "jpg": buffer.getvalue(), "cls": str(i % 10).encode()})
    return sorted(str(p) for p in folder.glob("bench-*.tar"))


class BareTarImages(Dataset[tuple[list[torch.Tensor], int]]):
    """The reference: images read by offset from the same tars, no webdataset anywhere."""

    def __init__(self, urls: list[str], views: MultiView) -> None:
        self.views, self.index = views, []
        for url in urls:
            with tarfile.open(url) as tar:
                members = {m.name: m for m in tar.getmembers()}
            for name, m in members.items():
                if name.endswith(".jpg"):
                    label = members[name[:-4] + ".cls"]
                    self.index.append((url, m.offset_data, m.size, label.offset_data, label.size))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        url, offset, size, cls_offset, cls_size = self.index[i]
        with open(url, "rb") as f:
            f.seek(offset)
            data = f.read(size)
            f.seek(cls_offset)
            label = int(f.read(cls_size))
        with Image.open(io.BytesIO(data)) as img:
            return self.views(pil_to_tensor(img, 3)), label


def images_per_second(loader: object, epochs: int = 2) -> float:
    """Images/s of the last of `epochs` epochs (the first warms caches and forks workers once)."""
    rate = 0.0
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for batch in loader:  # type: ignore[attr-defined]
            n += len(batch)
        rate = n / (time.perf_counter() - start)
    return rate


def anonymous_bytes(proc: psutil.Process) -> int:
    """Resident anonymous memory (heap, tensors, buffers) of one process.

    Not RSS or PSS: those include shared library pages, and PSS even changes with unrelated processes
    that map the same files. Pages a forked worker still shares with the main process count in
    both, which overstates the level but not its growth, the thing measured here.
    """
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(proc.memory_info().rss)


def tree_memory() -> int:
    total = 0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            total += anonymous_bytes(proc)
        except psutil.Error:
            pass
    return total


def peak_memory_while(fn: object) -> tuple[int, float]:
    """(peak anonymous memory of this process and its workers in bytes, seconds) while `fn()` runs."""
    peak, done = [tree_memory()], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_memory())
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    return peak[0], seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--view-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path("bench/loader.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    views = MultiView(ViewSpec(kind="contrastive", global_views=2), args.view_size, 3, [0.5] * 3, [0.25] * 3)
    result: dict[str, object] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "webdataset": getattr(wds, "__version__", "?"),
        },
        "setup": vars(args) | {"out": str(args.out), "views": "2 contrastive views"},
        "throughput": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_jpeg_shards(Path(tmp), args.images, args.image_size, args.per_shard)
        for workers in args.workers:
            stream = build_loader(
                urls, args.images, views, 3, args.batch_size, 0, num_workers=workers, rank=0, world=1
            )
            bare = DataLoader(
                BareTarImages(urls, views),
                batch_size=args.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=workers,
                collate_fn=collate,
                persistent_workers=False,
            )
            full, ref = images_per_second(stream), images_per_second(bare)
            row = {"workers": workers, "pipeline_img_s": round(full, 1), "bare_img_s": round(ref, 1)}
            row["ratio"] = round(full / ref, 3)
            result["throughput"].append(row)  # type: ignore[attr-defined]
            print(json.dumps(row), flush=True)
        memory = []
        for scale in (1, 10):
            loader = build_loader(
                urls, args.images, views, 3, args.batch_size, 0,
                num_workers=2, samples_per_epoch=scale * args.images, rank=0, world=1,
            )  # fmt: skip
            peak, seconds = peak_memory_while(lambda loader=loader: sum(1 for _ in loader))
            memory.append({"images_streamed": scale * args.images, "peak_anon_mb": round(peak / 2**20, 1)})
            memory[-1]["seconds"] = round(seconds, 1)
            print(json.dumps(memory[-1]), flush=True)
        result["memory"] = memory
        result["memory_ratio_10x_over_1x"] = round(memory[1]["peak_anon_mb"] / memory[0]["peak_anon_mb"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
