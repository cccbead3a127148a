"""An in-process broker with the semantics fedq relies on from RabbitMQ.

Manual acks; unacked deliveries return to their queue when a subscription
closes; a delivery limit dead-letters poison messages; single active consumer on
work queues; one model stream per task, read from its last announcement, of which a
subscription hands out only the newest; an append-only audit log of every update.
Used by the embedded simulation and by the shared transport tests, next to the
RabbitMQ implementation.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from common.errors import TransportError
from common.transport.base import Announcement, DeadLetter, TaskTopology, UpdateDelivery
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
    """The work queue's consumer, with batch settlement."""

    def __init__(self, queue: _Queue, prefetch: int) -> None:
        super().__init__(queue, prefetch, _UpdateDelivery)

    def ready(self, limit: int) -> list[UpdateDelivery]:
        """What the broker would have sent already (within the prefetch), no waiting."""
        if self.closed:
            raise TransportError("subscription is closed")
        return [_UpdateDelivery(self, msg) for msg in self._take_ready(limit)]

    async def ack_all(self, deliveries: Sequence[UpdateDelivery]) -> None:
        """Ack the live ones at once; the others are skipped."""
        live: list[_UpdateDelivery] = []
        for d in deliveries:
            if not isinstance(d, _UpdateDelivery):
                raise TransportError(f"not a delivery of this transport: {d!r}")
            if d.live:
                live.append(d)
        for sub in {id(d._sub): d._sub for d in live}.values():
            async with sub._q.changed:
                for d in live:
                    if d._sub is sub:
                        sub.unacked.pop(d._msg.tag, None)
                sub._q.changed.notify_all()


class _UpdateDelivery:
    def __init__(self, sub: _Subscription[_UpdateDelivery], msg: _Message) -> None:
        self._sub, self._msg = sub, msg

    @property
    def body(self) -> bytes:
        return self._msg.body

    @property
    def user_id(self) -> str | None:
        return self._msg.user_id

    @property
    def message_id(self) -> str | None:
        return self._msg.message_id

    @property
    def redelivered(self) -> bool:
        return self._msg.deliveries > 1

    @property
    def live(self) -> bool:
        return not self._sub.closed and self._msg.tag in self._sub.unacked

    async def ack(self) -> None:
        await self._sub.settle(self._msg)

    async def dead_letter(self, reason: str, detail: str = "") -> None:
        dead = self._sub._q.dead
        await self._sub.settle(self._msg)
        if dead is not None:
            headers = {**self._msg.headers, REASON_HEADER: reason, DETAIL_HEADER: detail}
            dead.append(DeadLetter(self._msg.body, reason, detail, headers))


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
    """A task's model stream: announcements with offsets.

    Like the broker's, it drops the oldest announcements once they hold more than
    ``max_bytes``, never the last one. It also drops those that no reader can be
    handed any more (older than every open reader's position): a reader starts at the
    last announcement, so nobody could tell.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: deque[tuple[int, _Message]] = deque()
        self.next_offset = 0
        self.size = 0
        self.readers: set[_ModelSubscription] = set()
        self.changed = asyncio.Condition()

    async def append(self, msg: _Message) -> None:
        async with self.changed:
            self.entries.append((self.next_offset, msg))
            self.next_offset += 1
            self.size += len(msg.body)
            needed = min((r.cursor for r in self.readers), default=self.next_offset)
            while len(self.entries) > 1 and (
                self.size > self.max_bytes or self.entries[0][0] < needed
            ):
                self.size -= len(self.entries.popleft()[1].body)
            self.changed.notify_all()


def _version(msg: _Message) -> int:
    v = msg.headers.get(VERSION_HEADER)
    return v if isinstance(v, int) else -1


class _ModelSubscription:
    """Reads a model stream from its last announcement; hands out the newest of those
    that arrived since the last :meth:`get` (the highest version; of equals, the later)."""

    def __init__(self, stream: _ModelStream) -> None:
        self._stream = stream
        #: The next offset to read: the last announcement's, or the next one's if none.
        self.cursor = stream.entries[-1][0] if stream.entries else stream.next_offset
        self.unacked: set[int] = set()
        self.closed = False
        stream.readers.add(self)

    async def get(self) -> _ModelDelivery:
        stream = self._stream
        async with stream.changed:
            await stream.changed.wait_for(lambda: self.closed or stream.next_offset > self.cursor)
            if self.closed:
                raise TransportError("subscription is closed")
            fresh: list[_Message] = []  # newest first; the last one is never dropped
            for offset, msg in reversed(stream.entries):
                if offset < self.cursor:
                    break
                fresh.append(msg)
            newest = max(fresh, key=_version)  # of equals, the first: the later
            self.cursor = stream.next_offset
        self.unacked.add(newest.tag)
        return _ModelDelivery(self, newest)

    async def settle(self, msg: _Message) -> None:
        if msg.tag not in self.unacked:
            raise TransportError("delivery already settled or its subscription closed")
        self.unacked.discard(msg.tag)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.unacked.clear()
        self._stream.readers.discard(self)
        async with self._stream.changed:
            self._stream.changed.notify_all()


class _ModelDelivery:
    def __init__(self, sub: _ModelSubscription, msg: _Message) -> None:
        self._sub, self._msg = sub, msg

    @property
    def body(self) -> bytes:
        return self._msg.body

    @property
    def version(self) -> int:
        return _version(self._msg)

    async def ack(self) -> None:
        await self._sub.settle(self._msg)


@dataclass
class _TaskQueues:
    work: _Queue
    dead: list[DeadLetter]
    audit: list[bytes]
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
    """A client of a :class:`MemoryBroker`; ``user`` plays the broker-validated user id."""

    def __init__(self, broker: MemoryBroker, user: str | None = None) -> None:
        self.broker = broker
        self.user = user
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

    async def consume_updates(self, task: str, *, prefetch: int) -> _UpdateSubscription:
        sub = _UpdateSubscription(self.broker.task(task).work, prefetch)
        self._subs.append(sub)  # type: ignore[arg-type]
        return sub

    async def announce_model(
        self,
        task: str,
        version: int,
        body: bytes,
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
        await stream.append(_Message(body, headers, self.user, f"{task}-model-{version}"))

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
        return len(self.broker.task(task).work.ready)

    async def dead_letters(self, task: str, limit: int = 1000) -> list[DeadLetter]:
        dead = self.broker.task(task).dead
        taken, dead[:limit] = dead[:limit], []
        return taken

    async def read_audit(self, task: str, *, idle_s: float = 1.0) -> AsyncIterator[bytes]:
        for body in list(self.broker.task(task).audit):
            yield body

    async def publish_update(
        self, task: str, participant: str, body: bytes, *, message_id: str
    ) -> None:
        tq = self.broker.tasks.get(task)
        if tq is None:  # unroutable: like a mandatory publish to an exchange with no binding
            raise TransportError(f"update for task {task!r} was not routed to any queue")
        tq.audit.append(body)
        await tq.work.put(_Message(body, {}, self.user, message_id))

    async def consume_models(self, task: str, participant: str) -> _ModelSubscription:
        sub = _ModelSubscription(self.broker.task(task).models)
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
