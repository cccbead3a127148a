"""A bank installs the participant without the aggregator's dependencies.

``pip install 'fedq[participant]'`` into a fresh virtual environment (no system site
packages; torch 2.13.0 first, as scripts/bootstrap.sh does, so no CUDA build is
pulled) from a copy of the repository, so build artefacts never land in the checkout.
Then ``fedq participant run`` answers ``--help`` and gets as far as connecting to the
broker, and neither the environment nor the process holds Redis, fakeredis,
Prometheus, aiohttp, safetensors or matplotlib.

Needs the package index that pip is configured with. Measured: about 100 s with a
warm pip cache on 2 busy cores (venv 5 s, torch 40 s, fedq and its core 55 s).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
# What [tool.setuptools.packages.find] ships, and what the build reads.
SHIPPED = ("fedq", "common", "aggregator", "participant")
BUILD_FILES = ("pyproject.toml", "README.md")
# Never installed, never imported by the participant: the aggregator's and the plot's.
# prometheus_client is a core dependency: the participant serves /metrics too.
NOT_FOR_BANKS = (
    "redis",
    "fakeredis",
    "aiohttp",
    "safetensors",
    "matplotlib",
    "onnx",
    "onnxruntime",
)
DATA = ROOT / "fedq" / "data" / "german_credit.csv"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = _run(args, cwd, timeout)
    assert result.returncode == 0, (
        f"{args} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level names of every module a ``python -X importtime`` run imported."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name and " " not in name:
                names.add(name.split(".")[0])
    return names


@pytest.fixture(scope="module")
def bank_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding ``fedq[participant]`` (non-editable) and nothing else."""
    work = tmp_path_factory.mktemp("packaging")
    src = work / "src"
    src.mkdir()
    for name in BUILD_FILES:
        shutil.copy2(ROOT / name, src / name)
    for package in SHIPPED:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = work / "venv"
    _ok([sys.executable, "-m", "venv", str(venv)], work, timeout=120)
    python = str(venv / "bin" / "python")
    # As scripts/bootstrap.sh: the CPU torch first, same spec and index overrides.
    torch = [os.environ.get("FEDQ_TORCH", "torch==2.13.0")]
    if os.environ.get("FEDQ_TORCH_INDEX"):
        torch += ["--index-url", os.environ["FEDQ_TORCH_INDEX"]]
    _ok([python, "-m", "pip", "install", "-q", *torch], work)
    _ok([python, "-m", "pip", "install", "-q", f"{src}[participant]"], work)
    return venv


def test_participant_install_holds_no_aggregator_dependencies(bank_venv: Path) -> None:
    probe = (
        "import importlib.util, json, fedq; "
        f"print(json.dumps([fedq.__file__, [m for m in {list(NOT_FOR_BANKS)!r} "
        "if importlib.util.find_spec(m) is not None]]))"
    )
    result = _ok([str(bank_venv / "bin" / "python"), "-I", "-c", probe], bank_venv.parent)
    fedq_file, installed = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(fedq_file).is_relative_to(bank_venv), f"fedq imported from {fedq_file}"
    assert installed == [], f"installed by fedq[participant]: {installed}"


def test_participant_run_help_imports_no_aggregator_dependencies(bank_venv: Path) -> None:
    fedq = str(bank_venv / "bin" / "fedq")
    result = _ok([fedq, "participant", "run", "--help"], bank_venv.parent, timeout=120)
    assert "Usage: fedq participant run" in result.stdout

    python = str(bank_venv / "bin" / "python")
    traced = _ok(
        [python, "-I", "-X", "importtime", fedq, "participant", "run", "--help"],
        bank_venv.parent,
        timeout=120,
    )
    imported = _imported(traced.stderr)
    assert "click" in imported  # the trace is read right
    leaked = sorted(imported & {*NOT_FOR_BANKS, "sklearn", "aggregator"})
    assert leaked == [], f"`fedq participant run --help` imported {leaked}"


def test_participant_run_gets_to_the_broker_without_aggregator_dependencies(
    bank_venv: Path,
) -> None:
    """The real command, as far as it goes without RabbitMQ: spec, data, model, connect."""
    work = bank_venv.parent
    fedq = str(bank_venv / "bin" / "fedq")
    spec = work / "task.json"
    _ok(
        [
            fedq,
            *("task", "init", "--data", str(DATA), "--target", "creditability"),
            *("--positive", "bad", "--task-id", "credit", "--participants", "bank-a"),
            *("--out", str(spec)),
        ],
        work,
        timeout=120,
    )
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _run(
        [
            str(bank_venv / "bin" / "python"),
            *("-I", "-X", "importtime", fedq, "participant", "run"),
            *("--spec", str(spec), "--participant", "bank-a", "--data", str(DATA)),
            *("--amqp-url", f"amqp://guest:guest@127.0.0.1:{port}/", "--max-updates", "1"),
        ],
        work,
        timeout=120,
    )
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    imported = _imported(result.stderr)
    leaked = sorted(imported & {*NOT_FOR_BANKS, "aggregator"})
    assert leaked == [], f"`fedq participant run` imported {leaked}:\n" + "\n".join(errors)
    assert result.returncode == 2, "\n".join(errors)
    assert "cannot connect to RabbitMQ" in " ".join(errors)
    assert "participant" in imported  # the worker was loaded before connecting
