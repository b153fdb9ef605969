"""CUDA path check: bf16 autocast, fused (flash) attention, and training throughput on one GPU.

    python bench/cuda_check.py --out bench/results/cuda_check.json

Measures one supervised training step of a ViT (default ViT-B/16 at 224 px) in fp32 and in bf16
autocast, and checks that timm's attention takes PyTorch's fused scaled-dot-product path and that
the flash kernel accepts its inputs. Writes JSON naming the device. Not a test: no assertion on time.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ssl_vit.backbone import Backbone
from ssl_vit.config import ModelConfig
from ssl_vit.objectives import build
from ssl_vit.types import Batch


def step_time(objective: torch.nn.Module, batch: Batch, dtype: torch.dtype | None, steps: int) -> float:
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4, fused=True)
    for i in range(steps + 3):  # three warm-up steps
        if i == 3:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = objective(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cuda_check.json"))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    backbone = Backbone.from_config(ModelConfig(name=args.model, img_size=224, in_chans=3))
    objective = build({"name": "supervised"}, backbone, num_classes=1000).to(device)
    attn = backbone.vit.blocks[0].attn
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    batch = Batch(views=[x], labels=torch.randint(0, 1000, (args.batch,), device=device))

    # Flash attention only accepts fp16/bf16: restricting SDPA to it proves the fused path runs.
    with (
        torch.no_grad(),
        torch.autocast("cuda", dtype=torch.bfloat16),
        sdpa_kernel([SDPBackend.FLASH_ATTENTION]),
    ):
        flash_out = backbone.forward_features(x[:4])
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.MATH]):
        math_out = backbone.forward_features(x[:4])
    fp32 = step_time(objective, batch, None, args.steps)
    bf16 = step_time(objective, batch, torch.bfloat16, args.steps)
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "model": args.model,
        "batch": args.batch,
        "timm_fused_attn": bool(getattr(attn, "fused_attn", False)),
        "flash_vs_math_max_abs_diff_bf16": float((flash_out.float() - math_out.float()).abs().max()),
        "fp32_tf32_step_s": fp32,
        "bf16_step_s": bf16,
        "fp32_tf32_images_per_s": args.batch / fp32,
        "bf16_images_per_s": args.batch / bf16,
        "bf16_speedup": fp32 / bf16,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
