"""How long `ssl-vit show` takes on a run: all figures, then each kind alone. Writes JSON.

python bench/figures.py                      # pretrains digits/supervised for --steps into a temp dir
python bench/figures.py --run runs/demo/supervised --out bench/figures.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from ssl_vit.cli import main
from ssl_vit.figures import KINDS, show


def timed(run: Path, out: Path, kinds: tuple[str, ...], method: str) -> float:
    start = time.perf_counter()
    show([run], out, kinds, method)
    return time.perf_counter() - start


def bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="an existing run directory (default: a fresh digits run)")
    parser.add_argument("--steps", type=int, default=100, help="pretraining steps of the fresh run")
    parser.add_argument("--out", type=Path, default=Path("bench/figures.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            run = Path(tmp) / "run"
            main(
                [
                    "pretrain",
                    "digits/supervised",
                    f"train.max_steps={args.steps}",
                    "--out",
                    str(run),
                    "--quiet",
                ]
            )
        timed(run, Path(tmp) / "warm", ("curves",), "pca")  # imports and first-call caches
        result = {
            "run": str(run),
            "device": "cpu",
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "seconds_all_tsne": timed(run, Path(tmp) / "all", KINDS, "tsne"),
            "seconds_all_pca": timed(run, Path(tmp) / "pca", KINDS, "pca"),
            **{f"seconds_{k}": timed(run, Path(tmp) / k, (k,), "tsne") for k in KINDS},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    bench()
