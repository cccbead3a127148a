"""``--compression`` and ``--topk-fraction`` of ``fedq task init`` and ``fedq simulate``:
the task spec's ``compression`` option from the command line (issue 18)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from common.spec import TaskSpec
from fedq.cli import main
from fedq.simulate import bundled_data

pytestmark = pytest.mark.timeout(120)

INIT = ["task", "init", "--data", str(bundled_data()), "--target", "creditability"]
INIT += ["--positive", "bad", "--task-id", "t1", "--participants", "a,b"]


def test_task_init_writes_the_compression_option() -> None:
    result = CliRunner().invoke(main, [*INIT, "--compression", "topk8", "--topk-fraction", "0.05"])
    assert result.exit_code == 0, result.output
    spec = TaskSpec.model_validate(json.loads(result.stdout))
    assert spec.compression is not None
    assert (spec.compression.codec, spec.compression.topk_fraction) == ("topk8", 0.05)
    plain = CliRunner().invoke(main, INIT)
    assert plain.exit_code == 0, plain.output
    assert "compression" not in json.loads(plain.stdout)  # exact updates: no option at all


def test_a_fraction_without_a_codec_and_an_unknown_codec_are_one_line_errors() -> None:
    alone = CliRunner().invoke(main, [*INIT, "--topk-fraction", "0.1"])
    assert alone.exit_code == 2
    assert "--topk-fraction needs --compression topk or topk8" in alone.output
    assert "Traceback" not in alone.output
    bad = CliRunner().invoke(main, [*INIT, "--compression", "int4"])
    assert bad.exit_code == 2 and "Invalid value for '--compression'" in bad.output


def test_simulate_runs_its_banks_with_the_chosen_codec(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    args = ["--log-level", "warning", "simulate", "--participants", "3", "--versions", "6"]
    args += ["--patience", "0", "--compression", "int8", "--report", str(report)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    assert doc["settings"]["spec"]["compression"]["codec"] == "int8"
    # every update in int8 was taken: the aggregator accepts the task's own codec
    assert doc["updates_accepted"] >= 6 and doc["refused_by_reason"] == {}
