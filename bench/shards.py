"""Shard-writing throughput: images/s of `ssl-vit shards` with one process against `--workers N`.

    python bench/shards.py                                   # 5000 photo-sized JPEGs, workers 1 and 2
    python bench/shards.py --images 300 --out bench/results/shards-smoke.json

Writes a flat folder of N photo-sized JPEGs (500x375, ~100 KB, as `bench/decode.py`), then writes its
shards (no labels, 1000 per shard) with each worker count, --repeats times in turn; the best run of
each counts (robust to load from other processes). The folder is read once before timing, so every
run finds it in the page cache (a cold disk adds the same read time to each). Every write must give
the same bytes; the script fails otherwise. Results go to JSON with the machine's description.
Timings on a shared machine are noisy: measure on a quiet one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ssl_vit.data.shards import write_shards  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import photo_like_jpegs  # noqa: E402  (a sibling script, not a package)


def write_jpegs(folder: Path, n: int) -> int:
    """`n` photo-sized JPEGs (`bench/decode.py`: 500x375, ~100 KB like ImageNet's); returns bytes."""
    total = 0
    for start in range(0, n, 500):  # in chunks: the bytes of 5,000 photos need not sit in memory
        for i, data in enumerate(photo_like_jpegs(min(500, n - start), first=start), start=start):
            (folder / f"{i:06d}.jpg").write_bytes(data)
            total += len(data)
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
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="timed writes per worker count (best counts)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/shards-cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "jpegs", Path(tmp) / "shards"
        src.mkdir()
        size = write_jpegs(src, args.images)
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
