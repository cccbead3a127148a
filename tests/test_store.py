"""The model store, run against fakeredis and the real Redis (one shared test class)."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
import torch

from aggregator.store import CommitOutcome, RedisModelStore, StoreConfig
from common.errors import (
    BlobPrunedError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
    TaskConflictError,
)
from common.spec import TaskSpec
from common.wire import ModelEnvelope, encode_model, tensors_hash
from tests.helpers import CREDIT_TASK, init_task, lineage_entry, model_params


async def _chain(store: RedisModelStore, task_spec: TaskSpec, n: int) -> None:
    for v in range(n):
        result = await store.commit(
            CREDIT_TASK,
            parent=v,
            params=model_params(task_spec, float(v + 1)),
            lineage=[
                lineage_entry(f"u{v}-a", weight=0.25),
                lineage_entry(f"u{v}-b", weight=0.75, staleness=1),
            ],
        )
        assert result.committed


class TestModelStore:
    async def test_register_task_is_idempotent_and_refuses_another_spec(
        self, store: RedisModelStore, task_spec: TaskSpec
    ) -> None:
        assert await store.register_task(task_spec) is True
        assert await store.register_task(task_spec) is False
        assert await store.get_spec(CREDIT_TASK) == task_spec
        assert await store.tasks() == [CREDIT_TASK]
        other = task_spec.model_copy(update={"seed": 42})
        with pytest.raises(TaskConflictError):
            await store.register_task(other)
        with pytest.raises(NotFoundError):
            await store.get_spec("nope")

    async def test_genesis_round_trips_parameters_bit_for_bit(
        self, store: RedisModelStore, task_spec: TaskSpec
    ) -> None:
        params = await init_task(store, task_spec)
        assert await store.head(CREDIT_TASK) == 0
        record = await store.get_head(CREDIT_TASK)
        assert record.parent is None and record.lineage == ()
        assert record.param_hash == tensors_hash(params)
        env = await store.get_params(CREDIT_TASK, 0)
        assert env.version == 0 and env.version_hash == record.version_hash
        for name, t in params.items():
            assert torch.equal(env.tensors[name], t)
        with pytest.raises(TaskConflictError):
            await store.create_genesis(CREDIT_TASK, params)

    async def test_genesis_needs_a_registered_task(
        self, store: RedisModelStore, task_spec: TaskSpec
    ) -> None:
        with pytest.raises(NotFoundError):
            await store.create_genesis(CREDIT_TASK, model_params(task_spec))

    async def test_commit_writes_version_lineage_and_applied_ids(
        self, store: RedisModelStore, task_spec: TaskSpec
    ) -> None:
        await init_task(store, task_spec)
        lineage = [lineage_entry("a", weight=0.1), lineage_entry("b", weight=0.9, staleness=2)]
        result = await store.commit(
            CREDIT_TASK,
            parent=0,
            params=model_params(task_spec, 1.0),
            lineage=lineage,
            info={"strategy": "fedasync"},
        )
        assert result.outcome is CommitOutcome.COMMITTED and result.record is not None
        assert await store.head(CREDIT_TASK) == 1
        record = await store.get_version(CREDIT_TASK, 1)
        assert record == result.record
        assert record.parent == 0 and record.lineage == tuple(lineage)
        assert record.info == {"strategy": "fedasync"}
        assert await store.applied_in(CREDIT_TASK, ["a", "b", "c"]) == {"a": 1, "b": 1}
        genesis = await store.get_version(CREDIT_TASK, 0)
        assert record.version_hash != genesis.version_hash

    async def test_commit_on_an_old_parent_is_a_lost_race_and_writes_nothing(
        self, store: RedisModelStore, task_spec: TaskSpec
    ) -> None:
        await init_task(store, task_spec)
        await _chain(store, task_spec, 2)
        result = await store.commit(
            CREDIT_TASK,
            parent=1,
            params=model_params(task_spec, 9.0),
            lineage=[lineage_entry("late")],
        )
        assert result.outcome is CommitOutcome.LOST_RACE and result.head == 2
        assert await store.head(CREDIT_TASK) == 2
        assert await store.applied_in(CREDIT_TASK, ["late"]) == {}

    async def test_racing_writers_exactly_one_wins(
        self, store: RedisModelStore, task_spec: TaskSpec
    ) -> None:
        await init_task(store, task_spec)
        for parent in range(10):
            results = await asyncio.gather(
                *(
                    store.commit(
                        CREDIT_TASK,
                        parent=parent,
                        params=model_params(task_spec, float(w)),
                        lineage=[lineage_entry(f"r{parent}-w{w}")],
                    )
                    for w in range(4)
                )
            )
            outcomes = [r.outcome for r in results]
            assert outcomes.count(CommitOutcome.COMMITTED) == 1, outcomes
            assert outcomes.count(CommitOutcome.LOST_RACE) == 3, outcomes
            winner = next(r for r in results if r.committed)
            assert winner.record is not None
            assert await store.head(CREDIT_TASK) == parent + 1
            # Only the winner's update is applied; the losers' may be retried later.
            ids = [f"r{parent}-w{w}" for w in range(4)]
            assert list(await store.applied_in(CREDIT_TASK, ids)) == [
                winner.record.lineage[0].update_id
            ]

    async def test_racing_writers_on_separate_connections(
        self, redis_client: aioredis.Redis, prefix: str, task_spec: TaskSpec
    ) -> None:
        """Two stores (two aggregators) on one Redis: the commit script decides."""
        a = RedisModelStore(redis_client, StoreConfig(prefix=prefix))
        b = RedisModelStore(redis_client, StoreConfig(prefix=prefix))
        await init_task(a, task_spec)
        results = await asyncio.gather(
            a.commit(
                CREDIT_TASK,
                parent=0,
                params=model_params(task_spec, 1.0),
                lineage=[lineage_entry("x")],
            ),
            b.commit(
                CREDIT_TASK,
                parent=0,
                params=model_params(task_spec, 2.0),
                lineage=[lineage_entry("y")],
            ),
        )
        assert sorted(r.outcome.value for r in results) == ["committed", "lost_race"]
        keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:*")]
        await redis_client.delete(*keys)

    async def test_update_applied_earlier_is_refused_later(
        self, store: RedisModelStore, task_spec: TaskSpec
    ) -> None:
        await init_task(store, task_spec)
        await store.commit(
            CREDIT_TASK,
            parent=0,
            params=model_params(task_spec, 1.0),
            lineage=[lineage_entry("once")],
        )
        await store.commit(
            CREDIT_TASK,
            parent=1,
            params=model_params(task_spec, 2.0),
            lineage=[lineage_entry("other")],
        )
        result = await store.commit(
            CREDIT_TASK,
            parent=2,
            params=model_params(task_spec, 3.0),
            lineage=[lineage_entry("new"), lineage_entry("once")],
        )
        assert result.outcome is CommitOutcome.DUPLICATE
        assert result.duplicates == {"once": 1}
        assert await store.head(CREDIT_TASK) == 2
        assert await store.applied_in(CREDIT_TASK, ["new"]) == {}

    async def test_lineage_with_a_repeated_id_is_an_error(
        self, store: RedisModelStore, task_spec: TaskSpec
    ) -> None:
        await init_task(store, task_spec)
        with pytest.raises(StoreError, match="twice"):
            await store.commit(
                CREDIT_TASK,
                parent=0,
                params=model_params(task_spec),
                lineage=[lineage_entry("d"), lineage_entry("d")],
            )

    async def test_missing_versions_are_not_found(
        self, store: RedisModelStore, task_spec: TaskSpec
    ) -> None:
        await init_task(store, task_spec)
        with pytest.raises(NotFoundError):
            await store.get_version(CREDIT_TASK, 5)
        with pytest.raises(NotFoundError):
            await store.get_blob(CREDIT_TASK, 5)
        with pytest.raises(NotFoundError):
            await store.commit(CREDIT_TASK, parent=5, params=model_params(task_spec), lineage=[])
        assert await store.head("unknown") is None

    async def test_several_versions_are_read_in_one_call_in_the_order_asked(
        self, store: RedisModelStore, task_spec: TaskSpec
    ) -> None:
        await init_task(store, task_spec)
        await _chain(store, task_spec, 4)
        records = await store.get_versions(CREDIT_TASK, [4, 2, 3, 0])
        assert [r.version for r in records] == [4, 2, 3, 0]
        for r in records:
            assert r == await store.get_version(CREDIT_TASK, r.version)
        assert await store.get_versions(CREDIT_TASK, []) == []
        with pytest.raises(NotFoundError, match="no version 7"):
            await store.get_versions(CREDIT_TASK, [3, 7])

    async def test_retention_drops_old_blobs_but_keeps_metadata_and_genesis(
        self, redis_client: aioredis.Redis, prefix: str, task_spec: TaskSpec
    ) -> None:
        store = RedisModelStore(redis_client, StoreConfig(prefix=prefix, keep_blobs=2))
        await init_task(store, task_spec)
        await _chain(store, task_spec, 5)
        for v in (1, 2, 3):
            with pytest.raises(BlobPrunedError):
                await store.get_blob(CREDIT_TASK, v)
        for v in (0, 4, 5):
            assert (await store.get_params(CREDIT_TASK, v)).version == v
        for v in range(6):
            assert len((await store.get_version(CREDIT_TASK, v)).lineage) == (0 if v == 0 else 2)
        report = await store.verify_chain(CREDIT_TASK)
        assert report.ok and report.unverified_params == (1, 2, 3)
        keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:*")]
        await redis_client.delete(*keys)

    async def test_verify_chain_matches_an_untouched_store(
        self, store: RedisModelStore, task_spec: TaskSpec
    ) -> None:
        await init_task(store, task_spec)
        await _chain(store, task_spec, 4)
        report = await store.verify_chain(CREDIT_TASK)
        assert report.ok, report.reason
        assert report.checked == 5
        assert report.head_hash == (await store.get_head(CREDIT_TASK)).version_hash


class TestTamperingChangesTheHeadHash:
    """Changing any stored parameter byte or lineage entry is detected and named."""

    async def _setup(self, store: RedisModelStore, task_spec: TaskSpec) -> bytes:
        await init_task(store, task_spec)
        await _chain(store, task_spec, 4)
        return (await store.get_head(CREDIT_TASK)).version_hash

    async def test_re_encoded_parameters(
        self, store: RedisModelStore, redis_client: aioredis.Redis, task_spec: TaskSpec
    ) -> None:
        head_hash = await self._setup(store, task_spec)
        env = await store.get_params(CREDIT_TASK, 2)
        tensors = {k: v.clone() for k, v in env.tensors.items()}
        first = next(iter(tensors))
        flat = tensors[first].view(-1).view(torch.int32)
        flat[0] ^= 1  # one bit of one parameter
        blob, _ = encode_model(
            ModelEnvelope(
                task=CREDIT_TASK, version=2, tensors=tensors, version_hash=env.version_hash
            )
        )
        await redis_client.set(store.keys.blob(CREDIT_TASK, 2), blob)
        report = await store.verify_chain(CREDIT_TASK)
        assert report.first_bad_version == 2 and "parameter hash" in report.reason
        assert report.head_hash != head_hash

    @pytest.mark.parametrize("offset", [-1, -40, -200])
    async def test_flipped_blob_byte(
        self, store: RedisModelStore, redis_client: aioredis.Redis, task_spec: TaskSpec, offset: int
    ) -> None:
        head_hash = await self._setup(store, task_spec)
        key = store.keys.blob(CREDIT_TASK, 3)
        stored = await redis_client.get(key)
        assert isinstance(stored, bytes)
        blob = bytearray(stored)
        blob[offset] ^= 0x01
        await redis_client.set(key, bytes(blob))
        report = await store.verify_chain(CREDIT_TASK)
        assert report.first_bad_version == 3, report
        assert report.head_hash != head_hash

    @pytest.mark.parametrize(
        ("field", "value"),
        [("weight", 0.2500001), ("update_id", "u1-z"), ("participant", "bank-z"), ("staleness", 5)],
    )
    async def test_changed_lineage_entry(
        self,
        store: RedisModelStore,
        redis_client: aioredis.Redis,
        task_spec: TaskSpec,
        field: str,
        value: object,
    ) -> None:
        head_hash = await self._setup(store, task_spec)
        key = store.keys.lineage(CREDIT_TASK, 2)
        lineage = json.loads(await redis_client.get(key) or b"[]")
        lineage[0][field] = value
        await redis_client.set(key, json.dumps(lineage))
        report = await store.verify_chain(CREDIT_TASK)
        assert report.first_bad_version == 2 and "version hash" in report.reason
        assert report.head_hash != head_hash

    async def test_removed_lineage_entry(
        self, store: RedisModelStore, redis_client: aioredis.Redis, task_spec: TaskSpec
    ) -> None:
        head_hash = await self._setup(store, task_spec)
        key = store.keys.lineage(CREDIT_TASK, 1)
        lineage = json.loads(await redis_client.get(key) or b"[]")
        await redis_client.set(key, json.dumps(lineage[1:]))
        report = await store.verify_chain(CREDIT_TASK)
        assert report.first_bad_version == 1
        assert report.head_hash != head_hash


async def test_unreachable_redis_raises_store_error(task_spec: TaskSpec) -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    store = RedisModelStore(client)
    try:
        assert await store.ping() is False
        with pytest.raises(StoreUnavailableError, match="Redis unavailable"):
            await store.head(CREDIT_TASK)
    finally:
        await store.close()
