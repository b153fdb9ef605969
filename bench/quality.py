"""k-NN quality of each objective's backbone after pretraining with its recipe (digits or shapes).

Pretrains through `ssl_vit.cli.pretrain`, extracts frozen features with `ssl_vit.eval.features`
and runs a weighted k-NN (k=20, cosine, T=0.07; Wu et al. 2018 / DINO's protocol) written here,
so this script needs nothing from the evaluators still being written. The random-init backbone
is the baseline every objective must beat by 10 points.

    python bench/quality.py --data digits --objectives mae simclr --seeds 0 1 2 --out runs/quality
    python bench/quality.py --data digits --objectives dino -- train.max_steps=200   # overrides

Writes `<out>/quality-<data>.json` (one row per objective and seed) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from ssl_vit.eval.features import extract, load_eval_model, normalise, split_features

from ssl_vit.backbone import Backbone
from ssl_vit.cli import pretrain
from ssl_vit.config import load_recipe
from ssl_vit.data import load_images


def knn_top1(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int = 20,
    t: float = 0.07,
) -> float:
    """Weighted k-NN on cosine similarity: each of the k neighbours votes exp(sim / t) for its class."""
    tr = torch.nn.functional.normalize(torch.from_numpy(train_x).float(), dim=1)
    te = torch.nn.functional.normalize(torch.from_numpy(test_x).float(), dim=1)
    labels = torch.from_numpy(train_y).long()
    classes = int(labels.max()) + 1
    sim, idx = (te @ tr.T).topk(k, dim=1)  # (M, k)
    votes = torch.zeros(te.shape[0], classes).scatter_add_(1, labels[idx], (sim / t).exp())
    return float((votes.argmax(1).numpy() == test_y).mean())


def random_init_features(
    data: str, seed: int, kind: str = "cls"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test features of a randomly initialised backbone (the supervised recipe's model)."""
    recipe = load_recipe(f"{data}/supervised")
    torch.manual_seed(seed)
    backbone = Backbone.from_config(recipe.model)
    size, chans = recipe.model.img_size, recipe.model.in_chans
    out = []
    for split in ("train", "test"):
        images, labels = load_images(recipe.data.train, split, size, chans)
        out += [
            extract(backbone, normalise(images, recipe.data.mean, recipe.data.std), kind=kind),
            labels.numpy(),
        ]
    return out[0], out[1], out[2], out[3]


def random_init(data: str, seed: int) -> float:
    return knn_top1(*random_init_features(data, seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", help="recipe folder: digits or shapes")
    parser.add_argument(
        "--objectives", nargs="+", default=["supervised", "mpp", "mae", "simclr", "mocov3", "dino"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--no-random", action="store_true", help="skip the random-init baseline")
    parser.add_argument("--threads", type=int, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run (after --)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    names = args.objectives if args.no_random else ["random_init", *args.objectives]
    for name in names:
        for seed in args.seeds:
            start = time.perf_counter()
            if name == "random_init":
                top1 = random_init(args.data, seed)
            else:
                run = args.out / f"{args.data}-{name}-s{seed}"
                pretrain(f"{args.data}/{name}", [f"seed={seed}", *args.overrides], run, quiet=True)
                recipe = load_recipe(run / "recipe.yaml")
                model = load_eval_model(run / "backbone", recipe.data.train)
                kind = recipe.eval.feature  # the recipe's own feature (MPP: mean patch token)
                top1 = knn_top1(*split_features(model, "train", kind), *split_features(model, "test", kind))
            rows.append(
                {"objective": name, "seed": seed, "knn_top1": top1, "seconds": time.perf_counter() - start}
            )
            print(
                f"{name:<12} seed {seed}: k-NN top-1 {100 * top1:5.1f}%  ({rows[-1]['seconds']:.0f}s)",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "data": args.data,
        "overrides": args.overrides,
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    (args.out / f"quality-{args.data}.json").write_text(json.dumps(record, indent=2))
    print(f"\n{'objective':<12} {'k-NN top-1 (mean over seeds)':>30}")
    for name in names:
        vals = [100 * r["knn_top1"] for r in rows if r["objective"] == name]
        spread = f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
        print(f"{name:<12} {statistics.mean(vals):>25.1f}%{spread}")


if __name__ == "__main__":
    main()
