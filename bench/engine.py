"""Steps per second of the engine (`fit`) against a bare PyTorch loop on the same model and batches.

Both loops train the same objective on the same pre-built batches (data loading is left out: it is
not the engine's cost), with AdamW over the same parameter groups, the per-step lr, and the
recipe's clipping. The bare loop has no accelerate, no safety checks, no logging, no checkpoints.
Each loop runs `--rounds` times, alternating, in windows of `--window` steps; the figure is the
median window after the first (warm-up) window of every round, so a noisy shared machine hurts less.

    python bench/engine.py                                      # CPU, recipes/digits/supervised.yaml
    python bench/engine.py --device cuda --precision bf16 --preset vit_s16_224
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ssl_vit import objectives
from ssl_vit.backbone import Backbone
from ssl_vit.config import load_recipe
from ssl_vit.data import class_names, train_loader
from ssl_vit.engine.loop import FitConfig, Reporting, fit
from ssl_vit.optim import cosine_schedule, param_groups
from ssl_vit.rundir import RunDir
from ssl_vit.types import Batch

PRESETS = {
    "digits": [],  # the recipe as it is: width 128, depth 4, 16 px, batch 64
    "vit_s16_224": [
        "model.name=vit_small_patch16_224",
        "model.img_size=224",
        "model.patch_size=16",
        "model.embed_dim=384",
        "model.depth=12",
        "model.num_heads=6",
        "train.batch_size=128",
    ],
}


def build(recipe_name: str, overrides: list[str], n_batches: int) -> tuple[Any, Any, list[Batch]]:
    recipe = load_recipe(recipe_name, overrides)
    torch.manual_seed(recipe.seed)
    backbone = Backbone.from_config(recipe.model)
    classes, mean, std = len(class_names(recipe.data.train)), recipe.data.mean, recipe.data.std
    objective = objectives.build(
        recipe.objective, backbone, num_classes=classes, pixel_mean=mean, pixel_std=std
    )
    loader = train_loader(
        recipe.data,
        objective.views(),
        recipe.model.img_size,
        recipe.model.in_chans,
        recipe.train.batch_size,
        0,
    )
    batches = [batch for _, batch in zip(range(n_batches), loader, strict=False)]
    return recipe, objective, batches


class Repeat:
    """The pre-built batches over and over, as a loader of `len` batches per epoch."""

    def __init__(self, batches: list[Batch], per_epoch: int) -> None:
        self.batches, self.per_epoch = batches, per_epoch

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self) -> Any:
        return (self.batches[i % len(self.batches)] for i in range(self.per_epoch))


def bare_loop(
    recipe: Any, objective: Any, batches: list[Batch], steps: int, window: int, device: str
) -> list[float]:
    """Steps/s of each window of a plain loop: forward, backward, clip, AdamW step."""
    model = objective.to(device).train()
    optim = recipe.optim
    groups = param_groups(model, optim.weight_decay, model.no_weight_decay(), optim.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=True)  # type: ignore[arg-type]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.mixed_precision)
    rates, tick = [], time.perf_counter()
    for step in range(steps):
        lr = cosine_schedule(step, steps, optim.lr, optim.min_lr, optim.warmup_steps or 0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batches[step % len(batches)].to(device)
        with torch.autocast(
            device_type=device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            loss, _ = model(batch)
        loss.backward()
        if optim.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % window == 0:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            now = time.perf_counter()
            rates.append(window / (now - tick))
            tick = now
    return rates


def engine_loop(recipe: Any, objective: Any, batches: list[Batch], steps: int, window: int) -> list[float]:
    """Steps/s of each logging window of `fit` (no checkpoint but the final one)."""
    recipe.log.every_steps, recipe.ckpt.every_steps, recipe.train.max_steps = window, None, steps
    with tempfile.TemporaryDirectory() as run_dir:
        loader = Repeat(batches, per_epoch=steps)
        cfg = FitConfig(recipe.optim, recipe.train, recipe.ckpt, recipe.log, recipe.seed)
        fit(objective, loader, cfg, Path(run_dir), report=Reporting(progress=False))
        records = RunDir(Path(run_dir)).metrics()
    return [record["images_per_sec"] / recipe.train.batch_size for record in records]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="digits/supervised")
    parser.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=60, help="steps per run, warm-up window included")
    parser.add_argument("--window", type=int, default=10, help="steps per timing window")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each loop")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine.json"))
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [
        *PRESETS[args.preset],
        *args.overrides,
        f"train.mixed_precision={args.precision}",
        f"train.cpu={str(args.device == 'cpu').lower()}",
    ]
    recipe, objective, batches = build(args.recipe, overrides, n_batches=8)
    bare, engine = [], []
    for _ in range(args.rounds):
        bare += bare_loop(recipe, copy.deepcopy(objective), batches, args.steps, args.window, args.device)[1:]
        engine += engine_loop(
            copy.deepcopy(recipe), copy.deepcopy(objective), batches, args.steps, args.window
        )[1:]
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "recipe": args.recipe,
        "overrides": overrides,
        "batch": recipe.train.batch_size,
        "precision": args.precision,
        "bare_steps_per_s": statistics.median(bare),
        "engine_steps_per_s": statistics.median(engine),
        "ratio": statistics.median(engine) / statistics.median(bare),
        "bare_windows": bare,
        "engine_windows": engine,
        "command": " ".join(["python", "bench/engine.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{device_name}: bare {result['bare_steps_per_s']:.2f} steps/s, engine "
        f"{result['engine_steps_per_s']:.2f} steps/s, ratio {result['ratio']:.3f} -> {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
