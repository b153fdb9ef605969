"""Where MAE's step departs from its FLOP ideal: encoder, decoder and attention timed apart.

`bench/objectives.py` gives MAE's whole step against supervised's. This times forward + backward
of its parts on the same model, batch and paper-scale decoder (`recipes/imagenet/vit_b16_mae.yaml`),
each against the backbone on all tokens and next to its share of that backbone's FLOPs:

- `encoder_visible`: the backbone on the visible quarter of the tokens (MAE's encoder);
- `decoder`: the decoder blocks, norm and pixel head on all tokens;
- `mae`: the whole objective (masking, both parts, the loss);
- attention alone (`scaled_dot_product_attention`, forward + backward) at the full encoder's,
  the visible encoder's and the decoder's shapes, in GFLOP/s.

    python bench/mae_split.py --preset l16 --batch 8 --threads 2

Medians of `--steps` calls after one warm-up; writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from objectives import (  # noqa: E402  (a sibling script, not a package)
    PRESETS,
    add_step_options,
    backbone_macs,
    build,
    mae_decoder_macs,
    median_seconds,
    step_device,
)

from ssl_vit.objectives.mae import random_masking  # noqa: E402


def attention_rate(
    batch: int, heads: int, tokens: int, head_dim: int, steps: int, device: torch.device
) -> float:
    """GFLOP/s of fused attention forward + backward (QK^T and AV, 3x for the backward)."""
    q, k, v = (
        torch.randn(batch, heads, tokens, head_dim, device=device, requires_grad=True) for _ in range(3)
    )
    grad = torch.randn(batch, heads, tokens, head_dim, device=device)

    def step() -> None:
        F.scaled_dot_product_attention(q, k, v).backward(grad)

    return 3 * 2 * 2 * batch * heads * tokens**2 * head_dim / median_seconds(step, steps, device) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_options(parser)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/mae_split.json"))
    args = parser.parse_args()
    if args.bf16:
        parser.error("--bf16: this script times fp32 steps only (bench/objectives.py takes --bf16)")
    device = step_device(args)
    model_name, img_size = PRESETS[args.preset]
    trainer = build("mae", model_name, img_size, args.batch, False, device)
    mae, imgs = trainer.obj, trainer.batch.views[0]
    bb, cfg = mae.backbone, mae.cfg
    n, prefix = bb.num_patches, bb.num_prefix_tokens
    kept = int(n * (1 - cfg.mask_ratio))

    def encoder_full() -> None:
        bb.encode(bb.embed(imgs), grid=bb.grid_of(imgs)).sum().backward()

    def encoder_visible() -> None:
        tokens = bb.embed(imgs)
        keep_idx, _, _ = random_masking(args.batch, n, cfg.mask_ratio, device)
        bb.encode(tokens, keep_idx=keep_idx, grid=bb.grid_of(imgs)).sum().backward()

    decoder_in = torch.randn(args.batch, prefix + n, cfg.decoder_dim, device=device, requires_grad=True)

    def decoder() -> None:
        mae.decoder_pred(mae.decoder_norm(mae.decoder(decoder_in))).sum().backward()

    def whole() -> None:
        mae(trainer.batch)[0].backward()

    full_macs = backbone_macs(bb, n)
    shares = {
        "encoder_full": 1.0,
        "encoder_visible": backbone_macs(bb, kept) / full_macs,
        "decoder": mae_decoder_macs(mae) / full_macs,
    }
    shares["mae"] = shares["encoder_visible"] + shares["decoder"]
    parts = {
        "encoder_full": encoder_full,
        "encoder_visible": encoder_visible,
        "decoder": decoder,
        "mae": whole,
    }
    times = {name: median_seconds(fn, args.steps, device, mae) for name, fn in parts.items()}
    rows: list[dict[str, Any]] = []
    print(f"{model_name} {img_size}px batch {args.batch}, forward + backward")
    print(f"{'part':<16} {'s':>7} {'of full':>8} {'FLOP share':>11} {'vs ideal':>9}")
    for name, share in shares.items():
        of_full = times[name] / times["encoder_full"]
        rows.append(
            {
                "part": name,
                "s": times[name],
                "of_full": of_full,
                "flop_share": share,
                "vs_ideal": of_full / share,
            }
        )
        print(f"{name:<16} {times[name]:>7.3f} {of_full:>8.3f} {share:>11.3f} {of_full / share:>9.2f}")
    heads = bb.vit.blocks[0].attn.num_heads  # type: ignore[index,union-attr]
    shapes = {
        "encoder_full": (heads, prefix + n, bb.embed_dim // heads),
        "encoder_visible": (heads, prefix + kept, bb.embed_dim // heads),
        "decoder": (cfg.decoder_heads, prefix + n, cfg.decoder_dim // cfg.decoder_heads),
    }
    attention = []
    for name, (h, tokens, head_dim) in shapes.items():
        rate = attention_rate(args.batch, h, tokens, head_dim, args.steps, device)
        attention.append({"part": name, "heads": h, "tokens": tokens, "head_dim": head_dim, "gflops": rate})
        print(f"attention, {name:<16} {h} heads x {tokens} tokens x {head_dim}: {rate:.0f} GFLOP/s")
    record = {
        "model": model_name,
        "img_size": img_size,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "parts": rows,
        "attention": attention,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
