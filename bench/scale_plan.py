"""The scale-out plan's numbers (docs/scale.md), computed from this repository's measurements.

For MAE ViT-B/16 and ViT-L/16 (800 epochs, global batch 4096) and DINO ViT-B/16 (400 epochs, global
batch 1024, 2 x 224 + 10 x 96 crops) on ImageNet-1k at 8, 64 and 256 GPUs: per-GPU batch, lr, steps,
wall time, GPU-hours, the images per second each GPU's loader must decode and the CPU cores that
takes, checkpoint size and cadence. Inputs, all measured and cited in BENCHMARKS.md:

- per-GPU step time: `bench/objectives.py` on an H200, bf16 (`bench/results/objectives-*-bf16*.json`);
- per-core decode + views rate: `bench/decode.py` (`bench/results/decode-cpu.json`);
- parameter counts: the objectives built from `recipes/imagenet/` (on the meta device).

    python bench/scale_plan.py --out bench/results/scale-plan.json

Assumptions the numbers rest on (docs/scale.md discusses them): a GPU keeps the throughput measured
at the largest measured batch not above its own (rows below every measured batch are marked: their
rate is optimistic); DDP's
gradient all-reduce overlaps the backward pass; the loader decodes every image once per view set
on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ssl_vit import objectives
from ssl_vit.backbone import Backbone
from ssl_vit.config import load_recipe

RESULTS = Path(__file__).resolve().parent / "results"
IMAGENET_TRAIN = 1_281_167
SHARDS = 1_281  # ~1,000 images (~110 MB) each
GPUS = (8, 64, 256)
CHECKPOINT_EVERY_S = 1_800  # aim: lose at most half an hour to a pre-emption


@dataclass(frozen=True)
class Run:
    name: str
    recipe: str
    overrides: tuple[str, ...]
    epochs: int
    global_batch: int
    objective: str  # the row of the step-time JSONs
    step_files: tuple[str, ...]  # measured step times (bf16, H200), at different batches
    views: str  # the row of decode-cpu.json


RUNS = (
    Run(
        "MAE ViT-B/16",
        "imagenet/vit_b16_mae",
        (),
        800,
        4096,
        "mae",
        ("objectives-b16-bf16.json", "objectives-b16-b256-bf16.json"),
        "mae",
    ),
    Run(
        "MAE ViT-L/16",
        "imagenet/vit_b16_mae",
        ("model.name=vit_large_patch16_224",),
        800,
        4096,
        "mae",
        ("objectives-l16-bf16.json", "objectives-l16-b128-bf16.json"),
        "mae",
    ),
    Run(
        "DINO ViT-B/16", "imagenet/vit_b16_dino", (), 400, 1024, "dino", ("objectives-b16-bf16.json",), "dino"
    ),
)


def measured_rate(run: Run, per_gpu_batch: int) -> tuple[float, int]:
    """(images/s on one GPU, the batch it was measured at): the largest measured batch that is not
    above `per_gpu_batch`, else the smallest measured (an optimistic rate for that batch)."""
    measured = []
    for name in run.step_files:
        record = json.loads((RESULTS / name).read_text())
        row = next(r for r in record["rows"] if r["objective"] == run.objective)
        measured.append((int(record["batch"]), record["batch"] / row["step_s"]))
    measured.sort()
    fitting = [m for m in measured if m[0] <= per_gpu_batch]
    batch, rate = fitting[-1] if fitting else measured[0]
    return rate, batch


def decode_rate(views: str) -> float | None:
    """Images/s one CPU core decodes and augments for these views (None: not measured yet)."""
    path = RESULTS / "decode-cpu.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())["rows"]
    return next((r["images_per_s"] for r in rows if r["pipeline"] == f"decode + {views} views"), None)


def state_bytes(run: Run) -> dict[str, int]:
    """Checkpoint bytes: fp32 weights of every parameter and buffer (student, teacher, heads) and
    AdamW's two fp32 moments of every trainable parameter."""
    recipe = load_recipe(run.recipe, list(run.overrides))
    with torch.device("meta"):
        objective = objectives.build(recipe.objective, Backbone.from_config(recipe.model), num_classes=1000)
    weights = sum(t.numel() for t in objective.state_dict().values()) * 4
    trainable = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    return {"weights": weights, "optimizer": 2 * 4 * trainable, "trainable_params": trainable}


def plan(run: Run) -> list[dict[str, Any]]:
    recipe = load_recipe(run.recipe, list(run.overrides))
    per_core = decode_rate(run.views)
    sizes = state_bytes(run)
    steps_per_epoch = IMAGENET_TRAIN // run.global_batch
    steps = steps_per_epoch * run.epochs
    lr = recipe.optim.lr * run.global_batch / 256 if recipe.optim.lr_scaling == "linear" else recipe.optim.lr
    rows = []
    for gpus in GPUS:
        per_gpu = run.global_batch // gpus
        rate, measured_batch = measured_rate(run, per_gpu)
        seconds = steps * run.global_batch / (gpus * rate)
        step_s = seconds / steps
        ckpt_every = max(1, round(CHECKPOINT_EVERY_S / step_s / 1000) * 1000)
        rows.append(
            {
                "run": run.name,
                "gpus": gpus,
                "global_batch": run.global_batch,
                "per_gpu_batch": per_gpu,
                "below_measured_batch": per_gpu < measured_batch,
                "lr": lr,
                "steps": steps,
                "steps_per_epoch": steps_per_epoch,
                "gpu_images_per_s": rate,
                "measured_at_batch": measured_batch,
                "wall_hours": seconds / 3600,
                "gpu_hours": seconds * gpus / 3600,
                "shards_per_gpu_per_epoch": SHARDS / gpus,
                "loader_cores_per_gpu": math.ceil(rate / per_core) if per_core else None,
                "decode_per_core": per_core,
                "checkpoint_gb": (sizes["weights"] + sizes["optimizer"]) / 1e9,
                "trainable_params_m": sizes["trainable_params"] / 1e6,
                "checkpoint_every_steps": ckpt_every,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [row for run in RUNS for row in plan(run)]
    header = "run            GPUs  batch/GPU  steps    lr       img/s/GPU  wall h  GPU-h   cores/GPU  ckpt GB"
    print(header)
    for r in rows:
        cores = r["loader_cores_per_gpu"] if r["loader_cores_per_gpu"] is not None else "—"
        flag = "*" if r["below_measured_batch"] else " "
        print(
            f"{r['run']:<14} {r['gpus']:>4}  {r['per_gpu_batch']:>7}{flag}  {r['steps']:>7,}  {r['lr']:.2e}"
            f"  {r['gpu_images_per_s']:>9,.0f}  {r['wall_hours']:>6.1f}  {r['gpu_hours']:>6,.0f}"
            f"  {cores!s:>9}  {r['checkpoint_gb']:>7.2f}"
        )
    print("* per-GPU batch below the batch the GPU rate was measured at: expect a lower rate")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": [asdict(r) for r in RUNS], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
