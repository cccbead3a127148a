"""The aggregator's memory is bounded by its prefetch and buffer, not by the backlog."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import torch

from aggregator.store import RedisModelStore
from common.models import build_task_model, model_tensors
from common.spec import AsyncSettings, ModelSpec, NumericFeature, TargetSpec, TaskSpec
from common.transport import TaskTopology
from common.transport.amqp import AmqpTransport
from common.wire import UpdateEnvelope, encode_update
from tests.helpers import AMQP_URL, REDIS_URL, forget_task

pytestmark = [pytest.mark.real, pytest.mark.slow]
PARTICIPANTS = ("bank-a", "bank-b", "bank-c", "bank-d", "bank-e")


def _spec() -> TaskSpec:
    # About 21 thousand parameters: an 84 KB update.
    return TaskSpec(
        task_id=f"mem{uuid.uuid4().hex[:8]}",
        model=ModelSpec(kind="mlp", hidden=(512, 24)),
        features=tuple(NumericFeature(name=f"x{i}") for i in range(16)),
        target=TargetSpec(name="y"),
        participants=PARTICIPANTS,
        **{"async": AsyncSettings(strategy="fedbuff", buffer_size=10, max_staleness=100_000)},
    )


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def _run_with_backlog(backlog: int, tmp_path: Path) -> tuple[float, int]:
    """Queue ``backlog`` updates, then start the aggregator; its peak RSS once drained."""
    spec = _spec()
    task = spec.task_id
    spec_file = tmp_path / f"{task}.json"
    spec_file.write_text(spec.to_json())
    publisher = await AmqpTransport.connect(AMQP_URL, name="memory-test")
    store = RedisModelStore(aioredis.Redis.from_url(REDIS_URL))
    proc: subprocess.Popen[bytes] | None = None
    try:
        await publisher.declare_task(TaskTopology(task, PARTICIPANTS))
        shapes = model_tensors(build_task_model(spec))
        gen = torch.Generator().manual_seed(0)
        sem = asyncio.Semaphore(32)
        size = 0

        async def send(i: int) -> None:
            nonlocal size
            delta = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in shapes.items()}
            p = PARTICIPANTS[i % 5]
            body, _ = encode_update(
                UpdateEnvelope(
                    task=task,
                    participant=p,
                    update_id=f"u{i}",
                    base_version=0,
                    num_samples=10,
                    tensors=delta,
                    spec_hash=spec.spec_hash(),
                )
            )
            size = len(body)
            async with sem:
                await publisher.publish_update(task, p, body, message_id=f"u{i}")

        await asyncio.gather(*(send(i) for i in range(backlog)))
        env = {**os.environ, "FEDQ_AMQP_URL": AMQP_URL, "FEDQ_REDIS_URL": REDIS_URL}
        with (tmp_path / f"{task}.log").open("ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fedq",
                    "--log-level",
                    "warning",
                    "aggregator",
                    "run",
                    "--spec",
                    str(spec_file),
                    "--no-sender-check",
                    "--http-port",
                    "0",
                    "--prefetch",
                    "32",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        async with asyncio.timeout(240):
            while await store.head(task) != backlog // 10:
                await asyncio.sleep(0.2)
        peak = _peak_rss_mib(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        return peak, size
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        await publisher.close()
        await store.close()
        await forget_task(task, PARTICIPANTS)


async def test_peak_memory_does_not_grow_with_the_backlog(tmp_path: Path) -> None:
    small, size = await _run_with_backlog(200, tmp_path)
    large, _ = await _run_with_backlog(2000, tmp_path)
    backlog_mib = 2000 * size / 2**20
    # 1,800 more queued updates (~150 MiB) cost the aggregator almost nothing.
    print(f"peak RSS {small:.0f} MiB (200 queued), {large:.0f} MiB (2000, {backlog_mib:.0f} MiB)")
    assert large - small < 40, (small, large, backlog_mib)
    assert large - small < backlog_mib / 4
