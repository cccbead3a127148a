"""The transport contract, run against the in-process broker and the real RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage

from common.chunks import MAGIC, ChunkLimits, split
from common.errors import PublishRefusedError, TransportError
from common.refusals import Refusal
from common.transport import (
    Chunking,
    DeadLetter,
    TaskTopology,
    Transport,
    UpdateDelivery,
    UpdateSubscription,
    refusal_of,
)
from common.transport.amqp import AmqpTransport
from common.transport.memory import MemoryBroker, MemoryTransport
from common.transport.names import audit_stream, model_queue, model_stream
from tests.helpers import AMQP_URL, delete_queues

T = TypeVar("T")


@dataclass
class Pair:
    """An aggregator-side and a participant-side connection, and a fresh task."""

    agg: Transport
    bank: Transport
    task: str
    participants: tuple[str, ...] = ("bank-a", "bank-b")

    def topology(self, delivery_limit: int = 5) -> TaskTopology:
        return TaskTopology(self.task, self.participants, delivery_limit=delivery_limit)


@contextlib.asynccontextmanager
async def _pair(kind: str, chunking: Chunking | None = None) -> AsyncIterator[Pair]:
    task = f"t{uuid.uuid4().hex[:10]}"
    if kind == "memory":
        broker = MemoryBroker()
        p = Pair(
            MemoryTransport(broker, "fedq-aggregator", chunking=chunking),
            MemoryTransport(broker, "guest", chunking=chunking),
            task,
        )
        yield p
    else:
        try:
            agg = await AmqpTransport.connect(
                AMQP_URL, name="test-aggregator", publish_timeout=1.0, chunking=chunking
            )
            bank = await AmqpTransport.connect(
                AMQP_URL, name="test-bank", publish_timeout=1.0, chunking=chunking
            )
        except TransportError as e:
            pytest.fail(f"real RabbitMQ at {AMQP_URL} does not answer ({e}); see .ci/run")
        p = Pair(agg, bank, task)
        try:
            yield p
        finally:
            await delete_queues(task, p.participants)
    await p.agg.close()
    await p.bank.close()


@pytest.fixture(params=["memory", pytest.param("real", marks=pytest.mark.real)])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    async with _pair(request.param) as p:
        yield p


#: Small chunks and a short timeout, so that chunk sets are cheap to make and to expire.
CHUNKING = Chunking(chunk_size=1024, limits=ChunkLimits(timeout_s=1.0))


@pytest.fixture(params=["memory", pytest.param("real", marks=pytest.mark.real)])
async def chunked(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    """A pair whose transports split bodies over 1 KiB (docs/chunking.md)."""
    async with _pair(request.param, CHUNKING) as p:
        yield p


async def _within(aw: Awaitable[T], seconds: float = 5.0) -> T:
    async with asyncio.timeout(seconds):
        return await aw


async def _ready(sub: UpdateSubscription, count: int) -> list[UpdateDelivery]:
    """``count`` deliveries from ``sub.ready``, polling until the client has them."""
    got: list[UpdateDelivery] = []
    async with asyncio.timeout(5):
        while True:
            got += sub.ready(count - len(got))
            if len(got) >= count:
                return got
            await asyncio.sleep(0.02)


async def _spy_acks(sub: UpdateSubscription) -> list[tuple[int, bool]] | None:
    """The basic.ack frames ``sub`` sends from now on, as (delivery tag, multiple);
    None on the in-process broker (it has no frames)."""
    channel = getattr(sub, "_channel", None)
    if channel is None:
        return None
    raw = await channel.get_underlay_channel()
    sent: list[tuple[int, bool]] = []
    send = raw.basic_ack

    async def spy(delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        sent.append((delivery_tag, multiple))
        await send(delivery_tag, multiple=multiple, wait=wait)

    raw.basic_ack = spy
    return sent


async def _stream_length(pair: Pair) -> int:
    """Messages the task's model stream has taken so far (its next offset)."""
    if isinstance(pair.agg, MemoryTransport):
        return pair.agg.broker.task(pair.task).models.next_offset
    conn = await aio_pika.connect(AMQP_URL)
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=10)
        stream = await channel.get_queue(model_stream(pair.task), ensure=True)
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        await stream.consume(inbox.put, arguments={"x-stream-offset": "last"})
        offset: object = -1
        with contextlib.suppress(TimeoutError):
            while True:
                msg = await _within(inbox.get(), 0.5)
                offset = (msg.headers or {})["x-stream-offset"]
                await msg.ack()
        assert isinstance(offset, int)
        return offset + 1
    finally:
        await conn.close()


async def _queue_exists(name: str) -> bool:
    conn = await aio_pika.connect(AMQP_URL)
    try:
        channel = await conn.channel()
        try:
            await channel.get_queue(name, ensure=True)  # a passive declare
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True
    finally:
        await conn.close()


class TestTransport:
    async def test_published_update_reaches_the_aggregator_with_identity(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        await pair.agg.declare_task(pair.topology())  # idempotent
        await pair.bank.publish_update(pair.task, "bank-a", b"update-1", message_id="u1")
        sub = await pair.agg.consume_updates(pair.task, prefetch=4)
        d = await _within(sub.get())
        assert d.body == b"update-1"
        assert d.message_id == "u1"
        assert d.user_id == "guest"
        assert d.redelivered is False
        await d.ack()
        await sub.close()
        assert await pair.agg.queue_depth(pair.task) == 0

    async def test_unacked_updates_return_when_the_consumer_goes(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        for i in range(3):
            await pair.bank.publish_update(
                pair.task, "bank-a", f"m{i}".encode(), message_id=f"u{i}"
            )
        sub = await pair.agg.consume_updates(pair.task, prefetch=10)
        first = [await _within(sub.get()) for _ in range(3)]
        assert [d.body for d in first] == [b"m0", b"m1", b"m2"]
        await first[0].ack()
        await sub.close()  # m1, m2 were never acked
        sub = await pair.agg.consume_updates(pair.task, prefetch=10)
        again = [await _within(sub.get()) for _ in range(2)]
        assert sorted(bytes(d.body) for d in again) == [b"m1", b"m2"]
        assert all(d.redelivered for d in again)
        for d in again:
            await d.ack()
        await sub.close()

    async def test_prefetch_bounds_unacked_deliveries(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        for i in range(5):
            await pair.bank.publish_update(pair.task, "bank-a", b"x", message_id=f"u{i}")
        sub = await pair.agg.consume_updates(pair.task, prefetch=2)
        a, b = await _within(sub.get()), await _within(sub.get())
        with pytest.raises(TimeoutError):
            await _within(sub.get(), 0.5)
        await a.ack()
        c = await _within(sub.get())
        for d in (b, c):
            await d.ack()
        await sub.close()

    async def test_dead_letter_keeps_body_and_reason(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        await pair.bank.publish_update(pair.task, "bank-a", b"\xc1bad", message_id="u-bad")
        sub = await pair.agg.consume_updates(pair.task, prefetch=1)
        d = await _within(sub.get())
        await d.dead_letter("malformed", "not a msgpack document")
        await sub.close()
        dead: list[DeadLetter] = []
        for _ in range(50):
            dead += await pair.agg.dead_letters(pair.task)
            if dead:
                break
            await asyncio.sleep(0.1)
        assert len(dead) == 1
        letter = dead[0]
        assert letter.body == b"\xc1bad"
        assert letter.reason == "malformed"
        assert letter.detail == "not a msgpack document"
        assert await pair.agg.queue_depth(pair.task) == 0

    async def test_poison_message_is_dead_lettered_at_the_delivery_limit(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology(delivery_limit=2))
        await pair.bank.publish_update(pair.task, "bank-a", b"poison", message_id="u-p")
        for _ in range(3):  # a consumer that crashes before acking, again and again
            sub = await pair.agg.consume_updates(pair.task, prefetch=1)
            try:
                await _within(sub.get(), 2.0)
            except TimeoutError:
                await sub.close()
                break
            await sub.close()
        dead: list[DeadLetter] = []
        for _ in range(50):
            dead += await pair.agg.dead_letters(pair.task)
            if dead:
                break
            await asyncio.sleep(0.1)
        assert [(d.body, d.reason) for d in dead] == [(b"poison", "delivery_limit")]

    async def test_single_active_consumer(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        first = await pair.agg.consume_updates(pair.task, prefetch=5)
        second = await pair.agg.consume_updates(pair.task, prefetch=5)
        await pair.bank.publish_update(pair.task, "bank-a", b"one", message_id="u1")
        d = await _within(first.get())
        assert d.body == b"one"
        await pair.bank.publish_update(pair.task, "bank-a", b"two", message_id="u2")
        with pytest.raises(TimeoutError):
            await _within(second.get(), 0.5)
        await first.close()  # both unacked go back; the standby takes over
        got = sorted([bytes((await _within(second.get())).body) for _ in range(2)])
        assert got == [b"one", b"two"]
        await second.close()

    async def test_last_announcement_is_kept_and_read_without_consuming(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        assert await pair.agg.last_announcement(pair.task) is None
        for v in (1, 2, 3):
            await pair.agg.announce_model(pair.task, v, b"m", fence=7, version_hash=bytes([v]) * 32)
        await asyncio.sleep(0.2)
        for _ in range(2):  # reading twice: the broker still holds it
            last = await pair.agg.last_announcement(pair.task)
            assert last is not None
            assert (last.version, last.fence, last.version_hash) == (3, 7, b"\x03" * 32)
        sub = await pair.bank.consume_models(pair.task, "bank-a")
        assert (await _within(sub.get())).version == 3  # participants are unaffected
        await sub.close()

    async def test_a_delivery_is_live_until_settled_or_its_subscription_closes(
        self, pair: Pair
    ) -> None:
        await pair.agg.declare_task(pair.topology())
        sub = await pair.agg.consume_updates(pair.task, prefetch=5)
        await pair.bank.publish_update(pair.task, "bank-a", b"one", message_id="u1")
        await pair.bank.publish_update(pair.task, "bank-a", b"two", message_id="u2")
        one, two = await _within(sub.get()), await _within(sub.get())
        assert [d.live for d in (one, two)] == [True, True]
        await one.ack()
        assert [d.live for d in (one, two)] == [False, True]
        await sub.close()
        assert [d.live for d in (one, two)] == [False, False]  # two went back to the queue
        again = await pair.agg.consume_updates(pair.task, prefetch=5)
        back = await _within(again.get())
        assert (back.body, back.redelivered, back.live) == (b"two", True, True)
        await back.ack()
        await again.close()

    async def test_ready_hands_out_what_was_prefetched_in_order(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        for i in range(5):
            await pair.bank.publish_update(
                pair.task, "bank-a", f"m{i}".encode(), message_id=f"u{i}"
            )
        sub = await pair.agg.consume_updates(pair.task, prefetch=3)
        first = await _within(sub.get())
        rest = await _ready(sub, 2)
        assert [d.body for d in (first, *rest)] == [b"m0", b"m1", b"m2"]
        await asyncio.sleep(0.3)
        assert sub.ready(10) == []  # the prefetch is used up: nothing more was sent
        await sub.ack_all([first, *rest])
        nxt = await _within(sub.get())
        assert nxt.body == b"m3"  # not one that ready() handed out before
        (last,) = await _ready(sub, 1)
        assert last.body == b"m4"
        assert sub.ready(10) == []
        await sub.ack_all([nxt, last])
        await sub.close()
        again = await pair.agg.consume_updates(pair.task, prefetch=5)
        with pytest.raises(TimeoutError):
            await _within(again.get(), 0.5)  # every one was acked once
        await again.close()

    async def test_ack_all_of_a_contiguous_batch_is_one_multiple_ack(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        for i in range(4):
            await pair.bank.publish_update(
                pair.task, "bank-a", f"m{i}".encode(), message_id=f"u{i}"
            )
        sub = await pair.agg.consume_updates(pair.task, prefetch=10)
        batch = [await _within(sub.get()), *await _ready(sub, 3)]
        acks = await _spy_acks(sub)
        await sub.ack_all(batch)
        assert [d.live for d in batch] == [False] * 4
        if acks is not None:
            assert acks == [(4, True)]  # one frame: up to and including the fourth
        await sub.ack_all(batch)  # settled already: skipped
        with pytest.raises(TransportError):
            await batch[0].ack()
        with pytest.raises(TransportError):
            await batch[1].dead_letter("malformed", "after its ack")
        if acks is not None:
            assert acks == [(4, True)]  # nothing was acked twice
        await sub.close()
        again = await pair.agg.consume_updates(pair.task, prefetch=10)
        with pytest.raises(TimeoutError):
            await _within(again.get(), 0.5)  # none was left unacked
        await again.close()
        assert await pair.agg.queue_depth(pair.task) == 0
        assert await pair.agg.dead_letters(pair.task) == []

    async def test_ack_all_with_an_older_delivery_still_held_acks_each(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        for i in range(3):
            await pair.bank.publish_update(
                pair.task, "bank-a", f"m{i}".encode(), message_id=f"u{i}"
            )
        sub = await pair.agg.consume_updates(pair.task, prefetch=10)
        held = await _within(sub.get())
        batch = await _ready(sub, 2)
        acks = await _spy_acks(sub)
        await sub.ack_all(batch)
        assert [d.live for d in (held, *batch)] == [True, False, False]
        if acks is not None:
            assert acks == [(2, False), (3, False)]  # a multiple ack would take m0 too
        await sub.close()
        again = await pair.agg.consume_updates(pair.task, prefetch=10)
        back = await _within(again.get())
        assert (back.body, back.redelivered) == (b"m0", True)
        with pytest.raises(TimeoutError):
            await _within(again.get(), 0.5)  # m1 and m2 do not come back
        await back.ack()
        await again.close()

    async def test_a_held_model_does_not_stop_newer_ones(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        for v in (1, 2, 3):
            await pair.agg.announce_model(pair.task, v, f"model-{v}".encode())
        sub = await pair.bank.consume_models(pair.task, "bank-a")
        m3 = await _within(sub.get())
        assert (m3.version, m3.body) == (3, b"model-3")
        with pytest.raises(TimeoutError):
            await _within(sub.get(), 0.3)
        # Held unacked while training; a newer one still arrives.
        await pair.agg.announce_model(pair.task, 4, b"model-4")
        m4 = await _within(sub.get())
        assert m4.version == 4
        await m3.ack()
        await sub.close()  # m4 not acked: a restarted participant starts at it again
        sub = await pair.bank.consume_models(pair.task, "bank-a")
        again = await _within(sub.get())
        assert again.version == 4
        await again.ack()
        with pytest.raises(TransportError):
            await again.ack()  # settled once
        await sub.close()
        other = await pair.bank.consume_models(pair.task, "bank-b")
        assert (await _within(other.get())).version == 4
        await other.close()

    async def test_a_late_subscriber_gets_the_newest_version_first(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        for v in range(1, 6):
            await pair.agg.announce_model(pair.task, v, f"model-{v}".encode())
        sub = await pair.bank.consume_models(pair.task, "bank-b")
        first = await _within(sub.get())
        assert (first.version, first.body) == (5, b"model-5")
        with pytest.raises(TimeoutError):
            await _within(sub.get(), 0.3)  # not the older four after it
        await first.ack()
        await sub.close()

    async def test_a_slow_consumer_gets_the_newest_not_the_backlog(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        await pair.agg.announce_model(pair.task, 1, b"model-1")
        sub = await pair.bank.consume_models(pair.task, "bank-a")
        held = await _within(sub.get())
        assert held.version == 1
        for v in range(2, 12):  # ten announcements while it trains on version 1
            await pair.agg.announce_model(pair.task, v, f"model-{v}".encode())
        await asyncio.sleep(0.5)  # all ten have reached it
        newest = await _within(sub.get())
        assert (newest.version, newest.body) == (11, b"model-11")
        with pytest.raises(TimeoutError):
            await _within(sub.get(), 0.3)  # versions 2 to 10 are not handed out after it
        await held.ack()
        await newest.ack()
        await sub.close()

    async def test_one_announcement_is_one_message_whatever_the_participants(
        self, pair: Pair
    ) -> None:
        pair.participants = tuple(f"bank-{i:04d}" for i in range(1000))
        await pair.agg.declare_task(pair.topology())
        await pair.agg.announce_model(pair.task, 1, b"model-1")
        before = await _stream_length(pair)
        await pair.agg.announce_model(pair.task, 2, b"model-2")
        assert await _stream_length(pair) == before + 1
        if isinstance(pair.agg, AmqpTransport):  # and no per-participant model queue
            for p in pair.participants[::97]:
                assert not await _queue_exists(model_queue(pair.task, p))
            assert await _queue_exists(model_stream(pair.task))
        sub = await pair.bank.consume_models(pair.task, pair.participants[-1])
        assert (await _within(sub.get())).version == 2
        await sub.close()

    async def test_publishing_to_an_undeclared_task_fails_after_retrying(self, pair: Pair) -> None:
        if isinstance(pair.bank, AmqpTransport):
            pair.bank.publish_timeout = 0.5
        with pytest.raises(TransportError):
            await pair.bank.publish_update(pair.task, "bank-a", b"x", message_id="u1")

    async def test_models_of_an_undeclared_task_are_an_error(self, pair: Pair) -> None:
        with pytest.raises(TransportError):
            await pair.bank.consume_models(pair.task, "bank-a")
        with pytest.raises(TransportError):
            await pair.agg.last_announcement(pair.task)


async def test_audit_stream_keeps_every_update_and_reading_does_not_consume(pair: Pair) -> None:
    await pair.agg.declare_task(pair.topology())
    for i in range(3):
        await pair.bank.publish_update(pair.task, "bank-a", f"u{i}".encode(), message_id=f"u{i}")
    sub = await pair.agg.consume_updates(pair.task, prefetch=5)
    d = await _within(sub.get())
    await d.dead_letter("malformed", "refused, yet retained")
    await sub.close()
    first = [b async for b in pair.agg.read_audit(pair.task, idle_s=0.5)]
    again = [b async for b in pair.agg.read_audit(pair.task, idle_s=0.5)]
    assert first == [b"u0", b"u1", b"u2"]
    assert again == first


async def test_audit_reader_waits_for_every_message_the_stream_held_however_short_idle_is(
    pair: Pair,
) -> None:
    """A stream of large chunked updates takes the broker a while to start delivering:
    the reader waits for every message the stream held when asked, not only ``idle_s``
    (with 1.0 s, replay of a 100M-parameter run read nothing)."""
    await pair.agg.declare_task(pair.topology())
    for i in range(3):
        await pair.bank.publish_update(pair.task, "bank-a", f"u{i}".encode(), message_id=f"u{i}")
    if isinstance(pair.agg, AmqpTransport):  # the broker's count lags fresh publishes
        for _ in range(300):
            if await _stream_count(audit_stream(pair.task)) == 3:
                break
            await asyncio.sleep(0.1)
    read = [b async for b in pair.agg.read_audit(pair.task, idle_s=0.000_001)]
    assert read == [b"u0", b"u1", b"u2"]


async def _stream_count(name: str) -> int:
    """The message count the broker reports for a stream (what the audit reader sees)."""
    conn = await aio_pika.connect(AMQP_URL)
    try:
        ch = await conn.channel()
        queue = await ch.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await conn.close()


def _big(chunks: float, seed: int) -> bytes:
    """A body of ``chunks`` chunks' worth of random bytes (not beginning like a chunk)."""
    body = random.Random(seed).randbytes(int(CHUNKING.chunk_size * chunks))
    assert not body.startswith(MAGIC)
    return body


def _pieces(body: bytes, set_id: str) -> list[bytes]:
    return list(split(body, id=set_id, chunk_size=CHUNKING.chunk_size))


async def _raw(pair: Pair, pieces: list[bytes], message_id: str, order: list[int]) -> None:
    """Publish chunk messages one by one, as a misbehaving or retrying publisher would."""
    bank = pair.bank
    assert isinstance(bank, MemoryTransport | AmqpTransport)
    for i in order:
        await bank.publish_raw(pair.task, "bank-a", pieces[i], message_id=message_id)


async def _depth(pair: Pair, expected: int) -> None:
    """Wait until the work queue's depth is ``expected`` (the broker counts lazily)."""
    depth = -1
    async with asyncio.timeout(5):
        while (depth := await pair.agg.queue_depth(pair.task)) != expected:
            await asyncio.sleep(0.05)
    assert depth == expected


async def _dead(pair: Pair, count: int) -> list[DeadLetter]:
    dead: list[DeadLetter] = []
    async with asyncio.timeout(5):
        while len(dead) < count:
            dead += await pair.agg.dead_letters(pair.task)
            if len(dead) < count:
                await asyncio.sleep(0.05)
    assert len(dead) == count
    return dead


async def _nothing_left(pair: Pair) -> None:
    """A new consumer gets nothing: every message was settled once."""
    await _depth(pair, 0)
    again = await pair.agg.consume_updates(pair.task, prefetch=10)
    with pytest.raises(TimeoutError):
        await _within(again.get(), 0.5)
    await again.close()


class TestChunks:
    """Bodies larger than the chunk size, over both transports (docs/chunking.md)."""

    async def test_a_large_update_is_one_delivery(self, chunked: Pair) -> None:
        p = chunked
        await p.agg.declare_task(p.topology())
        body = _big(4.5, 1)
        await p.bank.publish_update(p.task, "bank-a", body, message_id="u-big")
        await _depth(p, 5)  # five chunk messages wait in the queue
        sub = await p.agg.consume_updates(p.task, prefetch=1)
        d = await _within(sub.get())
        assert (d.body, d.message_id, d.user_id, d.redelivered) == (body, "u-big", "guest", False)
        assert refusal_of(d) is None
        with pytest.raises(TimeoutError):
            await _within(sub.get(), 0.3)  # one update, not five
        await d.ack()
        assert d.live is False
        with pytest.raises(TransportError):
            await d.ack()
        await sub.close()
        await _nothing_left(p)

    async def test_small_updates_stay_single_messages(self, chunked: Pair) -> None:
        p = chunked
        await p.agg.declare_task(p.topology())
        small = _big(1.0, 2)  # exactly the chunk size: not split
        await p.bank.publish_update(p.task, "bank-a", small, message_id="u-small")
        await _depth(p, 1)
        audit = [b async for b in p.agg.read_audit(p.task, idle_s=0.5)]
        assert audit == [small]

    async def test_chunks_out_of_order_and_copied_make_one_delivery(self, chunked: Pair) -> None:
        p = chunked
        await p.agg.declare_task(p.topology())
        body = _big(3.5, 3)
        pieces = _pieces(body, "u-mixed")
        await _raw(p, pieces, "u-mixed", [2, 0, 3, 0, 2, 1])
        sub = await p.agg.consume_updates(p.task, prefetch=4)
        d = await _within(sub.get())
        assert (d.body, d.message_id) == (body, "u-mixed")
        with pytest.raises(TimeoutError):
            await _within(sub.get(), 0.5)  # the copies make no second delivery
        acks = await _spy_acks(sub)
        await sub.ack_all([d])
        if acks is not None:
            assert acks == [(6, True)]  # its six messages, copies included, in one frame
        # A publisher that retries a chunk after the set was settled: acked, not delivered.
        await _raw(p, pieces, "u-mixed", [1])
        with pytest.raises(TimeoutError):
            await _within(sub.get(), 0.5)
        await sub.close()
        await _nothing_left(p)

    async def test_an_incomplete_set_expires_and_is_dead_lettered(self, chunked: Pair) -> None:
        p = chunked
        await p.agg.declare_task(p.topology())
        pieces = _pieces(_big(4.5, 4), "u-cut")
        await _raw(p, pieces, "u-cut", [0, 1, 3])
        sub = await p.agg.consume_updates(p.task, prefetch=4)
        loop = asyncio.get_running_loop()
        started = loop.time()
        d = await _within(sub.get())
        assert loop.time() - started > 0.5  # not before the timeout (1 s)
        refusal = refusal_of(d)
        assert refusal is not None
        assert refusal.reason is Refusal.CHUNKS_INCOMPLETE
        assert "3 of 5 chunks" in refusal.detail
        assert (d.body, d.message_id, d.user_id) == (b"", "u-cut", "guest")
        await d.dead_letter(refusal.reason.value, refusal.detail)
        await sub.close()
        dead = await _dead(p, 3)
        assert sorted(x.body for x in dead) == sorted(pieces[i] for i in (0, 1, 3))
        assert {x.reason for x in dead} == {"chunks_incomplete"}
        await _nothing_left(p)

    async def test_redelivered_chunks_reassemble_after_a_restart(self, chunked: Pair) -> None:
        p = chunked
        await p.agg.declare_task(p.topology())
        body = _big(4.5, 5)
        pieces = _pieces(body, "u-restart")
        await _raw(p, pieces, "u-restart", [0, 1, 2])
        sub = await p.agg.consume_updates(p.task, prefetch=2)
        with pytest.raises(TimeoutError):
            await _within(sub.get(), 0.3)  # incomplete
        await sub.close()  # its three chunks go back to the queue
        await _raw(p, pieces, "u-restart", [3, 4])
        sub = await p.agg.consume_updates(p.task, prefetch=2)
        d = await _within(sub.get())
        assert (d.body, d.redelivered) == (body, True)
        await sub.close()  # a whole delivery, not acked: every chunk goes back
        sub = await p.agg.consume_updates(p.task, prefetch=2)
        d = await _within(sub.get())
        assert (d.body, d.redelivered) == (body, True)
        await d.ack()
        await sub.close()
        await _nothing_left(p)

    async def test_interleaved_updates_are_acked_apart(self, chunked: Pair) -> None:
        p = chunked
        await p.agg.declare_task(p.topology())
        a, b = _big(2.5, 6), _big(2.5, 7)
        pa, pb = _pieces(a, "u-a"), _pieces(b, "u-b")
        for i in range(3):  # a0 b0 a1 b1 a2 b2: delivery tags 1 to 6
            await _raw(p, pa, "u-a", [i])
            await _raw(p, pb, "u-b", [i])
        sub = await p.agg.consume_updates(p.task, prefetch=4)
        first = await _within(sub.get())
        (second,) = await _ready(sub, 1)
        assert [first.body, second.body] == [a, b]
        acks = await _spy_acks(sub)
        await sub.ack_all([first])
        if acks is not None:
            assert acks == [(1, False), (3, False), (5, False)]  # never over b's chunks
        assert (first.live, second.live) == (False, True)
        await sub.close()
        await _depth(p, 3)  # b's three chunks are back; a's are gone
        sub = await p.agg.consume_updates(p.task, prefetch=4)
        back = await _within(sub.get())
        assert (back.body, back.redelivered) == (b, True)
        with pytest.raises(TimeoutError):
            await _within(sub.get(), 0.5)  # a does not come back
        acks = await _spy_acks(sub)
        await sub.ack_all([back])
        if acks is not None:
            assert acks == [(3, True)]  # alone on its channel now: one multiple ack
        await sub.close()
        await _nothing_left(p)

    async def test_dead_lettering_a_chunked_update_keeps_it_whole(self, chunked: Pair) -> None:
        p = chunked
        await p.agg.declare_task(p.topology())
        body = _big(3.5, 8)
        await p.bank.publish_update(p.task, "bank-a", body, message_id="u-dead")
        sub = await p.agg.consume_updates(p.task, prefetch=1)
        d = await _within(sub.get())
        await d.dead_letter("too_stale", "refused whole")
        with pytest.raises(TransportError):
            await d.ack()
        await sub.close()
        dead = await _dead(p, 1)
        assert [(x.body, x.reason, x.detail) for x in dead] == [
            (body, "too_stale", "refused whole")
        ]
        await _nothing_left(p)

    async def test_a_corrupted_chunk_is_refused_alone(self, chunked: Pair) -> None:
        p = chunked
        await p.agg.declare_task(p.topology())
        body = _big(2.5, 9)
        pieces = _pieces(body, "u-bad")
        bad = bytearray(pieces[1])
        bad[-1] ^= 0xFF
        await _raw(p, [*pieces, bytes(bad)], "u-bad", [0, 3, 1, 2])
        sub = await p.agg.consume_updates(p.task, prefetch=4)
        refused = await _within(sub.get())
        problem = refusal_of(refused)
        assert problem is not None and problem.reason is Refusal.HASH_MISMATCH
        await refused.dead_letter(problem.reason.value, problem.detail)
        whole = await _within(sub.get())  # the good copy completes the set
        assert whole.body == body
        await whole.ack()
        await sub.close()
        dead = await _dead(p, 1)
        assert [(x.body, x.reason) for x in dead] == [(bytes(bad), "hash_mismatch")]
        await _nothing_left(p)

    async def test_the_prefetch_counts_updates_not_messages(self, chunked: Pair) -> None:
        p = chunked
        await p.agg.declare_task(p.topology())
        bodies = [_big(2.5, 10 + i) for i in range(3)]
        for i, body in enumerate(bodies):
            await p.bank.publish_update(p.task, "bank-a", body, message_id=f"u{i}")
        sub = await p.agg.consume_updates(p.task, prefetch=2)
        x, y = await _within(sub.get()), await _within(sub.get())
        with pytest.raises(TimeoutError):
            await _within(sub.get(), 0.3)  # two unsettled: the third waits...
        await _depth(p, 1)  # ...and counts as waiting
        assert sub.ready(5) == []
        await x.ack()
        z = await _within(sub.get())
        assert [d.body for d in (x, y, z)] == bodies
        await sub.ack_all([y, z])
        await sub.close()
        await _nothing_left(p)

    async def test_a_chunked_model_is_announced_and_received(self, chunked: Pair) -> None:
        p = chunked
        await p.agg.declare_task(p.topology())
        models = {v: _big(3.5, 20 + v) for v in range(1, 5)}
        for v in (1, 2, 3):
            await p.agg.announce_model(p.task, v, models[v], fence=7, version_hash=bytes([v]) * 32)
        async with asyncio.timeout(5):
            while (last := await p.agg.last_announcement(p.task)) is None or last.version != 3:
                await asyncio.sleep(0.05)
        assert (last.fence, last.version_hash) == (7, b"\x03" * 32)
        sub = await p.bank.consume_models(p.task, "bank-a")
        m3 = await _within(sub.get())  # it joined after the last chunk was written
        assert (m3.version, m3.body) == (3, models[3])
        with pytest.raises(TimeoutError):
            await _within(sub.get(), 0.5)
        await p.agg.announce_model(p.task, 4, models[4])
        m4 = await _within(sub.get())
        assert (m4.version, m4.body) == (4, models[4])
        await m3.ack()
        await m4.ack()
        with pytest.raises(TransportError):
            await m4.ack()
        await sub.close()
        other = await p.bank.consume_models(p.task, "bank-b")
        late = await _within(other.get())
        assert (late.version, late.body) == (4, models[4])
        await other.close()

    async def test_read_audit_returns_whole_bodies(self, chunked: Pair) -> None:
        p = chunked
        await p.agg.declare_task(p.topology())
        big = _big(3.5, 30)
        cut = _pieces(_big(2.5, 31), "u-cut")
        await p.bank.publish_update(p.task, "bank-a", b"small-1", message_id="s1")
        await p.bank.publish_update(p.task, "bank-a", big, message_id="big")
        await _raw(p, cut, "u-cut", [0])
        await p.bank.publish_update(p.task, "bank-a", b"small-2", message_id="s2")
        await _raw(p, _pieces(big, "big"), "big", [1])  # a late copy of a chunk of big
        first = [b async for b in p.agg.read_audit(p.task, idle_s=0.5)]
        again = [b async for b in p.agg.read_audit(p.task, idle_s=0.5)]
        # big whole where it completed; the set that never completed as it was sent.
        assert first == [b"small-1", big, b"small-2", cut[0]]
        assert again == first


class TestReceipts:
    async def test_a_receipt_reaches_only_its_participant(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        await pair.agg.publish_receipt(pair.task, "bank-a", b"receipt-a", message_id="u1-accepted")
        await pair.agg.publish_receipt(pair.task, "bank-b", b"receipt-b", message_id="u2-refused")
        sub_a = await pair.bank.consume_receipts(pair.task, "bank-a")
        d = await _within(sub_a.get())
        assert (d.body, d.message_id) == (b"receipt-a", "u1-accepted")
        await d.ack()
        with pytest.raises(TimeoutError):
            await _within(sub_a.get(), 0.3)  # bank-b's receipt is not in bank-a's queue
        await sub_a.close()
        sub_b = await pair.bank.consume_receipts(pair.task, "bank-b")
        d = await _within(sub_b.get())
        assert d.body == b"receipt-b"
        await d.ack()
        await sub_b.close()

    async def test_an_unacked_receipt_comes_again(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        for i in range(3):
            await pair.agg.publish_receipt(
                pair.task, "bank-a", f"r{i}".encode(), message_id=f"r{i}"
            )
        sub = await pair.bank.consume_receipts(pair.task, "bank-a")
        first = [await _within(sub.get()) for _ in range(3)]
        assert [d.body for d in first] == [b"r0", b"r1", b"r2"]  # in order
        await first[0].ack()
        await sub.close()
        sub = await pair.bank.consume_receipts(pair.task, "bank-a")
        again = [await _within(sub.get()) for _ in range(2)]
        assert sorted(d.body for d in again) == [b"r1", b"r2"]
        for d in again:
            await d.ack()
        await sub.close()

    async def test_receipt_queue_of_an_unknown_participant_is_an_error(self, pair: Pair) -> None:
        await pair.agg.declare_task(pair.topology())
        with pytest.raises(TransportError):
            await pair.bank.consume_receipts(pair.task, "nobody")


@pytest.mark.real
async def test_a_publish_the_broker_refuses_for_good_is_not_retried() -> None:
    """PRECONDITION_FAILED (a user_id that is not the login) fails at once, with the code."""
    task = f"t{uuid.uuid4().hex[:10]}"
    agg = await AmqpTransport.connect(AMQP_URL, name="test-aggregator")
    liar = await AmqpTransport.connect(
        AMQP_URL, name="test-liar", user_id="not-guest", publish_timeout=60.0
    )
    try:
        await agg.declare_task(TaskTopology(task, ("bank-a",)))
        started = asyncio.get_running_loop().time()
        with pytest.raises(PublishRefusedError) as caught:
            await liar.publish_update(task, "bank-a", b"x", message_id="u1")
        assert caught.value.code == 406
        assert asyncio.get_running_loop().time() - started < 10  # not retried for 60 s
        # The connection is still usable: the next publish with the right identity works.
        liar.user_id = "guest"
        await liar.publish_update(task, "bank-a", b"y", message_id="u2")
    finally:
        await liar.close()
        await agg.close()
        await delete_queues(task, ("bank-a",))
