"""Receipts: each bank learns the fate of every update it sent (issue 13, item 4).

A bank that sends updates refused for several reasons, and accepted ones, gets one
fate per update id: accepted + refused = sent, each naming the right version or reason;
a permanent refusal stops a worker; a forged receipt is counted and ignored.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import numpy as np
import pandas as pd
import pytest

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, StoreConfig
from common.errors import ParticipantStoppedError
from common.refusals import PERMANENT, Refusal
from common.signing import SigningKey
from common.spec import AsyncSettings, NumericFeature, TargetSpec, TaskSpec
from common.transport import Transport
from common.transport.amqp import AmqpTransport
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import (
    Receipt,
    accepted_receipt,
    decode_receipt,
    encode_receipt,
    refused_receipt,
)
from participant.receipts import ReceiptTracker
from participant.worker import ParticipantWorker, WorkerConfig
from tests.helpers import AMQP_URL, delete_queues, encoded_update, wait_for

BANKS = ("bank-a", "bank-b")


def _spec(**kw: object) -> TaskSpec:
    return TaskSpec.model_validate(
        {
            "task_id": f"rcpt{uuid.uuid4().hex[:8]}",
            "features": tuple(NumericFeature(name=f"x{i}") for i in range(3)),
            "target": TargetSpec(name="y"),
            "participants": BANKS,
            "declared_samples": {"bank-b": 10},
            "async": AsyncSettings.model_validate(
                {"max_staleness": 2, "staleness_unit": "versions"}
            ),
            **kw,
        }
    )


def _data(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    return pd.DataFrame(
        {"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2], "y": (x[:, 0] > 0).astype(int)}
    )


async def _start(
    spec: TaskSpec, agg: Transport, config: ServiceConfig | None = None
) -> tuple[AggregatorService, RedisModelStore, asyncio.Event, asyncio.Task[None]]:
    store = RedisModelStore(
        fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), StoreConfig(prefix="fedq")
    )
    service = AggregatorService(spec, store, agg, config or ServiceConfig(lease_ttl_s=5.0))
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    async with asyncio.timeout(30):
        await service.ready.wait()
    return service, store, stop, running


async def _stop(stop: asyncio.Event, running: asyncio.Task[None], store: RedisModelStore) -> None:
    stop.set()
    async with asyncio.timeout(30):
        await running
    await store.close()


class Sender:
    """A hand-driven bank: publishes what a test wants and tracks its receipts."""

    def __init__(self, spec: TaskSpec, transport: Transport, name: str = "bank-b") -> None:
        self.spec, self.transport, self.name = spec, transport, name
        self.stats = _Stats()
        self.tracker = ReceiptTracker(transport, spec.task_id, name, self.stats)
        self.sent: set[str] = set()

    async def publish(
        self, *, base: int, n: int = 10, named: str | None = None, uid: str | None = None
    ) -> str:
        uid, body = encoded_update(
            self.spec, base=base, participant=named or self.name, update_id=uid
        )
        if n != 10:  # re-encode with another sample count
            from common.wire import UpdateEnvelope, decode_update, encode_update

            env = decode_update(body)
            body, _ = encode_update(
                UpdateEnvelope(
                    task=env.task,
                    participant=env.participant,
                    update_id=uid,
                    base_version=base,
                    num_samples=n,
                    tensors=env.tensors,
                    spec_hash=env.spec_hash,
                )
            )
        await self.transport.publish_update(self.spec.task_id, self.name, body, message_id=uid)
        self._sent(uid)
        return uid

    async def publish_raw(self, body: bytes) -> str:
        uid = uuid.uuid4().hex
        await self.transport.publish_update(self.spec.task_id, self.name, body, message_id=uid)
        self._sent(uid)
        return uid

    def _sent(self, uid: str) -> None:
        if uid not in self.sent:
            self.sent.add(uid)
            self.stats.published += 1


@dataclass
class _Stats:
    published: int = 0
    published_ids: deque[str] = field(default_factory=deque)
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    receipts_bad_signature: int = 0


async def _accounting(spec: TaskSpec, agg: Transport, bank_b: Transport, bank_a: Transport) -> None:
    """bank-a runs a worker; bank-b sends accepted updates and refusals of six kinds."""
    service, store, stop, running = await _start(spec, agg)
    bank_stop = asyncio.Event()
    worker = ParticipantWorker(
        spec,
        WorkerConfig(participant="bank-a", max_updates=4, wait_for_model_s=0.2),
        bank_a,
        _data(60),
    )
    b = Sender(spec, bank_b)
    b.tracker.linked(bank_stop)
    try:
        working = asyncio.create_task(worker.run(bank_stop))
        expect: dict[str, str] = {}
        accepted = [await b.publish(base=service.head_version) for _ in range(2)]
        await wait_for(lambda: b.stats.accepted == 2, 30)
        # The same update again (a publish retried): its fate is still "accepted", once.
        await b.publish(base=0, uid=accepted[0])
        expect[await b.publish(base=service.head_version, n=11)] = Refusal.TOO_MANY_SAMPLES
        expect[await b.publish_raw(b"\x93not an envelope")] = Refusal.MALFORMED
        expect[await b.publish(base=service.head_version + 100)] = Refusal.FUTURE_BASE
        expect[await b.publish(base=service.head_version, named="bank-a")] = Refusal.SENDER_MISMATCH
        expect[await b.publish(base=service.head_version, named="mallory")] = (
            Refusal.UNKNOWN_PARTICIPANT
        )
        await wait_for(lambda: service.head_version >= 5, 60)
        expect[await b.publish(base=0)] = Refusal.TOO_STALE
        accepted.append(await b.publish(base=service.head_version))
        stats = await asyncio.wait_for(working, 60)
        await wait_for(lambda: b.tracker.counted == len(b.sent), 30)
        await asyncio.sleep(0.3)  # nothing more comes (a second receipt would be a bug)
    finally:
        bank_stop.set()
        await b.tracker.close()
        await _stop(stop, running, store)

    # bank-a: its worker's receipts account for every update it published.
    assert stats.published == 4
    assert stats.accepted + sum(stats.refused.values()) == stats.published
    # bank-b: one fate per update id sent, each the right one.
    assert b.stats.accepted + sum(b.stats.refused.values()) == len(b.sent) == 9
    assert b.stats.accepted == len(accepted) == 3
    fates = b.tracker.fates
    for uid, reason in expect.items():
        assert fates[uid].outcome == "refused", (uid, reason, fates[uid])
        assert fates[uid].reason == reason
    for uid in accepted:
        r = fates[uid]
        assert r.accepted and r.version >= 1 and r.weight > 0


async def test_every_update_has_one_fate_in_process() -> None:
    spec = _spec()
    broker = MemoryBroker()
    await _accounting(
        spec,
        MemoryTransport(broker, "fedq-aggregator"),
        MemoryTransport(broker, "bank-b"),
        MemoryTransport(broker, "bank-a"),
    )


async def test_accepted_receipts_name_the_version_and_weight_of_the_lineage() -> None:
    spec = _spec()
    broker = MemoryBroker()
    service, store, stop, running = await _start(spec, MemoryTransport(broker, "fedq-aggregator"))
    b = Sender(spec, MemoryTransport(broker, "bank-b"))
    quit_ = asyncio.Event()
    b.tracker.linked(quit_)
    try:
        ids = []
        for _ in range(3):
            ids.append(await b.publish(base=service.head_version))
            count = len(ids)
            await wait_for(lambda: b.stats.accepted == count, 30)  # noqa: B023
        applied = await store.applied_in(spec.task_id, ids)
        for uid in ids:
            record = await store.get_version(spec.task_id, applied[uid])
            (entry,) = [e for e in record.lineage if e.update_id == uid]
            r = b.tracker.fates[uid]
            assert (r.version, r.weight) == (applied[uid], entry.weight)
        assert service.receipts.sent == 3
        sent = service.metrics.receipts_sent.labels(spec.task_id, "accepted")._value.get()
        assert sent == 3
    finally:
        quit_.set()
        await b.tracker.close()
        await _stop(stop, running, store)


async def test_a_permanent_refusal_stops_the_worker_with_the_reason() -> None:
    assert Refusal.TOO_MANY_SAMPLES in PERMANENT and Refusal.TOO_STALE not in PERMANENT
    spec = _spec(declared_samples={"bank-a": 5})
    broker = MemoryBroker()
    _, store, stop, running = await _start(spec, MemoryTransport(broker, "fedq-aggregator"))
    worker = ParticipantWorker(
        spec,
        WorkerConfig(participant="bank-a", wait_for_model_s=0.2),
        MemoryTransport(broker, "bank-a"),
        _data(60),
    )
    try:
        with pytest.raises(ParticipantStoppedError, match="too_many_samples"):
            await asyncio.wait_for(worker.run(asyncio.Event()), 60)
        assert worker.stats.refused == {"too_many_samples": 1}
        assert worker.stats.published <= 2  # it stopped publishing
    finally:
        await _stop(stop, running, store)


async def test_a_forged_receipt_is_counted_and_ignored() -> None:
    real, forger = SigningKey.generate(), SigningKey.generate()
    task = "forge"
    broker = MemoryBroker()
    agg = MemoryTransport(broker, "fedq-aggregator")
    from common.transport import TaskTopology

    await agg.declare_task(TaskTopology(task, BANKS))
    stats = _Stats(published=2)
    tracker = ReceiptTracker(
        MemoryTransport(broker, "bank-a"), task, "bank-a", stats, key=real.public
    )
    now = time.time()
    good = accepted_receipt(task, "bank-a", "u1", 3, 0.5, now)
    lie = refused_receipt(task, "bank-a", "u2", "unknown_participant", "forged", now)
    for body in (
        encode_receipt(lie, forger),  # signed by another key
        encode_receipt(lie),  # unsigned
        encode_receipt(good, real),
        encode_receipt(good, real),  # at-least-once: the same receipt again
    ):
        await agg.publish_receipt(task, "bank-a", body, message_id="m")
    quit_ = asyncio.Event()
    tracker.linked(quit_)
    try:
        await wait_for(lambda: stats.accepted == 1 and stats.receipts_bad_signature == 2)
        await wait_for(lambda: tracker.duplicates == 1)
        assert stats.refused == {}
        assert tracker.stopped is None  # the forged permanent refusal stopped nothing
    finally:
        quit_.set()
        await tracker.close()


def test_receipt_round_trip_and_signature() -> None:
    key = SigningKey.generate()
    a = accepted_receipt("t", "bank-a", "u1", 7, 0.25, 1.5)
    r = refused_receipt("t", "bank-a", "u2", "too_stale", "x" * 5000, 2.5)
    da = decode_receipt(encode_receipt(a, key))
    dr = decode_receipt(encode_receipt(r))
    assert (da.version, da.weight, da.outcome) == (7, 0.25, "accepted")
    assert (dr.reason, len(dr.detail), dr.signature) == ("too_stale", 1024, None)
    from common.wire import verify_receipt

    assert verify_receipt(da, key.public)
    fields: dict[str, Any] = {s: getattr(da, s) for s in da.__slots__}
    tampered = Receipt(**{**fields, "version": 8})
    assert not verify_receipt(tampered, key.public)


@pytest.fixture
async def shared_broker() -> AsyncIterator[tuple[TaskSpec, list[AmqpTransport]]]:
    spec = _spec()
    conns = [
        await AmqpTransport.connect(AMQP_URL, name=f"receipts-{n}")
        for n in ("aggregator", "bank-b", "bank-a")
    ]
    try:
        yield spec, conns
    finally:
        for c in conns:
            await c.close()
        await delete_queues(spec.task_id, spec.participants)


@pytest.mark.real
async def test_every_update_has_one_fate_through_rabbitmq(
    shared_broker: tuple[TaskSpec, list[AmqpTransport]],
) -> None:
    """The same accounting through the shared RabbitMQ. Every connection logs in as
    guest, so the sender check is off and the receipt goes to the participant the
    envelope names; bank-b's sender_mismatch case then reads as bank-a's (left out)."""
    spec, (agg, bank_b, bank_a) = shared_broker
    service, store, stop, running = await _start(
        spec, agg, ServiceConfig(require_sender_match=False, lease_ttl_s=5.0)
    )
    bank_stop = asyncio.Event()
    worker = ParticipantWorker(
        spec,
        WorkerConfig(participant="bank-a", max_updates=3, wait_for_model_s=0.2),
        bank_a,
        _data(60),
    )
    b = Sender(spec, bank_b)
    b.tracker.linked(bank_stop)
    try:
        working = asyncio.create_task(worker.run(bank_stop))
        expect: dict[str, str] = {}
        accepted = [await b.publish(base=service.head_version) for _ in range(2)]
        await b.publish(base=0, uid=accepted[0])  # the same update again
        expect[await b.publish(base=service.head_version, n=11)] = Refusal.TOO_MANY_SAMPLES
        expect[await b.publish(base=service.head_version + 100)] = Refusal.FUTURE_BASE
        stats = await asyncio.wait_for(working, 60)
        await wait_for(lambda: service.head_version >= 5, 60)
        expect[await b.publish(base=0)] = Refusal.TOO_STALE
        await wait_for(lambda: b.tracker.counted == len(b.sent), 30)
    finally:
        bank_stop.set()
        await b.tracker.close()
        await _stop(stop, running, store)
    assert stats.accepted + sum(stats.refused.values()) == stats.published == 3
    assert b.stats.accepted + sum(b.stats.refused.values()) == len(b.sent) == 5
    assert {uid: b.tracker.fates[uid].reason for uid in expect} == expect
    assert all(b.tracker.fates[uid].accepted for uid in accepted)


def test_a_refusal_goes_only_to_the_broker_validated_sender_while_senders_are_checked() -> None:
    from aggregator.receipts import recipient

    banks = ("bank-a", "bank-b")
    assert recipient("bank-b", "bank-a", banks, sender_match=True) == "bank-b"
    # No user_id: the broker validated nobody; the envelope's name is not trusted.
    assert recipient(None, "bank-a", banks, sender_match=True) is None
    assert recipient("guest", "bank-a", banks, sender_match=True) is None
    # Sender check off (one shared broker user): the envelope's participant.
    assert recipient("guest", "bank-a", banks, sender_match=False) == "bank-a"
    assert recipient(None, "bank-z", banks, sender_match=False) is None


class _FlakyReceipts:
    """A transport whose receipt publishes fail as told: to see the sender retry,
    drop and keep several publishes in flight."""

    def __init__(self, fail_once: set[str], refuse: set[str]) -> None:
        self.fail_once, self.refuse = set(fail_once), set(refuse)
        self.sent: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def publish_receipt(
        self, task: str, participant: str, body: bytes, *, message_id: str
    ) -> None:
        from common.errors import PublishRefusedError, TransportError

        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)  # the confirm's round trip
            uid = message_id.rsplit("-", 1)[0]
            if uid in self.refuse:
                raise PublishRefusedError("no route", 312)
            if uid in self.fail_once:
                self.fail_once.discard(uid)
                raise TransportError("connection lost")
            self.sent.append(uid)
        finally:
            self.in_flight -= 1


async def test_receipt_sender_keeps_many_in_flight_retries_failures_and_drops_refusals() -> None:
    """Receipts go out many at once (one confirm wait per batch, not per receipt); one
    whose publish failed is sent again, before newer ones; one the broker refuses for
    good is dropped and counted, and the others still go out."""
    from aggregator.receipts import ReceiptSender
    from common.hashing import LineageEntry

    ids = [f"u{i:03d}" for i in range(100)]
    transport = _FlakyReceipts(fail_once={"u005", "u070"}, refuse={"u050"})
    sender = ReceiptSender(transport, "t", BANKS, retry_s=0.01)  # type: ignore[arg-type]
    sender.start()
    lineage = [LineageEntry(uid, "bank-a", 0, 0, 1.0, bytes(32)) for uid in ids]
    sender.accepted(lineage, 1)
    await sender.close()
    assert transport.most_in_flight > 1
    assert sorted(transport.sent) == sorted(set(ids) - {"u050"})  # each once
    assert (sender.sent, sender.dropped, sender.waiting) == (99, 1, 0)
    # The failed ones went out after their own batch, ahead of the next batch's.
    assert transport.sent.index("u005") < transport.sent.index("u064")
