"""Group commits (one Lua script per group of versions), on fakeredis and the real Redis.

A group committed by :meth:`RedisModelStore.commit_many` must leave exactly what the
same versions committed one by one leave (but the times), a refused group nothing at
all, and a commit must be one command on the wire once the script is loaded.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis
import torch
from redis.asyncio.connection import AbstractConnection

from aggregator.server_opt import ServerState, initial_state
from aggregator.store import (
    CommitOutcome,
    GroupCommitResult,
    Lease,
    NewVersion,
    RedisModelStore,
    StoreConfig,
    VersionRecord,
)
from common.errors import StoreError
from common.segments import Segments
from common.spec import ServerOptimizerSpec, TaskSpec
from tests.helpers import CREDIT_TASK, init_task, lineage_entry, model_params

Snapshot = dict[str, object]


@pytest.fixture
async def prefixes(redis_client: aioredis.Redis) -> AsyncIterator[Callable[[], str]]:
    """Make private key prefixes; their keys are deleted afterwards."""
    made: list[str] = []

    def new() -> str:
        made.append(f"fedqtest-{uuid.uuid4().hex[:12]}")
        return made[-1]

    yield new
    for p in made:
        keys = [k async for k in redis_client.scan_iter(match=f"{p}:*", count=1000)]
        if keys:
            await redis_client.delete(*keys)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every command any redis.asyncio connection sends (pipelines too)."""
    names: list[str] = []
    pack = AbstractConnection.pack_command

    def counting(self: AbstractConnection, *args: Any) -> list[bytes]:
        name = args[0]
        names.append((name.decode() if isinstance(name, bytes) else str(name)).upper())
        return pack(self, *args)

    monkeypatch.setattr(AbstractConnection, "pack_command", counting)
    return names


def _state(params: dict[str, torch.Tensor], seed: int) -> ServerState:
    spec = ServerOptimizerSpec(kind="adam", lr=0.3, beta1=0.8, beta2=0.95, tau=0.01)
    state = initial_state(spec, params)
    gen = torch.Generator().manual_seed(seed)
    m = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in state.m.items()}
    return ServerState(spec, m, state.v)


def _versions(task_spec: TaskSpec, first: int, n: int, tag: str = "g") -> list[NewVersion]:
    """Versions ``first .. first + n - 1``: two updates each, every other one with an
    optimizer state (so both kinds of version are written)."""
    out = []
    for v in range(first, first + n):
        params = model_params(task_spec, 0.5 * v)
        lineage = [
            lineage_entry(f"{tag}{v}-a", weight=0.25, base=v - 1),
            lineage_entry(f"{tag}{v}-b", weight=0.75, base=max(0, v - 2), staleness=1),
        ]
        state = _state(params, v) if v % 2 else None
        out.append(NewVersion(params, lineage, {"strategy": "fedbuff", "n": v}, state))
    return out


async def _one_by_one(
    store: RedisModelStore, parent: int, versions: Sequence[NewVersion]
) -> tuple[list[VersionRecord], list[Segments]]:
    records: list[VersionRecord] = []
    blobs: list[Segments] = []
    for k, v in enumerate(versions):
        result = await store.commit(
            CREDIT_TASK,
            parent=parent + k,
            params=v.params,
            lineage=v.lineage,
            info=v.info,
            state=v.state,
        )
        assert result.committed and result.record is not None
        records.append(result.record)
        blobs.append(result.blob)
    return records, blobs


async def _snapshot(r: aioredis.Redis, prefix: str, *, timeless: bool = False) -> Snapshot:
    """Every key under ``prefix`` (named without it) with its value. ``timeless``: without
    the times (``created_at`` of metadata, stream ids and ``at`` of decisions)."""
    out: Snapshot = {}
    async for raw in r.scan_iter(match=f"{prefix}:*", count=1000):
        key = _text(raw)
        kind = _text(await r.type(key))
        value: object
        if kind == "string":
            value = await r.get(key)
            if timeless and key.endswith(":meta"):
                value = {k: v for k, v in json.loads(value or b"").items() if k != "created_at"}
        elif kind == "hash":
            value = await r.hgetall(key)
        elif kind == "list":
            value = await r.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(await r.smembers(key))
        elif kind == "stream":
            rows = await r.xrange(key) or []
            value = rows
            if timeless:  # neither the stream ids nor the decisions' times
                value = [{k: v for k, v in (f or {}).items() if k != b"at"} for _, f in rows]
        else:
            raise AssertionError(f"unexpected type {kind} of {key}")
        out[key[len(prefix) :]] = value
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _versions_with(snapshot: Snapshot, kind: str) -> set[int]:
    """The versions that have a ``kind`` key (blob, state, meta, lineage) in ``snapshot``."""
    parts = [k.split(":") for k in snapshot]  # ...:v:<version>:<kind>
    return {int(p[-2]) for p in parts if p[-3:-2] == ["v"] and p[-1] == kind}


def _timeless(record: VersionRecord) -> VersionRecord:
    return replace(record, created_at=0.0)


@pytest.mark.parametrize("keep_blobs", [None, 1, 2, 4])
async def test_a_group_leaves_what_the_same_commits_one_by_one_leave(
    redis_client: aioredis.Redis,
    prefixes: Callable[[], str],
    task_spec: TaskSpec,
    keep_blobs: int | None,
) -> None:
    a, b = prefixes(), prefixes()
    group = RedisModelStore(redis_client, StoreConfig(prefix=a, keep_blobs=keep_blobs))
    single = RedisModelStore(redis_client, StoreConfig(prefix=b, keep_blobs=keep_blobs))
    before, versions = _versions(task_spec, 1, 2, "p"), _versions(task_spec, 3, 3)
    for store in (group, single):
        await init_task(store, task_spec)
        await _one_by_one(store, 0, before)

    result = await group.commit_many(CREDIT_TASK, parent=2, versions=versions)
    records, blobs = await _one_by_one(single, 2, versions)

    assert result.outcome is CommitOutcome.COMMITTED and result.committed
    assert result.head == 5 and result.duplicates == {}
    assert [_timeless(r) for r in result.records] == [_timeless(r) for r in records]
    assert [r.version_hash for r in result.records] == [r.version_hash for r in records]
    assert [r.param_hash for r in result.records] == [r.param_hash for r in records]
    assert list(result.blobs) == blobs
    assert await group.get_versions(CREDIT_TASK, [3, 4, 5]) == list(result.records)
    snapshot = await _snapshot(redis_client, a, timeless=True)
    assert snapshot == await _snapshot(redis_client, b, timeless=True)
    # Retention as documented: version 0 and the newest keep_blobs versions keep their
    # parameters (and, the odd ones, their optimizer states).
    kept = set(range(6)) if keep_blobs is None else {0, *range(6 - keep_blobs, 6)}
    assert _versions_with(snapshot, "blob") == kept
    assert _versions_with(snapshot, "state") == {v for v in kept if v % 2}
    decisions = await group.decisions(CREDIT_TASK)
    assert [(d["version"], d["head"], d["update_id"]) for d in decisions[-6:]] == [
        (str(v), str(v - 1), f"g{v}-{s}") for v in (3, 4, 5) for s in "ab"
    ]
    report = await group.verify_chain(CREDIT_TASK)
    assert report.ok, report.reason
    assert report.head_hash == records[-1].version_hash


@pytest.mark.parametrize("refusal", ["fenced", "lost_race", "duplicate"])
async def test_a_refused_group_writes_nothing(
    store: RedisModelStore, redis_client: aioredis.Redis, task_spec: TaskSpec, refusal: str
) -> None:
    await init_task(store, task_spec)
    lease = await store.acquire_lease(CREDIT_TASK, "agg-a", 60_000)
    assert lease is not None
    await _one_by_one(store, 0, _versions(task_spec, 1, 2))
    before = await _snapshot(redis_client, store.config.prefix)

    versions = _versions(task_spec, 3, 3, "n")
    parent = 2
    if refusal == "fenced":
        lease = Lease("agg-b", lease.token + 1)
    elif refusal == "lost_race":
        parent = 1
    else:  # version 4 of the group carries an update already applied in version 1
        versions[1] = replace(versions[1], lineage=[lineage_entry("n4-a"), lineage_entry("g1-b")])
    head = await store.get_head(CREDIT_TASK)
    result = await store.commit_many(
        CREDIT_TASK, parent=parent, versions=versions, lease=lease, parent_hash=head.version_hash
    )

    expected = {
        "fenced": GroupCommitResult(CommitOutcome.FENCED),
        "lost_race": GroupCommitResult(CommitOutcome.LOST_RACE, head=2),
        "duplicate": GroupCommitResult(CommitOutcome.DUPLICATE, head=2, duplicates={"g1-b": 1}),
    }[refusal]
    assert result == expected and not result.committed
    assert await _snapshot(redis_client, store.config.prefix) == before


async def test_a_group_under_its_lease_commits(store: RedisModelStore, task_spec: TaskSpec) -> None:
    await init_task(store, task_spec)
    lease = await store.acquire_lease(CREDIT_TASK, "agg-a", 60_000)
    assert lease is not None
    result = await store.commit_many(
        CREDIT_TASK, parent=0, versions=_versions(task_spec, 1, 2), lease=lease
    )
    assert result.committed and result.head == 2
    assert await store.applied_in(CREDIT_TASK, ["g1-a", "g2-b"]) == {"g1-a": 1, "g2-b": 2}


async def test_a_commit_is_one_command_and_survives_a_script_flush(
    store: RedisModelStore, redis_client: aioredis.Redis, task_spec: TaskSpec, sent: list[str]
) -> None:
    await init_task(store, task_spec)
    first = await store.commit_many(CREDIT_TASK, parent=0, versions=_versions(task_spec, 1, 1))
    assert first.committed  # the script is loaded now

    sent.clear()
    group = await store.commit_many(
        CREDIT_TASK,
        parent=1,
        versions=_versions(task_spec, 2, 3),
        parent_hash=first.records[-1].version_hash,
    )
    assert group.committed and group.head == 4
    assert sent == ["EVALSHA"]

    await redis_client.script_flush()
    sent.clear()
    single = await store.commit(
        CREDIT_TASK,
        parent=4,
        params=model_params(task_spec, 9.0),
        lineage=[lineage_entry("after-flush")],
        parent_hash=group.records[-1].version_hash,
    )
    assert single.committed and single.record is not None and single.head == 5
    assert sent == ["EVALSHA", "SCRIPT LOAD", "EVALSHA"]  # NOSCRIPT, handled

    sent.clear()
    again = await store.commit(
        CREDIT_TASK,
        parent=5,
        params=model_params(task_spec, 10.0),
        lineage=[lineage_entry("loaded-again")],
        parent_hash=single.record.version_hash,
    )
    assert again.committed and sent == ["EVALSHA"]
    assert (await store.verify_chain(CREDIT_TASK)).ok


async def test_a_resent_script_reports_its_own_commit_and_writes_once(
    store: RedisModelStore, redis_client: aioredis.Redis, task_spec: TaskSpec
) -> None:
    """redis-py resends a command after a connection error: a commit whose reply was
    lost runs twice; the second run must see its own versions, not a lost race."""
    await init_task(store, task_spec)
    script = store._commit_script

    class Twice:
        async def __call__(self, keys: list[str], args: list[bytes | str]) -> object:
            await script(keys=keys, args=args)
            return await script(keys=keys, args=args)

    store._commit_script = Twice()  # type: ignore[assignment]
    result = await store.commit_many(CREDIT_TASK, parent=0, versions=_versions(task_spec, 1, 3))
    assert result.committed and result.head == 3 and len(result.records) == 3
    assert len(await store.decisions(CREDIT_TASK)) == 6
    # Another call's versions in its place are a lost race, as before.
    late = await store.commit_many(CREDIT_TASK, parent=0, versions=_versions(task_spec, 1, 3, "x"))
    assert late.outcome is CommitOutcome.LOST_RACE and late.head == 3
    store._commit_script = script


async def test_a_group_listing_an_update_twice_or_no_version_is_an_error(
    store: RedisModelStore, task_spec: TaskSpec
) -> None:
    await init_task(store, task_spec)
    versions = _versions(task_spec, 1, 2)
    versions[1] = replace(versions[1], lineage=[lineage_entry("g1-a")])
    with pytest.raises(StoreError, match="twice"):
        await store.commit_many(CREDIT_TASK, parent=0, versions=versions)
    with pytest.raises(StoreError, match="at least one"):
        await store.commit_many(CREDIT_TASK, parent=0, versions=[])
    assert await store.head(CREDIT_TASK) == 0


@pytest.mark.parametrize(("inline_below", "stage"), [(1 << 16, "inline"), (0, "thread")])
async def test_small_groups_are_encoded_inline_and_large_ones_in_a_thread(
    redis_client: aioredis.Redis,
    prefixes: Callable[[], str],
    task_spec: TaskSpec,
    inline_below: int,
    stage: str,
) -> None:
    seen: list[str] = []

    @contextlib.contextmanager
    def stages(name: str) -> Iterator[None]:
        seen.append(name)
        yield

    config = StoreConfig(prefix=prefixes(), inline_below=inline_below)
    store = RedisModelStore(redis_client, config, stages=stages)
    await init_task(store, task_spec)
    result = await store.commit_many(CREDIT_TASK, parent=0, versions=_versions(task_spec, 1, 2))
    assert result.committed
    assert seen == [f"store: encode and hash ({stage})", "store: transaction (Redis)"]
    assert (await store.verify_chain(CREDIT_TASK)).ok


async def test_recent_applied_names_the_updates_of_the_last_versions(
    store: RedisModelStore, redis_client: aioredis.Redis, task_spec: TaskSpec, sent: list[str]
) -> None:
    await init_task(store, task_spec)
    await store.commit_many(CREDIT_TASK, parent=0, versions=_versions(task_spec, 1, 5))
    sent.clear()
    assert await store.recent_applied(CREDIT_TASK, 5, 2) == {
        "g4-a": 4,
        "g4-b": 4,
        "g5-a": 5,
        "g5-b": 5,
    }
    assert sent == ["MGET"]  # one round trip
    every = await redis_client.hgetall(store.keys.applied(CREDIT_TASK))
    assert await store.recent_applied(CREDIT_TASK, 5, 100) == {
        _text(k): int(v) for k, v in every.items()
    }
    assert await store.recent_applied(CREDIT_TASK, 3, 1) == {"g3-a": 3, "g3-b": 3}
    assert await store.recent_applied(CREDIT_TASK, 5, 0) == {}
    assert await store.recent_applied(CREDIT_TASK, 0, 10) == {}
