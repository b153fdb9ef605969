from __future__ import annotations

from pathlib import Path

import pytest

from ssl_vit.config import RECIPES_DIR, load_recipe, parse_overrides
from ssl_vit.errors import RecipeError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_merge_and_overrides_win(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(tmp_path, "objective: {name: supervised}\noptim: {lr: 0.1}\n"), ["optim.lr=3e-4", "seed=7"]
    )
    assert recipe.optim.lr == pytest.approx(3e-4)
    assert recipe.seed == 7
    assert recipe.train.batch_size == 64  # untouched default


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        (
            "objective: {name: supervised}\ntrain: {batch_sise: 3}\n",
            [],
            "unknown key 'train.batch_sise'; did you mean 'train.batch_size'",
        ),
        (
            "objective: {name: supervised}\ntrain: {batch_size: many}\n",
            [],
            "bad value for 'train.batch_size'",
        ),
        ("objective: {name: supervised}\n", ["optim.lr"], "not of the form key=value"),
        ("objective: {name: supervised}\n", ["trian.epochs=3"], "did you mean 'train'"),
        ("train: {epochs: 1}\n", [], "objective.name"),
        ("[1, 2]\n", [], "mapping"),
        ("model: {name: [unclosed\n", [], "not valid YAML"),
    ],
)
def test_bad_recipes_give_one_line_errors(
    tmp_path: Path, text: str, overrides: list[str], expected: str
) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_recipe_name_suggests_known() -> None:
    with pytest.raises(RecipeError, match="digits/supervised"):
        load_recipe("digits/supervisd")


def test_override_values_are_parsed_as_yaml() -> None:
    cfg = parse_overrides(["data.mean=[0.1,0.2]", "train.max_steps=5"])
    assert list(cfg.data.mean) == [0.1, 0.2] and cfg.train.max_steps == 5


@pytest.mark.parametrize(
    "path", sorted(RECIPES_DIR.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}"
)
def test_every_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.objective["name"]
