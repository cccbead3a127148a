"""The aggregator service on the in-process and the real broker and store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import fakeredis
import pytest
import redis.asyncio as aioredis
import structlog
import torch

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, StoreConfig, VersionRecord
from aggregator.strategies import FedAsync
from common.errors import TransportError
from common.refusals import Refusal
from common.segments import Segments
from common.spec import TaskSpec
from common.transport import DeadLetter, Transport
from common.transport.amqp import AmqpTransport
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import Tensors, decode_model
from tests.helpers import AMQP_URL, REDIS_URL, delete_queues, encoded_update, service_spec, wait_for


@dataclass
class Rig:
    spec: TaskSpec
    store: RedisModelStore
    agg: Transport
    bank: Transport
    real: bool


@pytest.fixture(params=["memory", pytest.param("real", marks=pytest.mark.real)])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    spec = service_spec()
    prefix = f"fedqtest-{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        broker = MemoryBroker()
        client: aioredis.Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        rig = Rig(
            spec,
            RedisModelStore(client, StoreConfig(prefix=prefix)),
            MemoryTransport(broker, "fedq-aggregator"),
            MemoryTransport(broker, "bank-a"),
            False,
        )
    else:
        client = aioredis.Redis.from_url(REDIS_URL)
        rig = Rig(
            spec,
            RedisModelStore(client, StoreConfig(prefix=prefix)),
            await AmqpTransport.connect(AMQP_URL),
            await AmqpTransport.connect(AMQP_URL),
            True,
        )
    yield rig
    await rig.agg.close()
    await rig.bank.close()
    if rig.real:
        await delete_queues(spec.task_id, spec.participants)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    await rig.store.close()


async def _dead(rig: Rig, n: int) -> list[DeadLetter]:
    out: list[DeadLetter] = []
    async with asyncio.timeout(10):
        while len(out) < n:
            out += await rig.agg.dead_letters(rig.spec.task_id)
            await asyncio.sleep(0.05)
    return out


async def test_valid_updates_commit_and_refusals_are_dead_lettered(rig: Rig) -> None:
    spec = rig.spec
    service = AggregatorService(
        spec, rig.store, rig.agg, ServiceConfig(require_sender_match=not rig.real, depth_poll_s=0.2)
    )
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set())
    task = spec.task_id
    before = (await rig.store.get_params(task, 0)).tensors

    uid, good = encoded_update(spec, base=0)
    await rig.bank.publish_update(task, "bank-a", good, message_id=uid)
    await wait_for(lambda: service.head_version == 1)
    # Each of these must be refused with its reason, leaving the model as it is.
    bad = [
        b"\xc1 not msgpack",
        encoded_update(spec, base=0, participant="bank-z")[1],
        encoded_update(spec, base=9)[1],
        good,  # the same update again
        b"\x92\x01\x02",  # msgpack, but an array, not an envelope
    ]
    for i, body in enumerate(bad):
        await rig.bank.publish_update(task, "bank-a", body, message_id=f"bad-{i}")
    dead = await _dead(rig, len(bad))
    reasons = sorted(d.reason for d in dead)
    assert reasons == sorted(
        [
            Refusal.MALFORMED,
            Refusal.UNKNOWN_PARTICIPANT,
            Refusal.FUTURE_BASE,
            Refusal.DUPLICATE,
            Refusal.MALFORMED,
        ]
    )
    assert all(d.body in bad for d in dead)
    assert service.head_version == 1
    assert await rig.store.head(task) == 1
    assert service.stats.refused == {
        Refusal.MALFORMED: 2,
        Refusal.UNKNOWN_PARTICIPANT: 1,
        Refusal.FUTURE_BASE: 1,
        Refusal.DUPLICATE: 1,
    }
    metrics = service.metrics.render().decode()
    label = f'reason="{Refusal.DUPLICATE.value}",task="{task}"'
    assert f"fedq_updates_refused_total{{{label}}} 1.0" in metrics
    assert f'fedq_head_version{{task="{task}"}} 1.0' in metrics
    after = (await rig.store.get_params(task, 1)).tensors
    assert not all(torch.equal(after[k], before[k]) for k in after)
    health = await service.health()
    assert health["ok"] is True
    stop.set()
    await running
    assert (await service.health())["ok"] is False


async def test_too_stale_and_announcements(rig: Rig) -> None:
    spec = rig.spec
    task = spec.task_id
    service = AggregatorService(spec, rig.store, rig.agg, ServiceConfig(require_sender_match=False))
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set())
    models = await rig.bank.consume_models(task, "bank-a")
    first = await asyncio.wait_for(models.get(), 5)
    assert first.version == 0
    await first.ack()
    for v in range(5):
        uid, body = encoded_update(spec, base=v)
        await rig.bank.publish_update(task, "bank-a", body, message_id=uid)
        await wait_for(lambda: service.head_version == v + 1)  # noqa: B023
    # Staleness in rounds of the 2 banks: head 5, base 0: 5 versions = 2.5 rounds > max 2.
    uid, stale = encoded_update(spec, base=0)
    await rig.bank.publish_update(task, "bank-a", stale, message_id=uid)
    dead = await _dead(rig, 1)
    assert [d.reason for d in dead] == [Refusal.TOO_STALE]
    assert "2.5 rounds" in dead[0].detail
    latest = await asyncio.wait_for(models.get(), 5)
    while latest.version < 5:
        await latest.ack()
        latest = await asyncio.wait_for(models.get(), 5)
    env = decode_model(latest.body)
    record = await rig.store.get_version(task, 5)
    assert env.version == 5
    assert env.version_hash == record.version_hash
    await latest.ack()
    await models.close()
    stop.set()
    await running


async def test_sender_must_match_participant() -> None:
    broker = MemoryBroker()
    spec = service_spec()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    agg = MemoryTransport(broker, "fedq-aggregator")
    service = AggregatorService(spec, store, agg)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set())
    impostor = MemoryTransport(broker, "bank-b")  # bank-b's credentials, claims to be bank-a
    uid, body = encoded_update(spec, base=0, participant="bank-a")
    await impostor.publish_update(spec.task_id, "bank-a", body, message_id=uid)
    dead: list[DeadLetter] = []
    async with asyncio.timeout(5):
        while not dead:
            dead = await agg.dead_letters(spec.task_id)
            await asyncio.sleep(0.02)
    assert dead[0].reason == "sender_mismatch"
    assert service.head_version == 0
    stop.set()
    await running


async def test_fedbuff_acks_only_after_commit_and_returns_buffer_on_stop() -> None:
    broker = MemoryBroker()
    spec = service_spec(strategy="fedbuff", buffer_size=3)
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    agg = MemoryTransport(broker, "fedq-aggregator")
    bank = MemoryTransport(broker, "bank-a")
    service = AggregatorService(spec, store, agg)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set())
    for _ in range(5):
        uid, body = encoded_update(spec, base=0)
        await bank.publish_update(spec.task_id, "bank-a", body, message_id=uid)
    await wait_for(lambda: service.head_version == 1 and service.unacked == 2)
    assert len((await store.get_version(spec.task_id, 1)).lineage) == 3
    stop.set()
    await running
    # The two buffered updates were never acked: they are back in the queue.
    assert await agg.queue_depth(spec.task_id) == 2
    # A new aggregator picks them up (and one more makes a full buffer).
    service2 = AggregatorService(spec, store, MemoryTransport(broker, "fedq-aggregator"))
    stop2 = asyncio.Event()
    running2 = asyncio.create_task(service2.run(stop2))
    uid, body = encoded_update(spec, base=1)
    await wait_for(lambda: service2.ready.is_set())
    await bank.publish_update(spec.task_id, "bank-a", body, message_id=uid)
    await wait_for(lambda: service2.head_version == 2)
    assert len((await store.get_version(spec.task_id, 2)).lineage) == 3
    stop2.set()
    await running2


class FakeDelivery:
    """A delivery handed straight to ``handle``: records how it was settled."""

    def __init__(self, body: bytes, user_id: str = "bank-a") -> None:
        self.body, self.user_id, self.message_id, self.redelivered = body, user_id, None, False
        self.live = True
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def dead_letter(self, reason: str, detail: str = "") -> None:
        self.settled.append(f"dead:{reason}")


async def _prepared(spec: TaskSpec, transport: Transport | None = None) -> AggregatorService:
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    service = AggregatorService(spec, store, transport or MemoryTransport(MemoryBroker(), "agg"))
    await service.prepare()
    return service


async def test_a_redelivered_buffered_update_is_kept_not_refused() -> None:
    spec = service_spec(strategy="fedbuff", buffer_size=2)
    service = await _prepared(spec)
    uid, body = encoded_update(spec, base=0)
    first, again = FakeDelivery(body), FakeDelivery(body)
    await service.handle(first)
    first.live = False  # the broker lost the channel and redelivered it
    await service.handle(again)
    assert first.settled == [] and again.settled == []
    _, other = encoded_update(spec, base=0, participant="bank-b")
    third = FakeDelivery(other, user_id="bank-b")
    await service.handle(third)
    assert service.head_version == 1
    lineage = (await service.store.get_version(spec.task_id, 1)).lineage
    assert next(e.update_id for e in lineage) == uid
    assert again.settled == ["ack"]  # the live delivery is the one acked
    assert third.settled == ["ack"]
    assert service.stats.refused == {}


async def test_prefetch_is_raised_above_the_buffer() -> None:
    spec = service_spec(strategy="fedbuff", buffer_size=5)
    broker = MemoryBroker()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    service = AggregatorService(
        spec, store, MemoryTransport(broker, "agg"), ServiceConfig(prefetch=3)
    )
    assert service.prefetch == 6
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set())
    bank = MemoryTransport(broker, "bank-a")
    for _ in range(5):
        uid, body = encoded_update(spec, base=0)
        await bank.publish_update(spec.task_id, "bank-a", body, message_id=uid)
    await wait_for(lambda: service.head_version == 1)
    stop.set()
    await running


async def test_a_decoder_failure_is_refused_and_the_service_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = service_spec()
    service = await _prepared(spec)

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("aggregator.admission.decode_update", broken)
    d = FakeDelivery(b"anything")
    await service.handle(d)
    assert d.settled == ["dead:malformed"]
    monkeypatch.undo()
    _, body = encoded_update(spec, base=0)
    ok = FakeDelivery(body)
    await service.handle(ok)
    assert ok.settled == ["ack"]
    assert service.head_version == 1


class FlakyAnnouncer(MemoryTransport):
    """Announcements fail a number of times first (a broker hiccup)."""

    failures = 2

    async def announce_model(
        self,
        task: str,
        version: int,
        body: bytes | Segments,
        *,
        fence: int | None = None,
        version_hash: bytes | None = None,
    ) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise TransportError("broker unavailable")
        await super().announce_model(task, version, body, fence=fence, version_hash=version_hash)


async def test_a_failed_announcement_is_retried() -> None:
    spec = service_spec()
    broker = MemoryBroker()
    agg = FlakyAnnouncer(broker, "agg")
    agg.failures = 0
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    service = AggregatorService(spec, store, agg)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set())
    agg.failures = 2
    bank = MemoryTransport(broker, "bank-a")
    models = await bank.consume_models(spec.task_id, "bank-a")
    first = await models.get()
    assert first.version == 0
    await first.ack()
    uid, body = encoded_update(spec, base=0)
    await bank.publish_update(spec.task_id, "bank-a", body, message_id=uid)
    async with asyncio.timeout(10):
        latest = await models.get()
    assert latest.version == 1
    assert agg.failures == 0
    stop.set()
    await running


async def test_every_line_about_an_update_carries_its_context() -> None:
    """The context is bound with structlog's contextvars while the update is handled
    (what common.logging's merge_contextvars adds to every line), and unbound after."""
    spec = service_spec()
    service = await _prepared(spec)
    uid, body = encoded_update(spec, base=0)
    seen: list[dict[str, object]] = []

    async def on_version(record: VersionRecord, params: Tensors) -> None:
        seen.append(dict(structlog.contextvars.get_contextvars()))

    service.on_version = on_version
    before = dict(structlog.contextvars.get_contextvars())
    await service.handle(FakeDelivery(body))
    assert seen == [{**before, "update_id": uid, "participant": "bank-a", "version": 1}]
    assert structlog.contextvars.get_contextvars() == before


async def _feed(service: AggregatorService, spec: TaskSpec, senders: str) -> None:
    """One update per letter (a: bank-a, b: bank-b), each trained on the current head."""
    for who in senders:
        bank = f"bank-{who}"
        _, body = encoded_update(spec, base=service.head_version, participant=bank)
        await service.handle(FakeDelivery(body, bank))


@pytest.mark.parametrize("batch", [256, 3])
async def test_a_restarted_service_weighs_as_one_that_never_stopped(
    batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The state is read back RESTORE_BATCH versions per round trip: 3 crosses batches.
    monkeypatch.setattr("aggregator.service.RESTORE_BATCH", batch)
    spec = service_spec(strategy="fedasync", weighting="balanced", balance_window=8)
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    service = AggregatorService(spec, store, MemoryTransport(MemoryBroker(), "agg"))
    await service.prepare()
    await _feed(service, spec, "aaaaabaaaaab")
    assert service.head_version == 12
    before = service.strategy
    assert isinstance(before, FedAsync)
    restarted = AggregatorService(spec, store, MemoryTransport(MemoryBroker(), "agg"))
    await restarted.prepare()
    after = restarted.strategy
    assert isinstance(after, FedAsync)
    assert after.weighter.recent() == before.weighter.recent()
    assert len(after.weighter.recent()) == 8
    # bank-b sends a fifth as often: its next update is boosted, by the same factor.
    factor = before.weighter.factor("bank-b", 10)
    assert factor > 1.5
    await _feed(restarted, spec, "b")
    (entry,) = (await store.get_version(spec.task_id, 13)).lineage
    assert entry.weight == before.mixing_weight(0, factor)
    # The stats' recent weights were restored as well.
    assert restarted.stats.banks["bank-a"].weight_share > 0.0


async def test_a_bank_whose_weight_is_negligible_is_flagged_in_health_and_metrics() -> None:
    # bank-b holds 90% of the rows but sends rarely; weighting by staleness alone
    # gives it about a tenth of the weight: below a tenth of its data share -> flagged.
    base = service_spec(strategy="fedasync", weighting="staleness")
    spec = TaskSpec.model_validate(
        {**base.model_dump(by_alias=True), "declared_samples": {"bank-a": 100, "bank-b": 900}}
    )
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    service = AggregatorService(
        spec, store, MemoryTransport(MemoryBroker(), "agg"), ServiceConfig(flag_after=2)
    )
    await service.prepare()
    await _feed(service, spec, "b" + "a" * 12 + "b" + "a" * 12)
    health = await service.health()
    assert health["flagged"] == ["bank-b"]
    assert health["flag_reasons"] == {"bank-b": ["low_weight"]}
    assert service.stats.banks["bank-b"].as_dict()["low_weight"] is True
    metrics = service.metrics.render().decode()
    label = f'participant="bank-b",task="{spec.task_id}"'
    assert f"fedq_participant_low_weight{{{label}}} 1.0" in metrics
    assert f"fedq_participant_flagged{{{label}}} 1.0" in metrics
    assert f"fedq_participant_weight_share{{{label}}}" in metrics
