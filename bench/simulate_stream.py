"""Simulate the exact stream's assignment of ImageNet-1k's samples to processes and loader workers.

No data is read: `ssl_vit.data.exact.epoch_order` (the real function) orders 1,281 shard-sized
groups of sample ids, and the split rules of `ExactStream` (rank r of global micro-batch k takes
positions [k*G + r*B, k*G + (r+1)*B); worker w of a rank takes its batches w, w+W, ...) assign them.
For each layout (processes x workers) and global batch it reports:

- samples per worker in an epoch (max, min) and idle workers;
- shards a rank's micro-batch reads from, and shards each worker opens in an epoch (read locality);
- the epoch boundary: positions dropped (the last N mod G), the same at any process count;
- a resume at another process count mid-epoch: positions consumed before and after, duplicates and
  missing against the epoch's positions;
- for contrast, today's alternatives: dealing whole shards (`shards[rank::world][worker::workers]`:
  idle workers and unequal ranks) and drawing shards with replacement (the resampled stream: the
  share of distinct samples an epoch sees).

    python bench/simulate_stream.py --out bench/results/simulate-stream.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ssl_vit.data.exact import block_size, epoch_order

IMAGENET_TRAIN = 1_281_167
SHARDS = 1_281
SHUFFLE_BLOCK = 2**18  # data.shuffle_block's default
LAYOUTS = ((64, 8), (256, 8))
GLOBAL_BATCHES = {"MAE (4096)": 4096, "DINO (1024)": 1024}


def shard_counts() -> list[int]:
    """1,281 shards of ~1,000 samples: what `ssl-vit shards` writes for ImageNet-1k's train split."""
    base, extra = divmod(IMAGENET_TRAIN, SHARDS)
    return [base + (1 if s < extra else 0) for s in range(SHARDS)]


def distinct_per_row(rows: np.ndarray) -> np.ndarray:
    """(R, K) ints -> (R,) number of distinct values per row."""
    ordered = np.sort(rows, axis=1)
    return 1 + (np.diff(ordered, axis=1) != 0).sum(axis=1)


def exact(counts: list[int], world: int, workers: int, global_batch: int, seed: int = 0) -> dict[str, Any]:
    """Per-worker load and read locality of one epoch of the exact stream."""
    starts = np.concatenate([[0], np.cumsum(counts)])
    order = epoch_order(counts, seed, 0, block_size(counts, SHUFFLE_BLOCK))
    shard_of = np.searchsorted(starts, order, side="right") - 1  # (N,) shard of each position
    batch = global_batch // world
    steps = len(order) // global_batch
    used = shard_of[: steps * global_batch].reshape(steps, world, batch)  # (step, rank, sample)
    per_batch = distinct_per_row(used.reshape(steps * world, batch))
    # worker w of each rank: steps w, w+W, ... -> its shards over the epoch (rank 0 shown; all alike)
    worker_shards = [len(np.unique(used[w::workers, 0])) for w in range(workers)]
    per_worker = [len(range(w, steps, workers)) * batch for w in range(workers)]
    return {
        "per_process_batch": batch,
        "steps_per_epoch": steps,
        "samples_per_worker_max": max(per_worker),
        "samples_per_worker_min": min(per_worker),
        "idle_workers": world * sum(1 for n in per_worker if n == 0),
        "shards_per_rank_batch_mean": float(per_batch.mean()),
        "shards_per_rank_batch_max": int(per_batch.max()),
        "shards_opened_per_worker_epoch_max": max(worker_shards),
        "dropped_at_epoch_end": len(order) - steps * global_batch,
        "shards_per_block": block_size(counts, SHUFFLE_BLOCK),
    }


def resume(counts: list[int], before: int, after: int, global_batch: int, stop_step: int) -> dict[str, Any]:
    """Positions consumed by `before` processes up to `stop_step`, then by `after` processes to the
    epoch's end: duplicates and missing against the epoch's positions (the dropped remainder, the
    same for every process count, is not among them)."""
    total = sum(counts)
    steps = total // global_batch

    def consumed(world: int, first: int, last: int) -> np.ndarray:
        batch = global_batch // world
        parts = [
            np.arange(k * global_batch + r * batch, k * global_batch + (r + 1) * batch)
            for k in range(first, last)
            for r in range(world)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    seen = np.concatenate([consumed(before, 0, stop_step), consumed(after, stop_step, steps)])
    hits = np.bincount(seen, minlength=steps * global_batch)
    one_process = consumed(1, 0, steps)
    return {
        "processes": f"{before} -> {after}",
        "stop_step": stop_step,
        "positions_before": int(stop_step * global_batch),
        "positions_after": int((steps - stop_step) * global_batch),
        "duplicates": int((hits > 1).sum()),
        "missing": int((hits == 0).sum()),
        "same_order_as_one_process": bool(np.array_equal(seen, one_process)),
    }


def dealt_shards(counts: list[int], world: int, workers: int) -> dict[str, Any]:
    """Whole shards dealt to ranks, then workers (the exact mode before): load and idle workers."""
    per_rank = [sum(counts[r::world]) for r in range(world)]
    per_worker = [sum(counts[r::world][w::workers]) for r in range(world) for w in range(workers)]
    return {
        "samples_per_rank_max": max(per_rank),
        "samples_per_rank_min": min(per_rank),
        "idle_workers": sum(1 for n in per_worker if n == 0),
    }


def resampled_coverage(counts: list[int], seed: int = 0) -> float:
    """Share of distinct samples one epoch sees when shards are drawn with replacement (any layout:
    an epoch draws as many shards as there are)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(counts), size=len(counts))  # an epoch's worth of shard draws
    return float(np.unique(draws).size / len(counts))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    counts = shard_counts()
    start = time.perf_counter()
    rows = []
    for world, workers in LAYOUTS:
        for name, global_batch in GLOBAL_BATCHES.items():
            row = {"layout": f"{world} x {workers}", "run": name, "global_batch": global_batch}
            row.update(exact(counts, world, workers, global_batch))
            row["dealt_shards"] = dealt_shards(counts, world, workers)
            row["resampled_epoch_coverage"] = resampled_coverage(counts)
            rows.append(row)
            print(
                f"{row['layout']:>8} {name:<12} batch/process {row['per_process_batch']:>3}: samples/worker "
                f"{row['samples_per_worker_min']:,}-{row['samples_per_worker_max']:,}, idle {row['idle_workers']}; "
                f"shards per rank batch {row['shards_per_rank_batch_mean']:.1f} (max "
                f"{row['shards_per_rank_batch_max']}), per worker-epoch {row['shards_opened_per_worker_epoch_max']}; "
                f"dropped {row['dropped_at_epoch_end']:,}"
            )
            dealt = row["dealt_shards"]
            print(
                f"{'':>8} {'':<12} dealt shards: ranks {dealt['samples_per_rank_min']:,}-"
                f"{dealt['samples_per_rank_max']:,} samples, idle workers {dealt['idle_workers']}; resampled: "
                f"an epoch sees {100 * row['resampled_epoch_coverage']:.1f}% of the samples"
            )
    resumes = [
        resume(counts, 64, 256, 4096, stop_step=150),
        resume(counts, 256, 64, 4096, stop_step=150),
        resume(counts, 256, 64, 1024, stop_step=600),
    ]
    for r in resumes:
        print(
            f"resume {r['processes']} at step {r['stop_step']}: {r['positions_before']:,} + {r['positions_after']:,} "
            f"positions, duplicates {r['duplicates']}, missing {r['missing']}, "
            f"same order as one process: {r['same_order_as_one_process']}"
        )
    print(f"({time.perf_counter() - start:.1f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"samples": IMAGENET_TRAIN, "shards": SHARDS, "shuffle_block": SHUFFLE_BLOCK}
        args.out.write_text(json.dumps({**record, "rows": rows, "resumes": resumes}, indent=2))


if __name__ == "__main__":
    main()
