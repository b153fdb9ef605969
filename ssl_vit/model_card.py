"""The model card (`README.md`) of an export folder, so the folder can go to the Hugging Face hub as is.

Hugging Face reads the YAML front matter (`library_name: timm` makes the hub offer
`timm.create_model("hf-hub:...")`), people read the rest: architecture, objective and recipe, data,
images seen and pretraining time, and every evaluation result in the run directory. The card is
rendered from files only (the export's `config.json` and `model.safetensors` header; the run's
`recipe.yaml`, `summary.json`, `eval/*.json` and, where the training data has one, its
`manifest.json`, found in the data cache for a folder of images), so it can be rebuilt at any time:
`ssl-vit export RUN_DIR --out DIR` re-renders it with the evaluations done since. Evaluation files
are rendered generically, whatever their keys.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open

from ssl_vit.rundir import RunDir

CARD = "README.md"
MAX_LIST = 12  # longer lists in result files are summarised by their length


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        if len(value) > MAX_LIST or any(isinstance(v, (dict, list)) for v in value):
            return f"list of {len(value)}"
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value).replace("|", "\\|").replace("\n", " ")


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as (dotted key, formatted value) rows."""
    if not isinstance(obj, dict):
        return [(prefix or "value", _fmt(obj))]
    rows: list[tuple[str, str]] = []
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        rows += flatten(value, name) if isinstance(value, dict) else [(name, _fmt(value))]
    return rows


def _table(rows: list[tuple[str, str]], head: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {k} | {v} |" for k, v in rows])


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def find_manifest(data_train: str) -> Path | None:
    """`manifest.json` next to the training shards: in a folder `data.train`, or beside its pattern."""
    source = Path(data_train).expanduser()
    for folder in (source, source.parent):
        if str(folder) not in ("", ".") and (folder / "manifest.json").is_file():
            return folder / "manifest.json"
    return None


def parameter_count(export_dir: Path) -> int | None:
    path = export_dir / "model.safetensors"
    if not path.is_file():
        return None
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            count = 1
            for dim in f.get_slice(key).get_shape():
                count *= dim
            total += count
    return total


def _front_matter(objective: str, license_id: str) -> str:
    tags = ["timm", "ssl-vit", "vision-transformer", "image-feature-extraction", objective]
    tags.insert(3, "supervised" if objective == "supervised" else "self-supervised")
    meta: dict[str, Any] = {"library_name": "timm", "license": license_id}
    meta.update(pipeline_tag="image-feature-extraction", tags=list(dict.fromkeys(tags)))
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---"


def _architecture(config: dict[str, Any], export_dir: Path) -> list[tuple[str, str]]:
    args, cfg = config.get("model_args", {}), config.get("pretrained_cfg", {})
    chans, height, width = cfg.get("input_size", [args.get("in_chans", 3), 0, 0])
    rows = [("timm architecture", f"`{config.get('architecture', '?')}`")]
    rows.append(("input", f"{height} x {width}, {chans} channel(s)"))
    rows += [
        (k.replace("_", " "), _fmt(args[k]))
        for k in ("patch_size", "embed_dim", "depth", "num_heads")
        if k in args
    ]
    rows.append(
        ("pooled feature", f"{config.get('global_pool') or 'token'}, width {config.get('num_features', '?')}")
    )
    n_params = parameter_count(export_dir)
    if n_params is not None:
        rows.append(("parameters", f"{n_params / 1e6:.2f} M"))
    rows.append(("mean / std", f"{_fmt(cfg.get('mean'))} / {_fmt(cfg.get('std'))}"))
    return rows


def _pretraining(recipe: dict[str, Any], summary: dict[str, Any], weights: str) -> list[tuple[str, str]]:
    objective = dict(recipe.get("objective", {}))
    name = objective.pop("name", "?")
    optim, train, model = recipe.get("optim", {}), recipe.get("train", {}), recipe.get("model", {})
    rows = [("objective", f"`{name}`"), ("exported weights", weights)]
    if objective:
        rows.append(("objective options", ", ".join(f"{k}={_fmt(v)}" for k, v in objective.items())))
    if model.get("init_from"):
        rows.append(("initialised from", f"`{model['init_from']}`"))
    scaling = " per 256 images" if optim.get("lr_scaling") == "linear" else ""
    lr = f"lr {_fmt(optim.get('lr'))}{scaling}, weight decay {_fmt(optim.get('weight_decay'))}"
    steps = optim.get("warmup_steps")
    warmup = f"{steps} steps" if steps is not None else f"{_fmt(optim.get('warmup_epochs', 0.0))} epochs"
    rows.append(("optimiser", f"AdamW, {lr}, warm-up {warmup}"))
    length = f"{train['max_steps']} steps" if train.get("max_steps") else f"{train.get('epochs')} epochs"
    precision = {"no": "fp32"}.get(train.get("mixed_precision", "no"), train.get("mixed_precision"))
    rows.append(("schedule", f"{length}, batch {train.get('batch_size')} per device, {precision}"))
    for key, label in (
        ("steps", "optimiser steps"),
        ("images_seen", "images seen"),
        ("final_loss", "final loss"),
    ):
        if key in summary:
            rows.append((label, _fmt(summary[key])))
    if "pretrain_seconds" in summary:
        rows.append(("pretraining time", _duration(float(summary["pretrain_seconds"]))))
    if "seed" in recipe:
        rows.append(("seed", _fmt(recipe["seed"])))
    return rows


def _data(recipe: dict[str, Any], summary: dict[str, Any]) -> str:
    data, evals = recipe.get("data", {}), recipe.get("eval", {})
    train = str(data.get("train", "?"))
    rows = [
        ("training data", f"`{train}`"),
        ("validation data", f"`{data.get('val')}`" if data.get("val") else "-"),
        ("evaluation data", f"`{evals['train']}`" if evals.get("train") else "the training data"),
        ("evaluation test data", f"`{evals['test']}`" if evals.get("test") else "its test split"),
    ]
    text = _table(rows)
    shards = summary.get("data_shards")  # a folder of images trains from shards in the data cache
    manifest = find_manifest(str(shards)) if shards else find_manifest(train)
    if manifest is None:
        return (
            text
            + "\n\nNo `manifest.json` was found beside the training data, so no sample counts are listed."
        )
    return (
        text
        + f"\n\nFrom `{manifest}`:\n\n"
        + _table(flatten(_read_json(manifest) or {}), ("manifest", "value"))
    )


def _evaluations(run_dir: Path) -> str:
    files = RunDir(run_dir).eval_results()
    if not files:
        return "No evaluation results yet: `ssl-vit probe RUN_DIR` writes `eval/linear_probe.json`."
    parts = [f"### {p.stem}\n\n" + _table(flatten(_read_json(p)), ("metric", "value")) for p in files]
    return "\n\n".join(parts)


def render_card(
    export_dir: Path, run_dir: Path | None, weights: str | None = None, license_id: str = "apache-2.0"
) -> str:
    """The card's Markdown for the export in `export_dir`, trained in `run_dir` (None: unknown).

    weights: "student" or "teacher"; by default what the export's `config.json` records.
    """
    config = _read_json(export_dir / "config.json") or {}
    ours = config.get("ssl_vit", {})
    weights = weights or str(ours.get("weights", "student"))
    run = RunDir(run_dir) if run_dir else None
    recipe = asdict(run.recipe()) if run and run.exists() else {}
    summary = (run.summary() if run else None) or {}
    objective = str(recipe.get("objective", {}).get("name") or ours.get("objective", "unknown"))
    title = run_dir.name if run_dir else export_dir.name
    usage = (
        "```python\nimport timm, torch\n"
        'model = timm.create_model("hf-hub:USER/REPO", pretrained=True)  # or "local-dir:PATH/TO/THIS/FOLDER"\n'
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n"
        "with torch.no_grad():\n"
        "    features = model.forward_head(model.forward_features(images), pre_logits=True)  # (B, D)\n```"
    )
    sections = [
        _front_matter(objective, license_id),
        f"# {title}: a ViT backbone pretrained with `{objective}` (ssl-vit)",
        "A Vision Transformer backbone without a classifier head, pretrained with ssl-vit and exported "
        f"in timm's format. Usage:\n\n{usage}",
        "## Architecture\n\n" + _table(_architecture(config, export_dir)),
    ]
    if recipe:
        sections.append("## Pretraining\n\n" + _table(_pretraining(recipe, summary, weights)))
        sections.append("## Data\n\n" + _data(recipe, summary))
    if run_dir:
        sections.append("## Evaluation\n\n" + _evaluations(run_dir))
    if recipe:
        dump = yaml.safe_dump(recipe, sort_keys=False).strip()
        sections.append(
            f"## Recipe\n\n<details><summary>recipe.yaml</summary>\n\n```yaml\n{dump}\n```\n\n</details>"
        )
    return "\n\n".join(sections) + "\n"


def write_model_card(
    export_dir: Path, run_dir: Path | None, weights: str | None = None, license_id: str = "apache-2.0"
) -> Path:
    """Write `export_dir/README.md` and return its path."""
    path = export_dir / CARD
    path.write_text(render_card(export_dir, run_dir, weights, license_id))
    return path
