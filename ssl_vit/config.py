"""Recipes: YAML files loaded into typed dataclasses.

A recipe has the sections `model`, `data`, `objective`, `optim`, `train`, `ckpt`, `log`, `eval` and a
top-level `seed`. OmegaConf structured configs do the merging (defaults < recipe < `key=value`
overrides) and the type checks; this module turns their exceptions into one-line `RecipeError`s
that name the key and suggest a close match.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from ssl_vit.errors import RecipeError

T = TypeVar("T")

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class ModelConfig:
    """The timm ViT. `name` picks a registered timm variant; the explicit sizes override it."""

    name: str = "vit_tiny_patch16_224"
    img_size: int = 224
    patch_size: int | None = None
    in_chans: int = 3
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    global_pool: str = "token"  # token | avg
    drop_path_rate: float = 0.0
    pos_embed: str = "learned"  # learned | sincos (fixed 2-D sin-cos, as MAE)
    init: str = "timm"  # timm | mae | mocov3: the weight initialisation of that code base
    init_from: str | None = None


@dataclass
class DataConfig:
    """Where images come from and how they are normalised (the export records mean/std)."""

    train: str = "digits"
    val: str | None = None
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    num_workers: int = 0
    shuffle_buffer: int = 1000  # resampled streaming: samples in the shuffle buffer
    shuffle_block: int = 1 << 18  # exact stream: samples permuted together (whole shards; data.md)
    strict: bool = False
    cache_dir: str | None = None
    aug_strength: float = 1.0
    # brightness, contrast, saturation, hue of contrastive views' colour jitter, times aug_strength;
    # None: BYOL/MoCo v3's 0.4, 0.4, 0.2, 0.1. Hue 0.5 spins the whole colour wheel, for data whose
    # colours carry no class (shapes).
    color_jitter: list[float] | None = None
    hflip: bool = True  # off for data where mirroring changes the class (digits)
    crop_scale: float | None = None  # smallest crop area of global views (None: the objective's own)
    samples_per_epoch: int | None = None


@dataclass
class OptimConfig:
    """AdamW with warmup + cosine. With `lr_scaling: linear`, `lr` is per 256 images."""

    lr: float = 1e-3
    lr_scaling: str = "none"  # none | linear
    min_lr: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int | None = None
    warmup_epochs: float = 0.0
    clip_grad: float | None = None
    clip_mode: str = "global"  # global: one norm over all gradients | per_param: each its own (DINO)
    accum_steps: int = 1
    layer_decay: float | None = None
    no_decay: str = "timm"  # timm: biases, norms, tokens | 1d: biases, norms (MAE, DINO) | none (MoCo v3)


@dataclass
class TrainConfig:
    batch_size: int = 64
    epochs: int = 10
    max_steps: int | None = None  # overrides epochs, for quick runs
    mixed_precision: str = "no"  # no | bf16 | fp16
    cpu: bool = False  # force the CPU even where a GPU is present
    strategy: str = "ddp"  # ddp: whole model per process | fsdp: parameters sharded (GPUs only)
    max_bad_steps: int = 5  # non-finite losses in a row before the run stops


@dataclass
class CkptConfig:
    every_steps: int | None = None
    keep_last: int = 2


@dataclass
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = False
    sample_keys: bool = False  # each process writes the keys it consumed to RUN_DIR/samples/rank-R.txt


@dataclass
class EvalConfig:
    # The evaluators' data (probe, k-NN, fine-tune, compare, the online k-NN): labelled train images
    # (None: data.train, where it has labels) and test images (None: the train source's test split,
    # or a seeded 20% of a folder held out). `--data` overrides both.
    train: str | None = None
    test: str | None = None
    feature: str = "cls"  # cls | avg | cls4
    batch_size: int = 256
    knn_k: list[int] = field(default_factory=lambda: [20])
    knn_temperature: float = 0.07
    shots: int = 10
    lowshot_draws: int = 5
    # Online monitor while pretraining (`ssl_vit.eval.monitor`): k-NN top-1 and RankMe of the backbone
    # an export would write, on a fixed stratified subset of the TRAIN split (never test), every N
    # optimizer steps and at the last, into metrics.jsonl. None or 0: off.
    online_every_steps: int | None = None
    online_samples: int = 500  # train images it uses (all when fewer): half memory bank, half queries


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: dict[str, Any] = field(default_factory=lambda: {"name": MISSING})
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0


def _known_keys(schema: Any, prefix: str) -> list[str]:
    keys: list[str] = []
    for f in fields(schema):
        full = f"{prefix}.{f.name}" if prefix else f.name
        keys.append(full)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += _known_keys(type(default), full)
    return keys


def _one_line(err: OmegaConfBaseException, schema: Any, where: str, prefix: str = "") -> RecipeError:
    """Turn an OmegaConf exception into one line naming the key and a close match."""
    key = getattr(err, "full_key", None) or "?"
    key = f"{prefix}.{key}" if prefix else key
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        known = _known_keys(schema, prefix)
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if not close:  # a typo in the last part only: compare leaf names within the section
            section, _, leaf = key.rpartition(".")
            leaves = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section]
            close = [f"{section}.{m}" if section else m for m in difflib.get_close_matches(leaf, leaves, n=1)]
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return RecipeError(f"{where}: unknown key '{key}'{hint}")
    if isinstance(err, MissingMandatoryValue):
        return RecipeError(f"{where}: '{key}' is required but has no value")
    if isinstance(err, ValidationError):
        first = str(err).splitlines()[0]
        return RecipeError(f"{where}: bad value for '{key}': {first}")
    return RecipeError(f"{where}: {str(err).splitlines()[0]}")


def resolve_recipe_path(recipe: str) -> Path:
    """A path to a YAML file, or a name under `recipes/` such as `digits/supervised`."""
    direct = Path(recipe)
    if direct.is_file():
        return direct
    for base in (Path.cwd() / "recipes", RECIPES_DIR):
        for candidate in (base / recipe, base / f"{recipe}.yaml"):
            if candidate.is_file():
                return candidate
    names = sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.glob("*/*.yaml"))
    close = difflib.get_close_matches(recipe, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known recipes: {', '.join(names)}"
    raise RecipeError(f"recipe '{recipe}' not found (neither a file nor a name under recipes/){hint}")


def parse_overrides(overrides: list[str]) -> DictConfig:
    """`key=value` words (values parsed as YAML) into a config to merge last."""
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise RecipeError(f"override '{bad[0]}' is not of the form key=value (e.g. optim.lr=3e-4)")
    try:
        return OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as err:
        raise RecipeError(f"bad override: {str(err).splitlines()[0]}") from None


def load_recipe(recipe: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, merge and validate a recipe; every problem becomes a one-line `RecipeError`."""
    path = resolve_recipe_path(str(recipe))
    try:
        user = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and OSError both mean: fix the file
        raise RecipeError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(user, DictConfig):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections")
    return merge_recipe(user, overrides or [], where=str(path))


def merge_recipe(user: DictConfig | dict[str, Any], overrides: list[str], where: str) -> Recipe:
    schema = OmegaConf.structured(Recipe)
    try:
        merged = OmegaConf.merge(schema, user)
    except OmegaConfBaseException as err:
        raise _one_line(err, Recipe, where) from None
    try:
        merged = OmegaConf.merge(merged, parse_overrides(overrides))
    except OmegaConfBaseException as err:
        raise _one_line(err, Recipe, "override") from None
    try:
        recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _one_line(err, Recipe, where) from None
    assert isinstance(recipe, Recipe)
    if "name" not in recipe.objective or not isinstance(recipe.objective["name"], str):
        raise RecipeError(f"{where}: 'objective.name' is required")
    return recipe


def validate_section(schema: type[T], values: dict[str, Any], where: str) -> T:
    """Check a free-form section (such as an objective's options) against its dataclass."""
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as err:
        raise _one_line(err, schema, where, prefix=where) from None
    return obj  # type: ignore[return-value]


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def save_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(to_yaml(recipe))
