"""How fast one Linear layer trains against the number of rows (tokens x batch) it sees.

A FLOP-proportional ideal assumes every matmul runs at the same rate. MAE's encoder sees only the
visible quarter of the tokens, so at a small batch its matmuls are short (ViT-L/16 batch 2: 2 x 50
= 100 rows against a full step's 394): this measures the rate, forward + backward (the input's and
the weight's gradients), of the ViT's and MAE decoder's Linear shapes at such row counts, in
GFLOP/s, the median of `--repeats` timed calls after one warm-up.

    python bench/linear_rows.py --threads 2
    python bench/linear_rows.py --rows 100 400 --shapes 1024x4096 4096x1024 --threads 2

Writes JSON (`--out`); prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from objectives import median_seconds  # noqa: E402  (a sibling script, not a package)

# (in, out) of the Linears in a ViT-L/16 block (qkv, proj, fc1, fc2) and in MAE's 512-wide decoder
DEFAULT_SHAPES = ["1024x3072", "1024x1024", "1024x4096", "4096x1024", "512x1536", "512x2048", "2048x512"]


def train_rate(rows: int, fan_in: int, fan_out: int, repeats: int) -> float:
    """GFLOP/s of forward + backward of one Linear on `rows` rows (3 matmuls of 2*rows*in*out)."""
    layer = torch.nn.Linear(fan_in, fan_out)
    x = torch.randn(rows, fan_in, requires_grad=True)
    grad = torch.randn(rows, fan_out)

    def step() -> None:
        layer(x).backward(grad)

    seconds = median_seconds(step, repeats, torch.device("cpu"), layer)  # fresh gradients each call
    return 3 * 2 * rows * fan_in * fan_out / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100, 400, 1600])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="IN x OUT of each Linear")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/linear_rows.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    print(
        f"{'in x out':<11}" + "".join(f"{r:>9} rows" for r in args.rows) + "   (GFLOP/s, forward + backward)"
    )
    for shape in args.shapes:
        fan_in, fan_out = (int(v) for v in shape.lower().split("x"))
        rates = [train_rate(r, fan_in, fan_out, args.repeats) for r in args.rows]
        results.append(
            {
                "in": fan_in,
                "out": fan_out,
                "gflops": {str(r): g for r, g in zip(args.rows, rates, strict=True)},
            }
        )
        print(f"{shape:<11}" + "".join(f"{g:>14.0f}" for g in rates), flush=True)
    record = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": args.rows,
        "shapes": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
