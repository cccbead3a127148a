"""An in-process broker with the semantics fedq relies on from RabbitMQ.

Manual acks; unacked deliveries return to their queue when a subscription
closes; a delivery limit dead-letters poison messages; single active consumer on
work queues; one model stream per task, read from its last announcement, of which a
subscription hands out only the newest; an append-only audit log of every update.
Used by the embedded simulation and by the shared transport tests, next to the
RabbitMQ implementation. Bodies larger than the chunk size travel as chunk messages,
reassembled by the receiving side, exactly as over RabbitMQ (docs/chunking.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

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
from common.errors import TransportError
from common.segments import Segments
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
    DETAIL_HEADER,
    FENCE_HEADER,
    REASON_HEADER,
    VERSION_HASH_HEADER,
    VERSION_HEADER,
)

_ids = itertools.count()


@dataclass(slots=True)
class _Message:
    body: bytes
    headers: dict[str, object]
    user_id: str | None
    message_id: str | None
    deliveries: int = 0
    tag: int = field(default_factory=lambda: next(_ids))


class _Queue:
    def __init__(
        self,
        *,
        max_length: int | None = None,
        delivery_limit: int | None = None,
        dead: list[DeadLetter] | None = None,
        single_active: bool = False,
    ) -> None:
        self.ready: deque[_Message] = deque()
        self.max_length = max_length
        self.delivery_limit = delivery_limit
        self.dead = dead
        self.single_active = single_active
        self.consumers: list[_Subscription[object]] = []
        self.changed = asyncio.Condition()

    async def put(self, msg: _Message) -> None:
        async with self.changed:
            self.ready.append(msg)
            while self.max_length is not None and len(self.ready) > self.max_length:
                self.ready.popleft()  # drop-head
            self.changed.notify_all()

    async def requeue(self, msgs: list[_Message]) -> None:
        async with self.changed:
            for msg in reversed(msgs):
                if self.delivery_limit is not None and msg.deliveries >= self.delivery_limit:
                    if self.dead is not None:
                        self.dead.append(
                            DeadLetter(msg.body, "delivery_limit", "delivery limit reached")
                        )
                    continue
                self.ready.appendleft(msg)
            while self.max_length is not None and len(self.ready) > self.max_length:
                self.ready.popleft()
            self.changed.notify_all()


T = TypeVar("T")


class _Subscription(Generic[T]):
    def __init__(self, queue: _Queue, prefetch: int, wrap: type[T]) -> None:
        self._q = queue
        self._prefetch = prefetch
        self._wrap = wrap
        self.unacked: dict[int, _Message] = {}
        self.closed = False
        queue.consumers.append(self)  # type: ignore[arg-type]

    def _may_take(self) -> bool:
        q = self._q
        active = not q.single_active or (q.consumers and q.consumers[0] is self)
        return bool(active and q.ready and len(self.unacked) < self._prefetch)

    async def get(self) -> T:
        q = self._q
        async with q.changed:
            await q.changed.wait_for(lambda: self.closed or self._may_take())
            if self.closed:
                raise TransportError("subscription is closed")
            msg = q.ready.popleft()
            msg.deliveries += 1
            self.unacked[msg.tag] = msg
        return self._wrap(self, msg)  # type: ignore[call-arg]

    async def settle(self, msg: _Message) -> None:
        async with self._q.changed:
            if self.unacked.pop(msg.tag, None) is None:
                raise TransportError("delivery already settled or its subscription closed")
            self._q.changed.notify_all()

    def _take_ready(self, limit: int) -> list[_Message]:
        """Up to ``limit`` messages this consumer may take now (no waiting)."""
        taken: list[_Message] = []
        while len(taken) < limit and not self.closed and self._may_take():
            msg = self._q.ready.popleft()
            msg.deliveries += 1
            self.unacked[msg.tag] = msg
            taken.append(msg)
        return taken

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        pending = list(self.unacked.values())
        self.unacked.clear()
        if self in self._q.consumers:
            self._q.consumers.remove(self)  # type: ignore[arg-type]
        await self._q.requeue(pending)


class _UpdateSubscription(_Subscription["_UpdateDelivery"]):
    """The work queue's consumer: takes up to the message prefetch from the queue,
    reassembles chunk sets, hands out at most ``prefetch`` unsettled deliveries."""

    def __init__(
        self, queue: _Queue, prefetch: int, chunking: Chunking, update_bytes: int | None
    ) -> None:
        super().__init__(queue, chunking.prefetch_messages(prefetch, update_bytes), _UpdateDelivery)
        self.hand_out = prefetch
        self._reasm: Reassembler[_Message] = Reassembler(chunking.limits)
        #: Received whole (or refused), not handed out yet, in arrival order.
        self.waiting: deque[_UpdateDelivery] = deque()
        self._out: list[_UpdateDelivery] = []
        #: Chunked deliveries not settled yet, by set: a late copy of a chunk joins them.
        self._done: dict[SetKey, _UpdateDelivery] = {}

    async def get(self) -> _UpdateDelivery:
        q = self._q
        async with q.changed:
            while True:
                if self.closed:
                    raise TransportError("subscription is closed")
                self._pull()
                found = self._next()
                if found is not None:
                    return found
                deadline = self._reasm.next_deadline()
                wait = None if deadline is None else max(0.0, deadline - time.monotonic()) + 0.01
                try:
                    async with asyncio.timeout(wait):
                        await q.changed.wait()
                except TimeoutError:
                    pass

    def ready(self, limit: int) -> list[UpdateDelivery]:
        """What the broker would have sent already (within the prefetch), no waiting."""
        if self.closed:
            raise TransportError("subscription is closed")
        self._pull()
        out: list[UpdateDelivery] = []
        while len(out) < limit:
            found = self._next()
            if found is None:
                break
            out.append(found)
        return out

    def _pull(self) -> None:
        """Take what the prefetch allows off the queue; collect expired chunk sets."""
        for msg in self._take_ready(self._prefetch):
            self._absorb(msg)
        for failed in self._reasm.expire():
            self.waiting.append(_refused(self, failed))

    def _next(self) -> _UpdateDelivery | None:
        self._out = [d for d in self._out if d.live]
        if not self.waiting or len(self._out) >= self.hand_out:
            return None
        found = self.waiting.popleft()
        self._out.append(found)
        return found

    def _absorb(self, msg: _Message) -> None:
        body = msg.body
        if not is_chunk(body):
            self.waiting.append(_UpdateDelivery(self, [Part(msg, b"", 0, len(body))], body))
            return
        try:
            chunk = parse(body)
            added = self._reasm.add(chunk, msg, msg.user_id)
        except ChunkError as e:
            alone: Failed[_Message] = Failed(
                (msg.user_id or "", ""), e.reason, e.detail, body, [Part(msg, b"", 0, len(body))]
            )
            self.waiting.append(_refused(self, e.failed or alone))
            return
        if isinstance(added, Complete):
            whole = _UpdateDelivery(self, added.parts, added.body)
            self._done[added.key] = whole
            self.waiting.append(whole)
        elif added is Added.LATE:
            held = self._done.get((msg.user_id or "", chunk.header.id))
            if held is not None and held.live and not held.settling:
                held.parts.append(Part(msg, chunk.prefix, chunk.header.start, chunk.header.end))
            else:  # a copy of a chunk of an update settled already: acked at once
                self.unacked.pop(msg.tag, None)

    def forget(self, delivery: _UpdateDelivery) -> None:
        """A delivery was settled: it no longer takes a late chunk."""
        for key, held in list(self._done.items()):
            if held is delivery:
                del self._done[key]

    async def close(self) -> None:
        await super().close()
        self._reasm.forget()
        self.waiting.clear()
        self._done.clear()

    async def ack_all(self, deliveries: Sequence[UpdateDelivery]) -> None:
        """Ack the live ones at once; the others are skipped."""
        live: list[_UpdateDelivery] = []
        for d in deliveries:
            if not isinstance(d, _UpdateDelivery):
                raise TransportError(f"not a delivery of this transport: {d!r}")
            if d.live and not d.settling:
                live.append(d)
        for sub in {id(d._sub): d._sub for d in live}.values():
            async with sub._q.changed:
                for d in live:
                    if d._sub is sub:
                        d._settle_locked()
                sub._q.changed.notify_all()


def _refused(sub: _UpdateSubscription, failed: Failed[_Message]) -> _UpdateDelivery:
    return _UpdateDelivery(sub, failed.parts, b"", TransportRefusal(failed.reason, failed.detail))


class _UpdateDelivery:
    """One update: one message, or every chunk message of a chunked one."""

    def __init__(
        self,
        sub: _UpdateSubscription,
        parts: list[Part[_Message]],
        body: Body,
        refusal: TransportRefusal | None = None,
    ) -> None:
        self._sub, self.parts, self._body, self.refusal = sub, parts, body, refusal
        self._settled = False
        self.settling = False

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
        return any(p.handle.deliveries > 1 for p in self.parts)

    @property
    def live(self) -> bool:
        return not self._settled and not self._sub.closed

    def _settle_locked(self) -> None:
        """Take every message of it off the unacked (the queue's lock held)."""
        if not self.live or any(p.handle.tag not in self._sub.unacked for p in self.parts):
            raise TransportError("delivery already settled or its subscription closed")
        for p in self.parts:
            del self._sub.unacked[p.handle.tag]
        self._settled = True
        self._sub.forget(self)

    async def _settle(self) -> None:
        async with self._sub._q.changed:
            self._settle_locked()
            self._sub._q.changed.notify_all()

    async def ack(self) -> None:
        await self._settle()

    async def dead_letter(self, reason: str, detail: str = "") -> None:
        dead = self._sub._q.dead
        self.settling = True
        try:
            await self._settle()
        finally:
            self.settling = False
        if dead is not None:
            for p in self.parts:
                msg = p.handle
                headers = {**msg.headers, REASON_HEADER: reason, DETAIL_HEADER: detail}
                if msg.user_id:
                    headers[SENDER_HEADER] = msg.user_id
                dead.append(DeadLetter(msg.body, reason, detail, headers))


class _ReceiptDelivery:
    def __init__(self, sub: _Subscription[_ReceiptDelivery], msg: _Message) -> None:
        self._sub, self._msg = sub, msg

    @property
    def body(self) -> bytes:
        return self._msg.body

    @property
    def message_id(self) -> str | None:
        return self._msg.message_id

    async def ack(self) -> None:
        await self._sub.settle(self._msg)


class _ModelStream:
    """A task's model stream: announcement messages (chunk messages of a chunked one)
    with offsets.

    Like the broker's, it drops the oldest messages once they hold more than
    ``max_bytes``, never those of the last announcement. It also drops those that no
    reader can be handed any more (older than every open reader's position): a reader
    starts at the last announcement, so nobody could tell.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: deque[tuple[int, _Message]] = deque()
        self.next_offset = 0
        self.size = 0
        self.readers: set[_ModelSubscription] = set()
        self.changed = asyncio.Condition()

    def last_start(self) -> int:
        """The offset of the last announcement's first message (its chunk 0, when
        chunked); :attr:`next_offset` if the stream is empty."""
        if not self.entries:
            return self.next_offset
        offset, last = self.entries[-1]
        set_id = _set_id(last)
        if set_id is None:
            return offset
        for earlier, msg in reversed(self.entries):
            if _set_id(msg) != set_id:
                break
            offset = earlier
        return offset

    async def append(self, msg: _Message) -> None:
        async with self.changed:
            self.entries.append((self.next_offset, msg))
            self.next_offset += 1
            self.size += len(msg.body)
            keep = self.last_start()
            needed = min((r.cursor for r in self.readers), default=self.next_offset)
            while self.entries[0][0] < keep and (
                self.size > self.max_bytes or self.entries[0][0] < needed
            ):
                self.size -= len(self.entries.popleft()[1].body)
            self.changed.notify_all()


def _set_id(msg: _Message) -> str | None:
    """The chunk set id of a chunk message; None for a whole one (or a bad chunk)."""
    if not is_chunk(msg.body):
        return None
    try:
        return parse(msg.body).header.id
    except ChunkError:
        return None


def _version(msg: _Message) -> int:
    v = msg.headers.get(VERSION_HEADER)
    return v if isinstance(v, int) else -1


class _ModelSubscription:
    """Reads a model stream from its last announcement; hands out the newest of those
    that arrived whole since the last :meth:`get` (the highest version; of equals, the
    later). Chunk messages are reassembled as they are read."""

    def __init__(self, stream: _ModelStream, chunking: Chunking) -> None:
        self._stream = stream
        #: The next offset to read: the last announcement's, or the next one's if none.
        self.cursor = stream.last_start()
        self.unacked: set[int] = set()
        self.closed = False
        self._reasm: Reassembler[int] = Reassembler(dataclasses.replace(chunking.limits, recent=0))
        self._fresh: list[_ModelDelivery] = []
        stream.readers.add(self)

    async def get(self) -> _ModelDelivery:
        stream = self._stream
        async with stream.changed:
            while True:
                if self.closed:
                    raise TransportError("subscription is closed")
                self._read()
                if self._fresh:
                    newest = self._fresh[0]
                    for d in self._fresh[1:]:  # of equals, the later
                        if d.version >= newest.version:
                            newest = d
                    self._fresh.clear()
                    self.unacked.add(newest.token)
                    return newest
                deadline = self._reasm.next_deadline()
                wait = None if deadline is None else max(0.0, deadline - time.monotonic()) + 0.01
                try:
                    async with asyncio.timeout(wait):
                        await stream.changed.wait()
                except TimeoutError:
                    pass

    def _read(self) -> None:
        """Take the messages from the cursor on; whole models (and refused sets) go to
        ``_fresh``."""
        for offset, msg in self._stream.entries:
            if offset < self.cursor:
                continue
            self._take(msg)
        self.cursor = self._stream.next_offset
        for failed in self._reasm.expire():
            self._fresh.append(_failed_model(self, failed))

    def _take(self, msg: _Message) -> None:
        if not is_chunk(msg.body):
            self._fresh.append(_ModelDelivery(self, msg.body, _version(msg)))
            return
        try:
            added = self._reasm.add(parse(msg.body), _version(msg), msg.user_id)
        except ChunkError as e:
            self._fresh.append(
                _ModelDelivery(self, b"", _version(msg), TransportRefusal(e.reason, e.detail))
            )
            return
        if isinstance(added, Complete):
            self._fresh.append(_ModelDelivery(self, added.body, added.parts[0].handle))

    async def settle(self, token: int) -> None:
        if token not in self.unacked:
            raise TransportError("delivery already settled or its subscription closed")
        self.unacked.discard(token)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.unacked.clear()
        self._stream.readers.discard(self)
        async with self._stream.changed:
            self._stream.changed.notify_all()


def _failed_model(sub: _ModelSubscription, failed: Failed[int]) -> _ModelDelivery:
    refusal = TransportRefusal(failed.reason, failed.detail)
    return _ModelDelivery(sub, b"", failed.parts[0].handle, refusal)


class _ModelDelivery:
    def __init__(
        self,
        sub: _ModelSubscription,
        body: Body,
        version: int,
        refusal: TransportRefusal | None = None,
    ) -> None:
        self._sub, self._body, self._version, self.refusal = sub, body, version, refusal
        self.token = next(_ids)

    @property
    def body(self) -> Body:
        return self._body

    @property
    def version(self) -> int:
        return self._version

    async def ack(self) -> None:
        await self._sub.settle(self.token)


@dataclass
class _TaskQueues:
    work: _Queue
    dead: list[DeadLetter]
    #: Every update message published (body and sender), as the audit stream keeps them.
    audit: list[tuple[bytes, str | None]]
    models: _ModelStream
    receipts: dict[str, _Queue] = field(default_factory=dict)


class MemoryBroker:
    """The shared state: one per simulated federation."""

    def __init__(self) -> None:
        self.tasks: dict[str, _TaskQueues] = {}

    def task(self, task: str) -> _TaskQueues:
        try:
            return self.tasks[task]
        except KeyError:
            raise TransportError(f"no queues declared for task {task!r}") from None


class MemoryTransport:
    """A client of a :class:`MemoryBroker`; ``user`` plays the broker-validated user id.

    ``chunking``: the chunk size and reassembly limits (docs/chunking.md).
    """

    def __init__(
        self, broker: MemoryBroker, user: str | None = None, *, chunking: Chunking | None = None
    ) -> None:
        self.broker = broker
        self.user = user
        self.chunking = chunking or Chunking()
        self._subs: list[_Subscription[object] | _ModelSubscription] = []

    async def close(self) -> None:
        for sub in self._subs:
            await sub.close()
        self._subs.clear()

    async def declare_task(self, topology: TaskTopology) -> None:
        tq = self.broker.tasks.get(topology.task)
        if tq is None:
            dead: list[DeadLetter] = []
            tq = _TaskQueues(
                work=_Queue(delivery_limit=topology.delivery_limit, dead=dead, single_active=True),
                dead=dead,
                audit=[],
                models=_ModelStream(topology.models_max_bytes),
            )
            self.broker.tasks[topology.task] = tq
        for p in topology.participants:
            tq.receipts.setdefault(p, _Queue(max_length=topology.receipts_max_length))

    async def consume_updates(
        self, task: str, *, prefetch: int, update_bytes: int | None = None
    ) -> _UpdateSubscription:
        sub = _UpdateSubscription(
            self.broker.task(task).work, prefetch, self.chunking, update_bytes
        )
        self._subs.append(sub)  # type: ignore[arg-type]
        return sub

    def _pieces(self, body: bytes | Segments, set_id: str) -> list[bytes]:
        """``body`` as the messages that carry it: itself, or its chunk messages."""
        size = self.chunking.chunk_size
        if not needs_chunks(body, size):
            return [body if isinstance(body, bytes) else segments.join(body)]
        try:
            return list(split(body, id=set_id, chunk_size=size))
        except ValueError as e:
            n = len(body) if isinstance(body, bytes) else segments.total(body)
            raise TransportError(f"cannot split a body of {n} bytes: {e}") from e

    async def announce_model(
        self,
        task: str,
        version: int,
        body: bytes | Segments,
        *,
        fence: int | None = None,
        version_hash: bytes | None = None,
    ) -> None:
        headers: dict[str, object] = {VERSION_HEADER: version}
        if fence is not None:
            headers[FENCE_HEADER] = fence
        if version_hash is not None:
            headers[VERSION_HASH_HEADER] = version_hash
        stream = self.broker.task(task).models
        message_id = f"{task}-model-{version}"
        for piece in self._pieces(body, f"{message_id}-{uuid.uuid4().hex[:12]}"):
            await stream.append(_Message(piece, dict(headers), self.user, message_id))

    async def last_announcement(self, task: str) -> Announcement | None:
        entries = self.broker.task(task).models.entries
        if not entries:
            return None
        headers = entries[-1][1].headers
        fence, digest = headers.get(FENCE_HEADER), headers.get(VERSION_HASH_HEADER)
        return Announcement(
            _version(entries[-1][1]),
            fence if isinstance(fence, int) else None,
            digest if isinstance(digest, bytes) else None,
        )

    async def queue_depth(self, task: str) -> int:
        work = self.broker.task(task).work
        held = sum(len(s.waiting) for s in work.consumers if isinstance(s, _UpdateSubscription))
        return len(work.ready) + held

    async def dead_letters(self, task: str, limit: int = 1000) -> list[DeadLetter]:
        dead = self.broker.task(task).dead
        taken, dead[:limit] = dead[:limit], []
        return merge_dead_letters(taken)

    async def read_audit(self, task: str, *, idle_s: float = 1.0) -> AsyncIterator[bytes]:
        joiner = StreamJoiner(self.chunking.limits)
        for body, sender in list(self.broker.task(task).audit):
            for whole in joiner.feed(body, sender):
                yield whole
        for rest in joiner.finish():
            yield rest

    async def publish_update(
        self, task: str, participant: str, body: bytes, *, message_id: str
    ) -> None:
        tq = self.broker.tasks.get(task)
        if tq is None:  # unroutable: like a mandatory publish to an exchange with no binding
            raise TransportError(f"update for task {task!r} was not routed to any queue")
        for piece in self._pieces(body, message_id):
            await self.publish_raw(task, participant, piece, message_id=message_id)

    async def publish_raw(
        self, task: str, participant: str, body: bytes, *, message_id: str
    ) -> None:
        """Publish one message as it is to the task's work queue and audit stream (a
        chunk message made elsewhere: tests of misbehaving publishers)."""
        tq = self.broker.tasks.get(task)
        if tq is None:
            raise TransportError(f"update for task {task!r} was not routed to any queue")
        tq.audit.append((body, self.user))
        await tq.work.put(_Message(body, {}, self.user, message_id))

    async def consume_models(self, task: str, participant: str) -> _ModelSubscription:
        sub = _ModelSubscription(self.broker.task(task).models, self.chunking)
        self._subs.append(sub)
        return sub

    async def publish_receipt(
        self, task: str, participant: str, body: bytes, *, message_id: str
    ) -> None:
        q = self.broker.task(task).receipts.get(participant)
        if q is None:  # unroutable
            raise TransportError(f"receipt for {participant!r} of {task!r} was not routed")
        await q.put(_Message(body, {}, self.user, message_id))

    async def consume_receipts(
        self, task: str, participant: str
    ) -> _Subscription[_ReceiptDelivery]:
        q = self.broker.task(task).receipts.get(participant)
        if q is None:
            raise TransportError(f"no receipt queue for participant {participant!r} of {task!r}")
        sub = _Subscription(q, 64, _ReceiptDelivery)
        self._subs.append(sub)  # type: ignore[arg-type]
        return sub
