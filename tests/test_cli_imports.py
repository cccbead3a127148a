"""What the participant's commands import: no server client, no plotting, no sklearn.

A bank installs the participant alone (``pip install 'fedq[participant]'``): its
commands must not import the aggregator's dependencies. Each check runs the command
in a fresh interpreter of this venv and lists the modules it imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.spec import NumericFeature, TargetSpec, TaskSpec

#: What the aggregator, the auditor's commands or the simulation need, never a bank.
#: (prometheus_client is a core dependency: a participant serves its own /metrics.)
SERVER_SIDE = frozenset({"redis", "fakeredis", "aiohttp", "matplotlib", "onnx", "onnxruntime"})
#: Not for --help either; running the worker imports it (common/evaluation.py, ROC AUC).
HELP_ALSO = frozenset({"sklearn"})

RUN = """
import json, sys
from fedq.cli import main
out, args = sys.argv[1], sys.argv[2:]
try:
    main(args)
except SystemExit as e:
    code = e.code
with open(out, "w") as f:
    json.dump({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}, f)
"""


def _imports(tmp_path: Path, *args: str) -> tuple[object, set[str]]:
    out = tmp_path / "modules.json"
    subprocess.run(
        [sys.executable, "-c", RUN, str(out), *args], capture_output=True, timeout=120, check=True
    )
    doc = json.loads(out.read_text())
    return doc["code"], set(doc["modules"])


@pytest.mark.parametrize(
    "args", [("--help",), ("participant", "run", "--help")], ids=["fedq", "participant-run"]
)
def test_help_imports_nothing_server_side(tmp_path: Path, args: tuple[str, ...]) -> None:
    code, modules = _imports(tmp_path, *args)
    assert code == 0
    assert not modules & (SERVER_SIDE | HELP_ALSO), sorted(modules & (SERVER_SIDE | HELP_ALSO))


def test_participant_run_imports_nothing_server_side(tmp_path: Path) -> None:
    """The whole path up to the broker: spec, data, worker, transport (refused: no broker)."""
    spec = TaskSpec(
        task_id="imports",
        features=(NumericFeature(name="x"),),
        target=TargetSpec(name="y"),
        participants=("bank-a",),
    )
    (tmp_path / "spec.json").write_text(spec.to_json())
    rows = "\n".join(f"{i / 10},{i % 2}" for i in range(40))
    (tmp_path / "bank.csv").write_text(f"x,y\n{rows}\n")
    code, modules = _imports(
        tmp_path,
        *("participant", "run", "--spec", str(tmp_path / "spec.json")),
        *("--participant", "bank-a", "--data", str(tmp_path / "bank.csv")),
        *("--amqp-url", "amqp://guest:guest@127.0.0.1:1/", "--max-updates", "1"),
    )
    assert code == 2  # the broker refused the connection: one line, exit 2
    assert {"participant", "aio_pika", "torch"} <= modules  # it got as far as the worker
    assert not modules & SERVER_SIDE, sorted(modules & SERVER_SIDE)
