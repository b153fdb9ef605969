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
    objective = objectives.build(
        recipe.objective,
        backbone,
        num_classes=len(class_names(recipe.data.train)),
        pixel_mean=recipe.data.mean,
        pixel_std=recipe.data.std,
    )
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
        description="Pretrain, probe and export on the embedded digits set.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or chatter")


def _run_demo(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    rows = demo(args.out, args.quiet)
    print(format_table(rows))
    print(f"demo finished in {time.perf_counter() - start:.0f}s; results in {args.out}")


COMMANDS: dict[str, tuple[Callable[[Any], None], Callable[[argparse.Namespace], None]]] = {
    "pretrain": (_add_pretrain, _run_pretrain),
    "probe": (_add_probe, _run_probe),
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
