"""The transport interface both sides program against.

Participants publish updates and receive models; the aggregator consumes updates,
dead-letters refusals with a reason, and announces models. Every delivery must be
acknowledged explicitly: an unacknowledged delivery goes back to its queue when
its subscription closes (or its process dies), so nothing is lost before the
receiver has saved its effect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from common.chunks import (
    DEFAULT_CHUNK_SIZE,
    ChunkError,
    ChunkLimits,
    Complete,
    Reassembler,
    chunk_count,
    is_chunk,
    join,
    parse,
)
from common.errors import FedqError
from common.refusals import Refusal
from common.segments import Owned, Segments
from common.transport.names import RECEIPT_QUEUE_MAX_LENGTH

#: Header of a dead letter naming the broker user that sent the update.
SENDER_HEADER = "x-fedq-user-id"

T_co = TypeVar("T_co", covariant=True)
T = TypeVar("T")

#: A message body as received: ``bytes``, or one reassembled from chunks (common/segments.py
#: ``Owned``: a bytearray or a memory map of its own).
Body = bytes | Owned


@dataclass(frozen=True, slots=True)
class TaskTopology:
    """What the aggregator declares for one task."""

    task: str
    participants: Sequence[str] = ()
    #: Deliveries of one update before the broker dead-letters it (poison messages).
    delivery_limit: int = 5
    #: Audit stream retention: age (RabbitMQ duration, e.g. "90D") and size in bytes.
    audit_max_age: str = "90D"
    audit_max_bytes: int = 20 * 1024**3
    #: Receipts each participant's receipt queue keeps at most (oldest dropped first).
    receipts_max_length: int = RECEIPT_QUEUE_MAX_LENGTH
    #: Model stream retention: age (RabbitMQ duration) and size in bytes. The broker
    #: drops whole segments of ``models_segment_bytes``, never the one being written,
    #: so the last announcement is always kept.
    models_max_age: str = "1D"
    models_max_bytes: int = 256 * 1024**2
    models_segment_bytes: int = 16 * 1024**2


#: The most unacked messages one AMQP consumer may have (``basic.qos`` takes a short).
MAX_PREFETCH_MESSAGES = 65535


@dataclass(frozen=True, slots=True)
class Chunking:
    """How a transport splits bodies larger than one message and reassembles them
    (docs/chunking.md). Every party of a task should use the same ``chunk_size``."""

    #: A body longer than this travels as chunk messages of this many data bytes (plus
    #: a header of at most 512 bytes). Keep it under the broker's ``max_message_size``.
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: What a receiver reassembles at most (largest body, chunks, sets at once, timeout).
    limits: ChunkLimits = field(default_factory=ChunkLimits)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk size must be positive, not {self.chunk_size}")

    @property
    def max_chunks(self) -> int:
        """Chunks of the largest body a receiver takes, at this chunk size."""
        return min(self.limits.max_chunks, chunk_count(self.limits.max_total, self.chunk_size))

    def prefetch_messages(self, prefetch: int, update_bytes: int | None = None) -> int:
        """The broker prefetch (in messages) of a consumer that holds up to ``prefetch``
        updates unacked: ``prefetch * c + (C - c)``, where ``C`` is :attr:`max_chunks`
        and ``c`` the chunks of an update of ``update_bytes`` (``C`` if not given).

        With every update at most ``c`` chunks, ``prefetch - 1`` updates held leave room
        for one more of up to ``C`` chunks: the consumer never stalls on a chunked update
        it could hold. Capped at :data:`MAX_PREFETCH_MESSAGES` (docs/chunking.md).
        """
        if prefetch < 1:
            raise ValueError(f"prefetch must be positive, not {prefetch}")
        most = self.max_chunks
        per = (
            most if update_bytes is None else min(most, chunk_count(update_bytes, self.chunk_size))
        )
        return min(prefetch * per + (most - per), MAX_PREFETCH_MESSAGES)


@dataclass(frozen=True, slots=True)
class TransportRefusal:
    """Why the transport refuses a delivery before anyone decodes it: a chunk set it
    cannot reassemble (incomplete after its timeout, inconsistent, over a limit)."""

    reason: Refusal
    detail: str


def refusal_of(delivery: object) -> TransportRefusal | None:
    """The transport's refusal of ``delivery`` (its ``refusal``), or None for an update
    to decode. Such a delivery has an empty body; dead-lettering it dead-letters every
    message it stands for (docs/chunking.md)."""
    found = getattr(delivery, "refusal", None)
    return found if isinstance(found, TransportRefusal) else None


class UpdateDelivery(Protocol):
    """An update handed to the aggregator, to be acked or dead-lettered exactly once."""

    @property
    def body(self) -> Body:
        """The update's bytes: ``Owned`` when reassembled from chunks (its own
        memory: a decoder may hand out views into it)."""
        ...

    @property
    def user_id(self) -> str | None:
        """The sender as the broker validated it (AMQP ``user_id``)."""
        ...

    @property
    def message_id(self) -> str | None: ...
    @property
    def redelivered(self) -> bool: ...
    @property
    def live(self) -> bool:
        """Whether it can still be settled: not settled yet, its channel still open.

        A delivery whose channel was lost goes back to the queue by itself and comes
        again as a new delivery (``redelivered``).
        """
        ...

    async def ack(self) -> None:
        """Done with it: its effect is saved (or it is a harmless duplicate)."""
        ...

    async def dead_letter(self, reason: str, detail: str = "") -> None:
        """Refuse it: it moves to the task's dead-letter queue with the reason."""
        ...


class ModelDelivery(Protocol):
    """A model announced to a participant; ack it once done with it (flow control:
    a model stream never redelivers, a new consumer starts at the last announcement)."""

    @property
    def body(self) -> Body: ...
    @property
    def version(self) -> int:
        """The version named in the announcement's header (-1 if absent)."""
        ...

    async def ack(self) -> None: ...


class ReceiptDelivery(Protocol):
    """A receipt (the fate of one of its updates) delivered to a participant."""

    @property
    def body(self) -> bytes: ...
    @property
    def message_id(self) -> str | None: ...
    async def ack(self) -> None:
        """Done with it: counted. An unacked receipt comes again after a reconnect."""
        ...


class Subscription(Protocol[T_co]):
    """A consumer on one queue."""

    async def get(self) -> T_co:
        """The next delivery; wait for one (bound it with ``asyncio.timeout``)."""
        ...

    async def close(self) -> None:
        """Stop consuming; deliveries not acked go back to the queue."""
        ...


class UpdateSubscription(Subscription[UpdateDelivery], Protocol):
    """The aggregator's consumer on a task's work queue, with batch settlement."""

    def ready(self, limit: int) -> list[UpdateDelivery]:
        """Up to ``limit`` deliveries already received and not yet handed out, in order.

        Never waits (possibly empty); what it returns :meth:`get` does not return again.
        """
        ...

    async def ack_all(self, deliveries: Sequence[UpdateDelivery]) -> None:
        """Ack every delivery of ``deliveries`` that is still :attr:`~UpdateDelivery.live`.

        The others (settled already, or their channel lost) are skipped. Where the
        batch holds every unsettled delivery of its channel up to its highest, that is
        one acknowledgement for all. Raises TransportError if the broker cannot be told:
        those not acked stay live, or come again once their channel is gone.
        """
        ...


@dataclass(frozen=True, slots=True)
class Announcement:
    """The last model announced for a task, as the broker keeps it."""

    version: int
    #: The writer's fencing token when it announced (None if not recorded).
    fence: int | None = None
    #: The announced version's chained hash (None if not recorded).
    version_hash: bytes | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A refused update as it sits in the dead-letter queue."""

    body: bytes
    reason: str
    detail: str
    headers: Mapping[str, object] = field(default_factory=dict)


class Transport(Protocol):
    """One connection to the broker (or the in-process one)."""

    async def close(self) -> None: ...

    # --- aggregator side
    async def declare_task(self, topology: TaskTopology) -> None:
        """Declare the exchanges and the task's queues (idempotent)."""
        ...

    async def consume_updates(
        self, task: str, *, prefetch: int, update_bytes: int | None = None
    ) -> UpdateSubscription:
        """Consume the task's work queue with at most ``prefetch`` unacked deliveries.

        A delivery is one whole update, however many chunk messages it took. The broker
        prefetch in messages is :meth:`Chunking.prefetch_messages` (``update_bytes``: the
        size of the largest update expected, to size it; the largest allowed if None);
        what arrives beyond ``prefetch`` deliveries waits in the subscription, counted by
        :meth:`queue_depth`.
        """
        ...

    async def announce_model(
        self,
        task: str,
        version: int,
        body: bytes | Segments,
        *,
        fence: int | None = None,
        version_hash: bytes | None = None,
    ) -> None:
        """Publish a model version once, confirmed: it lands in the task's model stream,
        which every participant reads, and in the task's head queue, which keeps the
        last announcement with ``fence`` and ``version_hash`` for :meth:`last_announcement`.
        """
        ...

    async def last_announcement(self, task: str) -> Announcement | None:
        """The last model announced for the task (read without consuming), or None."""
        ...

    async def queue_depth(self, task: str) -> int:
        """Updates waiting in the task's work queue (ready, not yet delivered), and those
        this connection's consumer received but has not handed out yet. A chunked update
        still in the queue counts once per chunk message."""
        ...

    async def dead_letters(self, task: str, limit: int = 1000) -> list[DeadLetter]:
        """Take up to ``limit`` dead-letter messages off the task's dead-letter queue.

        The chunk messages of one update taken together are returned as one dead letter
        with the whole body (:func:`merge_dead_letters`).
        """
        ...

    async def publish_receipt(
        self, task: str, participant: str, body: bytes, *, message_id: str
    ) -> None:
        """Send a receipt to the participant's receipt queue; returns once confirmed.

        Persistent. Raises TransportError when it is not confirmed in time.
        """
        ...

    def read_audit(self, task: str, *, idle_s: float = 1.0) -> AsyncIterator[bytes]:
        """Every retained update of the task, oldest first, from the audit stream.

        Reading does not consume: the stream keeps them (until its retention drops
        them). Ends once no message has arrived for ``idle_s`` seconds. A chunked update
        is yielded once, whole, where its set completes; the messages of a set that does
        not complete are yielded as they are (chunk messages, which no decoder accepts).
        """
        ...

    # --- participant side
    async def publish_update(
        self, task: str, participant: str, body: bytes, *, message_id: str
    ) -> None:
        """Publish an update; returns once the broker has confirmed it (every chunk
        message of it, when it is larger than the chunk size)."""
        ...

    async def consume_models(self, task: str, participant: str) -> Subscription[ModelDelivery]:
        """Consume the task's model stream from its last announcement.

        :meth:`Subscription.get` returns the newest model of those received meanwhile
        (the highest version; of equals, the later) and acks the older ones unseen, so
        a slow participant never works through a backlog. The stream is the task's, not
        the participant's: ``participant`` names the reader only.
        """
        ...

    async def consume_receipts(self, task: str, participant: str) -> Subscription[ReceiptDelivery]:
        """Consume the participant's receipt queue (declared by the aggregator)."""
        ...


async def next_or_none(
    sub: Subscription[T], stop: asyncio.Event, wait: float | None = None
) -> T | None:
    """The next delivery; None once ``stop`` is set or after ``wait`` seconds."""
    getter = asyncio.ensure_future(sub.get())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({getter, stopper}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        getter.cancel()
        raise
    finally:
        stopper.cancel()
    if getter.done():
        return getter.result()
    getter.cancel()
    return None


def merge_dead_letters(letters: Sequence[DeadLetter]) -> list[DeadLetter]:
    """Dead letters with the chunk messages of each set that is complete among them
    merged into one (the whole body, the first chunk's reason and headers), at the
    place of its first chunk; the others as they are."""
    groups: dict[tuple[str, str], list[int]] = {}
    parsed: dict[int, tuple[str, str]] = {}
    for i, letter in enumerate(letters):
        if not is_chunk(letter.body):
            continue
        try:
            header = parse(letter.body).header
        except FedqError:
            continue
        sender = letter.headers.get(SENDER_HEADER)
        key = (str(sender) if sender is not None else "", header.id)
        groups.setdefault(key, []).append(i)
        parsed[i] = key
    merged: dict[tuple[str, str], DeadLetter] = {}
    for key, indices in groups.items():
        try:
            body = join(letters[i].body for i in indices)
        except FedqError:
            continue
        first = letters[indices[0]]
        merged[key] = DeadLetter(body, first.reason, first.detail, first.headers)
    out: list[DeadLetter] = []
    for i, letter in enumerate(letters):
        found = parsed.get(i)
        if found is None or found not in merged:
            out.append(letter)
        elif groups[found][0] == i:
            out.append(merged[found])
    return out


class StreamJoiner:
    """Whole bodies out of a stream of messages (the audit stream) that may hold chunk
    sets: :meth:`feed` each message's body and sender in stream order.

    A set is returned where it completes; a later copy of one of its chunks is left
    out. A message that is no valid chunk, and the messages of a set that fails (its
    hash, too many sets open at once: the one idle longest is given up, the sender's
    own when it holds as many as it may) or that is
    still incomplete at :meth:`finish`, are returned as they were sent. Sets never time
    out here: reading history, the next message may be a long time later.
    """

    def __init__(self, limits: ChunkLimits) -> None:
        self._reasm: Reassembler[None] = Reassembler(limits)

    def feed(self, body: bytes, sender: str | None) -> list[bytes]:
        """What is whole (or given up) once ``body`` is taken, in order."""
        if not is_chunk(body):
            return [body]
        out: list[bytes] = []
        try:
            chunk = parse(body)
        except ChunkError:
            return [body]
        while True:
            try:
                added = self._reasm.add(chunk, None, sender)
            except ChunkError as e:
                if e.failed is not None:
                    return out + e.failed.messages()
                if e.reason is Refusal.CHUNKS_INCOMPLETE:  # too many sets open: make room
                    evicted = self._reasm.evict_oldest(sender)
                    if evicted is not None:
                        out += evicted.messages()
                        continue
                return [*out, body]
            if isinstance(added, Complete):
                out.append(bytes(added.body))  # the audit stream's readers take bytes
            return out

    def finish(self) -> list[bytes]:
        """The messages of the sets still incomplete, as they were sent."""
        return [m for failed in self._reasm.drain() for m in failed.messages()]
