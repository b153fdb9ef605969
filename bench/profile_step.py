"""Where one objective's training step spends its time: busy device time against wall time.

`bench/objectives.py` says how far a step is from its FLOP ideal; this says why. It profiles the
same step (same model, heads, batch and optimiser) with `torch.profiler` and reports, per step:
wall seconds, device-kernel launches, the seconds the device spent in kernels, and the process's
minor page faults (memory the allocator handed back to the OS and touched afresh). On a GPU, busy
time well under wall time means the step is bound by launching kernels, not by FLOPs; the table of
the costliest operators shows where the rest goes on either device.

    python bench/profile_step.py --objective dino --preset b16 --batch 8 --threads 2
    python bench/profile_step.py --objective mae --preset b16 --batch 64 --device cuda --bf16

Writes JSON (`--out`) with the per-step figures and the top operators.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from objectives import PRESETS, add_step_options, build, step_device, sync  # noqa: E402  (a sibling script, not a package)


def kernel_stats(prof: profile, steps: int) -> tuple[int, float]:
    """Device kernels launched per step and their summed seconds per step (0, 0 on the CPU)."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in kernels)
    return len(kernels) // steps, busy_us / 1e6 / steps


def top_ops(prof: profile, device: torch.device, rows: int) -> list[dict[str, Any]]:
    """The operators with the most self time (device time on a GPU, CPU time otherwise)."""
    on_gpu = device.type == "cuda"
    events = prof.key_averages()
    key = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    return [
        {"op": e.key, "calls": e.count, "self_ms": key(e) / 1e3}
        for e in sorted(events, key=key, reverse=True)[:rows]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="mae")
    add_step_options(parser, warmup=2)
    parser.add_argument("--rows", type=int, default=15, help="operators to list")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/profile.json"))
    args = parser.parse_args()
    device = step_device(args)
    model_name, img_size = PRESETS[args.preset]
    trainer = build(args.objective, model_name, img_size, args.batch, args.bf16, device)
    for _ in range(args.warmup):
        trainer.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            trainer.step()
    wall = (time.perf_counter() - start) / args.steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // args.steps
    launches, busy = kernel_stats(prof, args.steps)
    ops = top_ops(prof, device, args.rows)
    record = {
        "objective": args.objective,
        "model": model_name,
        "batch": args.batch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bf16": args.bf16,
        "threads": torch.get_num_threads(),
        "wall_s_per_step": wall,
        "kernels_per_step": launches,
        "device_busy_s_per_step": busy,
        "page_faults_per_step": faults,  # minor faults: fresh memory touched by the process
        "top_ops": ops,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"{args.objective} {model_name} batch {args.batch}: {wall:.4f} s/step (profiled)", end="")
    print(f", {faults} page faults/step", end="")
    if launches:
        print(f", {launches} kernels/step, device busy {busy:.4f} s ({busy / wall:.0%} of wall)")
    else:
        print()
    for op in ops:
        print(
            f"  {op['self_ms'] / args.steps:>9.2f} ms/step  {op['calls'] // args.steps:>6} calls  {op['op']}"
        )


if __name__ == "__main__":
    main()
