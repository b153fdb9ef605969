"""The Python API: one function per `ssl-vit` command, re-exported from `ssl_vit`.

    import ssl_vit
    run = ssl_vit.pretrain("digits/supervised", ["train.max_steps=5"], out="runs/api-demo")
    print(ssl_vit.probe(run)["top1"])

The only module that wires recipe, data, backbone, objective and engine; `cli` parses arguments and
calls these. Imports are inside the functions so `import ssl_vit` and `ssl-vit --help` stay fast.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_vit.errors import CheckpointError, DataError, RecipeError
from ssl_vit.rundir import CHECKPOINTS_DIR, RunDir

if TYPE_CHECKING:
    import numpy as np

    from ssl_vit.config import Recipe, TrainConfig
    from ssl_vit.engine.loop import FitResult
    from ssl_vit.eval.compare import Protocol
    from ssl_vit.eval.features import EvalModel
    from ssl_vit.eval.finetune import FinetuneConfig
    from ssl_vit.objectives.base import Objective

log = logging.getLogger("ssl_vit")

PathLike = str | Path
Split = tuple["np.ndarray", "np.ndarray"]  # features (N, D) and labels (N,) of one split
RUN_LENGTH_KEYS = ("train.epochs", "train.max_steps")  # with eval.*, the only keys a resume may change


# ---------------------------------------------------------------- pretrain
def pretrain(
    recipe: str | None,
    overrides: Sequence[str] = (),
    out: PathLike | None = None,
    resume: str | None = None,
    quiet: bool = False,
) -> Path:
    """Pretrain a backbone from a recipe (a YAML file or a name under `recipes/`), export it to
    `RUN/backbone`, and return the run directory.

    `resume="auto"` continues the latest valid checkpoint of `out` (or starts fresh there);
    `resume=RUN_DIR` continues that run with its saved recipe (`recipe` may then be None); only
    `train.epochs`, `train.max_steps` and `eval.*` may change on a resume.

        run = ssl_vit.pretrain("digits/mae", ["train.max_steps=100"], out="runs/mae")
    """
    recipe_obj, run_dir, ckpt = _resolve_run(recipe, overrides, Path(out) if out else None, resume)

    import torch
    from accelerate.utils import broadcast_object_list

    from ssl_vit import data, objectives
    from ssl_vit.config import save_recipe
    from ssl_vit.data import class_names, evaluation_data, has_labels, prepare, train_loader
    from ssl_vit.engine.loop import FitConfig, Reporting, ensure_writable, fit, processes
    from ssl_vit.eval.monitor import online_every, online_monitor
    from ssl_vit.pretrained import backbone_from_config

    r = recipe_obj
    kind = objectives.get(r.objective["name"])  # unknown objective: fail before any work
    world = processes(r.train)  # under torchrun: this rank among all; fit's Accelerator reuses it
    run_dir, ckpt = broadcast_object_list([run_dir, ckpt])  # one timestamped default for all ranks
    run = RunDir(run_dir)
    main = world.is_main_process
    cached = prepare(r.data.train, r.data.cache_dir)  # a folder or table: its shards, written once
    data_cfg = replace(r.data, train=str(cached)) if cached else r.data
    if kind.needs_labels and not has_labels(data_cfg.train, cache_dir=r.data.cache_dir):
        raise DataError(
            f"objective '{r.objective['name']}' needs labels, but data.train '{r.data.train}' has none; "
            "use labelled data (class folders) or a self-supervised objective (mae, simclr, dino, ...)"
        )
    train = _resume_train(r.train, ckpt, world.num_processes, main and not quiet)
    torch.manual_seed(r.seed)
    backbone = backbone_from_config(r.model)  # applies model.init_from
    objective = objectives.build(
        r.objective,
        backbone,
        num_classes=len(class_names(data_cfg.train, r.data.cache_dir)),
        pixel_mean=r.data.mean,
        pixel_std=r.data.std,
    )
    loader = train_loader(
        data_cfg,
        objective.views(),
        r.model.img_size,
        r.model.in_chans,
        train.batch_size,
        r.seed,
        rank=world.process_index,
        world=world.num_processes,
    )
    monitor_every = online_every(r.eval)  # checked on every process; only the main one measures
    monitor = None
    if main and monitor_every:  # the backbone an export of this run would write
        watched = r.data.train  # the evaluators' train data where set, as they read it
        if r.eval.train:
            watched = evaluation_data(r.eval.train, r.eval.test, r.data.cache_dir)[0]
        monitor = online_monitor(
            objective.exported_backbone(),
            watched,
            r.model.img_size,
            r.model.in_chans,
            r.data.mean,
            r.data.std,
            r.eval,
            r.data.cache_dir,
        )
    if main:
        ensure_writable(run_dir)
        if ckpt is None:
            for name in run.clear_engine_files():
                log.warning("starting afresh in %s: removed the previous run's %s", run_dir, name)
        run.summary_file.unlink(missing_ok=True)  # written again when this (re)start ends
        save_recipe(r, run.recipe_file)
    world.wait_for_everyone()
    if main and not quiet:
        n_params = sum(p.numel() for p in backbone.parameters()) / 1e6
        what = f"resuming from {ckpt.name}" if ckpt else f"pretraining '{r.objective['name']}'"
        log.info("%s (%.2fM backbone params) -> %s", what, n_params, run_dir)
    skip_counts = getattr(data, "skip_counts", None)  # counters of skipped bad samples, where data has them
    report = Reporting(
        progress=not quiet,
        data_stats=(lambda: dict(skip_counts())) if callable(skip_counts) else None,
        monitor=monitor,
        monitor_every=monitor_every,
    )
    cfg = FitConfig(r.optim, train, r.ckpt, r.log, r.seed)
    result = fit(objective, loader, cfg, run_dir, resume=ckpt, report=report)
    if main:
        _finish_run(objective, run, r, result, cached, quiet)
    # Every process returns once the run directory is complete, so a script reading it on any rank
    # sees the export; and all ranks then tear down the process group together (one leaving while
    # another still works aborted a gloo rank at exit, "terminate called without an active exception").
    world.wait_for_everyone()
    return run_dir


def _finish_run(
    objective: Objective, run: RunDir, r: Recipe, result: FitResult, cached: Path | None, quiet: bool
) -> None:
    """On the main process: export the backbone, write `summary.json` and the model card."""
    from ssl_vit.model_card import write_model_card

    _export_from_objective(objective, run.backbone, r, run.path, result.seconds, result.images_seen)
    summary = {
        "objective": r.objective["name"],
        "steps": result.steps,
        "images_seen": result.images_seen,
        "pretrain_seconds": result.seconds,
        "final_loss": result.final_loss,
    }
    if cached:
        summary["data_shards"] = str(cached)  # where the model card finds the data's manifest
    run.summary_file.write_text(json.dumps(summary, indent=2))
    write_model_card(run.backbone, run.path)
    if not quiet:
        log.info(
            "done: %d steps, %d images, %.1fs, final loss %.4f",
            result.steps,
            result.images_seen,
            result.seconds,
            result.final_loss,
        )


def _resume_train(train: TrainConfig, ckpt: Path | None, processes: int, say: bool) -> TrainConfig:
    """On a resume, the per-process batch that keeps the checkpoint's global batch at this number of
    processes (a one-line error where it does not divide), so lr, steps and the sample order stay
    the run's; the saved recipe keeps its own `train.batch_size`."""
    from ssl_vit.engine.policy import meta_plan, resume_batch

    if ckpt is None:
        return train
    saved = meta_plan(ckpt)
    batch = resume_batch(saved, processes, ckpt)
    if batch is None or (batch == train.batch_size and saved["num_processes"] == processes):
        return train
    if say:
        log.info(
            "resuming %s of %d process(es) x %d images on %d: %d images per process, global batch unchanged",
            ckpt.name,
            saved["num_processes"],
            saved["per_device_batch"],
            processes,
            batch,
        )
    return replace(train, batch_size=batch)


def _flat(recipe: Recipe) -> dict[str, Any]:
    def walk(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                out.update(walk(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: node}

    return walk(asdict(recipe), "")


def _check_resumable(saved: Recipe, given: Recipe, run_dir: Path) -> None:
    """A resume may change the run length only; anything else would not continue the same run."""
    old, new = _flat(saved), _flat(given)
    for key in sorted(set(old) | set(new)):
        changeable = key in RUN_LENGTH_KEYS or key.startswith("eval.")  # eval.* never changes training
        if not changeable and old.get(key) != new.get(key):
            raise RecipeError(
                f"--resume: {key} is {old.get(key)!r} in {RunDir(run_dir).recipe_file} but "
                f"{new.get(key)!r} here; only {' and '.join(RUN_LENGTH_KEYS)} and eval.* may change when resuming"
            )


def _resolve_run(
    recipe_name: str | None, overrides: Sequence[str], out: Path | None, resume: str | None
) -> tuple[Recipe, Path, Path | None]:
    """(recipe, run dir, checkpoint to resume from or None); fails fast, before torch loads."""
    from ssl_vit.config import load_recipe, resolve_recipe_path

    if resume is None or resume == "auto":
        if resume == "auto" and out is None:
            raise RecipeError("--resume auto needs --out RUN_DIR (the run to continue)")
        run_dir = out
    else:
        run_dir = Path(resume)
        if out is not None and out.resolve() != run_dir.resolve():
            raise RecipeError(f"--resume {run_dir} continues in {run_dir}; drop --out {out}")
        RunDir(run_dir).require()
    saved = RunDir(run_dir) if run_dir is not None else None
    has_saved = saved is not None and saved.exists()
    if recipe_name is None and not (resume is not None and has_saved):
        raise RecipeError("pretrain needs a RECIPE (or --resume RUN_DIR to continue a run)")
    source = recipe_name if recipe_name is not None else str(saved.recipe_file)  # type: ignore[union-attr]
    recipe = load_recipe(source, list(overrides))
    if run_dir is None:
        name = resolve_recipe_path(str(recipe_name)).stem
        run_dir = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RunDir(run_dir)
    ckpt = run.latest_checkpoint()
    if resume is None and ckpt is not None and not run.summary_file.is_file():
        raise CheckpointError(
            f"{run_dir} holds an unfinished run ({ckpt.name}); continue it with --resume auto "
            "or choose another --out"
        )
    if resume is not None and ckpt is not None and has_saved:
        _check_resumable(run.recipe(), recipe, run_dir)
    return recipe, run_dir, ckpt if resume is not None else None


# ---------------------------------------------------------------- export
def export(
    run: PathLike,
    out: PathLike,
    weights: str | None = None,
    fmt: str = "timm",
    license_id: str = "apache-2.0",
) -> Path:
    """Rebuild a run's student or teacher backbone from its latest checkpoint and export it.

    fmt "timm": a folder plain timm loads, with a model card (`README.md`); "onnx": one .onnx file.
    `weights` defaults to the backbone the objective's paper evaluates.

        folder = ssl_vit.export("runs/mae", "exports/mae")
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    """
    from ssl_vit.backbone import Backbone
    from ssl_vit.engine.checkpoint import load_model_weights
    from ssl_vit.model_card import write_model_card
    from ssl_vit.timm_export import backbone_state, export_backbone

    run_dir, out = Path(run), Path(out)
    recipe = RunDir(run_dir).recipe()
    ckpts = RunDir(run_dir).list_checkpoints()
    if not ckpts:
        raise CheckpointError(f"{run_dir} has no complete checkpoint under {CHECKPOINTS_DIR}/")
    weights = weights or default_weights(recipe.objective["name"])
    backbone = Backbone.from_config(recipe.model)
    loaded = backbone.load_timm_weights(backbone_state(load_model_weights(ckpts[-1]), weights))
    if loaded.missing:
        raise CheckpointError(f"{ckpts[-1]} lacks backbone weights: {', '.join(loaded.missing[:3])}")
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
    if fmt != "timm":
        raise RecipeError(f"export format must be timm or onnx, not '{fmt}'")
    extra = {**_export_info(recipe, run_dir, weights), "checkpoint": ckpts[-1].name}
    folder = export_backbone(backbone, out, recipe.data.mean, recipe.data.std, extra)
    write_model_card(folder, run_dir, weights, license_id)
    return folder


def default_weights(objective_name: str) -> str:
    """The objective's `export_weights` ("teacher" where its paper evaluates the EMA teacher)."""
    from ssl_vit import objectives

    try:
        return objectives.get(objective_name).export_weights
    except RecipeError:  # a run made by an objective this install does not have
        return "student"


def _export_info(recipe: Recipe, run_dir: Path, weights: str) -> dict[str, Any]:
    """What an export records of its run, for evaluators and the model card."""
    return {
        "objective": recipe.objective["name"],
        "weights": weights,
        "run_dir": str(run_dir),
        "data": recipe.data.train,
        "eval_train": recipe.eval.train,  # the evaluators' data, where not data.train
        "eval_test": recipe.eval.test,
        "feature": recipe.eval.feature,  # what the evaluators pool by default
    }


def _export_from_objective(
    objective: Objective,
    out: Path,
    recipe: Recipe,
    run_dir: Path,
    seconds: float | None = None,
    images: int | None = None,
) -> Path:
    from ssl_vit.timm_export import export_backbone

    extra = _export_info(recipe, run_dir, objective.export_weights)
    if seconds is not None:
        extra.update(pretrain_seconds=seconds, images_seen=images)
    return export_backbone(objective.exported_backbone(), out, recipe.data.mean, recipe.data.std, extra)


# ---------------------------------------------------------------- evaluators
def _cache(cache: bool, cache_dir: PathLike | None) -> Path | None:
    from ssl_vit.eval.features import default_cache_dir

    return None if not cache else Path(cache_dir) if cache_dir else default_cache_dir()


def _features(
    path: PathLike, data: str | None, feature: str | None, cache_dir: Path | None
) -> tuple[EvalModel, Split, Split, str]:
    """The model, its train and test features, and the feature kind (default: the recipe's)."""
    from ssl_vit.eval.features import load_eval_model, split_features

    model = load_eval_model(Path(path), data)
    feature = feature or model.feature
    train = split_features(model, "train", feature, cache_dir=cache_dir)
    return model, train, split_features(model, "test", feature, cache_dir=cache_dir), feature


def probe(
    path: PathLike,
    *,
    shots: int = 0,
    seeds: int = 5,
    data: str | None = None,
    feature: str | None = None,
    method: str = "auto",
    cache: bool = True,
    cache_dir: PathLike | None = None,
) -> dict[str, Any]:
    """Linear probe on frozen features, or with `shots=K` the K-shot probe over `seeds` draws
    (mean ± std). Written to `RUN/eval/linear_probe.json` (or `lowshot_K.json`) for a run.

        ssl_vit.probe("runs/mae")["top1"]; ssl_vit.probe("runs/mae", shots=10)["top1_std"]
    """
    from ssl_vit.eval.features import save_result
    from ssl_vit.eval.linear_probe import linear_probe, lowshot_probe

    model, train, test, feature = _features(path, data, feature, _cache(cache, cache_dir))
    if shots:
        result = lowshot_probe(*train, *test, shots, seeds)
    else:
        result = linear_probe(*train, *test, method=method)
    result.update(data=model.data, test_data=model.test_data, feature=feature, model=str(path))
    save_result(model, f"lowshot_{shots}" if shots else "linear_probe", result)
    return result


def knn(
    path: PathLike,
    *,
    k: Sequence[int] = (20,),
    temperature: float = 0.07,
    data: str | None = None,
    feature: str | None = None,
    cache: bool = True,
    cache_dir: PathLike | None = None,
) -> dict[str, Any]:
    """Weighted k-NN on L2-normalised frozen features (DINO's protocol); `top1` is the first k's.

    ssl_vit.knn("runs/mae", k=[10, 20])["top1_per_k"]
    """
    from ssl_vit.eval.features import save_result
    from ssl_vit.eval.knn import knn_classify

    model, train, test, feature = _features(path, data, feature, _cache(cache, cache_dir))
    result = knn_classify(*train, *test, list(k), temperature)
    result.update(data=model.data, test_data=model.test_data, feature=feature, model=str(path))
    save_result(model, "knn", result)
    return result


LOWSHOT_FINETUNE_DRAWS = 3  # `finetune(shots=K)` without `seeds`


def finetune(
    path: PathLike,
    *,
    shots: int = 0,
    seeds: int | None = None,
    data: str | None = None,
    out: PathLike | None = None,
    resume: bool = False,
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Fine-tune end to end with a fresh head; `options` are `FinetuneConfig` fields (steps, lr,
    batch_size, layer_decay, ...). With `shots=K`: on K labelled images per class, over `seeds`
    seeded draws (default 3), mean ± std. Written to `RUN/eval/finetune*.json` for a run.

        ssl_vit.finetune("runs/mae", shots=10, steps=400)["top1"]
    """
    from ssl_vit.eval.features import load_eval_model, save_result
    from ssl_vit.eval.finetune import FinetuneConfig, default_config

    unknown = sorted(set(options) - set(FinetuneConfig.__dataclass_fields__))
    if unknown:
        raise RecipeError(f"finetune: unknown option(s) {', '.join(unknown)}")
    cfg = replace(default_config(shots), **options)
    seeds = seeds if seeds is not None else LOWSHOT_FINETUNE_DRAWS if shots else 1
    draws = seeds if shots or seeds != 1 else None  # one full-data fine-tune: a single result
    name = f"finetune_lowshot_{shots}" if shots else "finetune"
    model = load_eval_model(Path(path), data)
    if out is not None:
        out_dir = Path(out)
    elif model.run_dir:
        out_dir = RunDir(model.run_dir).eval_dir / name
    else:
        out_dir = Path("runs") / f"{name}-{model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = finetune_model(model, cfg, out_dir, progress, resume, draws)
    result.update(data=model.data, test_data=model.test_data, model=str(path), out_dir=str(out_dir))
    save_result(model, name, result)
    return result


def finetune_model(
    model: EvalModel,
    cfg: FinetuneConfig,
    out: Path,
    progress: bool,
    resume: bool = False,
    draws: int | None = None,
) -> dict[str, Any]:
    """Fine-tune with the run's own augmentation settings where the model came from a run.

    With `draws`: that many seeded fine-tunes (K-shot draws with `cfg.shots`) in `out/seed<s>`,
    reported as mean ± std; without: one fine-tune in `out`.
    """
    from ssl_vit.eval.finetune import finetune as finetune_one
    from ssl_vit.eval.finetune import finetune_draws

    data = RunDir(model.run_dir).recipe().data if model.run_dir else None
    if draws is not None:
        return finetune_draws(model, out, cfg, draws, data, progress, resume)
    return finetune_one(model, out, cfg, data, progress, resume)


@dataclass(frozen=True)
class FinetuneRun:
    """What `compare` calls for each input and seed: fine-tune (on the K-shot draw of that seed
    where `cfg.shots` is set), return test top-1. A module-level class, so `compare(jobs=N)` can
    send it to its worker processes.

    Every input gets the same augmentation (`finetune`'s default), never its run's own crop scale:
    the rows of a comparison differ by their backbones only, the random-initialised one included.
    """

    cfg: FinetuneConfig

    def __call__(self, model: EvalModel, seed: int, out: Path) -> float:
        from ssl_vit.eval.finetune import finetune

        return float(finetune(model, out, replace(self.cfg, seed=seed))["top1"])


def compare(
    paths: Sequence[PathLike],
    out: PathLike,
    *,
    probe: bool = True,
    knn: bool = True,
    finetune: bool = False,
    shots: int = 10,
    seeds: int = 3,
    finetune_shots: int = 0,
    finetune_steps: int | None = None,
    finetune_seeds: int | None = None,
    feature: str | None = None,
    data: str | None = None,
    figures: bool = False,
    cache: bool = True,
    cache_dir: PathLike | None = None,
    jobs: int = 1,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Evaluate runs or exports with identical protocols, plus raw-pixel and random-init baselines;
    writes `report.md`, `results.json`, `results.csv` and charts to `out`; returns the rows of
    `results.json`. `jobs` evaluates that many inputs at a time in worker processes.

        rows = ssl_vit.compare(["runs/mae", "runs/simclr"], "runs/cmp", finetune=True, finetune_shots=10)
    """
    from ssl_vit.eval.compare import Protocol
    from ssl_vit.eval.finetune import default_config

    protocol = Protocol(
        probe=probe,
        knn=knn,
        finetune=finetune,
        shots=shots,
        seeds=seeds,
        finetune_shots=finetune_shots,
        feature=feature,
        data=data,
        finetune_seeds=finetune_seeds,
    )
    cfg = default_config(finetune_shots)
    if finetune_steps is not None:
        cfg = replace(cfg, steps=finetune_steps)
    inputs = [Path(p) for p in paths]
    rows = compare_protocol(inputs, Path(out), protocol, cfg, _cache(cache, cache_dir), jobs, threads)
    if figures:
        from ssl_vit.figures import write_compare_figures

        write_compare_figures(inputs, Path(out) / "figures")
    return rows


def compare_protocol(
    inputs: Sequence[Path],
    out: Path,
    protocol: Protocol,
    finetune_cfg: FinetuneConfig,
    cache_dir: Path | None,
    jobs: int = 1,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """`compare` with a built `Protocol` and fine-tune config (what the demo uses)."""
    from ssl_vit.eval.compare import compare as compare_inputs
    from ssl_vit.flops import pretrain_flops

    finetune_cfg = replace(finetune_cfg, shots=protocol.finetune_shots)  # the protocol decides
    settings = {"finetune": asdict(finetune_cfg)} if protocol.finetune else {}
    return compare_inputs(
        inputs, out, protocol, cache_dir, pretrain_flops, FinetuneRun(finetune_cfg), settings, jobs, threads
    )


# ---------------------------------------------------------------- demo
def demo(
    data: str | None = None,
    *,
    out: PathLike = "runs/demo",
    objectives: Sequence[str] | None = None,
    steps_scale: float = 1.0,
    jobs: int | None = None,
    threads: int | None = None,
    overrides: Sequence[str] = (),
    full: bool = False,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Pretrain every objective (or those in `objectives`) on a built-in set at its demo budget
    (with `full`: its recipe's own budget, and the fine-tune's converged step count), `jobs`
    processes at a time (default: one per core) with `threads` each, then compare them all, the
    evaluations in parallel too. Returns the `results.json` rows.

        rows = ssl_vit.demo(objectives=["mae", "simclr"], steps_scale=0.5)
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ssl_vit import demo_runs as demo_lib
    from ssl_vit.data.shards import available_cores
    from ssl_vit.eval.compare import Protocol
    from ssl_vit.eval.finetune import default_config

    data = data or demo_lib.DEMO_DATA
    out = Path(out)
    cores = available_cores()
    jobs = jobs or cores
    threads = threads or max(1, cores // jobs)
    if jobs < 1 or threads < 1:
        raise RecipeError(f"--jobs and --threads must be at least 1, got {jobs} and {threads}")
    todo = demo_lib.demo_jobs(data, steps_scale, out, overrides, objectives, full)
    if not quiet:
        log.info(
            "pretraining %d objectives on %s: %d at a time, %d thread(s) each, %d cores",
            len(todo),
            data,
            jobs,
            threads,
            cores,
        )
    bar = tqdm(total=len(todo) + 1, disable=quiet or not sys.stderr.isatty(), unit="run", dynamic_ncols=True)
    done: list[str] = []

    def finished(job: demo_lib.PretrainJob, summary: dict[str, Any]) -> None:
        done.append(job.name)
        bar.update(1)
        if not quiet:
            log.info(
                "[%d/%d] %s: %d steps in %.0fs, final loss %.3f",
                len(done),
                len(todo),
                job.name,
                summary["steps"],
                summary["pretrain_seconds"],
                summary["final_loss"],
            )

    with bar, logging_redirect_tqdm():  # log lines above the bar, once (root handler swapped)
        runs = sorted(demo_lib.run_pretraining(todo, jobs, threads, finished))  # the table by name
        protocol = Protocol(**demo_lib.DEMO_PROTOCOL)
        finetune_cfg = default_config(protocol.finetune_shots)
        if not full:
            steps = max(1, round(demo_lib.DEMO_FINETUNE_STEPS * steps_scale))
            finetune_cfg = replace(finetune_cfg, steps=steps)
        if not quiet:
            log.info(
                "evaluating %d backbones and 2 baselines (k-NN, 10-shot probe, linear probe, 10-shot fine-tune)",
                len(runs),
            )
        rows = compare_protocol(runs, out / "compare", protocol, finetune_cfg, out / "cache", jobs, threads)
        bar.update(1)
    from ssl_vit.figures import write_compare_figures

    # PCA, not t-SNE: seven maps by t-SNE would cost the demo about a minute on two cores.
    write_compare_figures(runs, out / "compare" / "figures", method="pca")
    return rows


# ---------------------------------------------------------------- shards
def shards(
    src: str,
    out: PathLike,
    *,
    shard_size: int | None = None,
    val_fraction: float = 0.0,
    strict: bool = False,
    seed: int = 0,
    labels: str = "auto",
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write WebDataset shards (`train-%06d.tar`, `val-`, `test-`) and `manifest.json` from a
    built-in set, a folder of images (`labels`: auto, folders or none) or a CSV/TSV of paths, with
    `workers` processes (default: the cores); returns the manifest. Run again after an
    interruption, it continues from the last complete shard.

        manifest = ssl_vit.shards("photos/", "shards/photos", val_fraction=0.05)
    """
    from ssl_vit.data.shards import write_shards

    return write_shards(src, Path(out), shard_size, val_fraction, strict, seed, labels, workers, progress)


__all__ = ["compare", "demo", "export", "finetune", "knn", "pretrain", "probe", "shards"]
