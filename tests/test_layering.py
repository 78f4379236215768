"""Dependencies point one way: orchestrator -> trainers -> lab_kernels. Methods and ops stay pure PyTorch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"ray", "mlflow", "orchestrator", "deepspeed"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", ["trainers", "lab_kernels"])
def test_methods_and_kernels_import_no_infrastructure(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    offenders = {str(p.relative_to(REPO)): sorted(imported_roots(p) & FORBIDDEN) for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_kernels_do_not_import_trainers() -> None:
    offenders = [str(p) for p in (REPO / "lab_kernels").rglob("*.py") if "trainers" in imported_roots(p)]
    assert offenders == []


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom ray import train\nimport mlflow.tracking\n")
    assert imported_roots(bad) & FORBIDDEN == {"ray", "mlflow"}


def test_spec_is_the_bottom_of_the_orchestrator_package() -> None:
    """spec.py (the schema) imports no other orchestrator module, lazily or not: the checks that need tune,
    nas_search or data live in orchestrator/preflight.py."""
    spec_py = REPO / "orchestrator" / "spec.py"
    imported = set()
    for node in ast.walk(ast.parse(spec_py.read_text(), filename=str(spec_py))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert sorted(m for m in imported if m.startswith(("orchestrator", "."))) == []
