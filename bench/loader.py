"""Loader throughput and memory: the full shard pipeline against a bare loop over the same files.

    python bench/loader.py --out bench/loader.json                # defaults: 4000 JPEGs of 96 px
    python bench/loader.py --images 2000 --image-size 160 --workers 1 2 4

Full pipeline: the exact stream (`ssl_vit.data.exact`: tar index built before timing, samples read
by offset in the epoch's order -> safe decode -> two contrastive views -> batch). Bare loop: a map-style dataset that seeks each image inside the same tar
files (index built before timing), PIL decode, the same views, a torch DataLoader with the same
batch size and worker count; no webdataset. After a warm-up epoch each, the two take turns for
`--repeats` epochs and the best epoch of each counts (robust to load from other processes).

Memory: peak resident anonymous memory (heap, tensors) of the process tree in each tenth of a
resampled stream of 10x the data set. Flat means the second half peaks no higher than the first.
(Batches stacked on the heap instead of in shared memory made each worker's heap rise by ~200 MiB
over the first passes, glibc keeping freed buffers, before levelling off.)
Results go to JSON with the machine's description; timings on a shared machine are noisy.
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
from ssl_vit.data.loader import build_loader  # noqa: E402
from ssl_vit.data.safety import pil_to_tensor  # noqa: E402
from ssl_vit.data.shapes import render  # noqa: E402
from ssl_vit.data.stream import collate  # noqa: E402
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


def epoch_rate(loader: object) -> float:
    """Images per second over one epoch of `loader`."""
    start, n = time.perf_counter(), 0
    for batch in loader:  # type: ignore[attr-defined]
        n += len(batch)
    return n / (time.perf_counter() - start)


def best_rates(loaders: dict[str, object], repeats: int) -> dict[str, float]:
    """Best-of-`repeats` epoch rate per loader, the loaders taking turns after one warm-up epoch each,
    so that load from other processes hits both alike."""
    for loader in loaders.values():
        epoch_rate(loader)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, loader in loaders.items():
            rates[name].append(epoch_rate(loader))
    return {name: max(values) for name, values in rates.items()}


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


def memory_by_tenth(loader: object, total: int) -> list[float]:
    """Peak anonymous memory (MiB) of the process tree in each tenth of a stream of `total` images.

    Sampled every 0.1 s by a thread while the main thread consumes the loader.
    """
    delivered, done = [0], threading.Event()
    peaks = [0.0] * 10

    def watch() -> None:
        while not done.is_set():
            tenth = min(9, delivered[0] * 10 // total)
            peaks[tenth] = max(peaks[tenth], tree_memory() / 2**20)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    for batch in loader:  # type: ignore[attr-defined]
        delivered[0] += len(batch)
    done.set()
    watcher.join()
    return [round(p, 1) for p in peaks]


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
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per loader (best one counts)")
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
                urls, args.images, views, 3, args.batch_size, 0, num_workers=workers, cache_dir=tmp
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
            rates = best_rates({"pipeline": stream, "bare": bare}, args.repeats)
            full, ref = rates["pipeline"], rates["bare"]
            row = {"workers": workers, "pipeline_img_s": round(full, 1), "bare_img_s": round(ref, 1)}
            row["ratio"] = round(full / ref, 3)
            result["throughput"].append(row)  # type: ignore[attr-defined]
            print(json.dumps(row), flush=True)
        total = 10 * args.images
        loader = build_loader(
            urls, args.images, views, 3, args.batch_size, 0,
            num_workers=2, samples_per_epoch=total, rank=0, world=1,
        )  # fmt: skip
        start = time.perf_counter()
        peaks = memory_by_tenth(loader, total)
        first, second = max(peaks[:5]), max(peaks[5:])
        result["memory"] = {
            "images_streamed": total,
            "workers": 2,
            "seconds": round(time.perf_counter() - start, 1),
            "peak_anon_mib_per_tenth": peaks,
            "peak_first_half_mib": first,
            "peak_second_half_mib": second,
            "growth_second_over_first_half": round(second / first, 3),
        }
        print(json.dumps(result["memory"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
