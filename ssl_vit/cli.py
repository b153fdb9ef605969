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
RUN_LENGTH_KEYS = ("train.epochs", "train.max_steps")  # the only keys a resume may change


def _flat(recipe: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    def walk(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                out.update(walk(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: node}

    return walk(OmegaConf.to_container(OmegaConf.structured(recipe)), "")


def _check_resumable(saved: Any, given: Any, run_dir: Path) -> None:
    """A resume may change the run length only; anything else would not continue the same run."""
    old, new = _flat(saved), _flat(given)
    for key in sorted(set(old) | set(new)):
        if key not in RUN_LENGTH_KEYS and old.get(key) != new.get(key):
            from ssl_vit.errors import RecipeError

            raise RecipeError(
                f"--resume: {key} is {old.get(key)!r} in {run_dir / 'recipe.yaml'} but {new.get(key)!r} "
                f"here; only {' and '.join(RUN_LENGTH_KEYS)} may change when resuming"
            )


def _resolve_run(
    recipe_name: str | None, overrides: Sequence[str], out: Path | None, resume: str | None
) -> tuple[Any, Path, Path | None]:
    """(recipe, run dir, checkpoint to resume from or None) for `pretrain`.

    `--resume auto` continues the latest valid checkpoint of `--out` or starts fresh there;
    `--resume RUN_DIR` does the same in RUN_DIR, with its saved recipe unless RECIPE is given.
    """
    from ssl_vit.config import load_recipe, resolve_recipe_path
    from ssl_vit.errors import CheckpointError, RecipeError

    if resume is None or resume == "auto":
        if resume == "auto" and out is None:
            raise RecipeError("--resume auto needs --out RUN_DIR (the run to continue)")
        run_dir = out
    else:
        run_dir = Path(resume)
        if out is not None and out.resolve() != run_dir.resolve():
            raise RecipeError(f"--resume {run_dir} continues in {run_dir}; drop --out {out}")
        if not (run_dir / "recipe.yaml").is_file():
            raise CheckpointError(f"{run_dir} is not a run directory (no recipe.yaml)")
    saved_path = run_dir / "recipe.yaml" if run_dir is not None else None
    has_saved = saved_path is not None and saved_path.is_file()
    if recipe_name is None and not (resume is not None and has_saved):
        raise RecipeError("pretrain needs a RECIPE (or --resume RUN_DIR to continue a run)")
    recipe = load_recipe(recipe_name if recipe_name is not None else str(saved_path), list(overrides))
    if run_dir is None:
        name = resolve_recipe_path(str(recipe_name)).stem
        run_dir = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    from ssl_vit.engine.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if resume is None and ckpt is not None and not (run_dir / "summary.json").is_file():
        raise CheckpointError(
            f"{run_dir} holds an unfinished run ({ckpt.name}); continue it with --resume auto "
            "or choose another --out"
        )
    if resume is not None and ckpt is not None and has_saved:
        _check_resumable(load_recipe(str(saved_path)), recipe, run_dir)
    return recipe, run_dir, ckpt if resume is not None else None


def _fresh_run_dir(run_dir: Path) -> None:
    """Starting afresh where a finished (or never checkpointed) run was: drop its engine files."""
    import shutil

    for name in ("checkpoints", "metrics.jsonl", "summary.json", "train_state.json"):
        path = run_dir / name
        if path.is_dir():
            log.warning("starting afresh in %s: removing the previous run's %s/", run_dir, name)
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def pretrain(
    recipe_name: str | None,
    overrides: Sequence[str],
    out: Path | None,
    quiet: bool,
    resume: str | None = None,
) -> Path:
    """Load the recipe, train (or resume), export the backbone; returns the run directory."""
    recipe, run_dir, ckpt = _resolve_run(recipe_name, overrides, out, resume)  # fail fast, before torch

    import torch
    from accelerate.utils import broadcast_object_list

    from ssl_vit import data, objectives
    from ssl_vit.config import save_recipe
    from ssl_vit.data import class_names, train_loader
    from ssl_vit.engine.loop import ensure_writable, fit, processes
    from ssl_vit.model_card import write_model_card
    from ssl_vit.pretrained import backbone_from_config

    objectives.get(recipe.objective["name"])  # unknown objective: fail before any work
    world = processes(recipe.train)  # under torchrun: this rank among all; fit's Accelerator reuses it
    run_dir, ckpt = broadcast_object_list([run_dir, ckpt])  # one timestamped default for all ranks
    main = world.is_main_process
    torch.manual_seed(recipe.seed)
    backbone = backbone_from_config(recipe.model)  # applies model.init_from
    objective = objectives.build(recipe.objective, backbone, num_classes=len(class_names(recipe.data.train)))
    spec = objective.views()
    loader = train_loader(
        recipe.data, spec, recipe.model.img_size, recipe.model.in_chans, recipe.train.batch_size, recipe.seed
    )
    if main:
        ensure_writable(run_dir)
        if ckpt is None:
            _fresh_run_dir(run_dir)
        (run_dir / "summary.json").unlink(missing_ok=True)  # written again when this (re)start ends
        save_recipe(recipe, run_dir / "recipe.yaml")
    world.wait_for_everyone()
    if main and not quiet:
        n_params = sum(p.numel() for p in backbone.parameters()) / 1e6
        what = f"resuming from {ckpt.name}" if ckpt else f"pretraining '{recipe.objective['name']}'"
        print(f"{what} ({n_params:.2f}M backbone params) -> {run_dir}")
    skip_counts = getattr(data, "skip_counts", None)  # counters of skipped bad samples, where data has them
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
        resume=ckpt,
        data_stats=(lambda: dict(skip_counts())) if callable(skip_counts) else None,
    )
    if not main:
        return run_dir
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
    write_model_card(run_dir / "backbone", run_dir)
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

    weights = default_weights(recipe.objective["name"])
    backbone = _teacher_backbone(objective) if weights == "teacher" else objective.backbone
    extra = {
        "objective": recipe.objective["name"],
        "weights": weights,
        "run_dir": str(run_dir),
        "data": recipe.data.train,
    }
    if seconds is not None:
        extra.update(pretrain_seconds=seconds, images_seen=images)
    return export_backbone(backbone, out, recipe.data.mean, recipe.data.std, extra)


def _teacher_backbone(objective: Any) -> Any:
    """`objective.teacher_backbone`, else the EMA partner of `objective.backbone` in `ema_pairs()`."""
    from ssl_vit.errors import CheckpointError

    teacher = getattr(objective, "teacher_backbone", None)
    for online, partner in objective.ema_pairs():
        if teacher is None and online is objective.backbone:
            teacher = partner
    if teacher is None:
        raise CheckpointError("the objective asks for its teacher to be exported but has no teacher backbone")
    return teacher


# ---------------------------------------------------------------- export
def default_weights(objective_name: str) -> str:
    """The objective's `export_weights` ("teacher" where its paper evaluates the EMA teacher)."""
    from ssl_vit import objectives
    from ssl_vit.errors import RecipeError

    try:
        return str(getattr(objectives.get(objective_name), "export_weights", "student"))
    except RecipeError:  # a run made by an objective this install does not have
        return "student"


def export(
    run_dir: Path, out: Path, weights: str | None = None, fmt: str = "timm", license_id: str = "apache-2.0"
) -> Path:
    """Rebuild the run's student or teacher backbone from its latest checkpoint and export it.

    fmt "timm": a folder timm loads, with a model card (`README.md`); fmt "onnx": one .onnx file.
    """
    from ssl_vit.backbone import Backbone
    from ssl_vit.config import load_recipe
    from ssl_vit.engine.checkpoint import list_checkpoints, load_model_weights
    from ssl_vit.errors import CheckpointError
    from ssl_vit.export import backbone_state, export_backbone
    from ssl_vit.model_card import write_model_card

    if not (run_dir / "recipe.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no recipe.yaml)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if not ckpts:
        raise CheckpointError(f"{run_dir} has no complete checkpoint under checkpoints/")
    weights = weights or default_weights(recipe.objective["name"])
    backbone = Backbone.from_config(recipe.model)
    backbone.vit.load_state_dict(backbone_state(load_model_weights(ckpts[-1]), weights))
    if fmt == "onnx":
        from ssl_vit.onnx_export import TOLERANCE, export_onnx

        result = export_onnx(backbone, out, recipe.data.mean, recipe.data.std)
        level = logging.WARNING if result.max_abs_diff > TOLERANCE else logging.INFO
        log.log(
            level,
            "onnxruntime vs PyTorch, batch of %d: max abs diff %.1e",
            result.check_batch,
            result.max_abs_diff,
        )
        return result.path
    extra = {
        "objective": recipe.objective["name"],
        "weights": weights,
        "run_dir": str(run_dir),
        "checkpoint": ckpts[-1].name,
    }
    folder = export_backbone(backbone, out, recipe.data.mean, recipe.data.std, extra)
    write_model_card(folder, run_dir, weights, license_id)
    return folder


# ---------------------------------------------------------------- probe
def probe(path: Path, data: str | None, feature: str) -> dict[str, Any]:
    from ssl_vit.eval.features import load_eval_model, split_features
    from ssl_vit.eval.linear_probe import linear_probe

    model = load_eval_model(path, data)
    train_x, train_y = split_features(model, "train", feature)
    test_x, test_y = split_features(model, "test", feature)
    result = linear_probe(train_x, train_y, test_x, test_y)
    result.update(data=model.data, feature=feature, model=str(path))
    if (path / "recipe.yaml").is_file():
        (path / "eval").mkdir(exist_ok=True)
        (path / "eval" / "linear_probe.json").write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------- demo
def demo(out: Path, quiet: bool) -> list[dict[str, Any]]:
    """Supervised pretraining on digits, then the probe against two baselines, then export."""
    import torch

    from ssl_vit.backbone import Backbone
    from ssl_vit.config import load_recipe
    from ssl_vit.eval.features import extract, normalise, raw_pixel_features
    from ssl_vit.eval.linear_probe import linear_probe

    recipe_name = "digits/supervised"
    recipe = load_recipe(recipe_name)
    run_dir = pretrain(recipe_name, [], out / "supervised", quiet)
    rows: list[dict[str, Any]] = []
    size, chans = recipe.model.img_size, recipe.model.in_chans
    train = raw_pixel_features(recipe.data.train, "train", size, chans)
    test = raw_pixel_features(recipe.data.train, "test", size, chans)
    rows.append({"name": "raw pixels", "objective": "raw_pixels", **linear_probe(*train, *test)})
    torch.manual_seed(recipe.seed)
    random_backbone = Backbone.from_config(recipe.model)

    def feats(split_images: torch.Tensor) -> Any:
        return extract(random_backbone, normalise(split_images, recipe.data.mean, recipe.data.std))

    rand_train = feats(torch.from_numpy(train[0]).view(-1, chans, size, size)), train[1]
    rand_test = feats(torch.from_numpy(test[0]).view(-1, chans, size, size)), test[1]
    rows.append({"name": "random init", "objective": "random_init", **linear_probe(*rand_train, *rand_test)})
    rows.append({"name": "supervised", "objective": "supervised", **probe(run_dir, None, "cls")})
    exported = export(run_dir, out / "export")
    if not quiet:
        print(
            f"exported backbone -> {exported} (loads with timm.create_model('local-dir:{exported}', pretrained=True))"
        )
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'backbone':<16} {'objective':<12} {'probe top-1':>11}", "-" * 41]
    lines += [f"{r['name']:<16} {r['objective']:<12} {100 * r['top1']:>10.1f}%" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- commands
# Each command is a parser builder plus a runner; `COMMANDS` lists them in the order of `--help`.
def _add_pretrain(sub: Any) -> None:
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
        pretrain(recipe, overrides, args.out, args.quiet, args.resume)
    except TrainingInterrupted as stop:
        run_dir = Path(stop.checkpoint).parent.parent
        print(f"interrupted: {stop}; continue with --resume {run_dir}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None


def _add_probe(sub: Any) -> None:
    p = sub.add_parser(
        "probe",
        help="linear-probe a backbone",
        description="Linear probe (logistic regression) on frozen features.",
    )
    p.add_argument("path", type=Path, help="a run directory, an export folder or any timm-loadable folder")
    p.add_argument("--data", help="data source to probe on (default: the run's data.train, else digits)")
    p.add_argument(
        "--feature",
        default="cls",
        choices=["cls", "avg"],
        help="pooled token (cls) or mean of patch tokens (avg)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quiet", action="store_true", help="print only the result")


def _run_probe(args: argparse.Namespace) -> None:
    result = probe(args.path, args.data, args.feature)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"linear probe top-1: {100 * result['top1']:.2f}% (n_train={result['n_train']}, n_test={result['n_test']})"
        )


def _add_export(sub: Any) -> None:
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
    print(f"exported -> {export(args.run_dir, args.out, args.weights, args.format, args.license)}")


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the end-to-end demo (what `make demo` runs)",
        description="Pretrain, probe and export on the embedded digits set.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or chatter")


def _run_demo(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    rows = demo(args.out, args.quiet)
    print(format_table(rows))
    print(f"demo finished in {time.perf_counter() - start:.0f}s; results in {args.out}")


def _add_show(sub: Any) -> None:
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


def _add_shards(sub: Any) -> None:
    p = sub.add_parser(
        "shards",
        help="write WebDataset shards from a built-in set, an image folder or a CSV",
        description="Write DIR/train-%%06d.tar (and val-/test-) plus DIR/manifest.json.",
    )
    p.add_argument(
        "src", help="digits, shapes[:TRAIN:TEST], an ImageFolder dir, or a CSV/TSV of path[,label]"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (must not hold shards yet)")
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
    from ssl_vit.data.shards import write_shards

    manifest = write_shards(args.src, args.out, args.shard_size, args.val_fraction, args.strict, args.seed)
    splits = ", ".join(
        f"{name} {s['count']} in {len(s['shards'])} shards" for name, s in manifest["splits"].items()
    )
    print(f"wrote {splits} -> {args.out} (skipped {manifest['skipped']['count']} unreadable)")


COMMANDS: dict[str, tuple[Callable[[Any], None], Callable[[argparse.Namespace], None]]] = {
    "pretrain": (_add_pretrain, _run_pretrain),
    "probe": (_add_probe, _run_probe),
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    return 0
