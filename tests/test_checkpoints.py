"""Checkpoints plus lineage: the store keeps every K-th version's parameters and the
head's; any other version is rebuilt from the nearest kept one and the retained updates,
bit for bit, or the rebuild fails naming the version that does not match."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import fakeredis
import pandas as pd
import pytest
import redis.asyncio as aioredis
import torch
from click.testing import CliRunner

from aggregator.audit.export import export_version, load_exported
from aggregator.audit.rebuild import RebuildError, rebuild
from aggregator.audit.replay import index_answers, index_updates, replay
from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import Keys, NewVersion, RedisModelStore, StoreConfig, VersionRecord
from aggregator.store.commit_script import DECISION_FIELDS, ScriptVersion, commit_call
from common.errors import FedqError
from common.spec import AsyncSettings, ServerOptimizerSpec, TaskSpec
from common.transport import Transport
from common.transport.amqp import AmqpTransport
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import Tensors, UpdateEnvelope, decode_update, encode_update
from fedq.cli import main
from fedq.simulate import SimulationConfig, prepare, run_simulation
from participant.worker import ParticipantWorker, WorkerConfig
from tests.helpers import (
    AMQP_URL,
    CREDIT_TASK,
    REDIS_URL,
    forget_task,
    init_task,
    lineage_entry,
    model_params,
)

pytestmark = pytest.mark.slow

K = 10


# ------------------------------------------------------------------ the rule


def test_the_checkpoint_rule() -> None:
    every = StoreConfig(checkpoint_every=K)
    assert [v for v in range(36) if every.keeps(v, 35)] == [0, 10, 20, 30, 35]
    # The head that moves on drops its parameters unless it is a checkpoint.
    assert every.dropped_by(34, 35) == [34]
    assert every.dropped_by(29, 30) == [29]
    assert every.dropped_by(30, 31) == []
    assert every.dropped_by(29, 35) == [29]  # a group: 30..34 are not written, 30 is
    # With keep_blobs too: the union of the checkpoints and the newest keep_blobs.
    both = StoreConfig(checkpoint_every=K, keep_blobs=3)
    assert [v for v in range(36) if both.keeps(v, 35)] == [0, 10, 20, 30, 33, 34, 35]
    assert both.dropped_by(35, 36) == [33]
    assert both.dropped_by(35, 40) == [33, 34, 35]
    # keep_blobs alone: as before (version 0 and the newest N).
    newest = StoreConfig(keep_blobs=2)
    assert [v for v in range(6) if newest.keeps(v, 5)] == [0, 4, 5]
    assert newest.dropped_by(2, 5) == [1, 2]  # 3 is not written (committed with 4 and 5)
    assert StoreConfig().dropped_by(4, 9) == []
    with pytest.raises(ValueError, match="checkpoint_every"):
        StoreConfig(checkpoint_every=0)


def test_a_group_does_not_write_a_blob_it_would_prune() -> None:
    store = StoreConfig(checkpoint_every=4)
    versions = [
        ScriptVersion(v, b"blob" if store.keeps(v, 9) else None, None, b"{}", b"[]", ())
        for v in range(6, 10)
    ]
    call = commit_call(
        Keys("p"),
        "t",
        parent=5,
        versions=versions,
        lease=None,
        max_decisions=10,
        drop=store.dropped_by(5, 9),
        at=0.0,
    )
    first = 6 + len(DECISION_FIELDS)  # the fixed arguments, then each version's five
    blobs = [call.args[first + 5 * k] for k in range(4)]
    assert blobs == [b"", b"", b"blob", b"blob"]  # 6, 7 not kept; 8 a checkpoint; 9 the head
    assert call.keys[4 + 4 * 4 :] == [Keys("p").blob("t", 5), Keys("p").state("t", 5)]


async def _snapshot(client: aioredis.Redis, prefix: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    async for key in client.scan_iter(match=f"{prefix}:*"):
        name = key.decode() if isinstance(key, bytes) else key
        if name.endswith((":blob", ":state")):
            value = await client.get(key)
            assert isinstance(value, bytes)
            out[name.removeprefix(prefix)] = value
    return out


async def test_groups_leave_what_one_by_one_commits_leave(
    redis_client: aioredis.Redis, task_spec: TaskSpec
) -> None:
    a, b = f"ckpt-{uuid.uuid4().hex[:8]}", f"ckpt-{uuid.uuid4().hex[:8]}"
    group = RedisModelStore(redis_client, StoreConfig(a, keep_blobs=2, checkpoint_every=4))
    single = RedisModelStore(redis_client, StoreConfig(b, keep_blobs=2, checkpoint_every=4))
    try:
        for store in (group, single):
            await init_task(store, task_spec)
        news = [
            NewVersion(model_params(task_spec, 0.01 * v), [lineage_entry(f"u{v}")], {})
            for v in range(1, 12)
        ]
        parent = 0
        for size in (1, 5, 3, 2):  # groups 1, 2..6, 7..9, 10..11
            result = await group.commit_many(
                CREDIT_TASK, parent=parent, versions=news[parent : parent + size]
            )
            assert result.committed
            parent += size
        for v in range(11):
            result = await single.commit_many(CREDIT_TASK, parent=v, versions=[news[v]])
            assert result.committed
        kept = await _snapshot(redis_client, a)
        assert kept == await _snapshot(redis_client, b)
        assert sorted(int(k.split(":")[-2]) for k in kept) == [0, 4, 8, 10, 11]
        report = await group.verify_chain(CREDIT_TASK)
        assert report.ok, report.reason
        assert report.unverified_params == (1, 2, 3, 5, 6, 7, 9)
    finally:
        for prefix in (a, b):
            keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:*")]
            if keys:
                await redis_client.delete(*keys)


# ------------------------------------------------------------------ a federation


@dataclass
class Run:
    store: RedisModelStore
    transport: Transport
    task: str
    head: int
    #: Every committed version's parameters, as the service committed them.
    committed: dict[int, Tensors]


async def _federation(
    spec: TaskSpec,
    shards: Mapping[str, pd.DataFrame],
    versions: int,
    store: RedisModelStore,
    transports: Mapping[str, Transport],
    aggregator: Transport,
) -> Run:
    """Run ``spec`` to at least ``versions`` versions, capturing every version's
    parameters through the service's ``on_version`` hook."""
    committed: dict[int, Tensors] = {}

    async def on_version(record: VersionRecord, params: Tensors) -> None:
        committed[record.version] = {k: v.clone() for k, v in params.items()}

    service = AggregatorService(
        spec, store, aggregator, ServiceConfig(require_sender_match=False), None, on_version
    )
    stop, bank_stop = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    workers = [
        asyncio.create_task(
            ParticipantWorker(
                spec,
                WorkerConfig(participant=n, seed=i, delay_s=0.005, wait_for_model_s=0.2),
                transports[n],
                shards[n],
            ).run(bank_stop)
        )
        for i, n in enumerate(spec.participants)
    ]
    async with asyncio.timeout(90):
        while service.head_version < versions:
            await asyncio.sleep(0.01)
    bank_stop.set()
    await asyncio.gather(*workers)
    stop.set()
    await running
    head = await store.head(spec.task_id)
    assert head is not None and head >= versions
    assert sorted(committed) == list(range(1, head + 1))
    return Run(store, aggregator, spec.task_id, head, committed)


async def _embedded(spec: TaskSpec, shards: Mapping[str, pd.DataFrame], versions: int) -> Run:
    broker = MemoryBroker()
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    store = RedisModelStore(client, StoreConfig(checkpoint_every=K))
    banks: dict[str, Transport] = {n: MemoryTransport(broker, n) for n in spec.participants}
    return await _federation(
        spec, shards, versions, store, banks, MemoryTransport(broker, "fedq-aggregator")
    )


async def _stream(run: Run) -> list[bytes]:
    return [b async for b in run.transport.read_audit(run.task)]


async def _kept(run: Run) -> list[int]:
    r = run.store._r  # the store's own client: which blobs are there
    return [v for v in range(run.head + 1) if await r.exists(run.store.keys.blob(run.task, v))]


def _same(a: Tensors, b: Tensors) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _forged(body: bytes) -> bytes:
    """The same update re-encoded with one value changed (its content hash changes)."""
    env = decode_update(body)
    tensors = {k: v.clone() for k, v in env.tensors.items()}
    tensors[next(iter(tensors))].view(-1)[0] += 0.25
    forged, _ = encode_update(
        UpdateEnvelope(
            task=env.task,
            participant=env.participant,
            update_id=env.update_id,
            base_version=env.base_version,
            num_samples=env.num_samples,
            tensors=tensors,
            spec_hash=env.spec_hash,
        )
    )
    return forged


async def test_fedasync_every_pruned_version_rebuilds_bit_for_bit(tmp_path: Path) -> None:
    prep = prepare(SimulationConfig(participants=3))
    spec = prep.spec.model_copy(update={"async_": AsyncSettings(strategy="fedasync")})
    run = await _embedded(spec, prep.shards, 35)
    task, store = run.task, run.store
    assert await _kept(run) == sorted(
        {0, 10, 20, 30, run.head} | {v for v in [40] if v <= run.head}
    )
    bodies = await _stream(run)
    updates = index_updates(bodies)

    records = {r.version: r for r in await store.get_versions(task, range(1, run.head + 1))}
    kept = set(await _kept(run))
    for v in range(1, run.head + 1):
        rebuilt = await rebuild(store, task, v, updates)
        assert _same(rebuilt.params, run.committed[v]), v
        assert rebuilt.record == records[v]
        if v in kept:
            assert rebuilt.checkpoint == v and rebuilt.recomputed == 0
        else:
            # From a kept version, below every base an update after it mixed in.
            c = rebuilt.checkpoint
            assert c in kept and c < v
            bases = [e.base_version for u in range(c + 1, v + 1) for e in records[u].lineage]
            assert c <= min(bases) and c <= v - v % K
    # The audit stream itself (an async source) serves as well as its index.
    rebuilt = await rebuild(store, task, 25, run.transport.read_audit(task))
    assert _same(rebuilt.params, run.committed[25])

    # replay --verify from version 0, and from a pruned version (rebuilt first).
    report = await replay(store, updates, task)
    assert report.ok, report.reason
    assert report.checked == run.head
    window = await replay(store, updates, task, from_version=15, to_version=27)
    assert window.ok and window.checked == 12, window.reason
    # verify_chain trusts the recorded hash of a pruned version and says which.
    chain = await store.verify_chain(task)
    assert chain.ok
    assert chain.unverified_params == tuple(v for v in range(run.head + 1) if v not in kept)

    # Export of a pruned version writes the committed tensors; without the stream it
    # says what it needs.
    out = tmp_path / "v25.safetensors"
    meta = await export_version(store, task, 25, out, updates=updates)
    _, _, tensors = load_exported(out)
    assert _same(tensors, run.committed[25])
    assert meta["param_hash"] == records[25].param_hash.hex()
    with pytest.raises(FedqError, match="needs the retained updates"):
        await export_version(store, task, 25, tmp_path / "no.safetensors")


async def test_a_rebuild_fails_on_tampered_inputs_naming_the_version() -> None:
    prep = prepare(SimulationConfig(participants=3))
    spec = prep.spec.model_copy(update={"async_": AsyncSettings(strategy="fedasync")})
    run = await _embedded(spec, prep.shards, 30)
    task, store, r = run.task, run.store, run.store._r
    updates = index_updates(await _stream(run))
    assert _same((await rebuild(store, task, 27, updates)).params, run.committed[27])

    # A retained update altered (re-encoded with one value changed).
    victim = (await store.get_version(task, 24)).lineage[0]
    forged = {**updates, victim.update_id: _forged(updates[victim.update_id])}
    with pytest.raises(RebuildError, match=r"version 24: retained update .* differs") as err:
        await rebuild(store, task, 27, forged)
    assert err.value.bad_version == 24 and err.value.version == 27
    # One missing from the stream.
    missing = {k: v for k, v in updates.items() if k != victim.update_id}
    with pytest.raises(RebuildError, match="not in the audit stream"):
        await rebuild(store, task, 27, missing)
    # A lineage weight altered in the store.
    key = store.keys.lineage(task, 23)
    original = await r.get(key)
    lineage = json.loads(original or b"[]")
    lineage[0]["weight"] *= 1.001
    await r.set(key, json.dumps(lineage))
    with pytest.raises(RebuildError, match="version 23: replayed parameters differ") as err:
        await rebuild(store, task, 27, updates)
    assert err.value.bad_version == 23
    await r.set(key, original or b"")
    # A checkpoint's stored parameters altered.
    blob_key = store.keys.blob(task, 20)
    blob = await r.get(blob_key)
    assert isinstance(blob, bytes)
    flipped = bytearray(blob)
    flipped[-3] ^= 1
    await r.set(blob_key, bytes(flipped))
    with pytest.raises(RebuildError, match="version 20"):
        await rebuild(store, task, 27, updates)
    await r.set(blob_key, blob)
    assert _same((await rebuild(store, task, 27, updates)).params, run.committed[27])


async def test_fedbuff_with_server_momentum_rebuilds_parameters_and_state() -> None:
    prep = prepare(SimulationConfig(participants=3))
    server = ServerOptimizerSpec(kind="momentum", lr=0.5)
    spec = prep.spec.model_copy(
        update={"async_": AsyncSettings(strategy="fedbuff", buffer_size=2), "server": server}
    )
    run = await _embedded(spec, prep.shards, 13)
    task, store = run.task, run.store
    kept = await _kept(run)
    assert kept == sorted({0, 10, run.head})
    r = store._r
    states = [v for v in range(run.head + 1) if await r.exists(store.keys.state(task, v))]
    assert states == [v for v in kept if v > 0]  # version 0 has no optimizer state
    stream = await _stream(run)
    updates, answers = index_updates(stream), index_answers(stream)
    for v in range(1, run.head + 1):
        rebuilt = await rebuild(store, task, v, updates, answers=answers)
        assert _same(rebuilt.params, run.committed[v]), v
        assert rebuilt.state is not None
        assert rebuilt.state.digest() == rebuilt.record.state_hash
    report = await replay(store, updates, task)
    assert report.ok and report.checked == run.head, report.reason


# ------------------------------------------------------------------ real servers


@pytest.mark.real
async def test_replay_verify_and_export_on_the_real_servers(tmp_path: Path) -> None:
    prep = prepare(SimulationConfig(participants=3))
    task = f"ckpt{uuid.uuid4().hex[:10]}"
    spec = prep.spec.model_copy(
        update={"task_id": task, "async_": AsyncSettings(strategy="fedasync")}
    )
    client = aioredis.Redis.from_url(REDIS_URL)
    store = RedisModelStore(client, StoreConfig(checkpoint_every=K))
    aggregator = await AmqpTransport.connect(AMQP_URL, name="ckpt-aggregator")
    banks: dict[str, Transport] = {}
    try:
        for n in spec.participants:
            banks[n] = await AmqpTransport.connect(AMQP_URL, name=f"ckpt-{n}")
        run = await _federation(spec, prep.shards, 35, store, banks, aggregator)
        assert await _kept(run) == sorted({0, 10, 20, 30, run.head} | ({40} & {run.head}))
        urls = ["--amqp-url", AMQP_URL, "--redis-url", REDIS_URL]

        def cli(*args: str) -> tuple[int, str]:
            result = CliRunner().invoke(main, [*args, *urls])
            return result.exit_code, result.output

        code, output = await asyncio.to_thread(cli, "replay", "--task", task, "--verify")
        assert code == 0, output
        assert f"verified versions 1..{run.head}" in output
        out = tmp_path / "v25.safetensors"
        code, output = await asyncio.to_thread(
            cli, "export", "--task", task, "--version", "25", "--out", str(out)
        )
        assert code == 0, output
        _, _, tensors = load_exported(out)
        assert _same(tensors, run.committed[25])

        # A tampered lineage weight: export refuses on one line, naming the version.
        key = store.keys.lineage(task, 23)
        original = await client.get(key)
        lineage = json.loads(original or b"[]")
        lineage[0]["weight"] *= 1.001
        await client.set(key, json.dumps(lineage))
        code, output = await asyncio.to_thread(
            cli, "export", "--task", task, "--version", "25", "--out", str(tmp_path / "x.st")
        )
        assert code == 2
        assert "cannot rebuild" in output and "version 23" in output
        assert "Traceback" not in output
        await client.set(key, original or b"")
    finally:
        for t in (aggregator, *banks.values()):
            await t.close()
        await store.close()
        await forget_task(task, spec.participants)


@pytest.mark.real
async def test_simulate_keeps_the_checkpoints_it_is_given() -> None:
    result = await run_simulation(
        SimulationConfig(
            participants=2,
            versions=12,
            checkpoint_every=5,
            redis_url=REDIS_URL,
            seconds=60,
            baseline_epochs=2,
        )
    )
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = Keys()
        kept = [
            v for v in range(result.versions + 1) if await client.exists(keys.blob(result.task, v))
        ]
        assert kept == sorted({0, 5, 10, result.versions})
    finally:
        found = [k async for k in client.scan_iter(match=f"fedq:{{{result.task}}}:*")]
        if found:
            await client.delete(*found)
        await client.srem(keys.tasks(), result.task)
        await client.aclose()


def test_the_cli_refuses_a_checkpoint_interval_below_one() -> None:
    for args in (
        ["aggregator", "run", "--spec", "task.json", "--checkpoint-every", "0"],
        ["simulate", "--checkpoint-every", "-2"],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2
        assert "'--checkpoint-every': " in result.output
        assert "is not in the range x>=1" in result.output


async def test_a_restarted_service_rebuilds_a_pruned_base_for_a_stale_update() -> None:
    """After a restart the service holds only the head in memory: an update based on a
    version whose parameters were pruned is admitted on the base rebuilt from its
    checkpoint and the audit stream, and replay verifies the version it made."""
    prep = prepare(SimulationConfig(participants=3))
    spec = prep.spec.model_copy(update={"async_": AsyncSettings(strategy="fedasync")})
    run = await _embedded(spec, prep.shards, 35)
    task, store = run.task, run.store
    base = run.head - 2
    assert base % K and base not in await _kept(run)  # pruned
    service = AggregatorService(
        spec, store, run.transport, ServiceConfig(require_sender_match=False)
    )
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    async with asyncio.timeout(10):
        await service.ready.wait()
    assert list(service._bases) == [run.head]
    env = decode_update((await _stream(run))[-1])
    body, _ = encode_update(
        UpdateEnvelope(
            task=task,
            participant=env.participant,
            update_id=uuid.uuid4().hex,
            base_version=base,
            num_samples=env.num_samples,
            tensors=env.tensors,
            spec_hash=env.spec_hash,
        )
    )
    assert isinstance(run.transport, MemoryTransport)
    bank = MemoryTransport(run.transport.broker, env.participant)
    await bank.publish_update(task, env.participant, body, message_id="stale-on-pruned")
    async with asyncio.timeout(30):
        while service.head_version <= run.head:
            await asyncio.sleep(0.02)
    assert base in service._bases  # rebuilt: the store has no parameters of it
    stop.set()
    await running
    record = await store.get_version(task, run.head + 1)
    assert [e.base_version for e in record.lineage] == [base]
    report = await replay(store, index_updates(await _stream(run)), task)
    assert report.ok and report.checked == run.head + 1, report.reason
