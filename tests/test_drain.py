"""SIGTERM always ends a service (fedq/services.py ``drained``): a worker or aggregator
waiting on a server that does not answer is stopped DRAIN_S after the signal; one that
drains in time returns its result."""

from __future__ import annotations

import asyncio

import pytest

from fedq import services

pytestmark = pytest.mark.timeout(30)


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


async def test_a_close_that_hangs_is_left_after_its_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "CLOSE_S", 0.2)

    async def hangs() -> None:
        await asyncio.sleep(3600)

    t0 = asyncio.get_running_loop().time()
    await services._closed(hangs(), "a connection")
    assert asyncio.get_running_loop().time() - t0 < 5
