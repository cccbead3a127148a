"""Servers restarted mid-run (private instances): everyone reconnects, nothing is lost."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping

import pandas as pd
import pytest
import redis.asyncio as aioredis

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, StoreConfig, connect_redis
from common.spec import TaskSpec
from common.transport import Transport
from common.transport.amqp import AmqpTransport
from fedq.simulate import SimulationConfig, prepare
from participant.worker import ParticipantWorker, WorkerConfig
from tests.conftest import REDIS_URL
from tests.servers import PrivateRabbit, PrivateRedis, private_rabbit_fixture, private_redis_fixture  # noqa: F401
from tests.test_transport import AMQP_URL, _delete_queues

pytestmark = [pytest.mark.real, pytest.mark.slow]


async def _until(cond: Callable[[], Awaitable[bool]], seconds: float = 90.0) -> None:
    async with asyncio.timeout(seconds):
        while not await cond():
            await asyncio.sleep(0.1)


async def _federation(
    spec: TaskSpec, store: RedisModelStore, amqp_url: str, shards: Mapping[str, pd.DataFrame]
) -> tuple[
    AggregatorService,
    list[ParticipantWorker],
    list[asyncio.Task[object]],
    asyncio.Event,
    asyncio.Event,
]:
    agg: Transport = await AmqpTransport.connect(amqp_url, name="restart-aggregator")
    service = AggregatorService(
        spec, store, agg, ServiceConfig(require_sender_match=False, lease_ttl_s=5)
    )
    stop, bank_stop = asyncio.Event(), asyncio.Event()
    tasks: list[asyncio.Task[object]] = [asyncio.create_task(_run(service, stop))]
    async with asyncio.timeout(30):
        await service.ready.wait()
    workers = []
    for i, name in enumerate(spec.participants):
        t = await AmqpTransport.connect(amqp_url, name=f"restart-{name}")
        w = ParticipantWorker(
            spec,
            WorkerConfig(participant=name, seed=i, delay_s=0.05, wait_for_model_s=0.5),
            t,
            shards[name],
        )
        workers.append(w)
        tasks.append(asyncio.create_task(_work(w, bank_stop)))
    return service, workers, tasks, stop, bank_stop


async def _run(service: AggregatorService, stop: asyncio.Event) -> object:
    await service.run(stop)
    return None


async def _work(worker: ParticipantWorker, stop: asyncio.Event) -> object:
    return await worker.run(stop)


async def _wind_down(
    service: AggregatorService,
    store: RedisModelStore,
    workers: list[ParticipantWorker],
    tasks: list[asyncio.Task[object]],
    stop: asyncio.Event,
    bank_stop: asyncio.Event,
) -> None:
    """Stop the banks, let the aggregator settle every update they sent, then stop it."""
    bank_stop.set()
    await asyncio.gather(*tasks[1:])
    async with asyncio.timeout(60):
        while await _unsettled(store, service.task, workers):
            await asyncio.sleep(0.2)
    stop.set()
    await tasks[0]


async def _unsettled(
    store: RedisModelStore, task: str, workers: list[ParticipantWorker]
) -> set[str]:
    """Confirmed update ids neither applied nor refused (yet)."""
    confirmed = [uid for w in workers for uid in w.stats.published_ids]
    applied = await store.applied_in(task, confirmed)
    refused = {
        d["update_id"]
        for d in await store.decisions(task)
        if d["decision"] == "refused" and "update_id" in d
    }
    return set(confirmed) - set(applied) - refused


async def _accounted(store: RedisModelStore, task: str, workers: list[ParticipantWorker]) -> None:
    """Every confirmed update was applied exactly once or refused with a recorded reason."""
    head = await store.head(task)
    assert head is not None
    applied: list[str] = []
    for v in range(1, head + 1):
        record = await store.get_version(task, v)
        assert record.parent == v - 1
        applied += [e.update_id for e in record.lineage]
    assert len(applied) == len(set(applied))
    refused = {
        d["update_id"]
        for d in await store.decisions(task)
        if d["decision"] == "refused" and "update_id" in d
    }
    confirmed = {uid for w in workers for uid in w.stats.published_ids}
    assert confirmed, "the banks published nothing"
    missing = confirmed - set(applied) - refused
    assert not missing, f"{len(missing)} confirmed updates neither applied nor refused"
    assert (await store.verify_chain(task)).ok


async def test_rabbitmq_restarted_mid_run(private_rabbit: PrivateRabbit) -> None:
    prep = prepare(SimulationConfig(participants=3))
    spec = prep.spec.model_copy(
        update={"async_": prep.spec.async_.model_copy(update={"max_staleness": 1000})}
    )
    prefix = f"fedqtest-{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(REDIS_URL)
    store = RedisModelStore(client, StoreConfig(prefix=prefix))
    service, workers, tasks, stop, bank_stop = await _federation(
        spec, store, private_rabbit.url, prep.shards
    )
    try:
        await asyncio.to_thread(private_rabbit.sync_quorum_directory)
        await _until(lambda: _head_at_least(store, spec.task_id, 15))
        before = await store.head(spec.task_id)
        await private_rabbit.arestart(hard=True)  # SIGKILL the broker, start it again
        await _until(lambda: _head_at_least(store, spec.task_id, (before or 0) + 15), 120)
        await _wind_down(service, store, workers, tasks, stop, bank_stop)
        assert all(w.stats.published > 0 for w in workers)
        await _accounted(store, spec.task_id, workers)
    finally:
        for t in tasks:
            t.cancel()
        for w in workers:
            await w.transport.close()
        await service.transport.close()
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await store.close()


async def _head_at_least(store: RedisModelStore, task: str, n: int) -> bool:
    return (await store.head(task) or 0) >= n


async def test_redis_restarted_mid_run(private_redis: PrivateRedis) -> None:
    prep = prepare(SimulationConfig(participants=3))
    spec = prep.spec.model_copy(
        update={"async_": prep.spec.async_.model_copy(update={"max_staleness": 1000})}
    )
    store = RedisModelStore(connect_redis(private_redis.url))
    service, workers, tasks, stop, bank_stop = await _federation(spec, store, AMQP_URL, prep.shards)
    try:
        await _until(lambda: _head_at_least(store, spec.task_id, 15))
        await private_redis.akill()
        await asyncio.sleep(2.0)  # the aggregator waits: it must not crash meanwhile
        assert not tasks[0].done()
        down_head = service.head_version
        await private_redis.astart()
        # Nothing committed before the kill is lost (AOF, appendfsync always).
        assert (await store.head(spec.task_id) or 0) >= down_head
        await _until(lambda: _head_at_least(store, spec.task_id, down_head + 15), 120)
        await _wind_down(service, store, workers, tasks, stop, bank_stop)
        await _accounted(store, spec.task_id, workers)
    finally:
        for t in tasks:
            t.cancel()
        for w in workers:
            await w.transport.close()
        await service.transport.close()
        await store.close()
        await _delete_queues(spec.task_id, spec.participants)
