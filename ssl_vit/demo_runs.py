"""`ssl-vit demo`: every objective pretrained on a built-in set, side by side, on all the cores.

Each objective pretrains in a process of its own (`python -m ssl_vit pretrain ...`), `jobs` at a time
with `threads` intra-op threads each: a tiny ViT does not use two threads well, so two one-thread
processes on two cores finish about twice the steps of one two-thread process. The evaluations then
run in parallel too (`compare(..., jobs=...)`). Processes share nothing but the built-in set's shard
cache, which is written atomically, so the figures do not depend on `jobs`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_vit.errors import SslVitError
from ssl_vit.rundir import RunDir

DEMO_DATA = "digits"  # the embedded default; its recipes and demo figures are in BENCHMARKS.md
# Pretraining steps per objective, before --steps-scale: a share of each recipe's budget sized so
# that `make demo` (install included) stays under 10 minutes on a 2-core machine with 2 jobs. Listed
# longest run first (digits, measured): jobs start in this order, so the workers finish together.
DEMO_STEPS: dict[str, dict[str, int]] = {
    "digits": {"mpp": 600, "dino": 200, "mocov3": 200, "simclr": 250, "mae": 700, "supervised": 200},
    "shapes": {"mpp": 200, "dino": 40, "mocov3": 50, "simclr": 80, "mae": 300, "supervised": 200},
}
DEMO_DEFAULT_STEPS = 150
# `--full`: each recipe at its own budget and settings (its wall time: BENCHMARKS.md), the runs
# started longest first by the recipes' measured times; objectives not listed start last.
FULL_ORDER: dict[str, tuple[str, ...]] = {
    "digits": ("ibot", "dino", "ijepa", "mocov3", "mae", "mpp", "simclr", "supervised"),
    "shapes": ("ibot", "dino", "mocov3", "ijepa", "simclr", "mae", "mpp", "supervised"),
}
# Objectives with a recipe that the demo runs only when asked (`--objectives`): the six above fill
# `make demo`'s 10 minutes on 2 cores; I-JEPA's and iBOT's recipes run 1,400 steps (8-15 core-minutes
# each on digits), and at a demo-sized 200 steps I-JEPA's features are still near random init's
# (online k-NN 0.32 against 0.26; BENCHMARKS.md).
DEMO_OPT_IN = frozenset({"ijepa", "ibot"})
DEMO_FINETUNE_STEPS = 400  # of the 10-shot fine-tune (converged by ~800, BENCHMARKS.md); one draw
DEMO_PROTOCOL: dict[str, Any] = {  # `eval.compare.Protocol` fields
    "probe": True,
    "knn": True,
    "finetune": True,
    "shots": 10,
    "seeds": 3,
    "finetune_seeds": 1,
    "finetune_shots": 10,
}
DEMO_OVERRIDES = ("ckpt.keep_last=1",)  # recipe overrides for every run
# A teacher EMA sized for a recipe's full budget follows too slowly in a run a fifth as long; the
# demo's short runs get a faster teacher (measured at the demo budgets: BENCHMARKS.md, the demo).
DEMO_OBJECTIVE_OVERRIDES: dict[str, dict[str, tuple[str, ...]]] = {
    "digits": {"dino": ("objective.momentum=0.96",), "mocov3": ("objective.momentum=0.9",)},
}


class DemoError(SslVitError):
    """A demo step failed; the message names the run and its own error line."""


@dataclass
class PretrainJob:
    """One `ssl-vit pretrain` run of the demo."""

    name: str
    recipe: str
    overrides: list[str]
    out: Path

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "ssl_vit",
            "pretrain",
            self.recipe,
            *self.overrides,
            "--out",
            str(self.out),
            "--quiet",
        ]


def _thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(threads)
    return env


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1].removeprefix("error: ")


def run_pretraining(
    jobs: Sequence[PretrainJob],
    workers: int,
    threads: int,
    on_done: Callable[[PretrainJob, dict[str, Any]], None] | None = None,
) -> list[Path]:
    """Run every job as its own process, `workers` at a time; returns the run directories in job
    order. `on_done(job, summary)` is called as each finishes. After the first failure no new job
    starts; the ones running finish, then the failure is raised."""

    def run(job: PretrainJob) -> dict[str, Any]:
        done = subprocess.run(job.command(), env=_thread_env(threads), capture_output=True, text=True)
        if done.returncode != 0:
            raise DemoError(f"pretraining {job.name} failed: {_last_error(done.stderr)}")
        summary = RunDir(job.out).summary()
        if summary is None:
            raise DemoError(f"pretraining {job.name} ended without {RunDir(job.out).summary_file}")
        return summary

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(run, job): job for job in jobs}
        try:
            for future in as_completed(futures):
                summary = future.result()
                if on_done is not None:
                    on_done(futures[future], summary)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [job.out for job in jobs]


def demo_jobs(
    data: str,
    steps_scale: float,
    out: Path,
    overrides: Sequence[str] = (),
    only: Sequence[str] | None = None,
    full: bool = False,
) -> list[PretrainJob]:
    """Every registered objective with a recipe for `data` but the `DEMO_OPT_IN` ones (or those in
    `only`), on its demo budget, or with `full` on its recipe's own budget and settings."""
    from ssl_vit import objectives
    from ssl_vit.config import RECIPES_DIR
    from ssl_vit.errors import RecipeError

    if steps_scale <= 0:
        raise RecipeError(f"--steps-scale must be positive, got {steps_scale}")
    if full and steps_scale != 1:
        raise RecipeError("--steps-scale scales the demo's short budgets; --full runs each recipe's own")
    names = [n for n in objectives.names() if (RECIPES_DIR / data / f"{n}.yaml").is_file()]
    if not names:
        raise RecipeError(f"no recipes under recipes/{data}/ for any registered objective")
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise RecipeError(
            f"--objectives: no {data} recipe for {', '.join(unknown)}; choose from {', '.join(names)}"
        )
    names = [n for n in names if (n in only if only is not None else n not in DEMO_OPT_IN)]
    budgets = DEMO_STEPS.get(data, {})
    longest_first = list(FULL_ORDER.get(data, ()) if full else budgets)
    names.sort(key=lambda n: longest_first.index(n) if n in longest_first else len(longest_first))
    jobs = []
    for name in names:
        short: list[str] = []  # the demo's budget and short-run settings; none with `full`
        if not full:
            steps = max(1, round(budgets.get(name, DEMO_DEFAULT_STEPS) * steps_scale))
            short = [f"train.max_steps={steps}", *DEMO_OBJECTIVE_OVERRIDES.get(data, {}).get(name, ())]
        extra = [*short, *DEMO_OVERRIDES, *overrides]  # the user's overrides win
        jobs.append(PretrainJob(name, f"{data}/{name}", extra, out / name))
    return jobs


def headline(rows: Sequence[dict[str, Any]]) -> str:
    """One sentence saying what the comparison shows: the best self-supervised backbone's K-shot
    probe against raw pixels and the random-initialised backbone, its K-shot fine-tune against the
    same ViT fine-tuned from scratch where that was run, and supervised pretraining as the ceiling."""
    by_objective = {r["objective"]: r for r in rows}
    learned = [r for r in rows if r["objective"] not in ("raw_pixels", "random_init", "supervised")]
    scored = [r for r in learned if r.get("lowshot_top1") is not None]
    if not scored or "raw_pixels" not in by_objective:
        return ""
    best = max(scored, key=lambda r: r["lowshot_top1"])
    raw, rand = by_objective["raw_pixels"], by_objective.get("random_init", {})
    text = (
        f"With {best.get('shots')} labels per class, {best['objective']} features reach "
        f"{100 * best['lowshot_top1']:.1f}% (linear probe) against {100 * raw['lowshot_top1']:.1f}% for raw "
        "pixels"
    )
    if rand.get("lowshot_top1") is not None:
        text += f" and {100 * rand['lowshot_top1']:.1f}% for the random-initialised backbone"
    tuned = [r for r in learned if r.get("finetune_top1") is not None and r.get("finetune_shots")]
    if tuned and rand.get("finetune_top1") is not None:
        top = max(tuned, key=lambda r: r["finetune_top1"])
        text += (
            f"; fine-tuned on them, {top['objective']} reaches {100 * top['finetune_top1']:.1f}% against "
            f"{100 * rand['finetune_top1']:.1f}% from scratch"
        )
    sup = by_objective.get("supervised", {})
    if sup.get("linear_probe_top1") is not None:
        text += f"; supervised pretraining on every label gives {100 * sup['linear_probe_top1']:.1f}% (linear probe)"
    return text + "."
