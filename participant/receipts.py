"""The participant's side of receipts: count the fate of each update it sent.

The tracker consumes the participant's receipt queue in the background, checks each
receipt's signature when the task spec names the aggregator's key, dedupes by update
id, logs each fate, counts it (:class:`ReceiptStats`, the metrics) and acks it after
counting. Rules (docs/wire-format.md, "Receipts"):

- one fate per update id: the first receipt counts; later ones for the same id are
  duplicates (receipts are at-least-once) and are ignored, except that an
  ``accepted`` receipt replaces an earlier ``refused`` one (an id is applied at most
  once, and being applied is its final fate);
- a refusal whose reason can never heal (:data:`common.refusals.PERMANENT`) stops the
  worker: :meth:`ReceiptTracker.linked` returns an event that is set then, and
  :meth:`ReceiptTracker.raise_if_stopped` raises :class:`ParticipantStoppedError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from common.errors import DecodeError, ParticipantStoppedError, SpecError, TransportError
from common.refusals import PERMANENT
from common.signing import PublicKey
from common.spec import TaskSpec
from common.transport import ReceiptDelivery, Subscription, Transport, next_or_none
from common.wire import (
    KIND_UNMASK_REQUEST,
    Receipt,
    decode_receipt,
    peek_kind,
    verify_receipt,
)
from participant.metrics import ParticipantMetrics

#: The permanent reasons as strings (a receipt may name a reason this build does not know).
PERMANENT_REASONS = frozenset(str(r) for r in PERMANENT)

log = structlog.get_logger("fedq.participant")

#: Fates remembered for deduplication (the newest ones).
REMEMBER = 100_000
#: How long, when the worker ends by itself (``max_updates``), it waits for the
#: receipts of the updates it sent.
DRAIN_S = 10.0


class ReceiptStats(Protocol):
    """Where the tracker counts (the worker's stats)."""

    published: int
    #: The update ids this run published (the newest ones, bounded).
    published_ids: deque[str]
    accepted: int
    refused: dict[str, int]
    receipts_bad_signature: int


def aggregator_key(spec: TaskSpec) -> PublicKey | None:
    """The aggregator's public key from the spec (None: receipts are not checked)."""
    identity = getattr(spec, "identity", None)
    text = getattr(identity, "aggregator_key", None)
    if not text:
        return None
    try:
        return PublicKey.parse(str(text))
    except (SpecError, ValueError) as e:
        raise SpecError(f"identity.aggregator_key: {e}") from e


class ReceiptTracker:
    """Consumes one participant's receipts and counts them."""

    def __init__(
        self,
        transport: Transport,
        task: str,
        participant: str,
        stats: ReceiptStats,
        *,
        key: PublicKey | None = None,
        metrics: ParticipantMetrics | None = None,
        drain_s: float = DRAIN_S,
        on_request: Callable[[bytes], Awaitable[None]] | None = None,
    ) -> None:
        self.transport = transport
        self.task = task
        self.participant = participant
        self.stats = stats
        self.key = key
        self.metrics = metrics or ParticipantMetrics()
        self.drain_s = drain_s
        #: Secure aggregation: the aggregator's unmask requests come on this queue too
        #: and go here (participant/secagg.py), not to the receipt counting.
        self.on_request = on_request
        #: update id -> the receipt counted for it (the newest :data:`REMEMBER`).
        self.fates: OrderedDict[str, Receipt] = OrderedDict()
        #: Receipts ignored as duplicates of a fate already counted.
        self.duplicates = 0
        #: Set when a permanent refusal stopped the worker.
        self.stopped: ParticipantStoppedError | None = None
        self._halt = asyncio.Event()
        self._progress = asyncio.Event()
        self._quit = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._relay: asyncio.Task[None] | None = None
        self.log = log.bind(task=task, participant=participant)

    # ------------------------------------------------------------------ lifecycle

    def linked(self, stop: asyncio.Event) -> asyncio.Event:
        """Start consuming; return an event set when ``stop`` is, or on a permanent refusal."""
        linked = asyncio.Event()

        async def relay() -> None:
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._halt.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            linked.set()

        self._relay = asyncio.create_task(relay())
        self._runner = asyncio.create_task(self._run())
        return linked

    @property
    def counted(self) -> int:
        return self.stats.accepted + sum(self.stats.refused.values())

    async def close(self, *, drain: bool = False) -> None:
        """Stop consuming; with ``drain``, first wait (``drain_s`` at most) for the
        receipts of every update published."""
        if drain and self.stopped is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.drain_s):
                    while self.counted < self.stats.published:
                        self._progress.clear()
                        await self._progress.wait()
        self._quit.set()
        if self._runner is not None:
            try:
                async with asyncio.timeout(10):
                    await self._runner
            except TimeoutError:
                self.log.warning("receipt consumer did not stop in time")
        if self._relay is not None:
            self._relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relay
        self._runner = self._relay = None

    def raise_if_stopped(self) -> None:
        if self.stopped is not None:
            raise self.stopped

    async def _run(self) -> None:
        sub = await self._subscribe()
        if sub is None:
            return
        try:
            while not self._quit.is_set():
                delivery = await next_or_none(sub, self._quit)
                if delivery is None:
                    break
                if self.on_request is not None and peek_kind(delivery.body) == KIND_UNMASK_REQUEST:
                    await self.on_request(delivery.body)
                else:
                    self.take(delivery.body)
                try:
                    await delivery.ack()
                except TransportError as e:  # it comes again: the dedupe absorbs it
                    self.log.info("receipt ack failed", error=str(e))
        finally:
            await sub.close()

    async def _subscribe(self) -> Subscription[ReceiptDelivery] | None:
        delay = 0.1
        while not self._quit.is_set():
            try:
                return await self.transport.consume_receipts(self.task, self.participant)
            except TransportError as e:
                self.log.warning("receipt queue not available yet; retrying", error=str(e))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._quit.wait()
            delay = min(delay * 2, 30.0)
        return None

    # ------------------------------------------------------------------ one receipt

    def take(self, body: bytes) -> Receipt | None:
        """Check, dedupe, log and count one receipt; the receipt if it was counted."""
        try:
            receipt = decode_receipt(body)
        except DecodeError as e:
            self.log.warning("receipt unreadable; ignored", reason=e.reason, detail=e.detail)
            return None
        if receipt.task != self.task or receipt.participant != self.participant:
            self.log.warning(
                "receipt for someone else; ignored",
                receipt_task=receipt.task,
                receipt_participant=receipt.participant,
            )
            return None
        if self.key is not None and not verify_receipt(receipt, self.key):
            self.stats.receipts_bad_signature += 1
            self.metrics.receipts_bad_signature.inc()
            self.log.warning(
                "receipt not signed by the aggregator's key; ignored",
                update_id=receipt.update_id,
                signed=receipt.signature is not None,
            )
            return None
        earlier = self.fates.get(receipt.update_id)
        if earlier is not None and (earlier.accepted or not receipt.accepted):
            self.duplicates += 1
            return None
        if earlier is not None:  # refused before, applied now: applied is final
            self._uncount(earlier)
        self._count(receipt)
        return receipt

    def _count(self, r: Receipt) -> None:
        self._progress.set()
        self.fates[r.update_id] = r
        self.fates.move_to_end(r.update_id)
        while len(self.fates) > REMEMBER:
            self.fates.popitem(last=False)
        if r.accepted:
            self.stats.accepted += 1
            self.metrics.receipts.labels("accepted", "").inc()
            self.log.info(
                "update accepted", update_id=r.update_id, version=r.version, weight=r.weight
            )
            return
        self.stats.refused[r.reason] = self.stats.refused.get(r.reason, 0) + 1
        self.metrics.receipts.labels("refused", r.reason).inc()
        self.log.warning("update refused", update_id=r.update_id, reason=r.reason, detail=r.detail)
        # Only a refusal of an update this run published stops it: a receipt left from
        # an earlier run (another spec, another key) says nothing about this one.
        mine = r.update_id in self.stats.published_ids
        if mine and r.reason in PERMANENT_REASONS and self.stopped is None:
            self.stopped = ParticipantStoppedError(
                self.participant, r.reason, r.detail, r.update_id
            )
            self.log.error("stopping: this refusal cannot heal", reason=r.reason)
            self._halt.set()

    def _uncount(self, r: Receipt) -> None:
        left = self.stats.refused.get(r.reason, 0) - 1
        if left > 0:
            self.stats.refused[r.reason] = left
        else:
            self.stats.refused.pop(r.reason, None)
