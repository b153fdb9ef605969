"""The `ssl-vit` command: parses arguments, calls `ssl_vit.api`, prints the result."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ssl_vit import __version__, api

log = logging.getLogger("ssl_vit")
Subparsers = argparse._SubParsersAction  # what `add_subparsers` returns (typeshed's own name for it)


# ---------------------------------------------------------------- commands
# Each command is a parser builder plus a runner; `COMMANDS` lists them in the order of `--help`.
def _add_pretrain(sub: Subparsers) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a backbone from a recipe",
        description="Pretrain a backbone from a recipe, or continue a run with --resume.",
    )
    p.add_argument("recipe", nargs="?", help="a YAML file or a name under recipes/, e.g. digits/supervised")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe overrides, e.g. optim.lr=3e-4 train.max_steps=100",
    )
    p.add_argument("--out", type=Path, help="run directory (default runs/<recipe>-<timestamp>)")
    p.add_argument(
        "--resume",
        metavar="auto|RUN_DIR",
        help="'auto': continue the latest valid checkpoint in --out, or start fresh there; "
        "RUN_DIR: continue that run with its saved recipe (only train.epochs/max_steps may change)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or chatter")


def _run_pretrain(args: argparse.Namespace) -> None:
    from ssl_vit.engine.signals import TrainingInterrupted

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:
        recipe, overrides = None, [recipe, *overrides]  # `--resume RUN_DIR key=value`: no RECIPE
    try:
        api.pretrain(recipe, overrides, args.out, args.resume, args.quiet)
    except TrainingInterrupted as stop:
        run_dir = Path(stop.checkpoint).parent.parent
        print(f"interrupted: {stop}; continue with --resume {run_dir}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    from ssl_vit.eval.features import FEATURE_KINDS

    p.add_argument(
        "--data",
        help="labelled data to evaluate on: a built-in set, shards, a folder of class folders or a CSV "
        "(default: the recipe's eval.train / eval.test, else its data.train, else digits)",
    )
    p.add_argument(
        "--feature",
        choices=FEATURE_KINDS,
        help="pooled token (cls), mean of patch tokens (avg), CLS of the last 4 blocks (cls4); "
        "default: the run's recipe eval.feature, else cls",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="feature cache (default $SSL_VIT_CACHE/features or ~/.cache/ssl_vit/features)",
    )
    p.add_argument("--no-cache", action="store_true", help="extract features again, keep none on disk")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quiet", action="store_true", help="print only the result")


def _eval_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options `_add_eval_args` adds, as `api` keyword arguments."""
    return {
        "data": args.data,
        "feature": args.feature,
        "cache": not args.no_cache,
        "cache_dir": args.cache_dir,
    }


def _add_probe(sub: Subparsers) -> None:
    p = sub.add_parser(
        "probe",
        help="linear-probe a backbone",
        description="Linear probe on frozen features (logistic regression, or a torch head on large data).",
    )
    p.add_argument("path", type=Path, help="a run directory, an export folder or any timm-loadable folder")
    p.add_argument(
        "--shots", type=int, default=0, help="K labelled images per class (low-shot probe); 0: all"
    )
    p.add_argument("--seeds", type=int, default=5, help="seeded draws of the low-shot probe (mean ± std)")
    p.add_argument(
        "--method", default="auto", choices=["auto", "sklearn", "torch"], help="probe implementation"
    )
    _add_eval_args(p)


def _run_probe(args: argparse.Namespace) -> None:
    result = api.probe(
        args.path, method=args.method, shots=args.shots, seeds=args.seeds, **_eval_options(args)
    )
    if args.json:
        print(json.dumps(result))
    elif args.shots:
        std = result["top1_std"] or 0.0
        print(
            f"{args.shots}-shot probe top-1: {100 * result['top1']:.2f} ± {100 * std:.2f}% ({args.seeds} draws)"
        )
    else:
        print(
            f"linear probe top-1: {100 * result['top1']:.2f}% (n_train={result['n_train']}, n_test={result['n_test']})"
        )


def _add_knn(sub: Subparsers) -> None:
    p = sub.add_parser(
        "knn",
        help="k-NN accuracy of a backbone",
        description="Weighted k-NN on L2-normalised frozen features (DINO's protocol).",
    )
    p.add_argument("path", type=Path, help="a run directory, an export folder or any timm-loadable folder")
    p.add_argument("--k", type=int, nargs="+", default=[20], help="neighbour counts (default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T) (default 0.07)")
    _add_eval_args(p)


def _run_knn(args: argparse.Namespace) -> None:
    result = api.knn(args.path, k=args.k, temperature=args.temperature, **_eval_options(args))
    if args.json:
        print(json.dumps(result))
    else:
        for k, top1 in result["top1_per_k"].items():
            print(f"k-NN (k={k}, T={args.temperature}) top-1: {100 * top1:.2f}%")


FINETUNE_OPTIONS: list[tuple[str, type]] = [
    ("steps", int),
    ("batch_size", int),
    ("lr", float),
    ("warmup_steps", int),
    ("layer_decay", float),
    ("drop_path", float),
    ("label_smoothing", float),
    ("mixup", float),
    ("cutmix", float),
    ("weight_decay", float),
    ("seed", int),
    ("head_init", str),
]


def _add_finetune(sub: Subparsers) -> None:
    from ssl_vit.eval.finetune import LOWSHOT_DEFAULTS, FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser(
        "finetune",
        help="fine-tune a backbone end to end",
        description="Fine-tune with a fresh head: layer-wise lr decay, drop path, label smoothing, mixup. "
        "With --shots K, on K labelled images per class only (the low-label case), over seeded draws.",
    )
    p.add_argument("path", type=Path, help="a run directory, an export folder or any timm-loadable folder")
    p.add_argument(
        "--data", help="labelled data to fine-tune on (default: the recipe's eval.train, else its data.train)"
    )
    p.add_argument(
        "--out", type=Path, help="output folder (default RUN_DIR/eval/finetune, or finetune_lowshot_K)"
    )
    p.add_argument(
        "--shots", type=int, default=0, help="K labelled training images per class, drawn per seed; 0: all"
    )
    p.add_argument(
        "--seeds",
        type=int,
        help=f"runs with seeds --seed, --seed + 1, ... (with --shots, each its own draw), mean ± std; "
        f"default {api.LOWSHOT_FINETUNE_DRAWS} with --shots, else 1",
    )
    for name, kind in FINETUNE_OPTIONS:
        shot = f"; {LOWSHOT_DEFAULTS[name]} with --shots" if name in LOWSHOT_DEFAULTS else ""
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"default {getattr(d, name)}{shot}")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (always one at the end)")
    p.add_argument(
        "--resume", action="store_true", help="continue the latest checkpoint in the output folder"
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar or chatter")


def _run_finetune(args: argparse.Namespace) -> None:
    given = {name: getattr(args, name) for name, _ in FINETUNE_OPTIONS if getattr(args, name) is not None}
    result = api.finetune(
        args.path,
        shots=args.shots,
        seeds=args.seeds,
        data=args.data,
        out=args.out,
        resume=args.resume,
        progress=not (args.quiet or args.json),
        ckpt_every_steps=args.ckpt_every,
        **given,
    )
    out = result["out_dir"]
    if args.json:
        print(json.dumps(result))
    elif "draws" not in result:
        print(
            f"fine-tune top-1: {100 * result['top1']:.2f}% ({result['steps']} steps, {result['seconds']:.0f}s) -> {out}"
        )
    else:
        label = f"fine-tune {args.shots}-shot" if args.shots else "fine-tune"
        std = result["top1_std"]
        spread = f" ± {100 * std:.2f}" if std is not None else ""
        per_draw = ", ".join(f"{100 * v:.1f}" for v in result["per_draw"])
        print(
            f"{label} top-1: {100 * result['top1']:.2f}{spread}% over {result['draws']} seed(s) ({per_draw}; "
            f"{result['steps']} steps each, {result['seconds']:.0f}s in all) -> {out}"
        )


def _add_compare(sub: Subparsers) -> None:
    from ssl_vit.eval.finetune import LOWSHOT_DEFAULTS, FinetuneConfig

    p = sub.add_parser(
        "compare",
        help="compare backbones with identical protocols",
        description="Evaluate runs or exports with the same protocols, plus raw-pixel and random-init baselines; "
        "writes report.md, results.json, results.csv, compare.png and compute.png.",
    )
    p.add_argument("inputs", type=Path, nargs="+", metavar="RUN_OR_EXPORT", help="run directories or folders")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--probe", action="store_true", help="linear probe and the low-shot probe")
    p.add_argument("--knn", action="store_true", help="weighted k-NN")
    p.add_argument("--finetune", action="store_true", help="short end-to-end fine-tune")
    p.add_argument(
        "--seeds", type=int, default=3, help="low-shot draws and fine-tune runs per input (default 3)"
    )
    p.add_argument(
        "--shots", type=int, default=10, help="K of the low-shot probe; 0 turns it off (default 10)"
    )
    p.add_argument(
        "--finetune-shots",
        type=int,
        default=0,
        help="fine-tune on K labelled images per class (draw s for fine-tune seed s, the same for every "
        "input) instead of all labels (default 0: all)",
    )
    p.add_argument(
        "--finetune-steps",
        type=int,
        help=f"fine-tune steps per run (default {FinetuneConfig().steps}; "
        f"{LOWSHOT_DEFAULTS['steps']} with --finetune-shots)",
    )
    p.add_argument("--figures", action="store_true", help="also overlay training curves and embedding maps")
    _add_eval_args(p)


def _run_compare(args: argparse.Namespace) -> None:
    from ssl_vit.eval.report import format_table

    chosen = args.probe or args.knn or args.finetune
    rows = api.compare(
        args.inputs,
        args.out,
        probe=args.probe or not chosen,
        knn=args.knn or not chosen,
        finetune=args.finetune,
        shots=args.shots,
        seeds=args.seeds,
        finetune_shots=args.finetune_shots,
        finetune_steps=args.finetune_steps,
        figures=args.figures,
        **_eval_options(args),
    )
    if args.json:
        print(json.dumps(rows))
        return
    print(format_table(rows))
    print(f"report: {args.out / 'report.md'}; charts: {args.out / 'compare.png'}, {args.out / 'compute.png'}")
    if args.figures:
        print(f"figures: {args.out / 'figures'}")


def _add_export(sub: Subparsers) -> None:
    p = sub.add_parser(
        "export",
        help="export a run's backbone: a timm folder with a model card, or ONNX",
        description="Export a backbone that plain timm loads (a folder with a README.md model card), or ONNX.",
    )
    p.add_argument("run_dir", type=Path, help="a run directory")
    p.add_argument("--out", type=Path, required=True, help="output folder (timm) or file (onnx: model.onnx)")
    p.add_argument(
        "--format",
        default="timm",
        choices=["timm", "onnx"],
        help="timm: config.json + model.safetensors + README.md; onnx: pooled features, dynamic batch",
    )
    p.add_argument(
        "--weights",
        choices=["student", "teacher"],
        help="online or EMA-teacher backbone (default: the one the objective's paper evaluates)",
    )
    p.add_argument(
        "--license", default="apache-2.0", help="license id in the model card (default apache-2.0)"
    )


def _run_export(args: argparse.Namespace) -> None:
    print(f"exported -> {api.export(args.run_dir, args.out, args.weights, args.format, args.license)}")


def _add_demo(sub: Subparsers) -> None:
    from ssl_vit.demo_runs import DEMO_DATA

    p = sub.add_parser(
        "demo",
        help="the end-to-end demo (what `make demo` runs)",
        description="Pretrain every objective on a built-in set, in parallel processes, then compare them.",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="recipe overrides for every run, e.g. model.depth=2"
    )
    p.add_argument(
        "--data", default=DEMO_DATA, choices=["digits", "shapes"], help=f"built-in set (default {DEMO_DATA})"
    )
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step budget (default 1)")
    p.add_argument(
        "--full",
        action="store_true",
        help="each recipe's own budget and settings, an 800-step fine-tune (digits: 18 min on 2 cores)",
    )
    p.add_argument("--objectives", nargs="+", metavar="NAME", help="only these objectives (default: all)")
    p.add_argument("--jobs", type=int, help="runs at a time (default: one per core)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or chatter")


def _run_demo(args: argparse.Namespace) -> None:
    from ssl_vit.data.shards import available_cores
    from ssl_vit.demo_runs import headline
    from ssl_vit.eval.report import format_table

    start = time.perf_counter()
    rows = api.demo(
        args.data,
        out=args.out,
        objectives=args.objectives,
        steps_scale=args.steps_scale,
        jobs=args.jobs,
        threads=args.threads,
        overrides=args.overrides,
        full=args.full,
        quiet=args.quiet,
    )
    print(headline(rows))
    print(format_table(rows))
    report = args.out / "compare"
    print(f"report: {report / 'report.md'}; charts: {report / 'compare.png'}, {report / 'compute.png'}")
    print(f"figures: {report / 'figures'} (training curves, embedding maps)")
    print(
        f"backbones: {args.out}/<objective>/backbone (timm.create_model('local-dir:<folder>', pretrained=True))"
    )
    print(f"demo finished in {time.perf_counter() - start:.0f}s on {available_cores()} cores")


def _add_show(sub: Subparsers) -> None:
    p = sub.add_parser(
        "show",
        help="draw figures of runs (curves, attention, embedding, reconstructions)",
        description="Write PNG figures of one or more runs or export folders, listed in DIR/index.md.",
    )
    p.add_argument("paths", type=Path, nargs="+", metavar="RUN_DIR", help="run directories or export folders")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/figures; required for several)")
    p.add_argument("--curves", action="store_true", help="only the training curves, several runs overlaid")
    p.add_argument(
        "--embedding", default="tsne", choices=["tsne", "pca"], help="2-D map method (default tsne)"
    )
    p.add_argument("--images", type=int, default=4, help="images in attention and reconstruction figures")
    p.add_argument("--seed", type=int, default=0, help="seed of masks and maps (same seed, same pictures)")


def _run_show(args: argparse.Namespace) -> None:
    from ssl_vit.figures import KINDS, show

    start = time.perf_counter()
    kinds = ("curves",) if args.curves else KINDS
    report = show(args.paths, args.out, kinds, args.embedding, args.seed, args.images)
    for path in report.written:
        print(f"wrote {path}")
    for figure, why in report.skipped:
        print(f"skipped {figure}: {why}")
    print(
        f"{len(report.written)} figure(s) in {time.perf_counter() - start:.1f}s; index: {report.out_dir / 'index.md'}"
    )


def _add_shards(sub: Subparsers) -> None:
    p = sub.add_parser(
        "shards",
        help="write WebDataset shards from a built-in set, a folder of images or a CSV",
        description="Write DIR/train-%06d.tar (and val-/test-) plus DIR/manifest.json. Run again after "
        "an interruption, it continues from the last complete shard.",
    )
    p.add_argument(
        "src",
        help="digits, shapes[:TRAIN:TEST], a folder of images (flat, nested or class folders), "
        "or a CSV/TSV of path[,label]",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder (must not hold shards, but an unfinished write)",
    )
    p.add_argument(
        "--labels",
        default="auto",
        choices=["auto", "folders", "none"],
        help="folders: each first-level sub-folder is a class; none: unlabelled; auto (default): folders "
        "when every image sits in one of at least two sub-folders, else none",
    )
    p.add_argument(
        "--workers", type=int, help="processes that decode and check images (default: the available cores)"
    )
    p.add_argument(
        "--shard-size", type=int, default=None, help="samples per shard (default 1000; built-in: 16 shards)"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.0, help="fraction written to val-* shards (default 0)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the write order and the val split")
    p.add_argument(
        "--strict", action="store_true", help="stop at the first unreadable image instead of skipping it"
    )


def _run_shards(args: argparse.Namespace) -> None:
    manifest = api.shards(
        args.src,
        args.out,
        shard_size=args.shard_size,
        val_fraction=args.val_fraction,
        strict=args.strict,
        seed=args.seed,
        labels=args.labels,
        workers=args.workers,
        progress=sys.stderr.isatty(),
    )
    splits = ", ".join(
        f"{name} {s['count']} in {len(s['shards'])} shards" for name, s in manifest["splits"].items()
    )
    labels = f"{len(manifest['classes'])} classes" if manifest["labelled"] else "no labels"
    print(f"wrote {splits}, {labels} -> {args.out} (skipped {manifest['skipped']['count']} unreadable)")


COMMANDS: dict[str, tuple[Callable[[Subparsers], None], Callable[[argparse.Namespace], None]]] = {
    "pretrain": (_add_pretrain, _run_pretrain),
    "probe": (_add_probe, _run_probe),
    "knn": (_add_knn, _run_knn),
    "finetune": (_add_finetune, _run_finetune),
    "compare": (_add_compare, _run_compare),
    "export": (_add_export, _run_export),
    "demo": (_add_demo, _run_demo),
    "show": (_add_show, _run_show),
    "shards": (_add_shards, _run_shards),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-vit",
        description="Pretrain a ViT backbone with a chosen objective, evaluate it, export it to timm.",
    )
    parser.add_argument("--version", action="version", version=f"ssl-vit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser, _ in COMMANDS.values():
        add_parser(sub)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; `key=value` overrides may come before, between or after options
    (argparse alone stops collecting a positional list at the first option)."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(words)
    misplaced = [w for w in extra if "=" in w and not w.startswith("-")]
    if len(misplaced) != len(extra) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(args, "overrides"):
        found = set(args.overrides) | set(misplaced)
        for name, value in vars(args).items():  # `--objectives mae a.b=1`: the list option took it
            if name != "overrides" and isinstance(value, list) and all(isinstance(v, str) for v in value):
                found |= {v for v in value if "=" in v}
                setattr(args, name, [v for v in value if "=" not in v])
        args.overrides = [w for w in words if w in found]  # command-line order: the last one wins
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO, format="%(message)s"
    )
    for noisy in ("accelerate", "timm", "torch", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ssl_vit.errors import SslVitError

    try:
        COMMANDS[args.command][1](args)
    except SslVitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Under torchrun, end the process group while the interpreter is whole: left to interpreter
    exit, gloo's worker threads can abort the process ("terminate called without an active
    exception", SIGABRT; pytorch/pytorch#190489), which failed a 2-process test once in ~60 runs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
