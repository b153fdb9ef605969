"""The dependency table of STYLE.md section 2, checked by reading import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# The dependency table of issue 17 / STYLE.md, as an allow-list: every module of the package is
# listed, and each may import only the modules listed before it (leaves first).
ORDER = [
    "errors",
    "types",
    "config",
    "optim",
    "rundir",
    "data",
    "backbone",
    "objectives",
    "timm_export",
    "model_card",
    "onnx_export",
    "pretrained",
    "engine",  # sees only objectives.base
    "flops",
    "eval",  # frozen evaluators: no engine, no concrete objective; eval/finetune.py may use both
    "figures",
    "demo_runs",
    "api",  # the only module that wires recipe, data, backbone, objective and engine
    "cli",
    "__main__",
]
ANYWHERE = {"__version__"}  # `from ssl_vit import __version__`
FINETUNE_MAY_USE = ("ssl_vit.engine", "ssl_vit.objectives.supervised")


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
        (p.stem if p.parent.name == "ssl_vit" else p.parent.name, p)
        for p in (REPO / "ssl_vit").rglob("*.py")
        if not any(part.is_symlink() for part in [p, *p.parents])  # a worktree's ssl_vit/eval link
    ]
    out += [("eval", p) for p in (REPO / "eval").glob("*.py")]
    return [(m, p) for m, p in out if m != "__init__" or p.parent.name != "ssl_vit"]


@pytest.mark.parametrize("module, path", modules(), ids=lambda v: str(v))
def test_dependency_direction(module: str, path: Path) -> None:
    assert module in ORDER, f"{path.relative_to(REPO)}: place '{module}' in ORDER (the dependency table)"
    allowed = set(ORDER[: ORDER.index(module)]) | ANYWHERE | {module}
    bad = ssl_vit_imports(path) - allowed
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}, listed after it"
    full = _full_names(path)
    if module == "engine":  # the Objective protocol only, never a concrete objective
        concrete = {n for n in full if n.startswith("ssl_vit.objectives") and n != "ssl_vit.objectives.base"}
        assert not concrete, f"{path.relative_to(REPO)} imports {sorted(concrete)}"
    if module == "eval":
        used = {n for n in full if n.startswith(("ssl_vit.engine", "ssl_vit.objectives"))}
        if path.stem == "finetune":  # fine-tuning is supervised training (STYLE.md)
            used = {n for n in used if not n.startswith(FINETUNE_MAY_USE)}
        assert not used, f"{path.relative_to(REPO)} imports {sorted(used)}"


def test_the_package_init_imports_only_the_api() -> None:
    assert ssl_vit_imports(REPO / "ssl_vit" / "__init__.py") <= {"api"}


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
