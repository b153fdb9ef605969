"""The dependency table of STYLE.md section 2, checked by reading import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

LEAVES = {"config", "types", "errors", "optim"}
# module prefix -> ssl_vit modules it must not import
FORBIDDEN: dict[str, set[str]] = {
    "config": {"data", "backbone", "export", "objectives", "engine", "eval", "cli"},
    "types": {"data", "backbone", "export", "objectives", "engine", "eval", "cli"},
    "errors": {"data", "backbone", "export", "objectives", "engine", "eval", "cli", "config"},
    "optim": {"data", "backbone", "export", "objectives", "engine", "eval", "cli"},
    "data": {"backbone", "export", "objectives", "engine", "eval", "cli"},
    "backbone": {"data", "objectives", "engine", "eval", "cli", "export"},
    "export": {"data", "objectives", "engine", "eval", "cli"},
    "pretrained": {"data", "objectives", "engine", "eval", "cli", "export"},
    "onnx_export": {"data", "objectives", "engine", "eval", "cli", "export"},
    "model_card": {"data", "backbone", "objectives", "engine", "eval", "cli", "export"},
    "objectives": {"data", "engine", "eval", "cli", "export"},
    "engine": {"backbone", "data", "eval", "cli", "export", "objectives"},
    "eval": {"engine", "objectives", "cli"},
    "figures": {"engine", "cli"},  # objectives: only to rebuild a run's objective for reconstructions
}


def ssl_vit_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("ssl_vit."):
                found.add(name.split(".")[1])
    return found


def modules() -> list[tuple[str, Path]]:
    out = [
        (p.stem if p.parent.name == "ssl_vit" else p.parent.name, p) for p in (REPO / "ssl_vit").rglob("*.py")
    ]
    out += [("eval", p) for p in (REPO / "eval").glob("*.py")]
    return [(m, p) for m, p in out if m in FORBIDDEN]


@pytest.mark.parametrize("module, path", modules(), ids=lambda v: str(v))
def test_dependency_direction(module: str, path: Path) -> None:
    imported = ssl_vit_imports(path)
    if module == "eval" and path.stem == "finetune":
        imported -= {"engine", "objectives"}  # fine-tuning is supervised training (STYLE.md)
    if module == "engine":  # the Objective protocol only, never a concrete objective
        concrete = {
            n
            for n in _full_names(path)
            if n.startswith("ssl_vit.objectives") and n != "ssl_vit.objectives.base"
        }
        assert not concrete, f"{path.relative_to(REPO)} imports {sorted(concrete)}"
        imported -= {"objectives"}
    bad = imported & FORBIDDEN[module]
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def _full_names(path: Path) -> set[str]:
    return {
        n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) and n.module
    }


def test_library_code_does_not_print() -> None:
    for path in list((REPO / "ssl_vit").rglob("*.py")) + list((REPO / "eval").glob("*.py")):
        if path.name == "cli.py":
            continue
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]
        assert not any(isinstance(c.func, ast.Name) and c.func.id == "print" for c in calls), path
