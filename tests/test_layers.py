"""The layer rule is checked by the README's test command, and a break in it fails there.

``aggregator -> common <- participant``, ``fedq`` above both, ``bench`` on top: the
contract lives in pyproject.toml (``[tool.importlinter]``) and ``scripts/test`` runs
``lint-imports`` before pytest. Each case copies the packages and the project's
config to a temporary folder, adds one import that breaks the rule and checks that
``lint-imports`` fails there naming the contract and the offending import.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedq", "common", "aggregator", "participant", "bench")
CONTRACT = "Layers: aggregator -> common <- participant, fedq above, bench on top"


def _lint_imports() -> str:
    """The ``lint-imports`` of this environment."""
    beside = Path(sys.executable).parent / "lint-imports"
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert found, "lint-imports is not installed: pip install -e '.[all,dev]'"
    return found


def _run(cwd: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` as scripts/test runs it, in ``cwd``, with an unwrapped report."""
    env = {**os.environ, "COLUMNS": "250", "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [_lint_imports(), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_scripts_test_runs_lint_imports_before_pytest() -> None:
    lines = (ROOT / "scripts" / "test").read_text().splitlines()
    commands = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    lint = [i for i, line in enumerate(commands) if "lint-imports" in line]
    tests = [i for i, line in enumerate(commands) if "-m pytest" in line]
    assert lint, "scripts/test does not run lint-imports"
    assert tests, "scripts/test does not run pytest"
    assert lint[0] < tests[0], "lint-imports must run before pytest"
    # bootstrap.sh sets -e: a failing lint-imports ends the command with its exit status.
    assert "set -euo pipefail" in (ROOT / "scripts" / "bootstrap.sh").read_text()


def test_the_real_tree_keeps_the_layer_rule() -> None:
    result = _run(ROOT)
    out = _flat(result.stdout + result.stderr)
    assert result.returncode == 0, out
    assert f"{CONTRACT} KEPT" in out
    assert "0 broken" in out


# Each import goes into a package's __init__.py, which every refactor keeps.
@pytest.mark.parametrize(
    ("package", "imported"),
    [
        ("common", "aggregator"),
        ("common", "participant.partition"),
        ("common", "fedq"),
        ("common", "bench"),
        ("aggregator", "participant"),
        ("aggregator", "fedq.cli"),
        ("participant", "aggregator"),
        ("participant", "fedq"),
        ("fedq", "bench"),
    ],
)
def test_an_import_that_breaks_the_layer_rule_fails(
    tmp_path: Path, package: str, imported: str
) -> None:
    for name in PACKAGES:
        shutil.copytree(
            ROOT / name,
            tmp_path / name,
            ignore=shutil.ignore_patterns("__pycache__", "results"),
        )
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / package / "__init__.py"
    source = target.read_text()
    line = source.count("\n") + 2
    target.write_text(f"{source}\nimport {imported}  # breaks the layer rule\n")

    result = _run(tmp_path)
    out = _flat(result.stdout + result.stderr)
    assert result.returncode != 0, out
    assert f"{CONTRACT} BROKEN" in out
    assert f"{package} is not allowed to import {imported.split('.')[0]}" in out
    assert f"{package} -> {imported} (l.{line})" in out, out


@pytest.mark.parametrize("failing", ["ruff", "mypy", "lint-imports"])
def test_scripts_test_stops_when_a_check_fails(tmp_path: Path, failing: str) -> None:
    """Each check's failure fails the README's test command before pytest runs: under
    ``set -e`` a command inside ``a && b`` may fail without stopping the script (ruff's
    errors once went unnoticed that way). The real scripts/test runs with stub tools
    and a stub bootstrap that keeps its ``set -euo pipefail``."""
    scripts, stubs = tmp_path / "scripts", tmp_path / "bin"
    scripts.mkdir()
    stubs.mkdir()
    shutil.copy(ROOT / "scripts" / "test", scripts / "test")
    (scripts / "bootstrap.sh").write_text(
        f'set -euo pipefail\nFEDQ_ROOT="{tmp_path}"\nPATH="{stubs}:$PATH"\n'
    )
    for tool in ("ruff", "mypy", "lint-imports", "python"):
        code = 1 if tool == failing else 0
        (stubs / tool).write_text(f'#!/bin/sh\necho ran {tool} "$@"\nexit {code}\n')
        (stubs / tool).chmod(0o755)
    done = subprocess.run(
        ["bash", str(scripts / "test")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert f"ran {failing}" in done.stdout
    assert "ran python" not in done.stdout  # pytest never started
