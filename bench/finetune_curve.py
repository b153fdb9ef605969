"""K-shot fine-tune curve: test top-1 against the step budget, for a run's backbone and random init.

What `eval.finetune.LOWSHOT_DEFAULTS` was chosen from: the budget at which both a pretrained and a
from-scratch backbone have stopped improving.

    python bench/finetune_curve.py runs/sup --steps 200 400 800 --seeds 0 1 2 --threads 1
    python bench/finetune_curve.py runs/sup --steps 800 1200 --models random --lr 1e-3

Prints one JSON line per (model, steps, seed) and writes them all to `--out` (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from ssl_vit.eval.features import load_eval_model, random_init_model
from ssl_vit.eval.finetune import default_config, finetune

from ssl_vit.rundir import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory (its backbone, data and augmentation)")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 400, 800])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="draws (= fine-tune seeds)")
    parser.add_argument(
        "--models", nargs="+", default=["pretrained", "random"], choices=["pretrained", "random"]
    )
    parser.add_argument("--lr", type=float, help="override the K-shot default lr")
    parser.add_argument("--batch-size", type=int, help="override the K-shot default batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/finetune-curve.jsonl"))
    parser.add_argument("--work", type=Path, default=Path("runs/finetune-curve"), help="fine-tune folders")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    pretrained = load_eval_model(args.run)
    models = {"pretrained": pretrained, "random": random_init_model(pretrained, 0)}
    data = RunDir(args.run).recipe().data  # the run's augmentation, as `compare` uses
    base = default_config(args.shots)
    if args.lr is not None:
        base = replace(base, lr=args.lr)
    if args.batch_size is not None:
        base = replace(base, batch_size=args.batch_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as record:
        for name in args.models:
            for steps in args.steps:
                for seed in args.seeds:
                    cfg = replace(base, steps=steps, seed=seed)
                    start = time.perf_counter()
                    result = finetune(
                        models[name],
                        args.work / f"{name}-{steps}-{seed}",
                        cfg,
                        data if name == "pretrained" else None,
                    )
                    row = {
                        "model": name,
                        "shots": args.shots,
                        "steps": steps,
                        "seed": seed,
                        "lr": cfg.lr,
                        "batch_size": cfg.batch_size,
                        "top1": round(result["top1"], 4),
                        "wall_s": round(time.perf_counter() - start, 1),
                    }
                    print(json.dumps(row), flush=True)
                    record.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
