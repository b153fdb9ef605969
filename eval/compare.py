"""`ssl-vit compare`: the same evaluation protocols for every input, plus two baselines, in one report.

"Which objective gives the better backbone for my data, at what cost?" Every input (a run directory,
an export folder, any timm-loadable folder) goes through identical protocols: weighted k-NN, a
K-shot probe over seeded draws, the full linear probe and, where asked, a short fine-tune (on all
training labels, or with `finetune_shots` on K-shot draws: draw s for fine-tune seed s, the same images
for every input and baseline). Two
baseline rows use the same protocols: raw pixels, and the first input's architecture with random
weights. Runs of one recipe given together (differing only in seed) become one row, mean ± std over
runs; a single run's several seeds give mean ± std over seeds.

This module never imports the engine or the objectives: fine-tuning and the FLOP count come in as
functions from the CLI, which is where the parts are wired together.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ssl_vit.eval.features import (
    EvalModel,
    load_eval_model,
    random_init_model,
    raw_pixel_features,
    save_result,
    split_features,
)
from ssl_vit.eval.knn import knn_classify
from ssl_vit.eval.linear_probe import DEFAULT_CS, linear_probe, lowshot_probe
from ssl_vit.eval.report import write_report

from ssl_vit.errors import RecipeError
from ssl_vit.rundir import RunDir

log = logging.getLogger(__name__)

METRICS = ("linear_probe_top1", "lowshot_top1", "knn_top1", "finetune_top1")
FinetuneFn = Callable[[EvalModel, int, Path], float]  # (model, seed, out_dir) -> test top-1
FlopsFn = Callable[[Path], "float | None"]  # run directory -> pretraining FLOPs


@dataclass
class Protocol:
    """What `compare` measures; identical for every input and baseline."""

    probe: bool = True  # full linear probe and the K-shot probe
    knn: bool = True
    finetune: bool = False
    shots: int = 10  # K of the low-shot probe; 0 turns it off
    seeds: int = 3  # low-shot draws, and fine-tune runs, per input
    finetune_seeds: int | None = None  # fine-tune runs per input (default: `seeds`)
    finetune_shots: int = 0  # K labelled images per class for each fine-tune (draw = its seed); 0: all
    feature: str | None = None  # None: each model's own (its recipe's eval.feature)
    knn_k: list[int] = field(default_factory=lambda: [20])
    knn_temperature: float = 0.07
    probe_method: str = "auto"
    probe_cs: list[float] = field(default_factory=lambda: list(DEFAULT_CS))  # C grid (chosen on train)
    batch_size: int = 256
    data: str | None = None  # evaluation data (default: the first input's training data)


@dataclass
class Entry:
    """One evaluated input: its scores (a list per metric: one value per seed) and provenance."""

    model: EvalModel
    scores: dict[str, list[float]]
    run_dir: Path | None
    pretrain_seconds: float | None
    images_seen: float | None
    pretrain_flops: float | None
    group: str


def _run_dir_of(model: EvalModel) -> Path | None:
    """The run directory behind an input: itself, or the one its export records."""
    if model.run_dir is not None:
        return model.run_dir
    recorded = model.info.get("run_dir")
    if recorded and RunDir(Path(recorded)).exists():
        return Path(recorded)
    return None


def _group_key(model: EvalModel) -> str:
    """Run directories of one recipe share a key: the resolved recipe without seed, checkpointing and
    logging. Any other folder is a group of its own."""
    if model.run_dir is None:
        return f"path:{model.source.resolve() if model.source else model.name}"
    recipe = asdict(RunDir(model.run_dir).recipe())
    for key in ("seed", "ckpt", "log"):
        recipe.pop(key, None)
    return json.dumps(recipe, sort_keys=True)


def score_features(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], protocol: Protocol
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """The frozen protocols on one set of features: scores per metric and the full results."""
    scores: dict[str, list[float]] = {}
    details: dict[str, Any] = {}
    if protocol.knn:
        details["knn"] = knn_classify(*train, *test, protocol.knn_k, protocol.knn_temperature)
        scores["knn_top1"] = [details["knn"]["top1"]]
    if protocol.probe:
        details["linear_probe"] = linear_probe(*train, *test, protocol.probe_cs, method=protocol.probe_method)
        scores["linear_probe_top1"] = [details["linear_probe"]["top1"]]
        if protocol.shots > 0:
            draws = max(protocol.seeds, 1)
            details["lowshot"] = lowshot_probe(*train, *test, protocol.shots, draws, cs=protocol.probe_cs)
            scores["lowshot_top1"] = details["lowshot"]["per_draw"]
    return scores, details


def evaluate(
    model: EvalModel,
    protocol: Protocol,
    out: Path,
    cache_dir: Path | None,
    finetune_fn: FinetuneFn | None,
) -> dict[str, list[float]]:
    """Every protocol on one backbone; per-input results also go to `RUN_DIR/eval/compare.json`."""
    feature = protocol.feature or model.feature
    train = split_features(model, "train", feature, protocol.batch_size, cache_dir)
    test = split_features(model, "test", feature, protocol.batch_size, cache_dir)
    scores, details = score_features(train, test, protocol)
    if protocol.finetune:
        if finetune_fn is None:
            raise RecipeError("compare --finetune needs a fine-tune function (the CLI passes one)")
        runs = protocol.finetune_seeds or protocol.seeds
        slug = model.name.replace(os.sep, "_").replace(" ", "_")
        if protocol.finetune_shots:
            slug = f"{slug}-{protocol.finetune_shots}shot"
        scores["finetune_top1"] = [
            finetune_fn(model, seed, out / "finetune" / f"{slug}-seed{seed}") for seed in range(max(runs, 1))
        ]
        details["finetune_top1"] = scores["finetune_top1"]
        details["finetune_shots"] = protocol.finetune_shots
    save_result(model, "compare", {"feature": feature, **details})
    return scores


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def evaluate_all(
    models: Sequence[EvalModel],
    protocol: Protocol,
    out: Path,
    cache_dir: Path | None,
    finetune_fn: FinetuneFn | None,
    jobs: int = 1,
    threads: int | None = None,
) -> list[dict[str, list[float]]]:
    """`evaluate` on each model, in order; with `jobs` > 1 in that many spawned processes."""
    if jobs <= 1 or len(models) <= 1:
        return [evaluate(model, protocol, out, cache_dir, finetune_fn) for model in models]
    context = multiprocessing.get_context("spawn")  # fork after OpenMP threads have started can hang
    with ProcessPoolExecutor(
        min(jobs, len(models)), mp_context=context, initializer=_set_threads, initargs=(threads,)
    ) as pool:
        n = len(models)
        return list(pool.map(evaluate, models, [protocol] * n, [out] * n, [cache_dir] * n, [finetune_fn] * n))


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    mean = float(np.mean(values))  # type: ignore[arg-type]
    return int(mean) if all(isinstance(v, int) for v in values) and mean.is_integer() else mean


def _group_name(entries: Sequence[Entry]) -> str:
    if len(entries) == 1:
        return entries[0].model.name
    prefix = os.path.commonprefix([e.model.name for e in entries]).rstrip("-_ .")
    return prefix or entries[0].model.objective


def aggregate(entries: Sequence[Entry], shots: int, finetune_shots: int = 0) -> dict[str, Any]:
    """One results row: mean ± std over runs of one recipe, or over seeds of a single run.

    `shots` and `finetune_shots` (0: all labels) are recorded where their metric was measured."""
    row: dict[str, Any] = {
        "name": _group_name(entries),
        "objective": entries[0].model.objective,
        "n_runs": len(entries),
        "pretrain_seconds": _mean_or_none([e.pretrain_seconds for e in entries]),
        "images_seen": _mean_or_none([e.images_seen for e in entries]),
        "pretrain_flops": _mean_or_none([e.pretrain_flops for e in entries]),
    }
    for metric in METRICS:
        per_run = [e.scores[metric] for e in entries if metric in e.scores]
        if len(per_run) > 1:
            mean, std = _mean_std([float(np.mean(v)) for v in per_run])
        else:
            mean, std = _mean_std(per_run[0] if per_run else [])
        row[metric], row[f"{metric}_std"] = mean, std
        if metric == "lowshot_top1":
            row["shots"] = shots if mean is not None else None
        if metric == "finetune_top1":
            row["finetune_shots"] = finetune_shots if mean is not None else None
    return row


def _baseline_entry(name: str, objective: str, scores: dict[str, list[float]], model: EvalModel) -> Entry:
    stub = EvalModel(model.backbone, model.img_size, model.in_chans, model.mean, model.std, model.data)
    stub.test_data = model.test_data
    stub.name, stub.objective = name, objective
    return Entry(stub, scores, None, 0.0, 0, 0.0, f"baseline:{objective}")


def compare(
    inputs: Sequence[Path],
    out: Path,
    protocol: Protocol,
    cache_dir: Path | None = None,
    flops_fn: FlopsFn | None = None,
    finetune_fn: FinetuneFn | None = None,
    settings: dict[str, Any] | None = None,
    jobs: int = 1,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every input and both baselines; write the report files into `out`; return the rows.

    `settings` (e.g. the fine-tune protocol) is recorded in `report.md` next to the protocol. `jobs`
    evaluates that many backbones at once, each in its own process with `threads` torch threads
    (`finetune_fn` must then be picklable); every protocol is seeded, so the rows do not depend on it.
    """
    if not inputs:
        raise RecipeError("compare needs at least one run directory or export folder")
    if protocol.finetune_shots < 0:
        raise RecipeError(f"finetune shots must be 0 (all labels) or more, got {protocol.finetune_shots}")
    if protocol.finetune_shots and not protocol.finetune:
        raise RecipeError(f"--finetune-shots {protocol.finetune_shots} needs --finetune")
    models = [load_eval_model(path, protocol.data) for path in inputs]
    data, test_data = models[0].data, models[0].test_data  # `protocol.data`, else the first input's
    seen: dict[str, int] = {}
    for model in models:
        model.data, model.test_data = data, test_data
        if model.name == "backbone" and model.source is not None:  # RUN_DIR/backbone: name the run
            model.name = model.source.resolve().parent.name
        seen[model.name] = seen.get(model.name, 0) + 1
        if seen[model.name] > 1:  # two folders with one name: keep rows and fine-tune folders apart
            model.name = f"{model.name}-{seen[model.name]}"
    first = models[0]
    out.mkdir(parents=True, exist_ok=True)

    log.info("baseline: raw pixels")
    raw = [
        raw_pixel_features(data, split, first.img_size, first.in_chans, test_data)
        for split in ("train", "test")
    ]
    raw_protocol = Protocol(**{**asdict(protocol), "finetune": False})
    entries = [
        _baseline_entry("raw pixels", "raw_pixels", score_features(raw[0], raw[1], raw_protocol)[0], first)
    ]
    log.info("baseline: random init; then %d input(s), %d at a time", len(models), max(jobs, 1))
    random_model = random_init_model(first, seed=0)
    scores = evaluate_all([random_model, *models], protocol, out, cache_dir, finetune_fn, jobs, threads)
    entries.append(_baseline_entry("random init", "random_init", scores[0], first))
    for model, model_scores in zip(models, scores[1:], strict=True):
        run_dir = _run_dir_of(model)
        summary = (RunDir(run_dir).summary() if run_dir else None) or {}
        entries.append(
            Entry(
                model=model,
                scores=model_scores,
                run_dir=run_dir,
                pretrain_seconds=summary.get("pretrain_seconds", model.info.get("pretrain_seconds")),
                images_seen=summary.get("images_seen", model.info.get("images_seen")),
                pretrain_flops=flops_fn(run_dir) if flops_fn and run_dir else None,
                group=_group_key(model),
            )
        )
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.group, []).append(entry)
    rows = [aggregate(group, protocol.shots, protocol.finetune_shots) for group in groups.values()]
    feature = protocol.feature or "each recipe's eval.feature"
    report = {**asdict(protocol), "feature": feature, "data": data, "test_data": test_data}
    write_report(rows, out, {**report, **(settings or {})})
    return rows
