"""One writer per task: the lease, fencing on commit, a standby taking over."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
import redis.asyncio as aioredis

from aggregator.service import AggregatorService, FencedOutError, ServiceConfig
from aggregator.store import CommitOutcome, RedisModelStore
from common.spec import TaskSpec
from common.transport.memory import MemoryBroker, MemoryTransport
from tests.helpers import (
    CREDIT_TASK,
    encoded_update,
    init_task,
    lineage_entry,
    model_params,
    service_spec,
    wait_for,
)


class TestLease:
    async def test_one_holder_and_tokens_grow(self, store: RedisModelStore) -> None:
        a = await store.acquire_lease(CREDIT_TASK, "a", 10_000)
        assert a is not None
        assert await store.acquire_lease(CREDIT_TASK, "b", 10_000) is None
        assert await store.renew_lease(a, CREDIT_TASK, 10_000)
        await store.release_lease(a, CREDIT_TASK)
        b = await store.acquire_lease(CREDIT_TASK, "b", 10_000)
        assert b is not None
        assert b.token > a.token
        assert not await store.renew_lease(a, CREDIT_TASK, 10_000)

    async def test_an_expired_lease_goes_to_the_next_writer(self, store: RedisModelStore) -> None:
        a = await store.acquire_lease(CREDIT_TASK, "a", 100)
        assert a is not None
        await asyncio.sleep(0.3)
        b = await store.acquire_lease(CREDIT_TASK, "b", 10_000)
        assert b is not None
        assert not await store.renew_lease(a, CREDIT_TASK, 10_000)

    async def test_a_commit_under_a_lost_lease_is_fenced(
        self, store: RedisModelStore, redis_client: aioredis.Redis, task_spec: TaskSpec
    ) -> None:
        await init_task(store, task_spec)
        old = await store.acquire_lease(CREDIT_TASK, "old", 10_000)
        assert old is not None
        # The old writer pauses (GC, SIGSTOP); its lease expires; a new writer takes over.
        await redis_client.delete(store.keys.lease(CREDIT_TASK))
        new = await store.acquire_lease(CREDIT_TASK, "new", 10_000)
        assert new is not None
        late = await store.commit(
            CREDIT_TASK,
            parent=0,
            params=model_params(task_spec, 1.0),
            lineage=[lineage_entry("x")],
            lease=old,
        )
        assert late.outcome is CommitOutcome.FENCED
        assert await store.head(CREDIT_TASK) == 0
        ok = await store.commit(
            CREDIT_TASK,
            parent=0,
            params=model_params(task_spec, 1.0),
            lineage=[lineage_entry("x")],
            lease=new,
        )
        assert ok.committed


def _service(
    spec: TaskSpec, store: RedisModelStore, broker: MemoryBroker, owner: str
) -> AggregatorService:
    return AggregatorService(
        spec,
        store,
        MemoryTransport(broker, "fedq-aggregator"),
        ServiceConfig(owner=owner, lease_ttl_s=0.6, require_sender_match=False),
    )


async def test_a_standby_takes_over_when_the_active_one_dies() -> None:
    spec = service_spec()
    broker = MemoryBroker()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    active, standby = (
        _service(spec, store, broker, "active"),
        _service(spec, store, broker, "standby"),
    )
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    run_a = asyncio.create_task(active.run(stop_a))
    await wait_for(lambda: active.ready.is_set())
    run_b = asyncio.create_task(standby.run(stop_b))
    bank = MemoryTransport(broker, "bank-a")
    uid, body = encoded_update(spec, base=0)
    await bank.publish_update(spec.task_id, "bank-a", body, message_id=uid)
    await wait_for(lambda: active.head_version == 1)
    assert not standby.ready.is_set()  # waiting for the lease
    # The active aggregator dies without a clean stop: no release, its lease expires.
    run_a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run_a
    await wait_for(lambda: standby.ready.is_set(), seconds=10)
    assert standby.head_version == 1
    uid, body = encoded_update(spec, base=1)
    await bank.publish_update(spec.task_id, "bank-a", body, message_id=uid)
    await wait_for(lambda: standby.head_version == 2)
    owners = [(await store.get_version(spec.task_id, v)).info["owner"] for v in (1, 2)]
    fences = [(await store.get_version(spec.task_id, v)).info["fence"] for v in (1, 2)]
    assert owners == ["active", "standby"]
    assert fences[1] > fences[0]
    stop_b.set()
    await run_b
    del stop_a


async def test_a_paused_writer_is_fenced_and_its_updates_go_to_the_new_one() -> None:
    spec = service_spec()
    broker = MemoryBroker()
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    store = RedisModelStore(client)
    old = _service(spec, store, broker, "old")
    stop_old, stop_new = asyncio.Event(), asyncio.Event()
    run_old = asyncio.create_task(old.run(stop_old))
    await wait_for(lambda: old.ready.is_set())
    new = _service(spec, store, broker, "new")
    run_new = asyncio.create_task(new.run(stop_new))
    # While the old writer is paused its lease expires and another writer takes it.
    await client.set(store.keys.lease(spec.task_id), "intruder:99", px=60_000)
    bank = MemoryTransport(broker, "bank-a")
    uid, body = encoded_update(spec, base=0)
    await bank.publish_update(spec.task_id, "bank-a", body, message_id=uid)
    # The old writer cannot commit (or renew): it stops, its update goes back unacked.
    with pytest.raises(FencedOutError):
        await asyncio.wait_for(run_old, 10)
    assert await store.head(spec.task_id) == 0
    # The intruder's lease ends; the waiting aggregator takes over and applies it.
    await client.delete(store.keys.lease(spec.task_id))
    await wait_for(lambda: new.head_version == 1, seconds=10)
    record = await store.get_version(spec.task_id, 1)
    assert record.info["owner"] == "new"
    assert [e.update_id for e in record.lineage] == [uid]
    assert await store.head(spec.task_id) == 1
    stop_new.set()
    await run_new
    del stop_old
