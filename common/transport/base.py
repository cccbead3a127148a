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

from common.transport.names import RECEIPT_QUEUE_MAX_LENGTH

T_co = TypeVar("T_co", covariant=True)
T = TypeVar("T")


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


class UpdateDelivery(Protocol):
    """An update handed to the aggregator, to be acked or dead-lettered exactly once."""

    @property
    def body(self) -> bytes: ...
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
    def body(self) -> bytes: ...
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

    async def consume_updates(self, task: str, *, prefetch: int) -> UpdateSubscription:
        """Consume the task's work queue with at most ``prefetch`` unacked deliveries."""
        ...

    async def announce_model(
        self,
        task: str,
        version: int,
        body: bytes,
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
        """Updates waiting in the task's work queue (ready, not yet delivered)."""
        ...

    async def dead_letters(self, task: str, limit: int = 1000) -> list[DeadLetter]:
        """Take up to ``limit`` dead letters off the task's dead-letter queue."""
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
        them). Ends once no message has arrived for ``idle_s`` seconds.
        """
        ...

    # --- participant side
    async def publish_update(
        self, task: str, participant: str, body: bytes, *, message_id: str
    ) -> None:
        """Publish an update; returns once the broker has confirmed it."""
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
