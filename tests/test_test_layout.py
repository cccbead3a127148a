"""Test modules share helpers through helper modules, never by importing each other.

Shared helpers live in tests/helpers.py, tests/servers.py and tests/strategy_contract.py;
fixtures in tests/conftest.py. A ``tests/test_*.py`` importing another one would run
(and couple) that module's tests' setup wherever it is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a module, nested ones included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .test_x import y
                base = ".".join(["tests", node.module] if node.module else ["tests"])
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
                found.append((node.lineno, base))
            elif node.module is not None:
                found.append((node.lineno, node.module))
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _is_test_module(dotted: str) -> bool:
    parts = dotted.split(".")
    return len(parts) >= 2 and parts[0] == "tests" and parts[1].startswith("test_")


def test_no_test_module_imports_another() -> None:
    modules = sorted(TESTS.glob("test_*.py"))
    assert modules, f"no test modules under {TESTS}"
    offences = [
        f"{path.name}:{line}: imports {dotted}"
        for path in modules
        for line, dotted in _imported_modules(ast.parse(path.read_text(), str(path)))
        if _is_test_module(dotted)
    ]
    assert not offences, "move shared helpers to tests/helpers.py:\n" + "\n".join(offences)


def test_the_guard_sees_each_form_of_import() -> None:
    source = (
        "import tests.test_a\n"
        "from tests.test_b import x\n"
        "from tests import test_c\n"
        "from .test_d import y\n"
        "def f():\n    from tests.test_e import z\n"
        "from tests.helpers import wait_for\n"
        "from tests import servers\n"
    )
    bad = {d for _, d in _imported_modules(ast.parse(source)) if _is_test_module(d)}
    assert {d.split(".")[1] for d in bad} == {"test_a", "test_b", "test_c", "test_d", "test_e"}
