"""k-NN quality of each objective's backbone after pretraining with its recipe (digits or shapes).

Pretrains through `ssl_vit.pretrain` and scores frozen features with the evaluators' own k-NN
(`ssl_vit.eval.knn`: k=20, cosine, T=0.07; Wu et al. 2018 / DINO's protocol) and 10-shot linear probe
(5 seeded draws), on each recipe's `eval.feature`. Two baselines per seed: the random-initialised backbone (the one every objective
must beat by 10 points) and raw pixels.

    python bench/quality.py --data digits --seeds 0 1 2 --threads 1
    python bench/quality.py --data shapes --objectives mae simclr --seeds 0 --out runs/quality
    python bench/quality.py --data digits --objectives dino -- train.max_steps=200   # overrides
    python bench/quality.py --data shapes --colour     # also: how much each feature encodes colour
    python bench/quality.py --data shapes --grey       # control: the same shapes with colour removed
    python bench/quality.py --data shapes --finetune-shots 10   # and the 10-shot fine-tune (800 steps)
    python bench/quality.py --data shapes --finetune-shots 10 --reuse --finetune-set head_init=probe lr=3e-4

Writes `<out>/quality-<data>.json` (`quality-shapes-grey.json` with `--grey`; one row per objective
and seed, merged with rows already there, so objectives can run as separate processes) and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ssl_vit.eval.features import (
    EvalModel,
    load_eval_model,
    raw_pixel_features,
    split_features,
    split_images,
)
from ssl_vit.eval.finetune import FinetuneConfig, default_config, finetune
from ssl_vit.eval.knn import knn_classify
from ssl_vit.eval.linear_probe import lowshot_probe

import ssl_vit.data.shapes
from ssl_vit import objectives
from ssl_vit.api import pretrain
from ssl_vit.backbone import Backbone
from ssl_vit.config import DataConfig, Recipe, load_recipe
from ssl_vit.rundir import RunDir

OBJECTIVES = objectives.names()  # every registered objective (each has digits and shapes recipes)


Split = tuple[np.ndarray, np.ndarray]


def knn_top1(train: Split, test: Split) -> float:
    return float(knn_classify(*train, *test, device=torch.device("cpu"))["top1"])


def lowshot_top1(train: Split, test: Split, shots: int) -> float:
    """The evaluators' K-shot linear probe, mean over 5 seeded draws (the same draws for every row)."""
    return float(lowshot_probe(*train, *test, shots, draws=5)["top1"])


def background_colour(data: str, split: str, size: int, chans: int) -> np.ndarray:
    """Each image's background colour as one of 8 classes (1 bit per RGB channel of the median
    border pixel): a k-NN on these says how much a feature encodes colour rather than shape."""
    images, _ = split_images(data, split, size, chans)  # (N, 3, H, W) in [0, 1]
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], -1)
    bits = (border.median(dim=-1).values > 0.5).long()  # (N, 3)
    return (bits * torch.tensor([4, 2, 1])).sum(dim=1).numpy()


def remove_shapes_colour(cache: Path) -> None:
    """Control experiment: render every shapes image in grey (its luma in all 3 channels), for
    pretraining and evaluation alike, so an objective's result without the colour nuisance can be
    set beside its result with it. Same images otherwise (same seeds, shapes, clutter, noise). The
    grey shards get their own cache: the generator's code hash, and so the cache key, is unchanged."""
    os.environ["SSL_VIT_CACHE"] = str(cache)
    render = ssl_vit.data.shapes.render

    def render_grey(label: int, rng: np.random.Generator) -> np.ndarray:
        luma = render(label, rng).astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.repeat(np.rint(luma).astype(np.uint8)[..., None], 3, axis=-1)

    ssl_vit.data.shapes.render = render_grey


def same_training(a: Recipe, b: Recipe) -> bool:
    """Equal recipes, where `train.epochs` does not count when `train.max_steps` sets the length."""
    if a.train.max_steps is not None and a.train.max_steps == b.train.max_steps:
        b = replace(b, train=replace(b.train, epochs=a.train.epochs))
    return a == b


def backbone_model(
    data: str, name: str, seed: int, out: Path, overrides: list[str], reuse: bool = False
) -> tuple[EvalModel, str]:
    """The backbone of `data/name` pretrained at `seed` (or the random-initialised one) and the
    recipe's feature. With `reuse`, a finished run of the same resolved recipe in `out` is scored
    again instead of pretrained again."""
    recipe = load_recipe(f"{data}/supervised")
    if name == "random_init":
        backbone = Backbone.from_config(recipe.model)
        backbone.reset_parameters(seed)
        model = EvalModel(
            backbone,
            recipe.model.img_size,
            recipe.model.in_chans,
            list(recipe.data.mean),
            list(recipe.data.std),
            recipe.data.train,
            "random init",
            "random_init",
        )
        return model, recipe.eval.feature
    run = RunDir(out / f"{data}-{name}-s{seed}")
    wanted = load_recipe(f"{data}/{name}", [f"seed={seed}", *overrides])
    if not (reuse and run.summary() and same_training(run.recipe(), wanted)):
        pretrain(f"{data}/{name}", [f"seed={seed}", *overrides], run.path, quiet=True)
    recipe = run.recipe()
    return load_eval_model(run.backbone, recipe.data.train), recipe.eval.feature  # MPP: cls4


def features(
    data: str, name: str, seed: int, out: Path, overrides: list[str], reuse: bool = False
) -> tuple[Split, Split, EvalModel | None]:
    """Train and test features of `data/name` pretrained at `seed`, or of a baseline, and the model
    they came from (None for raw pixels)."""
    if name == "raw_pixels":
        recipe = load_recipe(f"{data}/supervised")
        size, chans = recipe.model.img_size, recipe.model.in_chans
        train, test = (raw_pixel_features(recipe.data.train, s, size, chans) for s in ("train", "test"))
        return train, test, None
    model, kind = backbone_model(data, name, seed, out, overrides, reuse)
    return split_features(model, "train", kind), split_features(model, "test", kind), model


def finetune_top1(model: EvalModel, shots: int, seed: int, out: Path, options: list[str]) -> float:
    """Test top-1 of the K-shot fine-tune (`ssl-vit finetune --shots K`'s protocol) on draw `seed`;
    `options` are `key=value` words changing `FinetuneConfig` fields or the crop's `crop_scale`."""
    cfg, data = replace(default_config(shots), seed=seed), DataConfig(hflip=False)
    fields = typing.get_type_hints(FinetuneConfig)  # e.g. int, float, `float | None`
    for key, value in (option.split("=", 1) for option in options):
        if key == "crop_scale":
            data.crop_scale = float(value)
        elif key in fields:
            kind = next(t for t in typing.get_args(fields[key]) or (fields[key],) if t is not type(None))
            cfg = replace(cfg, **{key: kind(value)})
        else:
            raise SystemExit(f"--finetune-set: unknown key {key!r} (FinetuneConfig fields or crop_scale)")
    return float(finetune(model, out, cfg, data)["top1"])


def mean_std(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{spread}"


def summarise(rows: list[dict[str, Any]]) -> None:
    """Mean ± std over seeds per objective: k-NN, the K-shot probe and fine-tune where measured,
    pretraining time."""
    print(
        f"\n{'objective':<12} {'k-NN top-1':>12} {'K-shot probe':>14} {'K-shot FT':>12} {'steps':>6}"
        f" {'pretrain s':>11}  seeds"
    )
    for name in dict.fromkeys(r["objective"] for r in rows):
        mine = [r for r in rows if r["objective"] == name]
        knn = mean_std([100 * r["knn_top1"] for r in mine])
        shots, tuned = (column(mine, prefix) for prefix in ("lowshot", "finetune"))
        steps = mine[0].get("steps", "—")
        secs = mean_std([r["pretrain_seconds"] for r in mine]) if "pretrain_seconds" in mine[0] else "—"
        seeds = ",".join(str(r["seed"]) for r in mine)
        print(f"{name:<12} {knn:>12} {shots:>14} {tuned:>12} {steps:>6} {secs:>11}  {seeds}")


def column(rows: list[dict[str, Any]], prefix: str) -> str:
    """Mean ± std of the first `<prefix>K_top1` field of `rows` where they have it, else a dash."""
    key = next((k for k in rows[0] if k.startswith(prefix)), None)
    values = [100 * r[key] for r in rows if key in r] if key else []
    return mean_std(values) if values else "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", default="digits", help="recipe folder: digits or shapes")
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--no-baselines", action="store_true", help="skip random init and raw pixels")
    parser.add_argument("--threads", type=int, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument(
        "--colour", action="store_true", help="also k-NN on the background colour (8 classes; RGB data)"
    )
    parser.add_argument(
        "--grey", action="store_true", help="control: shapes rendered in grey (colour removed), own cache"
    )
    parser.add_argument(
        "--shots", type=int, default=10, help="K of the K-shot linear probe per row (0: skip it; default 10)"
    )
    parser.add_argument(
        "--finetune-shots",
        type=int,
        default=0,
        help="also fine-tune each backbone (random init included) on K labels per class, draw = seed",
    )
    parser.add_argument(
        "--finetune-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="fine-tune protocol changes: FinetuneConfig fields (lr=3e-4, head_init=probe) or crop_scale=1.0",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="score finished runs of the same recipe in --out again"
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run (after --)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.grey:
        if args.data != "shapes":
            parser.error("--grey applies to shapes (digits is grey already)")
        remove_shapes_colour(args.out / "grey-cache")
    record_path = args.out / f"quality-{args.data}{'-grey' if args.grey else ''}.json"
    names = args.objectives if args.no_baselines else ["random_init", "raw_pixels", *args.objectives]
    merged: list[dict[str, Any]] = []
    colour = None
    if args.colour:
        shape = load_recipe(f"{args.data}/supervised").model
        if shape.in_chans != 3:
            parser.error("--colour needs RGB data (shapes)")
        colour = [background_colour(args.data, s, shape.img_size, shape.in_chans) for s in ("train", "test")]
    for name in names:
        for seed in [0] if name == "raw_pixels" else args.seeds:
            start = time.perf_counter()
            train, test, model = features(args.data, name, seed, args.out, args.overrides, args.reuse)
            row: dict[str, Any] = {"objective": name, "seed": seed, "knn_top1": knn_top1(train, test)}
            note = ""
            if args.shots:
                row[f"lowshot{args.shots}_top1"] = lowshot_top1(train, test, args.shots)
                note += f", {args.shots}-shot probe {100 * row[f'lowshot{args.shots}_top1']:5.1f}%"
            if args.finetune_shots and model is not None:
                key, ft_dir = (
                    f"finetune{args.finetune_shots}_top1",
                    args.out / f"{args.data}-{name}-s{seed}-ft",
                )
                row[key] = finetune_top1(model, args.finetune_shots, seed, ft_dir, args.finetune_set)
                note += f", {args.finetune_shots}-shot fine-tune {100 * row[key]:5.1f}%"
            if colour is not None:
                row["bg_colour_knn_top1"] = knn_top1((train[0], colour[0]), (test[0], colour[1]))
                note += f", background colour {100 * row['bg_colour_knn_top1']:5.1f}%"
            done = RunDir(args.out / f"{args.data}-{name}-s{seed}").summary()
            if name not in ("random_init", "raw_pixels") and done:
                row.update(steps=done["steps"], pretrain_seconds=done["pretrain_seconds"])
            row["seconds"] = time.perf_counter() - start
            top1 = 100 * row["knn_top1"]
            print(
                f"{name:<12} seed {seed}: k-NN top-1 {top1:5.1f}%{note}  ({row['seconds']:.0f}s)", flush=True
            )
            merged = save_rows(record_path, [row], args)  # after each row: a stopped job keeps them
    summarise(merged)


def save_rows(
    record_path: Path, rows: list[dict[str, Any]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Merge `rows` into the record file (rows of other objectives and seeds are kept; other processes
    may write to the same file, so it is read just before writing) and return all its rows."""
    new_keys = {(r["objective"], r["seed"]) for r in rows}
    old = json.loads(record_path.read_text())["rows"] if record_path.is_file() else []
    merged = [r for r in old if (r["objective"], r["seed"]) not in new_keys] + rows
    record = {
        "data": args.data,
        "grey": args.grey,
        "overrides": args.overrides,
        "finetune_set": args.finetune_set,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rows": merged,
    }
    record_path.write_text(json.dumps(record, indent=2))
    return merged


if __name__ == "__main__":
    main()
