"""Receipts: each bank learns the fate of each of its updates (docs/wire-format.md,
"Receipts").

After a commit, one ``accepted`` receipt per lineage entry (the version, the weight the
lineage records); after a refusal, one ``refused`` receipt with the reason and the
detail, to the broker-validated sender. Receipts are sent off the commit path by a
background sender with a bounded queue that retries failed publishes and drains on
close. They are at-least-once: a crash between a commit and its receipts' confirms
sends them again when the updates are redelivered (a redelivered update that was
already applied is answered with its ``accepted`` receipt again), so a participant
dedupes by update id.

Which refusals answer with what (so that, per bank, accepted + refused = the distinct
update ids it sent):

- an update id that was applied in a version, refused again (a broker redelivery
  after a crash, a copy a publish retry made): ``accepted`` with that version and
  weight, when the copy comes from the participant the lineage names;
- a copy of an update id the aggregator holds in its buffer for the same
  participant: no receipt (the held one's fate is its receipt);
- a broker redelivery of an update in flight (``Redelivered``): no receipt;
- anything else: ``refused`` with the reason.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import structlog

from aggregator.metrics import AggregatorMetrics
from common.errors import EncodeError, FedqError, PublishRefusedError
from common.hashing import LineageEntry
from common.ids import is_update_id
from common.signing import SigningKey
from common.transport import Transport
from common.wire import Receipt, accepted_receipt, encode_receipt, refused_receipt

log = structlog.get_logger("fedq.aggregator")

#: Receipts waiting to be sent at most; when full, the newest is dropped and logged.
QUEUE_LIMIT = 100_000
#: Receipts published at once, each awaiting its confirm.
BATCH = 64

#: The participant of the update the aggregator holds under an id (None if not held).
HeldBy = Callable[[str], "str | None"]
#: The version an update id was applied in, or None.
AppliedIn = Callable[[str], Awaitable["int | None"]]
#: The lineage of a committed version.
LineageOf = Callable[[int], Awaitable[Sequence[LineageEntry]]]


def recipient(
    user_id: str | None,
    named: str | None,
    participants: Sequence[str],
    *,
    sender_match: bool,
) -> str | None:
    """Whose receipt queue gets the answer to one delivery: the broker-validated sender
    when it is a participant. With the sender check on, nobody else: a publish without
    ``user_id`` is not validated by the broker, and the participant its envelope names
    must not receive refusals another bank provoked. With the check off (a test
    broker with one shared user), the participant the envelope names. None when no
    receipt queue fits."""
    if user_id is not None and user_id in participants:
        return user_id
    if sender_match:
        return None
    if named is not None and named in participants:
        return named
    return None


class ReceiptSender:
    """Builds the receipts of one task and sends them in the background: in order, up to
    ``BATCH`` in flight at once; one that failed is retried before newer ones."""

    def __init__(
        self,
        transport: Transport,
        task: str,
        participants: Sequence[str],
        *,
        sender_match: bool = True,
        signing_key: SigningKey | None = None,
        metrics: AggregatorMetrics | None = None,
        retry_s: float = 1.0,
        flush_timeout_s: float = 30.0,
        limit: int = QUEUE_LIMIT,
    ) -> None:
        self.transport = transport
        self.task = task
        self.participants = tuple(participants)
        self.sender_match = sender_match
        self.signing_key = signing_key
        self.metrics = metrics
        self.retry_s = retry_s
        self.flush_timeout_s = flush_timeout_s
        self.limit = limit
        self._queue: deque[tuple[Receipt, bytes]] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._runner: asyncio.Task[None] | None = None
        #: Receipts confirmed by the broker, dropped (queue full, refused for good).
        self.sent = 0
        self.dropped = 0
        self.log = log.bind(task=task)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ what to send

    def accepted(self, lineage: Sequence[LineageEntry], version: int) -> None:
        """One ``accepted`` receipt per entry of a committed version."""
        now = time.time()
        for e in lineage:
            if e.participant in self.participants:
                self._submit(
                    accepted_receipt(self.task, e.participant, e.update_id, version, e.weight, now)
                )

    async def refused(
        self,
        *,
        reason: str,
        detail: str,
        participant: str | None,
        update_id: str | None,
        user_id: str | None,
        message_id: str | None,
        held_by: HeldBy,
        applied_in: AppliedIn,
        lineage_of: LineageOf,
    ) -> None:
        """The answer to a refused delivery (see the module's rules)."""
        to = recipient(user_id, participant, self.participants, sender_match=self.sender_match)
        uid = update_id
        if uid is None and is_update_id(message_id):
            uid = message_id  # participants publish with message_id = update id
        if to is None or uid is None:
            self.log.info(
                "refusal without a receipt: no known sender or update id",
                reason=reason,
                user_id=user_id,
                message_id=message_id,
            )
            return
        now = time.time()
        if update_id is not None:  # the body names it: the same update may be held or applied
            if held_by(update_id) == to:
                return  # the copy it holds will be answered
            try:
                entry = await self._applied_entry(update_id, applied_in, lineage_of)
            except FedqError as err:
                self.log.warning("applied check for a receipt failed", error=str(err))
                entry = None
            if entry is not None and entry[1].participant == to:
                version, applied = entry
                self._submit(accepted_receipt(self.task, to, uid, version, applied.weight, now))
                return
        self._submit(refused_receipt(self.task, to, uid, reason, detail, now))

    @staticmethod
    async def _applied_entry(
        update_id: str, applied_in: AppliedIn, lineage_of: LineageOf
    ) -> tuple[int, LineageEntry] | None:
        version = await applied_in(update_id)
        if version is None:
            return None
        for e in await lineage_of(version):
            if e.update_id == update_id:
                return version, e
        return None

    def _submit(self, receipt: Receipt) -> None:
        if len(self._queue) >= self.limit:
            self.dropped += 1
            self.log.error(
                "receipt dropped: the send queue is full",
                participant=receipt.participant,
                update_id=receipt.update_id,
                limit=self.limit,
            )
            return
        try:
            body = encode_receipt(receipt, self.signing_key)
        except (EncodeError, ValueError) as e:
            self.dropped += 1
            self.log.error("receipt not encodable", update_id=receipt.update_id, error=str(e))
            return
        self._queue.append((receipt, body))
        self._wake.set()

    # ------------------------------------------------------------------ sending

    def start(self) -> None:
        """Start sending in the background."""
        if self._runner is None:
            self._closing = False
            self._runner = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Send what is queued (for at most ``flush_timeout_s``), then stop."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(self.flush_timeout_s):
                await runner
        except TimeoutError:
            self.log.error(
                "receipts not sent before shutdown (their updates' redeliveries resend them)",
                waiting=len(self._queue),
                timeout_s=self.flush_timeout_s,
            )

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            # Up to BATCH publishes in flight at once, each waiting for its own confirm:
            # one confirm round trip per batch rather than per receipt.
            batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            results = await asyncio.gather(
                *(self._publish(receipt, body) for receipt, body in batch),
                return_exceptions=True,
            )
            retry: list[tuple[Receipt, bytes]] = []
            error: Exception | None = None
            for (receipt, body), result in zip(batch, results, strict=True):
                if result is None:
                    self.sent += 1
                    if self.metrics is not None:
                        self.metrics.receipts_sent.labels(self.task, receipt.outcome).inc()
                elif isinstance(result, PublishRefusedError):  # never heals: drop it
                    self.dropped += 1
                    self.log.error("receipt refused by the broker; dropped", error=str(result))
                elif isinstance(result, Exception):
                    retry.append((receipt, body))
                    error = error or result
                else:  # CancelledError and other BaseExceptions: not ours to swallow
                    self._queue.extendleft(reversed(batch))
                    raise result
            if retry:
                self.log.warning(
                    "receipts not sent; will retry",
                    receipts=len(retry),
                    update_id=retry[0][0].update_id,
                    error=str(error),
                )
                self._queue.extendleft(reversed(retry))  # in their order, before newer ones
                await asyncio.sleep(self.retry_s)

    async def _publish(self, receipt: Receipt, body: bytes) -> None:
        await self.transport.publish_receipt(
            self.task,
            receipt.participant,
            body,
            message_id=f"{receipt.update_id}-{receipt.outcome}",
        )
