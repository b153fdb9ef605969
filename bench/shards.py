"""Shard-writing throughput: images/s of `ssl-vit shards` with one process against `--workers N`.

    python bench/shards.py                                   # 5000 JPEGs of 384 px, workers 1 and 2
    python bench/shards.py --images 300 --out bench/results/shards-smoke.json

Writes a flat folder of N JPEGs (procedural shapes upscaled to --image-size, q=90), then writes its
shards (no labels, 1000 per shard) with each worker count, --repeats times in turn; the best run of
each counts (robust to load from other processes). The folder is read once before timing, so every
run finds it in the page cache (a cold disk adds the same read time to each). Every write must give
the same bytes; the script fails otherwise. Results go to JSON with the machine's description.
Timings on a shared machine are noisy: measure on a quiet one.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ssl_vit.data.shapes import render  # noqa: E402
from ssl_vit.data.shards import write_shards  # noqa: E402


def write_jpegs(folder: Path, n: int, size: int) -> int:
    """`n` shapes images upscaled to `size` px as JPEG q=90; returns the bytes written."""
    total = 0
    for i in range(n):
        array = render(i % 10, np.random.default_rng([7, i]))
        buffer = io.BytesIO()
        Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR).save(
            buffer, "JPEG", quality=90
        )
        (folder / f"{i:06d}.jpg").write_bytes(buffer.getvalue())
        total += buffer.tell()
    return total


def digest(out: Path) -> str:
    hashed = hashlib.sha256()
    for shard in sorted(out.glob("*.tar")):
        hashed.update(shard.read_bytes())
    return hashed.hexdigest()


def timed_write(src: Path, out: Path, workers: int) -> tuple[float, str]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    write_shards(str(src), out, labels="none", workers=workers)
    return time.perf_counter() - start, digest(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="timed writes per worker count (best counts)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/shards-cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "jpegs", Path(tmp) / "shards"
        src.mkdir()
        size = write_jpegs(src, args.images, args.image_size)
        for path in src.iterdir():  # into the page cache before any timing
            path.read_bytes()
        seconds: dict[int, list[float]] = {w: [] for w in args.workers}
        digests = set()
        for _ in range(args.repeats):
            for workers in args.workers:
                elapsed, result = timed_write(src, out, workers)
                seconds[workers].append(elapsed)
                digests.add(result)
    if len(digests) != 1:
        raise SystemExit(f"writes with workers {args.workers} gave {len(digests)} different sets of shards")
    rates = {w: args.images / min(s) for w, s in seconds.items()}
    base = rates.get(1)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "pillow": Image.__version__,
        },
        "setup": vars(args) | {"out": str(args.out), "folder_mb": round(size / 2**20, 1)},
        "images_per_sec": {str(w): round(r, 1) for w, r in rates.items()},
        "speedup_vs_1": {str(w): round(r / base, 2) for w, r in rates.items()} if base else None,
        "seconds": {str(w): [round(x, 3) for x in s] for w, s in seconds.items()},
        "identical_shards": True,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("images_per_sec", "speedup_vs_1")}))


if __name__ == "__main__":
    main()
