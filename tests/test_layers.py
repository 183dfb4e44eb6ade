"""The package's floors: a module imports only from its own floor or the ones below it.

Training and evaluation both read images, cached features and run folders; those live below both
(``csmcir.data.batches``, ``csmcir.model.features``, ``csmcir.model.run_folder``), so that
evaluation never imports training and the model never imports either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import csmcir

PACKAGE = Path(csmcir.__file__).parent
# lowest first; a floor may import itself and every floor before it
FLOORS = ("errors", "io", "data", "model", "evaluation", "train")


def imported_floors(path: Path) -> set[str]:
    """The ``csmcir.<floor>`` names that ``path`` imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n.split(".")[1] for n in names if n.startswith("csmcir.") and n.count(".") >= 1}


@pytest.mark.parametrize("floor", FLOORS[2:])
def test_no_floor_imports_a_higher_one(floor: str):
    higher = set(FLOORS[FLOORS.index(floor) + 1 :])
    wrong = {
        str(path.relative_to(PACKAGE)): sorted(imported_floors(path) & higher)
        for path in sorted((PACKAGE / floor).rglob("*.py"))
        if imported_floors(path) & higher
    }
    assert not wrong


def test_the_check_sees_a_function_level_import(tmp_path: Path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from csmcir.train.run_folder import model_folder\n")
    assert imported_floors(module) == {"train"}
