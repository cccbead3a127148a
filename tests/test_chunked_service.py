"""The aggregator service with chunked updates and models (docs/chunking.md).

The transports split every body over a small chunk size, so that ordinary small-model
updates and announcements travel as chunk sets: they are accepted and committed, the
announcements reach the participants whole, refusals and incomplete sets are reported
with their reasons, and replay from the audit stream reproduces every version.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import fakeredis
import pytest
import redis.asyncio as aioredis
import torch

from aggregator.audit.replay import index_updates, replay
from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, StoreConfig
from common.chunks import MAGIC, ChunkLimits, split
from common.models import build_task_model, model_tensors
from common.refusals import Refusal
from common.spec import AsyncSettings, ModelSpec, NumericFeature, TargetSpec, TaskSpec
from common.transport import Chunking, DeadLetter, Transport
from common.transport.amqp import AmqpTransport
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import UpdateEnvelope, decode_model, decode_receipt, encode_update
from fedq.simulate import SimulationConfig, prepare
from participant.worker import ParticipantWorker, WorkerConfig
from tests.helpers import AMQP_URL, REDIS_URL, delete_queues, wait_for

#: 2 KiB chunks: an update of this module's model (about 6.5 KB) is four chunk messages.
CHUNKING = Chunking(chunk_size=2048, limits=ChunkLimits(timeout_s=1.0))


def _update(spec: TaskSpec, *, base: int, seed: int) -> tuple[str, bytes]:
    """An update of random values (incompressible: its body is as large as its model)."""
    g = torch.Generator().manual_seed(seed)
    delta = {
        k: torch.randn(v.shape, generator=g) * 0.01
        for k, v in model_tensors(build_task_model(spec)).items()
    }
    uid = uuid.uuid4().hex
    body, _ = encode_update(
        UpdateEnvelope(
            task=spec.task_id,
            participant="bank-a",
            update_id=uid,
            base_version=base,
            num_samples=10,
            tensors=delta,
            spec_hash=spec.spec_hash(),
        )
    )
    return uid, body


def _spec(**async_kw: object) -> TaskSpec:
    return TaskSpec(
        task_id=f"chk{uuid.uuid4().hex[:10]}",
        model=ModelSpec(kind="mlp", hidden=(64, 16)),
        features=tuple(NumericFeature(name=f"x{i}") for i in range(8)),
        target=TargetSpec(name="y"),
        participants=("bank-a", "bank-b"),
        **{"async": AsyncSettings.model_validate({"max_staleness": 50, **async_kw})},
    )


@dataclass
class Rig:
    spec: TaskSpec
    store: RedisModelStore
    agg: Transport
    bank: Transport
    real: bool


@pytest.fixture(params=["memory", pytest.param("real", marks=pytest.mark.real)])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    spec = _spec(strategy="fedbuff", buffer_size=2)
    if request.param == "memory":
        broker = MemoryBroker()
        client: aioredis.Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        agg: Transport = MemoryTransport(broker, "fedq-aggregator", chunking=CHUNKING)
        bank: Transport = MemoryTransport(broker, "bank-a", chunking=CHUNKING)
    else:
        client = aioredis.Redis.from_url(REDIS_URL)
        agg = await AmqpTransport.connect(AMQP_URL, name="chunked-agg", chunking=CHUNKING)
        bank = await AmqpTransport.connect(AMQP_URL, name="chunked-bank", chunking=CHUNKING)
    prefix = f"fedqtest-{uuid.uuid4().hex[:8]}"
    rig = Rig(spec, RedisModelStore(client, StoreConfig(prefix=prefix)), agg, bank, False)
    rig.real = request.param == "real"
    yield rig
    await agg.close()
    await bank.close()
    if rig.real:
        await delete_queues(spec.task_id, spec.participants)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    await rig.store.close()


async def _dead(agg: Transport, task: str, n: int) -> list[DeadLetter]:
    out: list[DeadLetter] = []
    async with asyncio.timeout(10):
        while len(out) < n:
            out += await agg.dead_letters(task)
            if len(out) < n:
                await asyncio.sleep(0.05)
    return out


async def test_chunked_updates_commit_and_chunked_models_arrive(rig: Rig) -> None:
    spec, task = rig.spec, rig.spec.task_id
    # On the shared broker every bank logs in as guest: no sender check there.
    config = ServiceConfig(require_sender_match=not rig.real, reannounce_s=None)
    service = AggregatorService(spec, rig.store, rig.agg, config)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set())
    models = await rig.bank.consume_models(task, "bank-a")
    receipts = await rig.bank.consume_receipts(task, "bank-a")

    ids: list[str] = []
    for version in range(3):
        for seed in range(2):  # fedbuff of two: both held unacked until the commit
            uid, body = _update(spec, base=version, seed=10 * version + seed)
            assert len(body) > 2 * CHUNKING.chunk_size  # three or more chunk messages
            await rig.bank.publish_update(task, "bank-a", body, message_id=uid)
            ids.append(uid)
        await wait_for(lambda v=version: service.head_version == v + 1)  # type: ignore[misc]

    # The newest announcement arrives whole (and was chunked: its body is over 2 KiB).
    async with asyncio.timeout(10):
        while True:
            model = await models.get()
            await model.ack()
            if model.version == 3:
                break
    assert len(model.body) > CHUNKING.chunk_size
    env = decode_model(model.body)
    assert env.version == 3
    assert env.version_hash == (await rig.store.get_version(task, 3)).version_hash
    last = await rig.agg.last_announcement(task)
    assert last is not None and last.version == 3

    # An update cut short (its last chunk never sent) is refused once its timeout passes.
    uid, body = _update(spec, base=3, seed=99)
    pieces = list(split(body, id=uid, chunk_size=CHUNKING.chunk_size))
    assert isinstance(rig.bank, MemoryTransport | AmqpTransport)
    for piece in pieces[:-1]:
        await rig.bank.publish_raw(task, "bank-a", piece, message_id=uid)
    dead = await _dead(rig.agg, task, len(pieces) - 1)
    assert {d.reason for d in dead} == {Refusal.CHUNKS_INCOMPLETE.value}
    assert sorted(d.body for d in dead) == sorted(pieces[:-1])
    decisions = await rig.store.decisions(task)
    assert any(d.get("reason") == Refusal.CHUNKS_INCOMPLETE.value for d in decisions)

    # Its bank hears of it, as it hears of the accepted ones (a receipt goes to the
    # broker user that sent it: on the shared broker that is guest, no participant).
    expected = dict.fromkeys(ids, "accepted")
    if not rig.real:
        expected[uid] = Refusal.CHUNKS_INCOMPLETE.value
    fates: dict[str, str] = {}
    async with asyncio.timeout(10):
        while len(fates) < len(expected):
            r = await receipts.get()
            await r.ack()
            receipt = decode_receipt(r.body)
            fates[receipt.update_id] = receipt.reason or receipt.outcome
    assert fates == expected
    assert service.head_version == 3
    assert await rig.agg.queue_depth(task) == 0

    stop.set()
    await running
    await models.close()
    await receipts.close()

    # Replay from the audit stream (chunk messages reassembled) reproduces every version.
    updates = index_updates([b async for b in rig.agg.read_audit(task, idle_s=0.5)])
    assert set(ids) <= set(updates)
    assert uid not in updates  # never whole
    report = await replay(rig.store, updates, task)
    assert report.ok, report.reason
    assert report.checked == 3


async def test_an_embedded_federation_of_chunked_bodies_replays_bit_for_bit() -> None:
    """Real participant workers: chunked models in, chunked updates out."""
    prep = prepare(SimulationConfig(participants=3))
    spec = prep.spec.model_copy(update={"model": ModelSpec(kind="mlp", hidden=(32,))})
    broker = MemoryBroker()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    agg = MemoryTransport(broker, "fedq-aggregator", chunking=CHUNKING)
    service = AggregatorService(spec, store, agg)
    stop, bank_stop = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    workers = [
        asyncio.create_task(
            ParticipantWorker(
                spec,
                WorkerConfig(participant=n, seed=i, delay_s=0.005, wait_for_model_s=0.2),
                MemoryTransport(broker, n, chunking=CHUNKING),
                prep.shards[n],
            ).run(bank_stop)
        )
        for i, n in enumerate(spec.participants)
    ]
    async with asyncio.timeout(60):
        while service.head_version < 6:
            await asyncio.sleep(0.01)
    bank_stop.set()
    await asyncio.gather(*workers)
    stop.set()
    await running
    task = spec.task_id
    audit = broker.task(task).audit
    assert sum(body.startswith(MAGIC) for body, _ in audit) >= 2 * 6  # chunks, not whole
    models = broker.task(task).models.entries
    assert all(msg.body.startswith(MAGIC) for _, msg in models)  # announcements chunked too
    updates = index_updates([b async for b in agg.read_audit(task)])
    report = await replay(store, updates, task)
    assert report.ok, report.reason
    assert report.checked == await store.head(task)
    assert report.checked >= 6


def test_a_task_larger_than_the_default_body_limit_gets_chunking_and_retention_for_it() -> None:
    """A model over 64 MiB (17M parameters, 68 MB in float32): the CLI's transports
    reassemble bodies of its size (twice it under secure aggregation's i64 masks), and
    the service keeps four of its models in the model stream; a small model keeps the
    defaults (its topology unchanged)."""
    import fakeredis

    from aggregator.service import MODELS_MAX_BYTES, AggregatorService, ServiceConfig
    from aggregator.store import RedisModelStore, StoreConfig
    from common.chunks import DEFAULT_MAX_TOTAL
    from common.spec import ModelSpec, NumericFeature, TargetSpec, TaskSpec
    from common.transport import TaskTopology
    from common.transport.memory import MemoryBroker, MemoryTransport
    from fedq.services import chunking_for

    def spec(hidden: tuple[int, ...]) -> TaskSpec:
        return TaskSpec(
            task_id="big",
            features=tuple(NumericFeature(name=f"x{i}") for i in range(20)),
            target=TargetSpec(name="y"),
            model=ModelSpec(kind="mlp", hidden=hidden),
        )

    big, small = spec((4096, 4096)), spec((8,))
    raw = (20 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 + 1) * 4
    assert raw > DEFAULT_MAX_TOTAL
    assert chunking_for(big).limits.max_total >= raw + raw // 64
    assert chunking_for(small).limits.max_total == DEFAULT_MAX_TOTAL
    assert TaskTopology("t").models_max_bytes == MODELS_MAX_BYTES

    def service(s: TaskSpec) -> AggregatorService:
        store = RedisModelStore(fakeredis.FakeAsyncRedis(), StoreConfig(prefix="chunkbig"))
        return AggregatorService(s, store, MemoryTransport(MemoryBroker(), "agg"), ServiceConfig())

    assert service(big)._models_max_bytes == 4 * raw
    assert service(small)._models_max_bytes == MODELS_MAX_BYTES


def _at_version(service: AggregatorService, version: int) -> bool:
    return service.head_version == version


@pytest.mark.parametrize("kind", ["memory", pytest.param("real", marks=pytest.mark.real)])
async def test_a_copy_whose_buffer_became_a_version_is_dead_lettered_intact(kind: str) -> None:
    """A chunked update's tensors are views into its reassembled buffer, and FedAsync
    writes the new version over them (``AcceptedUpdate.spare``). A bank re-sends an old
    update id on a newer base beyond the ids kept in memory: the commit script refuses
    the group after the step. The copy is not dead-lettered from its buffer (the AMQP
    transport rebuilds dead letters from it): it goes back to the queue, comes again
    and is refused as a duplicate with the bytes the bank sent."""
    spec = TaskSpec(
        task_id=f"chk{uuid.uuid4().hex[:10]}",
        model=ModelSpec(kind="mlp", hidden=(8192,)),  # a 96 KiB weight: decoded as a view
        features=tuple(NumericFeature(name=f"x{i}") for i in range(3)),
        target=TargetSpec(name="y"),
        participants=("bank-a", "bank-b"),
        **{"async": AsyncSettings.model_validate({"max_staleness": 50})},
    )
    chunking = Chunking(chunk_size=32 * 1024)
    prefix = f"fedqtest-{uuid.uuid4().hex[:8]}"
    if kind == "memory":
        broker = MemoryBroker()
        client: aioredis.Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        agg: Transport = MemoryTransport(broker, "fedq-aggregator", chunking=chunking)
        bank: Transport = MemoryTransport(broker, "bank-a", chunking=chunking)
    else:
        client = aioredis.Redis.from_url(REDIS_URL)
        agg = await AmqpTransport.connect(AMQP_URL, name="spare-agg", chunking=chunking)
        bank = await AmqpTransport.connect(AMQP_URL, name="spare-bank", chunking=chunking)
    store = RedisModelStore(client, StoreConfig(prefix=prefix))
    service = AggregatorService(
        spec, store, agg, ServiceConfig(applied_memory=1, require_sender_match=False)
    )
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    task = spec.task_id

    def body(uid: str, base: int, seed: int) -> bytes:
        g = torch.Generator().manual_seed(seed)
        delta = {
            k: torch.randn(v.shape, generator=g) * 0.01
            for k, v in model_tensors(build_task_model(spec)).items()
        }
        out, _ = encode_update(
            UpdateEnvelope(
                task=task,
                participant="bank-a",
                update_id=uid,
                base_version=base,
                num_samples=10,
                tensors=delta,
                spec_hash=spec.spec_hash(),
                codec="raw",  # what a worker sends by default: views into the buffer
            )
        )
        return out

    try:
        await wait_for(lambda: service.ready.is_set(), 30)
        for i in range(3):
            await bank.publish_update(task, "bank-a", body(f"old{i}", i, i), message_id=f"o{i}")
            await wait_for(functools.partial(_at_version, service, i + 1), 30)
        assert service._applied.get("old0") is None  # only the newest version's ids
        replayed = body("old0", 3, 50)
        await bank.publish_update(task, "bank-a", replayed, message_id="again")
        await bank.publish_update(task, "bank-a", body("new1", 3, 51), message_id="new1")
        await wait_for(lambda: service.head_version == 4, 30)
        dead = await _dead(agg, task, 1)
        assert [(d.reason, d.detail) for d in dead] == [
            (Refusal.DUPLICATE.value, "already applied in version 1")
        ]
        assert dead[0].body == replayed  # the bytes the bank sent, not a version
        assert (await store.applied_in(task, ["old0", "new1"])) == {"old0": 1, "new1": 4}
    finally:
        stop.set()
        await running
        await agg.close()
        await bank.close()
        if kind == "real":
            await delete_queues(task, spec.participants)
            keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
            if keys:
                await client.delete(*keys)
        await store.close()
