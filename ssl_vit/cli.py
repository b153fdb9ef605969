"""The `ssl-vit` command: the only place that wires recipe, data, backbone, objective and engine."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ssl_vit import __version__

log = logging.getLogger("ssl_vit")


# ---------------------------------------------------------------- pretrain
def pretrain(recipe_name: str, overrides: Sequence[str], out: Path | None, quiet: bool) -> Path:
    """Load the recipe, train, export the backbone; returns the run directory."""
    import torch

    from ssl_vit import objectives
    from ssl_vit.backbone import Backbone
    from ssl_vit.config import load_recipe, resolve_recipe_path, save_recipe
    from ssl_vit.data import class_names, train_loader
    from ssl_vit.engine.loop import fit

    recipe = load_recipe(recipe_name, list(overrides))
    name = resolve_recipe_path(recipe_name).stem
    objectives.get(recipe.objective["name"])  # unknown objective: fail before any work
    run_dir = out or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    torch.manual_seed(recipe.seed)
    backbone = Backbone.from_config(recipe.model)
    objective = objectives.build(recipe.objective, backbone, num_classes=len(class_names(recipe.data.train)))
    spec = objective.views()
    loader = train_loader(
        recipe.data, spec, recipe.model.img_size, recipe.model.in_chans, recipe.train.batch_size, recipe.seed
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / "recipe.yaml")
    if not quiet:
        n_params = sum(p.numel() for p in backbone.parameters()) / 1e6
        print(f"pretraining '{recipe.objective['name']}' ({n_params:.2f}M backbone params) -> {run_dir}")
    result = fit(
        objective,
        loader,
        len(loader),
        recipe.optim,
        recipe.train,
        recipe.ckpt,
        recipe.log,
        run_dir,
        recipe.seed,
        progress=not quiet,
    )
    _export_from_objective(
        objective, run_dir / "backbone", recipe, run_dir, result.seconds, result.images_seen
    )
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "objective": recipe.objective["name"],
                "steps": result.steps,
                "images_seen": result.images_seen,
                "pretrain_seconds": result.seconds,
                "final_loss": result.final_loss,
            },
            indent=2,
        )
    )
    if not quiet:
        print(
            f"done: {result.steps} steps, {result.images_seen} images, {result.seconds:.1f}s, final loss {result.final_loss:.4f}"
        )
    return run_dir


def _export_from_objective(
    objective: Any,
    out: Path,
    recipe: Any,
    run_dir: Path,
    seconds: float | None = None,
    images: int | None = None,
) -> Path:
    from ssl_vit.export import export_backbone

    extra = {"objective": recipe.objective["name"], "run_dir": str(run_dir), "data": recipe.data.train}
    if seconds is not None:
        extra.update(pretrain_seconds=seconds, images_seen=images)
    return export_backbone(objective.backbone, out, recipe.data.mean, recipe.data.std, extra)


# ---------------------------------------------------------------- export
def export(run_dir: Path, out: Path) -> Path:
    """Rebuild the run's backbone from its recipe and latest checkpoint, and export it."""
    from ssl_vit.backbone import Backbone
    from ssl_vit.config import load_recipe
    from ssl_vit.engine.checkpoint import list_checkpoints, load_model_weights
    from ssl_vit.errors import CheckpointError
    from ssl_vit.export import export_backbone

    if not (run_dir / "recipe.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no recipe.yaml)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if not ckpts:
        raise CheckpointError(f"{run_dir} has no complete checkpoint under checkpoints/")
    backbone = Backbone.from_config(recipe.model)
    prefix = "backbone.vit."
    state = {k[len(prefix) :]: v for k, v in load_model_weights(ckpts[-1]).items() if k.startswith(prefix)}
    backbone.vit.load_state_dict(state)
    extra = {"objective": recipe.objective["name"], "run_dir": str(run_dir), "checkpoint": ckpts[-1].name}
    return export_backbone(backbone, out, recipe.data.mean, recipe.data.std, extra)


# ---------------------------------------------------------------- evaluators
def _cache_dir(no_cache: bool, cache_dir: Path | None) -> Path | None:
    from ssl_vit.eval.features import default_cache_dir

    return None if no_cache else cache_dir or default_cache_dir()


def _features(path: Path, data: str | None, feature: str, cache_dir: Path | None) -> Any:
    from ssl_vit.eval.features import load_eval_model, split_features

    model = load_eval_model(path, data)
    train = split_features(model, "train", feature, cache_dir=cache_dir)
    return model, train, split_features(model, "test", feature, cache_dir=cache_dir)


def probe(
    path: Path,
    data: str | None,
    feature: str,
    shots: int = 0,
    seeds: int = 5,
    method: str = "auto",
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Full linear probe, or the K-shot probe over `seeds` draws; written to RUN_DIR/eval/."""
    from ssl_vit.eval.features import save_result
    from ssl_vit.eval.linear_probe import linear_probe, lowshot_probe

    model, train, test = _features(path, data, feature, cache_dir)
    if shots:
        result = lowshot_probe(*train, *test, shots, seeds)
    else:
        result = linear_probe(*train, *test, method=method)
    result.update(data=model.data, feature=feature, model=str(path))
    save_result(model, f"lowshot_{shots}" if shots else "linear_probe", result)
    return result


def knn(
    path: Path, data: str | None, feature: str, ks: Sequence[int], temperature: float, cache_dir: Path | None
) -> dict[str, Any]:
    from ssl_vit.eval.features import save_result
    from ssl_vit.eval.knn import knn_classify

    model, train, test = _features(path, data, feature, cache_dir)
    result = knn_classify(*train, *test, ks, temperature)
    result.update(data=model.data, feature=feature, model=str(path))
    save_result(model, "knn", result)
    return result


def finetune_model(model: Any, cfg: Any, out: Path, progress: bool) -> dict[str, Any]:
    """Fine-tune with the run's own augmentation settings where the model came from a run."""
    from ssl_vit.config import load_recipe
    from ssl_vit.eval.finetune import finetune

    data = load_recipe(model.run_dir / "recipe.yaml").data if model.run_dir else None
    return finetune(model, out, cfg, data, progress)


def _finetune_fn(cfg: Any) -> Callable[[Any, int, Path], float]:
    """What `compare` calls for each input and seed: fine-tune, return test top-1."""
    from dataclasses import replace

    def run(model: Any, seed: int, out: Path) -> float:
        return float(finetune_model(model, replace(cfg, seed=seed), out, progress=False)["top1"])

    return run


def compare_runs(
    inputs: Sequence[Path], out: Path, protocol: Any, finetune_cfg: Any, cache_dir: Path | None
) -> list[dict[str, Any]]:
    from dataclasses import asdict

    from ssl_vit.eval.compare import compare
    from ssl_vit.flops import pretrain_flops

    settings = {"finetune": asdict(finetune_cfg)} if protocol.finetune else {}
    return compare(inputs, out, protocol, cache_dir, pretrain_flops, _finetune_fn(finetune_cfg), settings)


# ---------------------------------------------------------------- demo
DEMO_DATA = "digits"  # becomes "shapes" once the built-in shapes set lands
# Pretraining steps per objective, before --steps-scale, chosen for roughly equal wall time per
# objective: seconds per step measured on the shared 2-core machine (1 thread, under load) with the
# shapes recipes: supervised 0.24, mpp 0.27, mae 0.23, simclr 1.5, mocov3 1.5, dino 1.4.
DEMO_STEPS: dict[str, dict[str, int]] = {
    "digits": {"supervised": 300},
    "shapes": {"supervised": 300, "mpp": 300, "mae": 400, "simclr": 80, "mocov3": 80, "dino": 60},
}
DEMO_DEFAULT_STEPS = 150
DEMO_FINETUNE_STEPS = 100
DEMO_OVERRIDES = ["ckpt.keep_last=1"]  # recipe overrides for every demo run
DEMO_PROTOCOL: dict[str, Any] = {
    "probe": True,
    "knn": True,
    "finetune": True,
    "shots": 10,
    "seeds": 3,
    "finetune_seeds": 1,
}


def demo_recipes(data: str) -> list[str]:
    """Every registered objective that has a recipe for `data`, as `data/name`."""
    from ssl_vit import objectives
    from ssl_vit.config import RECIPES_DIR

    return [f"{data}/{n}" for n in objectives.names() if (RECIPES_DIR / data / f"{n}.yaml").is_file()]


def demo(data: str, steps_scale: float, out: Path, quiet: bool) -> list[dict[str, Any]]:
    """Pretrain every objective with a recipe for `data` on a step budget, then compare them all."""
    from ssl_vit.errors import RecipeError
    from ssl_vit.eval.compare import Protocol
    from ssl_vit.eval.finetune import FinetuneConfig

    recipes = demo_recipes(data)
    if not recipes:
        raise RecipeError(f"no recipes under recipes/{data}/ for any registered objective")
    if steps_scale <= 0:
        raise RecipeError(f"--steps-scale must be positive, got {steps_scale}")
    runs = []
    for recipe in recipes:
        name = recipe.split("/")[1]
        steps = max(1, round(DEMO_STEPS.get(data, {}).get(name, DEMO_DEFAULT_STEPS) * steps_scale))
        runs.append(pretrain(recipe, [f"train.max_steps={steps}", *DEMO_OVERRIDES], out / name, quiet))
    protocol = Protocol(**DEMO_PROTOCOL)
    finetune_cfg = FinetuneConfig(steps=max(1, round(DEMO_FINETUNE_STEPS * steps_scale)))
    if not quiet:
        print(f"comparing {len(runs)} backbone(s) and 2 baselines (k-NN, 10-shot, linear probe, fine-tune)")
    return compare_runs(runs, out / "compare", protocol, finetune_cfg, out / "cache")


# ---------------------------------------------------------------- commands
# Each command is a parser builder plus a runner; `COMMANDS` lists them in the order of `--help`.
def _add_pretrain(sub: Any) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain a backbone from a recipe", description="Pretrain a backbone from a recipe."
    )
    p.add_argument("recipe", help="a YAML file or a name under recipes/, e.g. digits/supervised")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe overrides, e.g. optim.lr=3e-4 train.max_steps=100",
    )
    p.add_argument("--out", type=Path, help="run directory (default runs/<recipe>-<timestamp>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or chatter")


def _run_pretrain(args: argparse.Namespace) -> None:
    pretrain(args.recipe, args.overrides, args.out, args.quiet)


def _add_eval_args(p: Any) -> None:
    from ssl_vit.eval.features import FEATURE_KINDS

    p.add_argument("--data", help="data to evaluate on (default: the run's data.train, else digits)")
    p.add_argument(
        "--feature",
        default="cls",
        choices=FEATURE_KINDS,
        help="pooled token (cls), mean of patch tokens (avg), CLS of the last 4 blocks (cls4)",
    )
    p.add_argument(
        "--cache-dir", type=Path, help="feature cache (default $SSL_VIT_CACHE_DIR or ~/.cache/ssl_vit)"
    )
    p.add_argument("--no-cache", action="store_true", help="extract features again, keep none on disk")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quiet", action="store_true", help="print only the result")


def _add_probe(sub: Any) -> None:
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
    cache = _cache_dir(args.no_cache, args.cache_dir)
    result = probe(args.path, args.data, args.feature, args.shots, args.seeds, args.method, cache)
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


def _add_knn(sub: Any) -> None:
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
    cache = _cache_dir(args.no_cache, args.cache_dir)
    result = knn(args.path, args.data, args.feature, args.k, args.temperature, cache)
    if args.json:
        print(json.dumps(result))
    else:
        for k, top1 in result["top1_per_k"].items():
            print(f"k-NN (k={k}, T={args.temperature}) top-1: {100 * top1:.2f}%")


def _add_finetune(sub: Any) -> None:
    from ssl_vit.eval.finetune import FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser(
        "finetune",
        help="fine-tune a backbone end to end",
        description="Fine-tune with a fresh head: layer-wise lr decay, drop path, label smoothing, mixup.",
    )
    p.add_argument("path", type=Path, help="a run directory, an export folder or any timm-loadable folder")
    p.add_argument("--data", help="data to fine-tune on (default: the run's data.train, else digits)")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/eval/finetune)")
    for name, kind in [
        ("steps", int),
        ("batch_size", int),
        ("lr", float),
        ("layer_decay", float),
        ("drop_path", float),
        ("label_smoothing", float),
        ("mixup", float),
        ("cutmix", float),
        ("weight_decay", float),
        ("seed", int),
    ]:
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=getattr(d, name),
            help=f"default {getattr(d, name)}",
        )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar or chatter")


def _run_finetune(args: argparse.Namespace) -> None:
    from ssl_vit.eval.features import load_eval_model, save_result
    from ssl_vit.eval.finetune import FinetuneConfig

    fields = ("steps", "batch_size", "lr", "layer_decay", "drop_path", "label_smoothing", "mixup", "cutmix")
    cfg = FinetuneConfig(**{f: getattr(args, f) for f in (*fields, "weight_decay", "seed")})
    model = load_eval_model(args.path, args.data)
    if args.out:
        out = args.out
    elif model.run_dir:
        out = model.run_dir / "eval" / "finetune"
    else:
        out = Path("runs") / f"finetune-{model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = finetune_model(model, cfg, out, progress=not (args.quiet or args.json))
    result.update(data=model.data, model=str(args.path))
    save_result(model, "finetune", result)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"fine-tune top-1: {100 * result['top1']:.2f}% ({result['steps']} steps, {result['seconds']:.0f}s) -> {out}"
        )


def _add_compare(sub: Any) -> None:
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
    p.add_argument("--finetune-steps", type=int, default=300, help="fine-tune steps per run (default 300)")
    _add_eval_args(p)


def _run_compare(args: argparse.Namespace) -> None:
    from ssl_vit.eval.compare import Protocol
    from ssl_vit.eval.finetune import FinetuneConfig
    from ssl_vit.eval.report import format_table

    chosen = args.probe or args.knn or args.finetune
    protocol = Protocol(
        probe=args.probe or not chosen,
        knn=args.knn or not chosen,
        finetune=args.finetune,
        shots=args.shots,
        seeds=args.seeds,
        feature=args.feature,
        data=args.data,
    )
    cache = _cache_dir(args.no_cache, args.cache_dir)
    rows = compare_runs(args.inputs, args.out, protocol, FinetuneConfig(steps=args.finetune_steps), cache)
    if args.json:
        print(json.dumps(rows))
        return
    print(format_table(rows))
    print(f"report: {args.out / 'report.md'}; charts: {args.out / 'compare.png'}, {args.out / 'compute.png'}")


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a run's backbone as a timm folder",
        description="Export a backbone that plain timm loads.",
    )
    p.add_argument("run_dir", type=Path, help="a run directory")
    p.add_argument("--out", type=Path, required=True, help="output folder (config.json + model.safetensors)")


def _run_export(args: argparse.Namespace) -> None:
    print(f"exported -> {export(args.run_dir, args.out)}")


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the end-to-end demo (what `make demo` runs)",
        description="Pretrain every objective on a built-in set with a step budget, then compare them.",
    )
    p.add_argument(
        "--data", default=DEMO_DATA, choices=["shapes", "digits"], help=f"built-in set (default {DEMO_DATA})"
    )
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step budget (default 1)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or chatter")


def _run_demo(args: argparse.Namespace) -> None:
    from ssl_vit.eval.report import format_table

    start = time.perf_counter()
    rows = demo(args.data, args.steps_scale, args.out, args.quiet)
    print(format_table(rows))
    report = args.out / "compare"
    print(f"report: {report / 'report.md'}; charts: {report / 'compare.png'}, {report / 'compute.png'}")
    print(
        f"backbones: {args.out}/<objective>/backbone (timm.create_model('local-dir:<folder>', pretrained=True))"
    )
    print(f"demo finished in {time.perf_counter() - start:.0f}s")


COMMANDS: dict[str, tuple[Callable[[Any], None], Callable[[argparse.Namespace], None]]] = {
    "pretrain": (_add_pretrain, _run_pretrain),
    "probe": (_add_probe, _run_probe),
    "knn": (_add_knn, _run_knn),
    "finetune": (_add_finetune, _run_finetune),
    "compare": (_add_compare, _run_compare),
    "export": (_add_export, _run_export),
    "demo": (_add_demo, _run_demo),
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO, format="%(message)s"
    )
    for noisy in ("accelerate", "timm", "torch"):
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
    return 0
