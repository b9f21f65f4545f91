"""Imports run one way between the two halves of a method: a client trainer may use its
strategy's pure maths (``clients`` → ``strategies``), a strategy never imports a client
(so the server side loads without any trainer), and fedtune's core imports neither
package's modules by name (it discovers them, :func:`fedtune.registry.load_plugins`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (any import statement, anywhere)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package, forbidden", [("strategies", {"clients"}),
                                                ("fedtune", {"clients", "strategies"})])
def test_imports_run_one_way(package: str, forbidden: set[str]) -> None:
    offenders = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & forbidden)
                 for p in sorted((ROOT / package).rglob("*.py")) if imported_packages(p) & forbidden}
    assert offenders == {}


def test_the_check_sees_an_import_in_a_function(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from clients.base_delta import BaseDeltaTrainer\n    import strategies.flora\n")
    assert imported_packages(module) == {"clients", "strategies"}
