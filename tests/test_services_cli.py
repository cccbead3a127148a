"""`fedq aggregator run` and `fedq participant run` as real processes on the real servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import AMQP_URL, REDIS_URL, forget_task

pytestmark = [pytest.mark.real, pytest.mark.slow]
DATA = Path(__file__).resolve().parent.parent / "fedq" / "data" / "german_credit.csv"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fedq(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedq", "--log-format", "json", *args]


@pytest.fixture
def task_file(tmp_path: Path) -> Iterator[Path]:
    task = f"cli{uuid.uuid4().hex[:8]}"
    out = tmp_path / "task.json"
    subprocess.run(
        _fedq(
            "task",
            "init",
            "--data",
            str(DATA),
            "--target",
            "creditability",
            "--positive",
            "bad",
            "--task-id",
            task,
            "--participants",
            "bank-a,bank-b",
            "--out",
            str(out),
        ),
        check=True,
        capture_output=True,
        timeout=60,
    )
    yield out
    asyncio.run(forget_task(task, ("bank-a", "bank-b")))


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_aggregator_and_participant_processes(task_file: Path, tmp_path: Path) -> None:
    spec = json.loads(task_file.read_text())
    assert spec["target"] == {"name": "creditability", "positive": "bad"}
    port = _free_port()
    env = {**os.environ, "FEDQ_AMQP_URL": AMQP_URL, "FEDQ_REDIS_URL": REDIS_URL}
    config = tmp_path / "fedq.toml"
    config.write_text(f"[aggregator]\nhttp_port = {port}\nsender_check = false\n")
    agg = subprocess.Popen(
        _fedq("--config", str(config), "aggregator", "run", "--spec", str(task_file)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        status = 0
        while time.monotonic() < deadline:
            try:
                status, body = _get(f"http://127.0.0.1:{port}/healthz")
            except OSError:
                status = 0
            if status == 200:
                break
            assert agg.poll() is None, agg.stdout.read() if agg.stdout else ""
            time.sleep(0.2)
        assert status == 200
        assert json.loads(body)["version"] == 0
        bank = subprocess.run(
            _fedq(
                "participant",
                "run",
                "--spec",
                str(task_file),
                "--participant",
                "bank-a",
                "--data",
                str(DATA),
                "--max-updates",
                "3",
            ),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bank.returncode == 0, bank.stderr
        published = [
            json.loads(line) for line in bank.stderr.splitlines() if "update published" in line
        ]
        assert len(published) == 3
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _, metrics = _get(f"http://127.0.0.1:{port}/metrics")
            if f'fedq_head_version{{task="{spec["task_id"]}"}} 3.0' in metrics:
                break
            time.sleep(0.2)
        assert f'fedq_updates_accepted_total{{task="{spec["task_id"]}"}} 3.0' in metrics
    finally:
        agg.send_signal(signal.SIGTERM)
        out, _ = agg.communicate(timeout=30)
    assert agg.returncode == 0, out
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert events.count("version committed") == 3
    assert events[-1] == "aggregator stopped"

    # The store loses every version (a Redis restart without its AOF): a restarted
    # aggregator must not start a fresh chain; it exits with one clear line.
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"fedq:{{{spec['task_id']}}}:*"))
    client.delete(*keys)
    client.close()
    again = subprocess.run(
        _fedq("--config", str(config), "aggregator", "run", "--spec", str(task_file)),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 2, again.stdout + again.stderr
    assert "store went backwards" in again.stderr
    assert "version 3 was announced" in again.stderr
    assert "Traceback" not in again.stdout + again.stderr
    client = redis.Redis.from_url(REDIS_URL)
    assert client.get(f"fedq:{{{spec['task_id']}}}:head") is None  # no fresh version 0
    client.close()


def test_bad_spec_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "task.json"
    bad.write_text('{"task_id": "x", "features": []}')
    run = subprocess.run(
        _fedq("aggregator", "run", "--spec", str(bad)), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2
    assert "invalid task spec" in run.stderr
