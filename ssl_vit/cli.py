"""The `ssl-vit` command: the only place that wires recipe, data, backbone, objective and engine."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_vit import __version__

log = logging.getLogger("ssl_vit")


# ---------------------------------------------------------------- pretrain
RUN_LENGTH_KEYS = ("train.epochs", "train.max_steps")  # with eval.*, the only keys a resume may change


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
        changeable = key in RUN_LENGTH_KEYS or key.startswith("eval.")  # eval.* never changes training
        if not changeable and old.get(key) != new.get(key):
            from ssl_vit.errors import RecipeError

            raise RecipeError(
                f"--resume: {key} is {old.get(key)!r} in {run_dir / 'recipe.yaml'} but {new.get(key)!r} "
                f"here; only {' and '.join(RUN_LENGTH_KEYS)} and eval.* may change when resuming"
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
    from ssl_vit.eval.monitor import online_every, online_monitor
    from ssl_vit.model_card import write_model_card
    from ssl_vit.pretrained import backbone_from_config

    objectives.get(recipe.objective["name"])  # unknown objective: fail before any work
    world = processes(recipe.train)  # under torchrun: this rank among all; fit's Accelerator reuses it
    run_dir, ckpt = broadcast_object_list([run_dir, ckpt])  # one timestamped default for all ranks
    main = world.is_main_process
    torch.manual_seed(recipe.seed)
    backbone = backbone_from_config(recipe.model)  # applies model.init_from
    classes, mean, std = len(class_names(recipe.data.train)), recipe.data.mean, recipe.data.std
    objective = objectives.build(
        recipe.objective, backbone, num_classes=classes, pixel_mean=mean, pixel_std=std
    )
    spec = objective.views()
    loader = train_loader(
        recipe.data, spec, recipe.model.img_size, recipe.model.in_chans, recipe.train.batch_size, recipe.seed
    )
    monitor_every = online_every(recipe.eval)  # checked on every process; only the main one measures
    monitor = None
    if main and monitor_every:  # the backbone an export of this run would write
        monitor = online_monitor(
            objective.exported_backbone(),
            recipe.data.train,
            recipe.model.img_size,
            recipe.model.in_chans,
            recipe.data.mean,
            recipe.data.std,
            recipe.eval,
            recipe.data.cache_dir,
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
        monitor=monitor,
        monitor_every=monitor_every,
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


def _export_info(recipe: Any, run_dir: Path, weights: str) -> dict[str, Any]:
    """What an export records of its run, for evaluators and the model card."""
    return {
        "objective": recipe.objective["name"],
        "weights": weights,
        "run_dir": str(run_dir),
        "data": recipe.data.train,
        "feature": recipe.eval.feature,  # what the evaluators pool by default
    }


def _export_from_objective(
    objective: Any,
    out: Path,
    recipe: Any,
    run_dir: Path,
    seconds: float | None = None,
    images: int | None = None,
) -> Path:
    from ssl_vit.export import export_backbone

    extra = _export_info(recipe, run_dir, objective.export_weights)
    if seconds is not None:
        extra.update(pretrain_seconds=seconds, images_seen=images)
    return export_backbone(objective.exported_backbone(), out, recipe.data.mean, recipe.data.std, extra)


# ---------------------------------------------------------------- export
def default_weights(objective_name: str) -> str:
    """The objective's `export_weights` ("teacher" where its paper evaluates the EMA teacher)."""
    from ssl_vit import objectives
    from ssl_vit.errors import RecipeError

    try:
        return objectives.get(objective_name).export_weights
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
    extra = {**_export_info(recipe, run_dir, weights), "checkpoint": ckpts[-1].name}
    folder = export_backbone(backbone, out, recipe.data.mean, recipe.data.std, extra)
    write_model_card(folder, run_dir, weights, license_id)
    return folder


# ---------------------------------------------------------------- evaluators
def _cache_dir(no_cache: bool, cache_dir: Path | None) -> Path | None:
    from ssl_vit.eval.features import default_cache_dir

    return None if no_cache else cache_dir or default_cache_dir()


def _features(path: Path, data: str | None, feature: str | None, cache_dir: Path | None) -> Any:
    """The model, its train and test features, and the feature kind (default: the recipe's)."""
    from ssl_vit.eval.features import load_eval_model, split_features

    model = load_eval_model(path, data)
    feature = feature or model.feature
    train = split_features(model, "train", feature, cache_dir=cache_dir)
    return model, train, split_features(model, "test", feature, cache_dir=cache_dir), feature


def probe(
    path: Path,
    data: str | None,
    feature: str | None,
    shots: int = 0,
    seeds: int = 5,
    method: str = "auto",
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Full linear probe, or the K-shot probe over `seeds` draws; written to RUN_DIR/eval/."""
    from ssl_vit.eval.features import save_result
    from ssl_vit.eval.linear_probe import linear_probe, lowshot_probe

    model, train, test, feature = _features(path, data, feature, cache_dir)
    if shots:
        result = lowshot_probe(*train, *test, shots, seeds)
    else:
        result = linear_probe(*train, *test, method=method)
    result.update(data=model.data, feature=feature, model=str(path))
    save_result(model, f"lowshot_{shots}" if shots else "linear_probe", result)
    return result


def knn(
    path: Path,
    data: str | None,
    feature: str | None,
    ks: Sequence[int],
    temperature: float,
    cache_dir: Path | None,
) -> dict[str, Any]:
    from ssl_vit.eval.features import save_result
    from ssl_vit.eval.knn import knn_classify

    model, train, test, feature = _features(path, data, feature, cache_dir)
    result = knn_classify(*train, *test, ks, temperature)
    result.update(data=model.data, feature=feature, model=str(path))
    save_result(model, "knn", result)
    return result


def finetune_model(
    model: Any, cfg: Any, out: Path, progress: bool, resume: bool = False, draws: int | None = None
) -> dict[str, Any]:
    """Fine-tune with the run's own augmentation settings where the model came from a run.

    With `draws`: that many seeded fine-tunes (K-shot draws with `cfg.shots`) in `out/seed<s>`,
    reported as mean ± std (`finetune_draws`); without: one fine-tune in `out`.
    """
    from ssl_vit.config import load_recipe
    from ssl_vit.eval.finetune import finetune, finetune_draws

    data = load_recipe(model.run_dir / "recipe.yaml").data if model.run_dir else None
    if draws is not None:
        return finetune_draws(model, out, cfg, draws, data, progress, resume)
    return finetune(model, out, cfg, data, progress, resume)


@dataclass(frozen=True)
class _FinetuneRun:
    """What `compare` calls for each input and seed: fine-tune (on the K-shot draw of that seed where
    `cfg.shots` is set), return test top-1. A module-level class, so that `compare(jobs=N)` can send
    it to its worker processes."""

    cfg: Any

    def __call__(self, model: Any, seed: int, out: Path) -> float:
        from dataclasses import replace

        return float(finetune_model(model, replace(self.cfg, seed=seed), out, progress=False)["top1"])


def compare_runs(
    inputs: Sequence[Path],
    out: Path,
    protocol: Any,
    finetune_cfg: Any,
    cache_dir: Path | None,
    jobs: int = 1,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    from dataclasses import asdict, replace

    from ssl_vit.eval.compare import compare
    from ssl_vit.flops import pretrain_flops

    finetune_cfg = replace(finetune_cfg, shots=protocol.finetune_shots)  # the protocol decides
    settings = {"finetune": asdict(finetune_cfg)} if protocol.finetune else {}
    finetune_fn = _FinetuneRun(finetune_cfg)
    return compare(inputs, out, protocol, cache_dir, pretrain_flops, finetune_fn, settings, jobs, threads)


# ---------------------------------------------------------------- demo
DEMO_FINETUNE_STEPS = 400  # of the 10-shot fine-tune (converged by ~800, BENCHMARKS.md); one draw
DEMO_PROTOCOL: dict[str, Any] = {
    "probe": True,
    "knn": True,
    "finetune": True,
    "shots": 10,
    "seeds": 3,
    "finetune_seeds": 1,
    "finetune_shots": 10,
}


def demo(
    data: str,
    steps_scale: float,
    out: Path,
    quiet: bool,
    jobs: int | None = None,
    threads: int | None = None,
    overrides: Sequence[str] = (),
    only: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Pretrain every objective with a recipe for `data` (or those in `only`) on its demo budget, `jobs`
    processes at a time (default: one per core) with `threads` each, then compare them all, the
    evaluations in parallel too."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    from ssl_vit.demo import PretrainJob, available_cores, demo_jobs, run_pretraining
    from ssl_vit.errors import RecipeError
    from ssl_vit.eval.compare import Protocol
    from ssl_vit.eval.finetune import default_config

    cores = available_cores()
    jobs = jobs or cores
    threads = threads or max(1, cores // jobs)
    if jobs < 1 or threads < 1:
        raise RecipeError(f"--jobs and --threads must be at least 1, got {jobs} and {threads}")
    todo = demo_jobs(data, steps_scale, out, overrides, only)
    bar = tqdm(total=len(todo) + 1, disable=quiet or not sys.stderr.isatty(), unit="run", dynamic_ncols=True)

    done: list[str] = []

    def finished(job: PretrainJob, summary: dict[str, Any]) -> None:
        done.append(job.name)
        bar.update(1)
        if not quiet:
            bar.write(
                f"[{len(done)}/{len(todo)}] {job.name}: {summary['steps']} steps in "
                f"{summary['pretrain_seconds']:.0f}s, final loss {summary['final_loss']:.3f}"
            )

    if not quiet:
        print(
            f"pretraining {len(todo)} objectives on {data}: {jobs} at a time, {threads} thread(s) each, {cores} cores"
        )
    try:
        runs = run_pretraining(todo, jobs, threads, finished)
        protocol = Protocol(**DEMO_PROTOCOL)
        steps = max(1, round(DEMO_FINETUNE_STEPS * steps_scale))
        finetune_cfg = replace(default_config(protocol.finetune_shots), steps=steps)
        if not quiet:
            bar.write(
                f"evaluating {len(runs)} backbones and 2 baselines (k-NN, 10-shot probe, linear probe, 10-shot fine-tune)"
            )
        rows = compare_runs(runs, out / "compare", protocol, finetune_cfg, out / "cache", jobs, threads)
        bar.update(1)
    finally:
        bar.close()
    from ssl_vit.figures import write_compare_figures

    # PCA, not t-SNE: seven maps by t-SNE would cost the demo about a minute on two cores.
    write_compare_figures(runs, out / "compare" / "figures", method="pca")
    return rows


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


def _add_eval_args(p: Any) -> None:
    from ssl_vit.eval.features import FEATURE_KINDS

    p.add_argument("--data", help="data to evaluate on (default: the run's data.train, else digits)")
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
]
LOWSHOT_FINETUNE_DRAWS = 3  # `finetune --shots K` without --seeds


def _add_finetune(sub: Any) -> None:
    from ssl_vit.eval.finetune import LOWSHOT_DEFAULTS, FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser(
        "finetune",
        help="fine-tune a backbone end to end",
        description="Fine-tune with a fresh head: layer-wise lr decay, drop path, label smoothing, mixup. "
        "With --shots K, on K labelled images per class only (the low-label case), over seeded draws.",
    )
    p.add_argument("path", type=Path, help="a run directory, an export folder or any timm-loadable folder")
    p.add_argument("--data", help="data to fine-tune on (default: the run's data.train, else digits)")
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
        f"default {LOWSHOT_FINETUNE_DRAWS} with --shots, else 1",
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
    from dataclasses import replace

    from ssl_vit.eval.features import load_eval_model, save_result
    from ssl_vit.eval.finetune import default_config

    given = {name: getattr(args, name) for name, _ in FINETUNE_OPTIONS if getattr(args, name) is not None}
    cfg = replace(default_config(args.shots), **given, ckpt_every_steps=args.ckpt_every)
    seeds = args.seeds if args.seeds is not None else LOWSHOT_FINETUNE_DRAWS if args.shots else 1
    draws = seeds if args.shots or seeds != 1 else None  # one full-data fine-tune: today's result
    name = f"finetune_lowshot_{args.shots}" if args.shots else "finetune"
    model = load_eval_model(args.path, args.data)
    if args.out:
        out = args.out
    elif model.run_dir:
        out = model.run_dir / "eval" / name
    else:
        out = Path("runs") / f"{name}-{model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    progress = not (args.quiet or args.json)
    result = finetune_model(model, cfg, out, progress, args.resume, draws)
    result.update(data=model.data, model=str(args.path))
    save_result(model, name, result)
    if args.json:
        print(json.dumps(result))
    elif draws is None:
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


def _add_compare(sub: Any) -> None:
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
    from dataclasses import replace

    from ssl_vit.eval.compare import Protocol
    from ssl_vit.eval.finetune import default_config
    from ssl_vit.eval.report import format_table

    chosen = args.probe or args.knn or args.finetune
    protocol = Protocol(
        probe=args.probe or not chosen,
        knn=args.knn or not chosen,
        finetune=args.finetune,
        shots=args.shots,
        seeds=args.seeds,
        finetune_shots=args.finetune_shots,
        feature=args.feature,
        data=args.data,
    )
    finetune_cfg = default_config(args.finetune_shots)
    if args.finetune_steps is not None:
        finetune_cfg = replace(finetune_cfg, steps=args.finetune_steps)
    cache = _cache_dir(args.no_cache, args.cache_dir)
    rows = compare_runs(args.inputs, args.out, protocol, finetune_cfg, cache)
    figures = []
    if args.figures:
        from ssl_vit.figures import write_compare_figures

        figures = write_compare_figures(args.inputs, args.out / "figures")
    if args.json:
        print(json.dumps(rows))
        return
    print(format_table(rows))
    print(f"report: {args.out / 'report.md'}; charts: {args.out / 'compare.png'}, {args.out / 'compute.png'}")
    if figures:
        print(f"figures: {', '.join(str(f) for f in figures)}")


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
    from ssl_vit.demo import DEMO_DATA

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
    p.add_argument("--objectives", nargs="+", metavar="NAME", help="only these objectives (default: all)")
    p.add_argument("--jobs", type=int, help="runs at a time (default: one per core)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or chatter")


def _run_demo(args: argparse.Namespace) -> None:
    from ssl_vit.demo import available_cores, headline
    from ssl_vit.eval.report import format_table

    start = time.perf_counter()
    rows = demo(
        args.data,
        args.steps_scale,
        args.out,
        args.quiet,
        args.jobs,
        args.threads,
        args.overrides,
        args.objectives,
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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        misplaced = [w for w in extra if "=" in w and not w.startswith("-")]
        if hasattr(args, "overrides") and len(misplaced) == len(extra):
            args.overrides = [*args.overrides, *misplaced]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
