"""Drift monitoring as operators and banks run it: real processes on the real servers.

``fedq task init --monitoring`` writes the spec; ``fedq aggregator run`` serves it;
``fedq task pause`` freezes training; three ``fedq participant run --recent`` workers
on German credit, one whose recent rows are shifted in two features. That bank's
summary resumes training (``on_drift = resume``); ``fedq drift``, ``fedq status``,
``/metrics`` and ``fedq audit report`` show the drift there and only there, and every
bank's evaluations.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from aggregator.store import RedisModelStore, connect_redis
from common.models import initial_tensors
from common.spec import NumericFeature, SecureAggregationSpec, TargetSpec, TaskSpec
from fedq.cli import main
from fedq.simulate import bundled_data
from participant.data import load_table
from tests.helpers import AMQP_URL, REDIS_URL, forget_task, secagg_identity
from tests.servers import free_port

BANKS = ("bank-a", "bank-b", "bank-c")
DRIFTING = "bank-b"
SHIFTED = ["credit_amount", "duration_in_month"]


def _fedq(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedq", "--log-format", "json", *args]


class _Federation:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.task = f"drift-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "FEDQ_AMQP_URL": AMQP_URL, "FEDQ_REDIS_URL": REDIS_URL}
        self.procs: list[subprocess.Popen[str]] = []

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            _fedq(*args), env=self.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self, name: str, *args: str) -> None:
        with (self.tmp / f"{name}.log").open("w") as log:
            self.procs.append(
                subprocess.Popen(
                    _fedq(*args), env=self.env, stdout=subprocess.DEVNULL, stderr=log, text=True
                )
            )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[_Federation]:
    fed = _Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.stop()
        asyncio.run(forget_task(fed.task, BANKS))


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return int(r.status), r.read().decode()


def _status(url: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_get(f"{url}/status")[1])
    return doc


def _wait(url: str, cond: Any, seconds: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        doc = _status(url)
        if cond(doc):
            return doc
        assert time.monotonic() < deadline, f"{what}: {json.dumps(doc)[:2000]}"
        time.sleep(0.3)


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_drift_at_one_bank_with_real_processes(federation: _Federation) -> None:
    fed, tmp = federation, federation.tmp
    df = load_table(bundled_data())
    order = np.random.default_rng(7).permutation(len(df))
    for i, name in enumerate(BANKS):
        rows = df.iloc[order[i::3]]
        rows.to_csv(tmp / f"{name}.csv", index=False)
        recent = rows.copy()
        if name == DRIFTING:
            recent["duration_in_month"] = recent["duration_in_month"] * 2 + 12
            recent["credit_amount"] = recent["credit_amount"] * 3
        recent.to_csv(tmp / f"{name}-recent.csv", index=False)
    spec = tmp / "task.json"
    fed.cli(
        "task", "init", "--data", str(bundled_data()), "--target", "creditability",
        "--positive", "bad", "--task-id", fed.task, "--participants", ",".join(BANKS),
        "--monitoring", "--monitor-interval", "0.5", "--on-drift", "resume",
        "--out", str(spec),
    )  # fmt: skip
    assert json.loads(spec.read_text())["monitoring"]["on_drift"] == "resume"
    port = free_port()
    fed.start(
        "aggregator", "aggregator", "run", "--spec", str(spec), "--no-sender-check",
        "--http-host", "127.0.0.1", "--http-port", str(port),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if _status(url)["role"] == "active":
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, (tmp / "aggregator.log").read_text()[-3000:]
        time.sleep(0.3)
    typo = subprocess.run(
        _fedq("task", "resume", "--task", fed.task + "-typo"),
        env=fed.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert typo.returncode == 2 and "is not in the store" in typo.stderr, typo.stderr
    assert "Traceback" not in typo.stderr
    assert "training paused at version 0" in fed.cli("task", "pause", "--task", fed.task)
    _wait(url, lambda d: d["monitoring"]["paused"] is not None, 10, "the pause is read")
    for name in BANKS:
        fed.start(
            name, "participant", "run", "--spec", str(spec), "--participant", name,
            "--data", str(tmp / f"{name}.csv"), "--recent", str(tmp / f"{name}-recent.csv"),
        )  # fmt: skip
    doc = _wait(
        url,
        lambda d: (
            d["monitoring"]["paused"] is None
            and (d["head"]["version"] or 0) >= 3
            and all(b["drift"] is not None for b in d["banks"])
        ),
        150,
        "drift at bank-b resumes training and versions follow",
    )
    banks = {b["participant"]: b for b in doc["banks"]}
    assert set(banks[DRIFTING]["drift"]["drifted"]) - {"score"} == set(SHIFTED)
    assert all(banks[n]["drift"]["drifted"] == [] for n in BANKS if n != DRIFTING)
    assert doc["monitoring"]["retrain_signals"] >= 1
    assert '"training resumed"' in (fed.tmp / "aggregator.log").read_text()

    state = json.loads(fed.cli("drift", "--task", fed.task, "--json"))
    assert set(state["banks"]) == set(BANKS)
    assert set(state["banks"][DRIFTING]["drifted"]) - {"score"} == set(SHIFTED)
    assert state["paused"] is None
    assert {s["participant"] for s in state["retrain_signals"]} == {DRIFTING}
    table = fed.cli("drift", "--task", fed.task)
    assert re.search(r"drift at bank-b: credit_amount, duration_in_month", table), table
    assert "drift at bank-a" not in table and "drift at bank-c" not in table

    metrics = _get(f"{url}/metrics")[1]
    psi = re.search(
        r'fedq_drift_psi\{feature="credit_amount",participant="bank-b",task="[^"]+"\} (\S+)',
        metrics,
    )
    assert psi is not None and float(psi.group(1)) > 0.25, metrics[:500]
    assert re.search(r'fedq_drift_over_threshold\{participant="bank-a",[^}]*\} 0\.0', metrics)

    fed.stop()  # the report reads the store and the audit stream: no service needed
    assert [p.returncode for p in fed.procs] == [0] * len(fed.procs)
    report = tmp / "report.html"
    fed.cli("audit", "report", "--task", fed.task, "--no-contributions", "--out", str(report))
    html = report.read_text()
    table_html = html[html.index('id="bank-evaluation-table"') :]
    table_html = table_html[: table_html.index("</table>")]
    assert all(f"<td>{n}</td>" in table_html for n in BANKS)
    drift_html = html[html.index('id="drift-table"') :]
    drift_html = drift_html[: drift_html.index("</table>")]
    assert "credit_amount, duration_in_month" in drift_html


@pytest.mark.real
def test_a_task_under_secure_aggregation_cannot_be_paused() -> None:
    names = ("bank-01", "bank-02", "bank-03")
    spec = TaskSpec(
        task_id=f"drift-sa-{uuid.uuid4().hex[:8]}",
        features=tuple(NumericFeature(name=f"x{i}") for i in range(4)),
        target=TargetSpec(name="y"),
        participants=names,
        mode="sync",
        identity=secagg_identity(names),
        secure_aggregation=SecureAggregationSpec(),
    )

    async def register() -> None:
        store = RedisModelStore(connect_redis(REDIS_URL))
        try:
            await store.register_task(spec)
            await store.create_genesis(spec.task_id, initial_tensors(spec), info={})
        finally:
            await store.close()

    asyncio.run(register())
    try:
        done = CliRunner().invoke(
            main, ["task", "pause", "--task", spec.task_id, "--redis-url", REDIS_URL]
        )
        assert done.exit_code == 2, done.output
        assert "uses secure aggregation" in done.output and "cannot be paused" in done.output
        assert "Traceback" not in done.output
    finally:
        asyncio.run(forget_task(spec.task_id, names))
