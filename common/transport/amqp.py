"""The transport on RabbitMQ, with aio-pika.

Publishing uses publisher confirms and mandatory routing, persistent messages,
and retries with backoff until the broker confirms. Consumers use manual acks
with a bounded prefetch; each subscription has its own channel, so closing it
returns its unacked deliveries to the queue. Models go through one stream per
task, read from its last announcement. aio-pika and aiormq errors are converted
to :class:`~common.errors.TransportError` here. Bodies larger than the chunk size
travel as chunk messages, reassembled by the receiving side (docs/chunking.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
import uuid
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, Generic, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from yarl import URL

from common import segments
from common.chunks import (
    Added,
    ChunkError,
    Complete,
    Failed,
    Part,
    Reassembler,
    SetKey,
    is_chunk,
    needs_chunks,
    parse,
    split,
)
from common.errors import PublishRefusedError, TransportError
from common.segments import Owned, Segments
from common.tls import url_problem
from common.transport.base import (
    SENDER_HEADER,
    Announcement,
    Body,
    Chunking,
    DeadLetter,
    StreamJoiner,
    TaskTopology,
    TransportRefusal,
    UpdateDelivery,
    merge_dead_letters,
)
from common.transport.names import (
    CONTENT_TYPE,
    DEAD_LETTER_EXCHANGE,
    DETAIL_HEADER,
    FENCE_HEADER,
    MODELS_EXCHANGE,
    REASON_HEADER,
    RECEIPTS_EXCHANGE,
    UPDATES_EXCHANGE,
    VERSION_HASH_HEADER,
    VERSION_HEADER,
    audit_stream,
    dead_key,
    dead_queue,
    head_queue,
    model_binding,
    model_key,
    model_stream,
    receipt_key,
    receipt_queue,
    update_binding,
    update_key,
    work_queue,
)
from common.urls import redact_url

#: Errors from aio-pika / aiormq / the socket that a retry may cure. While a robust
#: connection reconnects, aiormq raises ChannelInvalidStateError and plain
#: RuntimeError("... closed") on channels of the old connection.
_RETRYABLE: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    RuntimeError,
)

#: ...and for a publish: also a nack or an unroutable return (no queue bound yet).
_RETRYABLE_PUBLISH: tuple[type[BaseException], ...] = (
    *_RETRYABLE,
    aio_pika.exceptions.DeliveryError,
    aio_pika.exceptions.PublishError,
)

#: Broker refusals of a publish that no retry can cure: ACCESS_REFUSED (403: no write
#: permission), NOT_FOUND (404: no such exchange), PRECONDITION_FAILED (406: a message
#: over the broker's size limit, a user_id that is not the login). RabbitMQ closes the
#: channel with one of these; it is checked before the retryable errors (it is an
#: AMQPError too).
_NEVER_HEALS: dict[type[BaseException], int] = {
    aiormq.exceptions.ChannelAccessRefused: 403,
    aiormq.exceptions.ChannelNotFoundEntity: 404,
    aiormq.exceptions.ChannelPreconditionFailed: 406,
}

#: Unacked deliveries of a model stream consumer: the model a participant holds (at
#: times two), the newest waiting to be handed out, and room for the next to arrive (an
#: arrival acks the one it supersedes, so a backlog streams through in the background).
_MODEL_PREFETCH = 4
#: Times a model stream consumer goes back to an earlier offset to find the first
#: chunks of an announcement it joined in the middle (docs/chunking.md).
_MAX_REWINDS = 8

T = TypeVar("T")


#: How long the audit reader waits for each message the stream held when asked.
AUDIT_WAIT_S = 60.0


class AmqpTransport:
    """A connection to RabbitMQ for one party (a participant or the aggregator)."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        *,
        user_id: str | None,
        publish_timeout: float = 300.0,
        confirm_timeout: float = 30.0,
        declare_channels: int = 8,
        chunking: Chunking | None = None,
    ) -> None:
        self._conn = connection
        self.user_id = user_id
        #: The chunk size and reassembly limits (docs/chunking.md).
        self.chunking = chunking or Chunking()
        self.publish_timeout = publish_timeout
        self.confirm_timeout = confirm_timeout
        #: Channels :meth:`declare_task` declares the participants' queues over.
        self.declare_channels = declare_channels
        self._pub: AbstractChannel | None = None
        self._pub_lock = asyncio.Lock()
        self._exchanges: dict[str, AbstractExchange] = {}
        self._subs: list[_AmqpSubscription[Any]] = []

    @classmethod
    async def connect(
        cls, url: str, *, name: str = "fedq", connect_timeout: float = 30.0, **kw: Any
    ) -> AmqpTransport:
        """Connect (robustly: the connection re-establishes itself after failures).

        ``amqps://`` URLs carry the TLS files (``?cafile=&certfile=&keyfile=``); the
        server's certificate is always verified (common/tls.py).
        """
        problem = url_problem(url)
        if problem is not None:
            raise TransportError(problem)
        try:
            conn = await aio_pika.connect_robust(
                url, timeout=connect_timeout, client_properties={"connection_name": name}
            )
        except _RETRYABLE as e:
            raise TransportError(f"cannot connect to RabbitMQ at {redact_url(url)}: {e!r}") from e
        except ValueError as e:
            raise TransportError(f"invalid AMQP URL {redact_url(url)}: {e}") from e
        login = URL(url).user or "guest"
        return cls(conn, user_id=kw.pop("user_id", login), **kw)

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.close()
        with contextlib.suppress(*_RETRYABLE):
            await self._conn.close()

    # ------------------------------------------------------------------ helpers

    async def _publisher(self) -> AbstractChannel:
        async with self._pub_lock:
            if self._pub is None or self._pub.is_closed:
                self._pub = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
                self._exchanges.clear()
            return self._pub

    async def _exchange(self, name: str) -> AbstractExchange:
        channel = await self._publisher()
        ex = self._exchanges.get(name)
        if ex is None:
            ex = await channel.get_exchange(name, ensure=False)
            self._exchanges[name] = ex
        return ex

    async def _publish_confirmed(
        self, exchange: str, routing_key: str, message: aio_pika.Message
    ) -> None:
        """Publish until the broker confirms, with backoff; TransportError after the timeout."""
        deadline = time.monotonic() + self.publish_timeout
        delay = 0.05
        while True:
            try:
                ex = await self._exchange(exchange)
                await ex.publish(message, routing_key, mandatory=True, timeout=self.confirm_timeout)
                return
            except tuple(_NEVER_HEALS) as e:
                self._exchanges.clear()
                code = next(c for t, c in _NEVER_HEALS.items() if isinstance(e, t))
                raise PublishRefusedError(
                    f"the broker refused the publish to {exchange}/{routing_key} "
                    f"({code}, not retried): {e}",
                    code,
                ) from e
            except _RETRYABLE_PUBLISH as e:
                self._exchanges.clear()
                if time.monotonic() + delay > deadline:
                    raise TransportError(
                        f"publish to {exchange}/{routing_key} not confirmed within "
                        f"{self.publish_timeout:.0f}s: {e!r}"
                    ) from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _guard(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except aiormq.exceptions.ChannelPreconditionFailed as e:
            raise TransportError(
                f"{what}: the broker holds it with other settings ({e}); "
                "delete it or align broker_config"
            ) from e
        except aiormq.exceptions.ChannelNotFoundEntity as e:
            raise TransportError(f"{what}: not found on the broker ({e})") from e
        except aiormq.exceptions.ChannelAccessRefused as e:
            raise TransportError(f"{what}: access refused for this user ({e})") from e
        except _RETRYABLE as e:
            raise TransportError(f"{what}: {e!r}") from e

    # ------------------------------------------------------------------ aggregator side

    async def declare_task(self, topology: TaskTopology) -> None:
        task = topology.task

        async def declare() -> None:
            ch = await self._conn.channel()
            try:
                updates = await ch.declare_exchange(
                    UPDATES_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
                )
                models = await ch.declare_exchange(
                    MODELS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
                )
                dlx = await ch.declare_exchange(
                    DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
                )
                work = await ch.declare_queue(
                    work_queue(task),
                    durable=True,
                    arguments={
                        "x-queue-type": "quorum",
                        "x-single-active-consumer": True,
                        "x-delivery-limit": topology.delivery_limit,
                        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                        "x-dead-letter-routing-key": dead_key(task),
                        "x-dead-letter-strategy": "at-least-once",
                        "x-overflow": "reject-publish",
                    },
                )
                await work.bind(updates, update_binding(task))
                audit = await ch.declare_queue(
                    audit_stream(task),
                    durable=True,
                    arguments={
                        "x-queue-type": "stream",
                        "x-max-age": topology.audit_max_age,
                        "x-max-length-bytes": topology.audit_max_bytes,
                    },
                )
                await audit.bind(updates, update_binding(task))
                dead = await ch.declare_queue(
                    dead_queue(task), durable=True, arguments={"x-queue-type": "quorum"}
                )
                await dead.bind(dlx, dead_key(task))
                stream = await ch.declare_queue(
                    model_stream(task),
                    durable=True,
                    arguments={
                        "x-queue-type": "stream",
                        "x-max-age": topology.models_max_age,
                        "x-max-length-bytes": topology.models_max_bytes,
                        "x-stream-max-segment-size-bytes": topology.models_segment_bytes,
                    },
                )
                await stream.bind(models, model_binding(task))
                head = await ch.declare_queue(
                    head_queue(task),
                    durable=True,
                    arguments={"x-max-length": 1, "x-overflow": "drop-head"},
                )
                await head.bind(models, model_key(task))
                await ch.declare_exchange(
                    RECEIPTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
                )
            finally:
                with contextlib.suppress(*_RETRYABLE):
                    await ch.close()
            await self._declare_receipt_queues(topology)

        await self._guard(f"declaring the topology of task {task!r}", declare)

    async def _declare_receipt_queues(self, topology: TaskTopology) -> None:
        """Each participant's receipt queue and its binding, over several channels at once.

        A channel sends its declarations without waiting for each reply (``nowait``),
        then one call that has a reply: the broker handles a channel's methods in order
        and closes the channel at the first that fails, so that reply confirms them all.
        """
        task, participants = topology.task, list(topology.participants)
        arguments: dict[str, Any] = {
            "x-max-length": topology.receipts_max_length,
            "x-overflow": "drop-head",
        }

        async def lane(names: Sequence[str]) -> None:
            ch = await self._conn.channel()
            try:
                raw = await ch.get_underlay_channel()
                try:
                    for p in names:
                        queue = receipt_queue(task, p)
                        await raw.queue_declare(
                            queue, durable=True, arguments=arguments, nowait=True
                        )
                        await raw.queue_bind(
                            queue, RECEIPTS_EXCHANGE, receipt_key(task, p), nowait=True
                        )
                    await raw.basic_qos(prefetch_count=0)
                except aiormq.exceptions.ChannelInvalidStateError as e:
                    # Closed by the broker at a failed declaration: raise its reason.
                    raise await _close_reason(raw) or e from e
            finally:
                with contextlib.suppress(*_RETRYABLE):
                    await ch.close()

        lanes = min(max(1, self.declare_channels), len(participants))
        done = await asyncio.gather(
            *(lane(participants[i::lanes]) for i in range(lanes)), return_exceptions=True
        )
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome

    async def consume_updates(
        self, task: str, *, prefetch: int, update_bytes: int | None = None
    ) -> _AmqpUpdateSubscription:
        messages = self.chunking.prefetch_messages(prefetch, update_bytes)

        async def subscribe() -> _AmqpUpdateSubscription:
            ch = await self._conn.channel()
            await ch.set_qos(prefetch_count=messages)
            queue = await ch.declare_queue(work_queue(task), passive=True)
            sub = _AmqpUpdateSubscription(self, task, ch, queue, prefetch)
            await sub.start()
            return sub

        sub = await self._guard(f"consuming {work_queue(task)}", subscribe)
        self._subs.append(sub)
        return sub

    async def announce_model(
        self,
        task: str,
        version: int,
        body: bytes | Segments,
        *,
        fence: int | None = None,
        version_hash: bytes | None = None,
    ) -> None:
        headers: dict[str, Any] = {VERSION_HEADER: version}
        if fence is not None:
            headers[FENCE_HEADER] = fence
        if version_hash is not None:
            headers[VERSION_HASH_HEADER] = version_hash.hex()
        message_id = f"{task}-model-{version}"
        # A chunked announcement's set id is new each time: announcing a version again
        # is a new set, which a reader takes again (as it takes a whole one again).
        for piece in self._pieces(body, f"{message_id}-{uuid.uuid4().hex[:12]}"):
            message = aio_pika.Message(
                piece,
                content_type=CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id,
                headers=dict(headers),
                user_id=self.user_id,
            )
            await self._publish_confirmed(MODELS_EXCHANGE, model_key(task), message)

    def _pieces(self, body: bytes | Segments, set_id: str) -> Iterator[bytes]:
        """``body`` as the messages that carry it: itself, or its chunk messages (made
        one at a time, as they are published)."""
        size = self.chunking.chunk_size
        if not needs_chunks(body, size):
            return iter((body if isinstance(body, bytes) else segments.join(body),))
        try:
            return split(body, id=set_id, chunk_size=size)
        except ValueError as e:
            n = len(body) if isinstance(body, bytes) else segments.total(body)
            raise TransportError(f"cannot split a body of {n} bytes: {e}") from e

    async def last_announcement(self, task: str) -> Announcement | None:
        async def peek() -> Announcement | None:
            ch = await self._conn.channel()
            try:
                q = await ch.declare_queue(head_queue(task), passive=True)
                msg = await q.get(no_ack=False, fail=False)
                if msg is None:
                    return None
                # Put it back: the head queue keeps the last announcement for good.
                await msg.reject(requeue=True)
                return _announcement(msg.headers or {})
            finally:
                with contextlib.suppress(*_RETRYABLE):
                    await ch.close()

        return await self._guard(f"reading {head_queue(task)}", peek)

    async def queue_depth(self, task: str) -> int:
        async def depth() -> int:
            ch = await self._conn.channel()
            try:
                q = await ch.declare_queue(work_queue(task), passive=True)
                count = q.declaration_result.message_count
                return int(count or 0)
            finally:
                with contextlib.suppress(*_RETRYABLE):
                    await ch.close()

        ready = await self._guard(f"reading the depth of {work_queue(task)}", depth)
        held = sum(
            s.waiting
            for s in self._subs
            if isinstance(s, _AmqpUpdateSubscription) and s.task == task
        )
        return ready + held

    async def dead_letters(self, task: str, limit: int = 1000) -> list[DeadLetter]:
        async def take() -> list[DeadLetter]:
            ch = await self._conn.channel()
            out: list[DeadLetter] = []
            try:
                q = await ch.declare_queue(dead_queue(task), passive=True)
                while len(out) < limit:
                    msg = await q.get(no_ack=False, fail=False)
                    if msg is None:
                        break
                    out.append(_dead_letter(msg))
                    await msg.ack()
            finally:
                with contextlib.suppress(*_RETRYABLE):
                    await ch.close()
            return out

        return merge_dead_letters(await self._guard(f"reading {dead_queue(task)}", take))

    async def read_audit(self, task: str, *, idle_s: float = 1.0) -> AsyncIterator[bytes]:
        """Read the audit stream from its first retained offset (a stream consumer):
        the messages it held when asked (as far as the broker's count, which lags
        fresh publishes by a moment, says), waiting up to ``AUDIT_WAIT_S`` for each (a
        stream of large chunked updates takes the broker a while to read from disk);
        then whatever comes until ``idle_s`` passes without a message."""
        try:
            ch = await self._conn.channel()
            await ch.set_qos(prefetch_count=256)
            queue = await ch.declare_queue(audit_stream(task), passive=True)
        except _RETRYABLE as e:
            raise TransportError(f"reading {audit_stream(task)}: {e!r}") from e
        held = queue.declaration_result.message_count or 0
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        joiner = StreamJoiner(self.chunking.limits)
        try:
            tag = await queue.consume(inbox.put, arguments={"x-stream-offset": "first"})
            read = 0
            while True:
                wait = max(idle_s, AUDIT_WAIT_S) if read < held else idle_s
                try:
                    async with asyncio.timeout(wait):
                        msg = await inbox.get()
                except TimeoutError:
                    break
                read += 1
                await msg.ack()
                body, sender = msg.body, msg.user_id
                del msg  # a chunk's bytes are copied into its set's buffer, not kept
                for whole in joiner.feed(body, sender):
                    yield whole
            await queue.cancel(tag)
            for rest in joiner.finish():
                yield rest
        except _RETRYABLE as e:
            raise TransportError(f"reading {audit_stream(task)}: {e!r}") from e
        finally:
            with contextlib.suppress(*_RETRYABLE):
                await ch.close()

    # ------------------------------------------------------------------ participant side

    def _signed_off(self, body: bytes, message_id: str) -> aio_pika.Message:
        """A persistent message under this connection's broker user (``user_id``)."""
        return aio_pika.Message(
            body,
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            user_id=self.user_id,
            timestamp=time.time(),
        )

    async def publish_update(
        self, task: str, participant: str, body: bytes, *, message_id: str
    ) -> None:
        # The chunks of an update share its id: a publisher that retries sends the same
        # set again, and the receiver takes the copies as duplicates.
        for piece in self._pieces(body, message_id):
            await self.publish_raw(task, participant, piece, message_id=message_id)

    async def publish_raw(
        self, task: str, participant: str, body: bytes, *, message_id: str
    ) -> None:
        """Publish one message as it is (never split): a chunk message made elsewhere."""
        message = self._signed_off(body, message_id)
        await self._publish_confirmed(UPDATES_EXCHANGE, update_key(task, participant), message)

    async def publish_receipt(
        self, task: str, participant: str, body: bytes, *, message_id: str
    ) -> None:
        message = self._signed_off(body, message_id)
        await self._publish_confirmed(RECEIPTS_EXCHANGE, receipt_key(task, participant), message)

    async def consume_receipts(
        self, task: str, participant: str
    ) -> _AmqpSubscription[_ReceiptDelivery]:
        async def subscribe() -> _AmqpSubscription[_ReceiptDelivery]:
            ch = await self._conn.channel()
            await ch.set_qos(prefetch_count=64)
            queue = await ch.declare_queue(receipt_queue(task, participant), passive=True)
            sub = _AmqpSubscription(self, ch, queue, _ReceiptDelivery)
            await sub.start()
            return sub

        sub = await self._guard(f"consuming {receipt_queue(task, participant)}", subscribe)
        self._subs.append(sub)
        return sub

    async def consume_models(self, task: str, participant: str) -> _AmqpModelSubscription:
        async def subscribe() -> _AmqpModelSubscription:
            ch = await self._conn.channel()
            await ch.set_qos(prefetch_count=_MODEL_PREFETCH)
            queue = await ch.declare_queue(model_stream(task), passive=True)
            sub = _AmqpModelSubscription(self, task, ch, queue)
            await sub.start()
            return sub

        sub = await self._guard(f"consuming {model_stream(task)}", subscribe)
        self._subs.append(sub)
        return sub


class _AmqpSubscription(Generic[T]):
    """A consumer on one queue, on a channel of its own; a delivery is wrapped on arrival."""

    def __init__(
        self,
        transport: AmqpTransport,
        channel: AbstractChannel,
        queue: AbstractQueue,
        wrap: Callable[[AbstractIncomingMessage], T],
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        self._transport = transport
        self._channel = channel
        self._queue = queue
        self._wrap = wrap
        self._arguments = dict(arguments or {})
        self._inbox: asyncio.Queue[T] = asyncio.Queue()
        self._tag: str | None = None
        self._closed = False

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_message, arguments=self._arguments)

    async def _on_message(self, msg: AbstractIncomingMessage) -> None:
        self._inbox.put_nowait(self._wrap(msg))

    async def get(self) -> T:
        if self._closed:
            raise TransportError("subscription is closed")
        return await self._inbox.get()

    async def close(self) -> None:
        """Cancel the consumer and close the channel: unacked deliveries return to the queue."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(*_RETRYABLE):
            if self._tag is not None:
                await self._queue.cancel(self._tag)
        with contextlib.suppress(*_RETRYABLE):
            await self._channel.close()
        if self in self._transport._subs:
            self._transport._subs.remove(self)


class _Ledger:
    """The messages of one channel that are not settled yet, by delivery tag: every
    message received, whether a whole update, a chunk of a set being reassembled or
    one of a delivery not handed out yet."""

    __slots__ = ("channel", "unsettled")

    def __init__(self, channel: aiormq.abc.AbstractChannel | None) -> None:
        self.channel = channel
        self.unsettled: set[int] = set()

    @property
    def open(self) -> bool:
        return self.channel is not None and not self.channel.is_closed


async def _ack_messages(
    transport: AmqpTransport, ledger: _Ledger, batch: Mapping[int, AbstractIncomingMessage]
) -> None:
    """Ack the messages of ``batch`` (by delivery tag), all on ``ledger``'s channel.

    A multiple ack acknowledges every unsettled tag up to its own, so it is used only for
    the longest run of the channel's unsettled tags, lowest first, that are all in the
    batch: it never covers a message outside the batch (a chunk of another update, one
    held by the service). The rest of the batch is acked one by one.
    """
    if not batch:
        return
    tags = sorted(batch)
    below = sorted(t for t in ledger.unsettled if t <= tags[-1])
    run = 0
    while run < len(below) and below[run] in batch:
        run += 1
    rest = tags
    if run > 1:
        top = below[run - 1]
        await transport._guard("acking updates", functools.partial(batch[top].ack, multiple=True))
        ledger.unsettled.difference_update(below[:run])
        rest = [t for t in tags if t > top]
    for tag in rest:
        await transport._guard("acking an update", batch[tag].ack)
        ledger.unsettled.discard(tag)


def _drop_body(msg: AbstractIncomingMessage) -> None:
    """Let go of a chunk message's bytes once copied (its set's buffer holds them)."""
    with contextlib.suppress(ValueError, AttributeError):  # a locked (settled) message
        setattr(msg, "body", b"")  # noqa: B010 - the abstract type declares no setter


class _AmqpUpdateSubscription(_AmqpSubscription["_UpdateDelivery"]):
    """The work queue's consumer: reassembles chunk sets, hands out at most ``prefetch``
    unsettled deliveries (what the broker sends beyond waits here) and settles a batch
    with one multiple ack where it can."""

    def __init__(
        self,
        transport: AmqpTransport,
        task: str,
        channel: AbstractChannel,
        queue: AbstractQueue,
        prefetch: int,
    ) -> None:
        super().__init__(transport, channel, queue, self._whole)
        self.task = task
        self.hand_out = prefetch
        self._ledger = _Ledger(None)
        self._reasm: Reassembler[AbstractIncomingMessage] = Reassembler(transport.chunking.limits)
        self._waiting: deque[_UpdateDelivery] = deque()
        self._out: list[_UpdateDelivery] = []
        #: Chunked deliveries not settled yet, by set: a late copy of a chunk joins them.
        self._done: dict[SetKey, _UpdateDelivery] = {}
        self._changed = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Deliveries received and not handed out yet (their channel still open)."""
        return sum(1 for d in self._waiting if d.live)

    async def start(self) -> None:
        await super().start()
        self._ticker = asyncio.create_task(self._expire())

    def _ledger_for(self, msg: AbstractIncomingMessage) -> _Ledger:
        try:
            channel: aiormq.abc.AbstractChannel | None = msg.channel
        except aiormq.exceptions.ChannelInvalidStateError:  # closed already
            channel = None
        if channel is None or self._ledger.channel is not channel:  # a reopened channel
            self._ledger = _Ledger(channel)
            # The chunks of the old channel went back to the queue by themselves.
            self._reasm.forget()
            self._done.clear()
        return self._ledger

    def _whole(self, msg: AbstractIncomingMessage) -> _UpdateDelivery:
        body = msg.body
        return _UpdateDelivery(self, self._ledger, [Part(msg, b"", 0, len(body))], body, body)

    async def _on_message(self, msg: AbstractIncomingMessage) -> None:
        ledger = self._ledger_for(msg)
        tag = msg.delivery_tag or 0
        ledger.unsettled.add(tag)
        body = msg.body
        if not is_chunk(body):
            self._push(self._whole(msg))
            return
        try:
            chunk = parse(body)
            added = self._reasm.add(chunk, msg, msg.user_id)
        except ChunkError as e:
            if e.failed is not None:
                _drop_body(msg)
                self._push(self._refused(ledger, e.failed))
            else:
                refusal = TransportRefusal(e.reason, e.detail)
                alone = [Part(msg, b"", 0, len(body))]
                self._push(_UpdateDelivery(self, ledger, alone, b"", body, refusal))
            return
        _drop_body(msg)
        if isinstance(added, Complete):
            whole = _UpdateDelivery(self, ledger, added.parts, added.body, added.body)
            self._done[added.key] = whole
            self._push(whole)
        elif added is Added.LATE:
            held = self._done.get((msg.user_id or "", chunk.header.id))
            if held is not None and held.live and not held.settling and held._ledger is ledger:
                held.parts.append(Part(msg, chunk.prefix, chunk.header.start, chunk.header.end))
            else:  # a copy of a chunk of an update settled already: nothing to keep
                with contextlib.suppress(TransportError):
                    await _ack_messages(self._transport, ledger, {tag: msg})

    def _refused(self, ledger: _Ledger, failed: Failed[AbstractIncomingMessage]) -> _UpdateDelivery:
        refusal = TransportRefusal(failed.reason, failed.detail)
        return _UpdateDelivery(self, ledger, failed.parts, b"", failed.buffer, refusal)

    def _push(self, delivery: _UpdateDelivery) -> None:
        self._waiting.append(delivery)
        self._changed.set()

    def _next(self) -> _UpdateDelivery | None:
        self._out = [d for d in self._out if d.live]
        while self._waiting and len(self._out) < self.hand_out:
            found = self._waiting.popleft()
            if not found.live:  # its channel is gone: its messages are back in the queue
                continue
            self._out.append(found)
            return found
        return None

    def settled(self, delivery: _UpdateDelivery) -> None:
        """A delivery was settled: a slot is free; it takes no late chunk any more."""
        for key, held in list(self._done.items()):
            if held is delivery:
                del self._done[key]
        self._changed.set()

    async def _expire(self) -> None:
        """Chunk sets that made no progress for the timeout: refused deliveries."""
        tick = min(1.0, self._transport.chunking.limits.timeout_s / 4)
        while True:
            await asyncio.sleep(tick)
            for failed in self._reasm.expire():
                self._push(self._refused(self._ledger, failed))

    async def get(self) -> _UpdateDelivery:
        while True:
            if self._closed:
                raise TransportError("subscription is closed")
            found = self._next()
            if found is not None:
                return found
            self._changed.clear()
            await self._changed.wait()

    def ready(self, limit: int) -> list[UpdateDelivery]:
        if self._closed:
            raise TransportError("subscription is closed")
        out: list[UpdateDelivery] = []
        while len(out) < limit:
            found = self._next()
            if found is None:
                break
            out.append(found)
        return out

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        await super().close()
        self._changed.set()  # a get() waiting raises
        self._reasm.forget()
        self._waiting.clear()
        self._done.clear()

    async def ack_all(self, deliveries: Sequence[UpdateDelivery]) -> None:
        batches: dict[_Ledger, tuple[dict[int, AbstractIncomingMessage], list[_UpdateDelivery]]]
        batches = {}
        for d in deliveries:
            if not isinstance(d, _UpdateDelivery):
                raise TransportError(f"not a delivery of this transport: {d!r}")
            if d.live and not d.settling:
                messages, owners = batches.setdefault(d._ledger, ({}, []))
                messages.update(d.messages())
                owners.append(d)
        for ledger, (messages, owners) in batches.items():
            await _ack_messages(self._transport, ledger, messages)
            for d in owners:
                d._settle()


class _AmqpModelSubscription(_AmqpSubscription["_ModelDelivery"]):
    """A consumer on a task's model stream from its last announcement.

    Of the announcements received whole, only the newest waits to be handed out: an
    older one is acked (giving the stream its credit back) as soon as a newer one
    arrives. Chunk messages are acked as soon as they are copied into their set. A
    consumer that starts in the middle of a chunked announcement goes back (a new
    consumer on a new channel) to the offset of its first chunk: chunk ``i`` at offset
    ``o`` means chunk 0 is at ``o - i`` or before (docs/chunking.md).
    """

    def __init__(
        self, transport: AmqpTransport, task: str, channel: AbstractChannel, queue: AbstractQueue
    ) -> None:
        super().__init__(
            transport, channel, queue, _ModelDelivery.of, arguments={"x-stream-offset": "last"}
        )
        self._task = task
        self._newest: _ModelDelivery | None = None
        self._arrived = asyncio.Event()
        limits = dataclasses.replace(transport.chunking.limits, recent=0)
        self._reasm: Reassembler[int] = Reassembler(limits)
        self._generation = 0
        #: The first stream offset the current consumer received.
        self._first: int | None = None
        self._rewinds = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._tag = await self._queue.consume(
            functools.partial(self._receive, self._generation), arguments=self._arguments
        )
        self._spawn(self._expire())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_message(self, msg: AbstractIncomingMessage) -> None:
        await self._receive(self._generation, msg)

    async def _receive(self, generation: int, msg: AbstractIncomingMessage) -> None:
        if generation != self._generation:
            return  # from a consumer given up for an earlier offset: it reads them again
        offset = _offset(msg)
        if self._first is None:
            self._first = offset
        body = msg.body
        if not is_chunk(body):
            await self._offer(_ModelDelivery.of(msg))
            return
        version = _version(msg)
        # Its credit back at once: a stream never redelivers, the bytes are copied below.
        with contextlib.suppress(*_RETRYABLE):
            await msg.ack()
        _drop_body(msg)
        try:
            chunk = parse(body)
            added = self._reasm.add(chunk, version, msg.user_id)
        except ChunkError as e:
            refusal = TransportRefusal(e.reason, e.detail)
            await self._offer(_ModelDelivery(None, b"", version, refusal))
            return
        if isinstance(added, Complete):
            await self._offer(_ModelDelivery(None, added.body, version))
        elif added is Added.STORED and offset is not None:
            missing = self._reasm.missing((msg.user_id or "", chunk.header.id))
            target = offset - chunk.header.index
            first = self._first
            if (
                missing
                and missing[0] < chunk.header.index
                and first is not None
                and target < first
                and self._rewinds < _MAX_REWINDS
            ):
                # Its first chunks are before where this consumer started.
                self._rewinds += 1
                self._generation += 1
                self._first = target
                self._reasm.forget()
                self._spawn(self._rewind(self._generation, target))

    async def _rewind(self, generation: int, offset: int) -> None:
        """Consume again from ``offset``, on a new channel (the old one is closed)."""
        old = self._channel
        try:
            ch = await self._transport._conn.channel()
            await ch.set_qos(prefetch_count=_MODEL_PREFETCH)
            queue = await ch.declare_queue(model_stream(self._task), passive=True)
            if self._closed or generation != self._generation:
                await ch.close()
                return
            self._channel, self._queue = ch, queue
            self._arguments = {"x-stream-offset": offset}
            self._tag = await queue.consume(
                functools.partial(self._receive, generation), arguments=self._arguments
            )
        except _RETRYABLE:
            return  # the set stays incomplete and times out
        finally:
            if old is not self._channel:
                with contextlib.suppress(*_RETRYABLE):
                    await old.close()

    async def _expire(self) -> None:
        tick = min(1.0, self._transport.chunking.limits.timeout_s / 4)
        while True:
            await asyncio.sleep(tick)
            for failed in self._reasm.expire():
                refusal = TransportRefusal(failed.reason, failed.detail)
                await self._offer(_ModelDelivery(None, b"", failed.parts[0].handle, refusal))

    async def _offer(self, delivery: _ModelDelivery) -> None:
        kept, skipped = delivery, self._newest
        if skipped is not None and skipped.version > delivery.version:
            kept, skipped = skipped, delivery
        self._newest = kept
        self._arrived.set()
        if skipped is not None:
            await skipped.release()

    async def get(self) -> _ModelDelivery:
        while True:
            if self._closed:
                raise TransportError("subscription is closed")
            newest, self._newest = self._newest, None
            self._arrived.clear()
            if newest is not None:
                return newest
            await self._arrived.wait()

    async def close(self) -> None:
        """Cancel the consumer and close the channel (the stream keeps every message)."""
        for task in list(self._tasks):
            task.cancel()
        await super().close()
        self._arrived.set()  # a get() waiting raises


def _dead_letter(msg: AbstractIncomingMessage) -> DeadLetter:
    headers: dict[str, object] = dict(msg.headers or {})
    reason = headers.get(REASON_HEADER)
    detail = headers.get(DETAIL_HEADER)
    if reason is None:  # dead-lettered by the broker itself (delivery limit, rejection)
        deaths = headers.get("x-death")
        first = deaths[0] if isinstance(deaths, list) and deaths else {}
        reason = first.get("reason", "unknown") if isinstance(first, dict) else "unknown"
        reason = "delivery_limit" if reason == "delivery_limit" else f"broker_{reason}"
        detail = "dead-lettered by the broker"
    return DeadLetter(
        msg.body,
        reason.decode() if isinstance(reason, bytes) else str(reason),
        detail.decode() if isinstance(detail, bytes) else str(detail or ""),
        headers,
    )


def _announcement(headers: Mapping[str, Any]) -> Announcement | None:
    version = headers.get(VERSION_HEADER)
    if not isinstance(version, int):
        return None
    fence = headers.get(FENCE_HEADER)
    digest = headers.get(VERSION_HASH_HEADER)
    if isinstance(digest, bytes):
        digest = digest.decode(errors="replace")
    try:
        version_hash = bytes.fromhex(digest) if isinstance(digest, str) else None
    except ValueError:
        version_hash = None
    return Announcement(version, fence if isinstance(fence, int) else None, version_hash)


def _version(msg: AbstractIncomingMessage) -> int:
    """The version an announcement names in its header (-1 if absent)."""
    v = (msg.headers or {}).get(VERSION_HEADER)
    return v if isinstance(v, int) else -1


def _offset(msg: AbstractIncomingMessage) -> int | None:
    """The stream offset of a message read from a stream (None if absent)."""
    v = (msg.headers or {}).get("x-stream-offset")
    return v if isinstance(v, int) else None


async def _close_reason(channel: aiormq.abc.AbstractChannel) -> BaseException | None:
    """The error the broker closed ``channel`` with (waiting a moment for it), if any."""
    closing = channel.closing
    await asyncio.wait({closing}, timeout=1.0)
    if not closing.done() or closing.cancelled():
        return None
    return closing.exception()


class _UpdateDelivery:
    """One update: one message, or every chunk message of a chunked one (``parts``,
    whose bodies are rebuilt from ``buffer`` when dead-lettered)."""

    def __init__(
        self,
        sub: _AmqpUpdateSubscription,
        ledger: _Ledger,
        parts: list[Part[AbstractIncomingMessage]],
        body: Body,
        buffer: bytes | Owned,
        refusal: TransportRefusal | None = None,
    ) -> None:
        self._sub, self._t, self._task, self._ledger = sub, sub._transport, sub.task, ledger
        self.parts, self._body, self._buffer, self.refusal = parts, body, buffer, refusal
        self._settled = False
        #: Being dead-lettered: a late chunk copy does not join it any more.
        self.settling = False

    @property
    def tag(self) -> int:
        """The delivery tag of its first message."""
        return self.parts[0].handle.delivery_tag or 0

    @property
    def body(self) -> Body:
        return self._body

    @property
    def user_id(self) -> str | None:
        return self.parts[0].handle.user_id

    @property
    def message_id(self) -> str | None:
        return self.parts[0].handle.message_id

    @property
    def redelivered(self) -> bool:
        return any(p.handle.redelivered for p in self.parts)

    @property
    def live(self) -> bool:
        return not self._settled and self._ledger.open

    def messages(self) -> dict[int, AbstractIncomingMessage]:
        """Its messages by delivery tag."""
        return {p.handle.delivery_tag or 0: p.handle for p in self.parts}

    def _settle(self) -> None:
        self._settled = True
        self._ledger.unsettled.difference_update(self.messages())
        self._sub.settled(self)

    async def ack(self) -> None:
        if self._settled:
            raise TransportError("acking an update: already settled")
        await _ack_messages(self._t, self._ledger, self.messages())
        self._settle()

    async def dead_letter(self, reason: str, detail: str = "") -> None:
        """Publish each message to the dead-letter exchange with the reason (confirmed),
        then ack them all."""
        if self._settled:
            raise TransportError("dead-lettering an update: already settled")
        self.settling = True
        try:
            for part in list(self.parts):
                msg = part.handle
                headers: dict[str, Any] = dict(msg.headers or {})
                headers.update({REASON_HEADER: reason, DETAIL_HEADER: detail[:1024]})
                if msg.user_id:
                    headers[SENDER_HEADER] = msg.user_id
                copy = aio_pika.Message(
                    part.message(self._buffer),
                    headers=headers,
                    content_type=msg.content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=msg.message_id,
                )
                await self._t._publish_confirmed(DEAD_LETTER_EXCHANGE, dead_key(self._task), copy)
            await _ack_messages(self._t, self._ledger, self.messages())
            self._settle()
        finally:
            self.settling = False


class _ModelDelivery:
    """A model announced: one message (``msg``), or a chunked one reassembled (its
    messages acked on arrival; acking it only marks it done)."""

    def __init__(
        self,
        msg: AbstractIncomingMessage | None,
        body: Body,
        version: int,
        refusal: TransportRefusal | None = None,
    ) -> None:
        self._msg, self._body, self._version, self.refusal = msg, body, version, refusal
        self._acked = False

    @classmethod
    def of(cls, msg: AbstractIncomingMessage) -> _ModelDelivery:
        return cls(msg, msg.body, _version(msg))

    @property
    def body(self) -> Body:
        return self._body

    @property
    def version(self) -> int:
        return self._version

    async def ack(self) -> None:
        if self._msg is None:
            if self._acked:
                raise TransportError("acking a model: already acked")
            self._acked = True
            return
        try:
            await self._msg.ack()
        except _RETRYABLE as e:
            raise TransportError(f"acking a model: {e!r}") from e

    async def release(self) -> None:
        """Done with it unseen (a newer one arrived). Its channel may be gone (a
        reconnect): then there is nothing to give back."""
        self._acked = True
        if self._msg is not None:
            with contextlib.suppress(*_RETRYABLE):
                await self._msg.ack()


class _ReceiptDelivery:
    def __init__(self, msg: AbstractIncomingMessage) -> None:
        self._msg = msg

    @property
    def body(self) -> bytes:
        return self._msg.body

    @property
    def message_id(self) -> str | None:
        return self._msg.message_id

    async def ack(self) -> None:
        try:
            await self._msg.ack()
        except _RETRYABLE as e:
            raise TransportError(f"acking a receipt: {e!r}") from e
