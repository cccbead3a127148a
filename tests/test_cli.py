"""The fedq command: --help, --version, and the demo end to end (embedded and real Redis)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from fedq import __version__
from fedq.cli import main
from tests.conftest import REDIS_URL


def test_version_and_help() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output


def test_console_script_is_installed() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedq", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"fedq, version {__version__}"


@pytest.mark.parametrize(
    "redis_url",
    ["memory://", pytest.param(REDIS_URL, marks=pytest.mark.real)],
    ids=["memory", "real"],
)
def test_demo_commits_and_verifies(redis_url: str) -> None:
    result = CliRunner().invoke(
        main,
        [
            "--log-format",
            "json",
            "demo",
            "--redis-url",
            redis_url,
            "--versions",
            "3",
            "--banks",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "hash chain verified over 4 versions" in result.output
    assert "6 updates" in result.output


def test_bad_redis_url_is_a_clear_error() -> None:
    result = CliRunner().invoke(main, ["demo", "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2
    assert "Redis unavailable" in result.output
