"""The fedq command: --help, --version, shared options, the config file, the fail path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
from click.testing import CliRunner

from common.spec import TaskSpec
from fedq import __version__
from fedq.cli import main
from fedq.cli_common import (
    model_options,
    spec_default,
    spec_option,
    spec_overrides,
    strategy_option,
)
from fedq.simulate import SIMULATION_SPEC


def test_version_and_help() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "simulate" in result.output
    assert "demo" not in result.output


def test_console_script_is_installed() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedq", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"fedq, version {__version__}"


def test_bad_redis_url_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            *("export", "--task", "t", "--out", str(tmp_path / "m.safetensors")),
            *("--redis-url", "redis://127.0.0.1:1/0"),
        ],
    )
    assert result.exit_code == 2
    assert "Redis unavailable" in result.output
    assert "Traceback" not in result.output


def test_spec_options_default_to_the_spec_and_nest_in_its_shape() -> None:
    """fedq simulate's task options: defaults from SIMULATION_SPEC over the spec's own."""
    seen: dict[str, Any] = {}

    @click.command()
    @strategy_option(simulation=True)
    @model_options(simulation=True)
    @spec_option("async.mixing", "--mixing", simulation=True, type=float)
    @spec_option("sync.quorum", "--quorum", simulation=True, type=int)
    def cmd(**_: Any) -> None:
        seen.update(spec_overrides(click.get_current_context()))

    assert CliRunner().invoke(cmd, ["--quorum", "2"]).exit_code == 0
    assert seen == {
        "async": {"strategy": "fedasync", "mixing": SIMULATION_SPEC["async"]["mixing"]},
        "model": {"kind": "logreg"},  # no hidden layers for a logistic regression
        "sync": {"quorum": 2},
    }
    assert CliRunner().invoke(cmd, ["--model", "mlp", "--hidden", "8,4"]).exit_code == 0
    assert seen["model"] == {"kind": "mlp", "hidden": (8, 4)}

    @click.command()
    @spec_option("async.max_staleness", "--max-staleness", simulation=True, type=int)
    @spec_option("async.staleness.kind", "--staleness", simulation=True, type=str)
    def bounds(**_: Any) -> None:
        seen.clear()
        seen.update(spec_overrides(click.get_current_context()))

    args = ["--max-staleness", "50", "--staleness", "hinge"]
    assert CliRunner().invoke(bounds, args).exit_code == 0
    # The bound and the function weigh late updates in sync rounds too.
    assert seen["sync"] == {"max_staleness": 50, "staleness": {"kind": "hinge"}}
    assert seen["async"]["max_staleness"] == 50
    task_default = TaskSpec.model_fields["async_"].default
    assert spec_default("async.mixing", simulation=False) == task_default.mixing


def test_config_file_keys_are_named_like_the_options(tmp_path: Path) -> None:
    config = tmp_path / "fedq.toml"
    config.write_text('[participant]\nparticipant = "bank-z"\ndelay = 2.5\n')
    ctx = main.make_context("fedq", ["--config", str(config), "participant", "run", "--help"])
    assert ctx.default_map == {"participant": {"run": {"participant": "bank-z", "delay_s": 2.5}}}


ASYNC_AND_SERVER = [
    *("--strategy", "fedbuff", "--buffer-size", "4", "--weighting", "samples"),
    *("--staleness-unit", "versions", "--max-boost", "5", "--balance-window", "7"),
    *("--max-staleness", "9", "--server-opt", "adam", "--server-opt-lr", "0.1"),
    *("--server-beta1", "0.8", "--server-beta2", "0.95", "--server-tau", "0.01"),
]


def _assert_async_and_server(spec: dict[str, Any]) -> None:
    assert spec["async"]["strategy"] == "fedbuff"
    assert spec["async"]["buffer_size"] == 4
    assert spec["async"]["weighting"] == "samples"
    assert spec["async"]["staleness_unit"] == "versions"
    assert spec["async"]["max_boost"] == 5
    assert spec["async"]["balance_window"] == 7
    assert spec["async"]["max_staleness"] == 9
    assert spec["sync"]["max_staleness"] == 9
    assert spec["server"] == {"kind": "adam", "lr": 0.1, "beta1": 0.8, "beta2": 0.95, "tau": 0.01}


def test_simulate_options_reach_the_spec_and_the_config(monkeypatch: Any) -> None:
    import fedq.simulate_cli

    seen: dict[str, Any] = {}

    def capture(config: Any, _console: Any, **kw: Any) -> bool:
        seen["config"], seen["both"], seen["spec"] = config, kw["both"], kw["prepared"].spec
        return True

    monkeypatch.setattr(fedq.simulate_cli, "run_with_progress", capture)
    args = ["simulate", *ASYNC_AND_SERVER, "--partition", "sizes", "--shares", "60,10,10,10,10"]
    args += ["--patience", "7", "--min-delta", "0.01", "--seeds", "3", "--baseline-epochs", "20"]
    args += ["--alert-rate", "0.02", "--mode", "both"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    _assert_async_and_server(json.loads(seen["spec"].to_json()))
    config = seen["config"]
    assert config.shares == (60, 10, 10, 10, 10) and config.partition == "sizes"
    assert (config.patience, config.min_delta, config.seeds) == (7, 0.01, 3)
    assert (config.baseline_epochs, config.alert_rate, seen["both"]) == (20, 0.02, True)
    rows = sorted(seen["spec"].declared_samples.values())
    assert rows[-1] > 5 * rows[0]  # one bank with 60% of the rows


def test_task_init_takes_the_async_and_server_options(tmp_path: Path) -> None:
    from fedq.simulate import bundled_data

    args = ["task", "init", "--data", str(bundled_data()), "--target", "creditability"]
    args += ["--positive", "bad", "--task-id", "t1", "--participants", "a,b", *ASYNC_AND_SERVER]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    _assert_async_and_server(json.loads(result.stdout))
    bad = CliRunner().invoke(main, [*args, "--weighting", "loud"])
    assert bad.exit_code == 2 and "Invalid value for '--weighting'" in bad.output
