"""Step time of every objective relative to `supervised`, next to its FLOP-proportional ideal.

One training step (forward, backward, AdamW step, EMA update and the objective's hooks) of each
objective on the same backbone and batch, with the paper-scale heads of `recipes/imagenet/` (MAE's
8-block 512-wide decoder, DINO's 65536-way head and 10 local crops at 96 px, iBOT's 8192-way head on
the CLS and every patch token, MoCo v3's 4096-wide MLPs). The ideal ratio counts multiply-accumulates
from the model sizes: trainable parts cost 3x their forward (forward + backward), no-grad teachers 1x.
An objective is efficient when its measured ratio is close to its ideal (the issue's target: within
1.05x). Each objective's steps alternate with the supervised baseline's, so load drifting on a shared
machine hits both sides of its ratio.

    python bench/objectives.py                                   # cheap: ViT-Ti/16, 112 px, batch 4
    python bench/objectives.py --preset b16 --batch 8            # ViT-B/16 at 224 px
    python bench/objectives.py --preset l16 --batch 4 --device cuda --bf16
    python bench/objectives.py --preset b16 --batch 8 --processes 3    # medians of 3 fresh processes

Writes JSON (`--out`) naming the device; prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ssl_vit import objectives
from ssl_vit.backbone import Backbone
from ssl_vit.config import ModelConfig, load_recipe
from ssl_vit.engine.ema import ema_update
from ssl_vit.optim import adamw
from ssl_vit.types import Batch

DOUBLE_BATCH = "supervised_2x_batch"
PRESETS = {
    "tiny": ("vit_tiny_patch16_224", 112),
    "b16": ("vit_base_patch16_224", 224),
    "l16": ("vit_large_patch16_224", 224),
}


# ------------------------------------------------------------------ FLOP model
def blocks_macs(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Pre-norm transformer blocks on one sample: qkv + proj (4 D^2), MLP (2 r D^2), QK^T and AV (2 T D)."""
    per_block = tokens * (4 + 2 * mlp_ratio) * dim**2 + 2 * tokens**2 * dim
    return depth * per_block


def backbone_macs(bb: Backbone, patches: int) -> float:
    """Patch embedding plus the blocks on `patches` patch tokens and the prefix tokens."""
    vit = bb.vit
    fc1: torch.nn.Linear = vit.blocks[0].mlp.fc1  # type: ignore[index,union-attr,assignment]
    mlp_ratio = fc1.out_features / bb.embed_dim
    embed = patches * bb.patch_size**2 * bb.in_chans * bb.embed_dim
    return embed + blocks_macs(patches + bb.num_prefix_tokens, bb.embed_dim, len(vit.blocks), mlp_ratio)


def linear_macs(module: torch.nn.Module) -> float:
    """MACs of every Linear in `module` applied to one input row."""
    return float(
        sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))
    )


def mae_decoder_macs(mae: Any) -> float:
    """MAE's decoder blocks on every token plus its pixel head on every patch, per sample."""
    bb, cfg = mae.backbone, mae.cfg
    blocks = blocks_macs(
        bb.num_patches + bb.num_prefix_tokens, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_mlp_ratio
    )
    return blocks + bb.num_patches * linear_macs(mae.decoder_pred)


def ijepa_macs(obj: Any, batch: int, draws: int = 50) -> float:
    """I-JEPA per sample: the context encoder on the context tokens, the predictor on context plus one
    target block's tokens (once per block), both trained (3x); the target encoder on the full image
    (1x). Token counts are the means of `draws` seeded mask draws at this batch (the context is cut to
    the batch's shortest)."""
    bb, cfg = obj.backbone, obj.cfg
    generator = torch.Generator().manual_seed(0)
    drawn = [obj.masks(batch, torch.device("cpu"), generator) for _ in range(draws)]
    context = statistics.mean(c.shape[1] for c, _ in drawn)
    target = statistics.mean(t.shape[2] for _, t in drawn)
    predictor = blocks_macs(context + target, cfg.predictor_dim, cfg.predictor_depth, cfg.predictor_mlp_ratio)
    student = (
        backbone_macs(bb, context)
        + context * linear_macs(obj.predictor_embed)
        + cfg.n_targets * (predictor + target * linear_macs(obj.predictor_proj))
    )
    return 3 * student + backbone_macs(bb, bb.num_patches)


def ideal_macs(name: str, obj: Any, batch: int = 8) -> float:
    """Training MACs per sample: 3x forward for trained parts, 1x for no-grad teachers."""
    bb: Backbone = obj.backbone
    n = bb.num_patches
    full = backbone_macs(bb, n)
    if name == "supervised":
        return 3 * (full + linear_macs(obj.head))
    if name == "mpp":
        return 3 * (full + n * linear_macs(obj.head))
    if name == "mae":
        kept = int(n * (1 - obj.cfg.mask_ratio))
        embed = (kept + bb.num_prefix_tokens) * linear_macs(obj.decoder_embed)
        return 3 * (backbone_macs(bb, kept) + embed + mae_decoder_macs(obj))
    if name == "simclr":
        return 3 * 2 * (full + linear_macs(obj.projector))
    if name == "mocov3":
        online = full + linear_macs(obj.projector) + linear_macs(obj.predictor)
        return 3 * 2 * online + 2 * (full + linear_macs(obj.momentum_projector))
    if name in ("dino", "ibot"):
        spec = obj.views()
        local = backbone_macs(bb, (spec.local_size // bb.patch_size) ** 2)
        head = linear_macs(obj.head) + obj.head.last_layer.v.numel()  # MLP + weight-normalised layer
        student = 2 * full + spec.local_views * local + (2 + spec.local_views) * head
        teacher = 2 * (full + head)
        if name == "ibot":  # every patch of both global views through the MLP and the patch layer, twice
            patch_layer = obj.patch_head if obj.patch_head is not None else obj.head.last_layer
            patches = 2 * n * (linear_macs(obj.head.mlp) + patch_layer.v.numel())
            student, teacher = student + patches, teacher + patches
        return 3 * student + teacher
    if name == "ijepa":
        return ijepa_macs(obj, batch)
    raise ValueError(f"no FLOP model for '{name}'")


# ------------------------------------------------------------------ timing
def make_batch(obj: Any, batch: int, img_size: int, chans: int, device: torch.device) -> Batch:
    spec = obj.views()
    local = spec.local_size or img_size // 2
    views = [torch.randn(batch, chans, img_size, img_size, device=device) for _ in range(spec.global_views)]
    views += [torch.randn(batch, chans, local, local, device=device) for _ in range(spec.local_views)]
    return Batch(views=views, labels=torch.randint(0, 1000, (batch,), device=device))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(
    fn: Callable[[], None], steps: int, device: torch.device, module: torch.nn.Module | None = None
) -> float:
    """Median wall seconds of `fn` over `steps` calls after one warm-up; `module`'s gradients are
    dropped before each call, as a training step's are."""
    fn()
    times = []
    for _ in range(steps):
        if module is not None:
            module.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Trainer:
    """One objective with its batch and optimiser; `step()` times one full training step."""

    def __init__(
        self, obj: Any, batch: Batch, bf16: bool, device: torch.device, compile: bool = False
    ) -> None:
        self.obj, self.batch, self.bf16, self.device = obj, batch, bf16, device
        self.forward = torch.compile(obj) if compile else obj  # compiled on the first (warm-up) step
        params = [p for p in obj.parameters() if p.requires_grad]
        self.opt = adamw([{"params": params}], 1e-4, (0.9, 0.999))  # the engine's optimiser
        obj.train()

    def step(self) -> tuple[float, float]:
        """Seconds for the whole step, and for its forward + backward alone (what FLOPs predict)."""
        obj = self.obj
        sync(self.device)
        start = time.perf_counter()
        obj.set_progress(5000, 10000, 100)  # past DINO's frozen last layer
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, _ = self.forward(self.batch)
        loss.backward()
        sync(self.device)
        compute = time.perf_counter() - start
        obj.after_backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if obj.ema_pairs():
            ema_update(obj.ema_pairs(), obj.ema_momentum(5000, 10000))
        obj.after_optimizer_step()
        sync(self.device)
        return time.perf_counter() - start, compute


def build(
    name: str,
    model_name: str,
    img_size: int,
    batch: int,
    bf16: bool,
    device: torch.device,
    compile: bool = False,
) -> Trainer:
    """The objective with its paper-scale heads (`recipes/imagenet/`) on the chosen backbone."""
    recipe = load_recipe(f"imagenet/vit_b16_{name}")
    torch.manual_seed(0)
    model = ModelConfig(name=model_name, img_size=img_size, in_chans=3, pos_embed=recipe.model.pos_embed)
    section = dict(recipe.objective)
    if name in ("dino", "ibot"):  # local crops keep the paper's 96/224 of the image
        section["local_size"] = max(round(img_size * 96 / 224 / 16), 1) * 16
    with device:  # initialise on the device: ViT-L/16 takes many seconds on the CPU
        obj = objectives.build(section, Backbone.from_config(model), num_classes=1000)
    return Trainer(obj, make_batch(obj, batch, img_size, 3, device), bf16, device, compile)


def summarise(name: str, times: list[tuple[float, float]], base: list[tuple[float, float]]) -> dict[str, Any]:
    """Medians of (step, forward+backward) seconds and their ratios to the interleaved baseline."""
    step_s, fb_s = (statistics.median(t[i] for t in times) for i in (0, 1))
    base_s, base_fb = (statistics.median(t[i] for t in base) for i in (0, 1))
    return {
        "objective": name,
        "step_s": step_s,
        "baseline_s": base_s,
        "ratio": step_s / base_s,
        "fwd_bwd_ratio": fb_s / base_fb,
    }


def add_step_options(parser: argparse.ArgumentParser, warmup: int = 1) -> None:
    """Model preset, batch, timed and warm-up steps, device, precision, threads: what picks a step
    (shared with `bench/profile_step.py`, which profiles the same step)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU")


def step_device(args: argparse.Namespace) -> torch.device:
    """Apply `--threads` and return the `--device`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One process's measurement: every objective's steps interleaved with the baseline's."""
    device = step_device(args)
    model_name, default_size = PRESETS[args.preset]
    img_size = args.img_size or default_size
    names = args.objectives or objectives.names()
    # Each objective is timed in alternation with the supervised baseline (one step each, in
    # turn), so load that drifts on a shared machine hits both sides of the ratio alike.
    base = build("supervised", model_name, img_size, args.batch, args.bf16, device, args.compile)
    for _ in range(args.warmup):
        base.step()
    rows: list[dict[str, Any]] = []
    base_all: list[tuple[float, float]] = []
    if args.batch_scaling:
        names = [*names, DOUBLE_BATCH]
    for name in [n for n in names if n != "supervised"]:
        if name == DOUBLE_BATCH:  # the backbone alone at twice the images: what two views cost here
            other = build("supervised", model_name, img_size, 2 * args.batch, args.bf16, device, args.compile)
        else:
            other = build(name, model_name, img_size, args.batch, args.bf16, device, args.compile)
        for _ in range(args.warmup):
            other.step()
        pairs = [(base.step(), other.step()) for _ in range(args.steps)]
        base_all += [b for b, _ in pairs]
        row = summarise(name, [o for _, o in pairs], [b for b, _ in pairs])
        macs = (
            2 * ideal_macs("supervised", other.obj)
            if name == DOUBLE_BATCH
            else ideal_macs(name, other.obj, args.batch)
        )
        row["ideal_ratio"] = macs / ideal_macs("supervised", base.obj)
        rows.append(row)
        del other
        print(f"{name:<12} {row['step_s']:.3f} s/step (supervised {row['baseline_s']:.3f})", flush=True)
    rows.insert(0, summarise("supervised", base_all or [base.step()], base_all or [base.step()]))
    rows[0]["ideal_ratio"] = 1.0
    for row in rows:
        row["vs_ideal"] = row["ratio"] / row["ideal_ratio"]
        row["fwd_bwd_vs_ideal"] = row["fwd_bwd_ratio"] / row["ideal_ratio"]
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    return {
        "device": device_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": model_name,
        "img_size": img_size,
        "batch": args.batch,
        "bf16": args.bf16,
        "compile": args.compile,
        "rows": rows,
    }


MEDIAN_KEYS = ("step_s", "baseline_s", "ratio", "fwd_bwd_ratio", "vs_ideal", "fwd_bwd_vs_ideal")


def merge(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Several processes' records as one: each row's figures are the medians over processes, each
    taken on its own (so `step_s / baseline_s` need not equal `ratio`), and `runs` keeps every
    process's `vs_ideal` so the spread between processes can be read."""
    merged = {**records[0], "processes": len(records)}
    rows = []
    for i, row in enumerate(records[0]["rows"]):
        per_process = [r["rows"][i] for r in records]
        rows.append(
            {
                **row,
                **{k: statistics.median(p[k] for p in per_process) for k in MEDIAN_KEYS},
                "runs": [p["vs_ideal"] for p in per_process],
            }
        )
    merged["rows"] = rows
    return merged


def measure_in_processes(args: argparse.Namespace) -> dict[str, Any]:
    """`measure` in `args.processes` fresh interpreters, one after the other, merged.

    On the CPU a step's speed moves by about 10% from one process to the next (where the allocator
    and the OS place its memory), more than between steps of one process; a target of 5% can only
    be read from the median of several processes.
    """
    if args.processes == 1:
        return measure(args)
    records = []
    spawn = multiprocessing.get_context("spawn")
    for i in range(args.processes):
        print(f"process {i + 1}/{args.processes}", flush=True)
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            records.append(pool.submit(measure, args).result())
    return merge(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_options(parser)
    parser.add_argument("--img-size", type=int, help="default: the preset's (112 tiny, 224 b16/l16)")
    parser.add_argument("--objectives", nargs="+", default=None, help="default: every registered one")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile each objective (fuses element-wise kernels)"
    )
    parser.add_argument(
        "--batch-scaling",
        action="store_true",
        help=f"add a row '{DOUBLE_BATCH}': supervised at twice the batch (ideal 2.0), the device's own "
        "cost of twice the images, to read two-view objectives against",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="measure in this many fresh processes, one after another, and report the medians",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench/objectives.json"))
    args = parser.parse_args()
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    record = measure_in_processes(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    precision = "bf16" if record["bf16"] else "fp32"
    print(
        f"\n{record['model']} {record['img_size']}px batch {record['batch']} on {record['device']} "
        f"({precision}, {record.get('processes', 1)} process(es))"
    )
    print(
        f"{'objective':<12} {'s/step':>8} {'ratio':>7} {'fwd+bwd':>8} {'ideal':>7} {'vs ideal':>9} "
        f"{'fwd+bwd vs ideal':>17}  vs ideal per process"
    )
    for r in record["rows"]:
        runs = " ".join(f"{v:.2f}" for v in r.get("runs", []))
        print(
            f"{r['objective']:<12} {r['step_s']:>8.3f} {r['ratio']:>7.2f} {r['fwd_bwd_ratio']:>8.2f} "
            f"{r['ideal_ratio']:>7.2f} {r['vs_ideal']:>9.2f} {r['fwd_bwd_vs_ideal']:>17.2f}  {runs}"
        )
    print("ratios are to the supervised steps interleaved with each objective's; the optimiser and EMA")
    print("updates cost per parameter, not per FLOP, which is what separates the two `vs ideal` columns")


if __name__ == "__main__":
    main()
