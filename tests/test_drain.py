"""SIGTERM always ends a service (fedq/services.py ``drained``): a worker or aggregator
waiting on a server that does not answer is stopped DRAIN_S after the signal; one that
drains in time returns its result."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from fedq import services
from tests.helpers import AMQP_URL, REDIS_URL, delete_queues

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(30)
async def test_work_that_ignores_the_signal_is_cancelled_after_the_drain_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(services, "DRAIN_S", 0.3)
    stop = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck() -> int:  # e.g. a publish retried against a broker that is gone
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    asyncio.get_running_loop().call_later(0.1, stop.set)
    t0 = asyncio.get_running_loop().time()
    assert await services.drained(stuck(), stop, "test") is None
    assert cancelled.is_set()
    assert 0.35 <= asyncio.get_running_loop().time() - t0 < 5


@pytest.mark.timeout(30)
async def test_work_that_drains_in_time_returns_its_result_and_errors() -> None:
    stop = asyncio.Event()

    async def drains() -> str:
        await stop.wait()
        await asyncio.sleep(0.05)  # finishing the commit in flight
        return "done"

    asyncio.get_running_loop().call_later(0.05, stop.set)
    assert await services.drained(drains(), stop, "test") == "done"

    async def fails() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await services.drained(fails(), asyncio.Event(), "test")


@pytest.mark.timeout(30)
async def test_a_close_that_hangs_is_left_after_its_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "CLOSE_S", 0.2)

    async def hangs() -> None:
        await asyncio.sleep(3600)

    t0 = asyncio.get_running_loop().time()
    await services._closed(hangs(), "a connection")
    assert asyncio.get_running_loop().time() - t0 < 5


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(200)
async def test_an_aggregator_whose_store_is_gone_exits_after_sigterm(tmp_path: Path) -> None:
    """The defect: with Redis gone, a commit waits (and retries) for ever, by design, and
    `fedq aggregator run` ignored SIGTERM (still running 100 s after it). Now it stops
    DRAIN_S after the signal; what it held goes back to the queue. Redis is reached
    through a proxy the test closes; RabbitMQ and Redis themselves are the shared ones."""
    task = f"drain{uuid.uuid4().hex[:8]}"
    spec = tmp_path / "spec.json"
    data = str(ROOT / "fedq" / "data" / "german_credit.csv")
    fedq = [sys.executable, "-m", "fedq"]
    init = [*fedq, "task", "init", "--data", data, "--target", "creditability"]
    init += ["--positive", "bad", "--task-id", task, "--participants", "bank-a"]
    init += ["--no-require-signatures", "--out", str(spec)]
    subprocess.run(init, cwd=ROOT, check=True, capture_output=True)
    proxy = _Proxy(6379)
    port = await proxy.start()
    agg_cmd = [*fedq, "aggregator", "run", "--spec", str(spec), "--amqp-url", AMQP_URL]
    agg_cmd += ["--redis-url", f"redis://127.0.0.1:{port}/0", "--http-port", "0"]
    agg_cmd += ["--no-sender-check"]
    bank_cmd = [*fedq, "participant", "run", "--spec", str(spec), "--participant", "bank-a"]
    bank_cmd += ["--data", data, "--amqp-url", AMQP_URL, "--delay", "0.5"]
    log = (tmp_path / "aggregator.log").open("wb")
    agg = subprocess.Popen(agg_cmd, cwd=ROOT, stderr=log)
    bank = subprocess.Popen(bank_cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        head = f"fedq:{{{task}}}:head"
        async with asyncio.timeout(60):
            while int(await client.get(head) or 0) < 2:  # versions committed
                await asyncio.sleep(0.2)
        await proxy.stop()  # the store is gone: the next commit waits
        await asyncio.sleep(3)
        t0 = time.monotonic()
        agg.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(agg.wait, services.DRAIN_S + 3 * services.CLOSE_S + 20)
        waited = time.monotonic() - t0
        assert code == 0 and waited < services.DRAIN_S + 3 * services.CLOSE_S + 20
        log.flush()
        stderr = (tmp_path / "aggregator.log").read_text(errors="replace")
        assert "did not stop in time after the signal" in stderr
        assert "Traceback" not in stderr
    finally:
        for p in (agg, bank):
            if p.poll() is None:
                p.kill()
                p.wait(10)
        log.close()
        await proxy.stop()
        keys = [k async for k in client.scan_iter(match=f"fedq:{{{task}}}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await delete_queues(task, ("bank-a",))


class _Proxy:
    """A TCP proxy to a local port that can be cut: open connections closed, new ones
    refused (the server gone, as the client sees it)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for w in self.writers:
            w.close()
        self.writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.server is None:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [writer, up_writer]
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
