"""Registry of objectives: `register` a class under a name, `get` it, `build` it from a recipe section."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ssl_vit.backbone import Backbone
from ssl_vit.config import validate_section
from ssl_vit.errors import RecipeError
from ssl_vit.objectives.base import Objective, Reconstructor

_REGISTRY: dict[str, type[Objective]] = {}
_BUILTIN = ("supervised", "mpp", "mae", "simclr", "mocov3", "dino", "ijepa", "ibot")

ObjectiveT = TypeVar("ObjectiveT", bound=type[Objective])


def register(name: str) -> Callable[[ObjectiveT], ObjectiveT]:
    """Class decorator: make an objective available as `objective.name: <name>`."""

    def wrap(cls: ObjectiveT) -> ObjectiveT:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"objective '{name}' is registered twice")
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    for module in _BUILTIN:
        importlib.import_module(f"ssl_vit.objectives.{module}")


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> type[Objective]:
    _load_builtins()
    if name not in _REGISTRY:
        raise RecipeError(f"objective.name '{name}' is unknown; choose one of {', '.join(names())}")
    return _REGISTRY[name]


def unregister(name: str) -> type[Objective]:
    """Remove `name` from the registry and return its class, so another class may take the name.

    For notebooks, where running a `@register` cell again brings a new class object, and for tests
    that register an objective for a while and then restore the registry. An unknown name is a
    `RecipeError`, as in `get`.
    """
    cls = get(name)
    del _REGISTRY[name]
    return cls


def build(
    section: dict[str, Any],
    backbone: Backbone,
    *,
    num_classes: int | None = None,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
) -> Objective:
    """Build from the recipe's `objective` section (`name` plus the objective's own options).

    The keywords are the data facts an objective may need and the section may leave unset: the class
    count (supervised; the caller reads it from the data) and the input normalisation (MPP's colour
    targets are in un-normalised pixels). Each fills the option of that name where the objective's
    `Config` has one; the others are ignored, so callers pass what they know to every objective.
    """
    options = {k: v for k, v in section.items() if k != "name"}
    cls = get(str(section["name"]))
    facts = {"num_classes": num_classes, "pixel_mean": pixel_mean, "pixel_std": pixel_std}
    for key, value in facts.items():
        if value is not None and key in cls.Config.__dataclass_fields__ and options.get(key) is None:
            options[key] = value
    cfg = validate_section(cls.Config, options, "objective")
    return cls(backbone, cfg)  # type: ignore[call-arg]


__all__ = ["Objective", "Reconstructor", "build", "get", "names", "register", "unregister"]
