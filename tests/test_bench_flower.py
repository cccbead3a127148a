"""bench/flower.py: its round accounting, and its fedq variant with one process per bank
against the real servers. Timings are reported, never asserted: the test checks that
the processes variant trains exactly what the embedded simulation trains (the same
AUC after every round), that every update was accepted with the sender check on, and
that the run left no queue and no Redis key behind. Flower itself is not a fedq
dependency and is not run here."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis

from tests.helpers import AMQP_URL, REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def flower() -> ModuleType:
    """The script as a module (it imports ``_common`` from bench/)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_flower", BENCH / "flower.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_steady_rounds_skip_round_one(flower: ModuleType) -> None:
    assert flower.steady_per_round([0.0, 5.0, 6.0, 7.0]) == 1.0
    assert flower.steady_per_round([0.0, 5.0]) is None


def test_ratios_and_auc_differences_are_to_flower(flower: ModuleType) -> None:
    figures = {
        "fedq": {"seconds_per_round": 0.05, "auc_by_round": [0.5, 0.7, 0.8]},
        "Flower": {"seconds_per_round": 0.2, "auc_by_round": [0.5, 0.7, 0.79]},
    }
    flower.compare(figures)
    assert figures["fedq"]["vs_flower"] == pytest.approx(0.25)
    assert figures["fedq"]["max_auc_diff_vs_flower"] == pytest.approx(0.01)
    assert figures["Flower"]["vs_flower"] == 1.0


Span = tuple[str, float, float, float, float]


def _synthetic(rounds: int) -> tuple[list[float], list[Span], dict[str, dict[str, Any]]]:
    """A bank and an aggregator whose every round takes 1 s, in known pieces; the CPU
    clock runs with the wall clock."""

    def span(name: str, a: float, b: float) -> Span:
        return (name, a, b, a, b)

    bank: list[Span] = []
    agg: list[Span] = []
    cpu: list[tuple[float, float]] = []
    for r in range(rounds):
        t = float(r)
        bank += [
            span("worker: wait for the newest model", t, t + 0.1),
            span("worker: decode the model", t + 0.1, t + 0.15),
            span("worker: train, encode, publish", t + 0.2, t + 0.6),
            span("worker: publish (to confirm)", t + 0.5, t + 0.55),
        ]
        cpu.append((t + 0.55, t + 0.55))
        agg += [span("admit", t + 0.7, t + 0.72), span("commit", t + 0.8, t + 0.85)]
    ends = [float(r + 1) for r in range(rounds)]
    banks = {"bank-01": {"spans": bank, "cpu": cpu}}
    return ends, agg, banks


def test_the_critical_path_adds_up_to_the_round(flower: ModuleType) -> None:
    ends, agg, banks = _synthetic(4)
    prof = flower.critical_path(ends, agg, banks)
    assert prof["rounds_profiled"] == 3  # rounds 2..4
    path = prof["critical_path_ms_median"]
    expected = {
        "announce + delivery": 100,
        "worker: decode": 50,
        "worker: val eval": 50,
        "worker: train + encode": 300,
        "update to aggregator": 200,
        "aggregator: admit + offer": 100,
        "aggregator: commit": 50,
        "aggregator: after commit": 150,
        "round": 1000,
    }
    assert path == pytest.approx(expected)
    assert sum(v for k, v in path.items() if k != "round") == pytest.approx(path["round"])
    cpu = prof["bank_cpu_ms_per_round"]
    assert cpu["total (publish to publish)"] == pytest.approx(1000)
    assert cpu["train_local + finite check + encode/sign (threads)"] == pytest.approx(300)
    assert prof["aggregator_cpu_ms_per_round"]["commit"] == pytest.approx(50)


async def _leftovers(task: str, prefix: str) -> tuple[list[str], list[bytes]]:
    from common.transport.names import model_stream, work_queue

    queues = []
    conn = await aio_pika.connect(AMQP_URL)
    try:
        for name in (work_queue(task), model_stream(task)):
            ch = await conn.channel()
            try:
                await ch.declare_queue(name, passive=True)
                queues.append(name)
            except aio_pika.exceptions.ChannelClosed:
                continue
    finally:
        await conn.close()
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*")]
    finally:
        await r.aclose()
    return queues, keys


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_process_per_bank_trains_what_the_simulation_trains(tmp_path: Path) -> None:
    out = tmp_path / "flower.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "flower.py"),
            "--banks",
            "3",
            "--rounds",
            "4",
            "--no-flower",
            "--amqp-url",
            AMQP_URL,
            "--redis-url",
            REDIS_URL,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = json.loads(out.read_text())["runs"][0]["3"]
    procs, embedded = run["fedq sync, processes"], run["fedq sync, embedded"]
    assert procs["rounds"] == 4
    assert procs["sender_check"] is True
    assert procs["updates_accepted"] == 12 and procs["updates_refused"] == 0
    assert len(procs["auc_by_round"]) == 5
    assert procs["auc_by_round"] == pytest.approx(embedded["auc_by_round"], abs=1e-9)
    assert procs["seconds_per_round"] > 0
    assert procs["profile"]["rounds_profiled"] == 3
    queues, keys = asyncio.run(_leftovers(procs["task"], procs["redis_prefix"]))
    assert queues == [] and keys == []
