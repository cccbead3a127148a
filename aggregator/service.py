"""The aggregator service: consume updates, validate, aggregate, commit, ack, announce.

The path of one update (docs/wire-format.md): decode with hard limits and the task's shapes
(off the event loop); check task, participant, sender identity, duplicates and
staleness; offer it to the task's strategy; when the strategy emits a version,
commit it to the store in one transaction and only then ack the deliveries that
went into it; then announce the new model. A refused update goes to the
dead-letter queue with its reason and is counted; the service keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
import torch

from aggregator.metrics import AggregatorMetrics
from aggregator.store import CommitOutcome, CommitResult, Lease, RedisModelStore, VersionRecord
from aggregator.strategies import AcceptedUpdate, Step, Strategy, strategy_for
from common.errors import (
    BlobPrunedError,
    DecodeError,
    FedqError,
    NotFoundError,
    StoreRegressedError,
    StoreUnavailableError,
)
from common.models import build_task_model, model_tensors, tensor_specs
from common.spec import TaskSpec
from common.transport import Announcement, TaskTopology, Transport, UpdateDelivery, next_or_none
from common.wire import DEFAULT_LIMITS, DecodeLimits, Tensors, UpdateEnvelope, decode_update

log = structlog.get_logger("fedq.aggregator")
T = TypeVar("T")

#: Called after each commit with the new version's record and parameters.
VersionHook = Callable[[VersionRecord, Tensors], Awaitable[None]]


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


class FencedOutError(FedqError):
    """Another writer committed to this task: this aggregator must stop."""


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """How the aggregator consumes and validates."""

    #: Unacked deliveries at most (bounds memory together with the strategy's buffer).
    prefetch: int = 64
    #: Refuse an update whose broker-validated sender is not the participant it names.
    require_sender_match: bool = True
    limits: DecodeLimits = DEFAULT_LIMITS
    #: How often the work queue's depth is sampled for metrics (seconds).
    depth_poll_s: float = 5.0
    #: Writer lease: one active aggregator per task; a standby waits for it.
    lease_ttl_s: float = 10.0
    #: Who this aggregator is, in the lease and in each version's info.
    owner: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )
    #: Retention of the audit stream (every update, accepted or not): age and size.
    audit_max_age: str = "90D"
    audit_max_bytes: int = 20 * 1024**3
    #: /healthz turns unhealthy when updates wait in the queue and none has been
    #: received for this long (seconds): the consumer makes no progress.
    stall_s: float = 60.0


class AggregatorService:
    """The single writer of one task."""

    def __init__(
        self,
        spec: TaskSpec,
        store: RedisModelStore,
        transport: Transport,
        config: ServiceConfig | None = None,
        metrics: AggregatorMetrics | None = None,
        on_version: VersionHook | None = None,
    ) -> None:
        self.spec = spec
        self.task = spec.task_id
        self.store = store
        self.transport = transport
        self.config = config or ServiceConfig()
        self.metrics = metrics or AggregatorMetrics()
        self.on_version = on_version
        self.strategy: Strategy = strategy_for(spec)
        self.sync = spec.mode == "sync"
        # Buffered updates stay unacked until their commit: the prefetch must exceed
        # the buffer (FedBuff K, the sync quorum), or the broker stops delivering.
        buffer = spec.async_.buffer_size if spec.async_.strategy == "fedbuff" else 1
        if self.sync:
            buffer = spec.sync.quorum or len(spec.participants) or 1
        self.prefetch = max(self.config.prefetch, buffer + 1)
        self.expected = tensor_specs(model_tensors(build_task_model(spec)))
        self.head_version = -1
        self.head_params: Tensors = {}
        self.head_hash = b""
        self._bases: OrderedDict[int, Tensors] = OrderedDict()
        self._pending: dict[str, UpdateDelivery] = {}
        #: The offered updates behind ``_pending`` (the strategy buffers these very objects).
        self._updates: dict[str, AcceptedUpdate] = {}
        self._consuming = False
        self.lease: Lease | None = None
        self._halt = asyncio.Event()
        self._fenced = False
        #: Sync mode: when the current round's deadline passes (monotonic seconds).
        self._deadline: float | None = None
        self._overdue = False
        self._announce_slot: tuple[int, bytes, bytes] | None = None
        self._announce_wake = asyncio.Event()
        self._closing = False
        #: Set once the head is loaded and announced.
        self.ready = asyncio.Event()
        self.accepted = 0
        self.refused: dict[str, int] = {}
        #: Why the service stopped for good (a store that went backwards), for /healthz.
        self.failure: str | None = None
        #: When a delivery last arrived, and the work queue's last sampled depth.
        self._last_delivery = time.monotonic()
        self._handling_since: float | None = None
        self._depth = 0
        self.log = log.bind(task=self.task)

    # ------------------------------------------------------------------ lifecycle

    async def prepare(self) -> None:
        """Declare the topology, check the store against the broker's last announcement,
        register the task, create version 0 if needed and announce the head.

        Raises StoreRegressedError, before writing anything, when the store is behind
        what was already announced: an empty store for a task whose versions were
        announced, a head behind the announced version, another chain at the same
        version, or a fencing token that went backwards.
        """
        await self.transport.declare_task(
            TaskTopology(
                self.task,
                self.spec.participants,
                audit_max_age=self.config.audit_max_age,
                audit_max_bytes=self.config.audit_max_bytes,
            )
        )
        announced = await self.transport.last_announcement(self.task)
        if await self.store.head(self.task) is None:
            if announced is not None and announced.version > 0:
                raise self._regressed(
                    f"the store holds no version of task {self.task!r}, but version "
                    f"{announced.version} was announced"
                )
            await self.store.register_task(self.spec)
            genesis = model_tensors(build_task_model(self.spec))
            await self.store.create_genesis(self.task, genesis, info={"strategy": "genesis"})
            self.log.info("version 0 created", seed=self.spec.seed)
        else:
            await self.store.register_task(self.spec)
        record = await self.store.get_head(self.task)
        self._check_announced(announced, record.version, record.version_hash)
        env = await self.store.get_params(self.task, record.version)
        self._set_head(record.version, env.tensors)
        self.head_hash = record.version_hash
        await self.transport.announce_model(
            self.task,
            record.version,
            await self.store.get_blob(self.task, record.version),
            fence=self.lease.token if self.lease else None,
            version_hash=record.version_hash,
        )
        self.ready.set()
        self.log.info("aggregator ready", version=record.version, strategy=self.strategy.name)

    def _check_announced(self, announced: Announcement | None, head: int, head_hash: bytes) -> None:
        """The store's head must not be behind the last announcement (see prepare)."""
        if announced is None:
            return
        if announced.version > head:
            raise self._regressed(
                f"the store's head of {self.task!r} is version {head}, but version "
                f"{announced.version} was announced"
            )
        if (
            announced.version == head
            and announced.version_hash is not None
            and announced.version_hash != head_hash
        ):
            raise self._regressed(
                f"version {head} of {self.task!r} in the store is not the one announced "
                f"(hash {head_hash.hex()[:16]}, announced {announced.version_hash.hex()[:16]})"
            )
        if self.lease is not None and announced.fence is not None:
            self._check_fence(self.lease.token, announced.fence)

    def _check_fence(self, token: int, before: int) -> None:
        """A new writer lease's token must exceed every earlier one (it only grows)."""
        if token <= before:
            raise self._regressed(
                f"the writer lease's fencing token of {self.task!r} went back from {before} "
                f"to {token}"
            )

    def _regressed(self, what: str) -> StoreRegressedError:
        self.failure = (
            f"store went backwards: {what}; it lost committed data (restore it from a "
            "backup of its AOF/RDB files, or start a new chain under a new task id)"
        )
        self.log.error("store went backwards; stopping", detail=what)
        return StoreRegressedError(self.failure)

    async def run(self, stop: asyncio.Event) -> None:
        """Take the writer lease (waiting as a standby), then consume until ``stop``.

        The commit in flight finishes first; buffered, uncommitted updates go back to
        the queue. Raises FencedOutError if another aggregator took the task over.
        """
        self.lease = await self._acquire_lease(stop)
        if self.lease is None:
            return
        halt = self._halt
        relay = asyncio.create_task(_relay(stop, halt))
        renewer = asyncio.create_task(self._renew_lease())
        sub = None
        try:
            await self.prepare()
            if self.prefetch != self.config.prefetch:
                self.log.info("prefetch raised above the buffer", prefetch=self.prefetch)
            sub = await self.transport.consume_updates(self.task, prefetch=self.prefetch)
            self._consuming = True
            poller = asyncio.create_task(self._poll_depth(halt))
            announcer = asyncio.create_task(self._announcer())
            try:
                while not (stop.is_set() or halt.is_set()):
                    delivery = await next_or_none(sub, halt, self._until_deadline())
                    if delivery is None:
                        if not (stop.is_set() or halt.is_set()):
                            await self._deadline_passed()
                    elif stop.is_set() or halt.is_set():
                        break  # not handled: it goes back to the queue unacked
                    else:
                        self._last_delivery = time.monotonic()
                        self._handling_since = self._last_delivery
                        try:
                            await self.handle(delivery)
                        finally:
                            self._handling_since = None
            finally:
                self._consuming = False
                poller.cancel()
                await self._flush_announcements(announcer)
        finally:
            # Buffered updates were never acked: closing returns them to the queue.
            if sub is not None:
                await sub.close()
            renewer.cancel()
            relay.cancel()
            if not self._fenced:
                try:
                    await self.store.release_lease(self.lease, self.task)
                except FedqError as e:
                    self.log.warning("lease not released; it expires by itself", error=str(e))
            self.log.info(
                "aggregator stopped",
                version=self.head_version,
                returned_to_queue=len(self._pending),
                fenced=self._fenced,
            )
            self._pending.clear()
            self._updates.clear()
        if self.failure is not None:
            raise StoreRegressedError(self.failure)
        if self._fenced:
            raise FencedOutError(f"another aggregator holds the writer lease of {self.task!r}")

    async def _acquire_lease(self, stop: asyncio.Event) -> Lease | None:
        """Become the task's writer; as a standby, try again until the lease is free."""
        ttl = int(self.config.lease_ttl_s * 1000)
        announced = False
        while not stop.is_set():
            try:
                lease = await self.store.acquire_lease(self.task, self.config.owner, ttl)
            except StoreUnavailableError as e:
                self.log.warning("store unavailable; waiting", error=str(e))
                lease = None
            if lease is not None:
                self.log.info("writer lease acquired", owner=lease.owner, fence=lease.token)
                return lease
            if not announced:
                self.log.info("standby: another aggregator holds the writer lease")
                announced = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.lease_ttl_s / 3):
                    await stop.wait()
        return None

    async def _renew_lease(self) -> None:
        """Keep the lease; if another writer took it, stop at once (fenced)."""
        assert self.lease is not None
        ttl = int(self.config.lease_ttl_s * 1000)
        while True:
            await asyncio.sleep(self.config.lease_ttl_s / 3)
            try:
                if await self.store.renew_lease(self.lease, self.task, ttl):
                    continue
                # Expired (e.g. Redis restarted): take a new lease if nobody else did.
                fresh = await self.store.acquire_lease(self.task, self.config.owner, ttl)
            except StoreUnavailableError as e:
                self.log.warning("store unavailable; lease not renewed", error=str(e))
                continue
            if fresh is None:
                self.log.error("writer lease lost to another aggregator; stopping")
                self._fenced = True
                self._halt.set()
                return
            try:
                self._check_fence(fresh.token, self.lease.token)
            except StoreRegressedError:
                self._halt.set()
                return
            self.log.warning("writer lease had expired; re-acquired", fence=fresh.token)
            self.lease = fresh

    async def health(self) -> dict[str, object]:
        """What /healthz reports: ok only while consuming, with the store up and progress.

        ``stalled`` is true when one update has been in hand for more than ``stall_s``
        seconds, or when updates wait in the work queue and no delivery has arrived
        for that long (the consumer can take none).
        """
        store_ok = await self.store.ping()
        now, limit = time.monotonic(), self.config.stall_s
        since = self._handling_since
        stalled = self._consuming and (
            (since is not None and now - since > limit)
            or (self._depth > 0 and now - self._last_delivery > limit)
        )
        report: dict[str, object] = {
            "ok": bool(store_ok and self._consuming and not stalled and self.failure is None),
            "task": self.task,
            "version": self.head_version,
            "store": store_ok,
            "consuming": self._consuming,
            "stalled": stalled,
            "waiting": self._depth,
            "unacked": len(self._pending),
        }
        if self.failure is not None:
            report["error"] = self.failure
        return report

    # ------------------------------------------------------------------ one update

    async def handle(self, delivery: UpdateDelivery) -> None:
        """Validate one delivery and offer it to the strategy; commit when it steps."""
        try:
            env = await asyncio.to_thread(
                decode_update, delivery.body, self.config.limits, self.expected
            )
        except DecodeError as e:
            await self._refuse(delivery, e.reason, e.detail)
            return
        except Exception as e:  # a decoder bug must not take the service down
            self.log.exception("decoder failed unexpectedly")
            await self._refuse(delivery, "malformed", f"decoder failed: {type(e).__name__}")
            return
        held = self._pending.get(env.update_id)
        if held is not None:
            if not held.live:
                # The broker redelivered an update we hold (its channel was lost): the
                # new delivery is the live one; the buffered update itself is unchanged.
                self._pending[env.update_id] = delivery
                self.log.info("buffered update redelivered", update_id=env.update_id)
                return
            # Another copy under an id we hold: settle it now, or it would sit unacked
            # for good and, repeated, fill the prefetch and stall every bank.
            detail = f"update id {env.update_id!r} is already buffered for the next version"
            await self._refuse(delivery, "duplicate", detail, env.participant, env.update_id)
            return
        problem = self._check(env, delivery)
        if problem is not None:
            await self._refuse(delivery, *problem, env.participant, env.update_id)
            return
        applied = await self._store_retry(
            "checking duplicates", lambda: self.store.applied_in(self.task, [env.update_id])
        )
        if applied:
            detail = f"already applied in version {applied[env.update_id]}"
            await self._refuse(delivery, "duplicate", detail, env.participant, env.update_id)
            return
        base = await self._base(env.base_version) if self.strategy.uses_base else self.head_params
        if base is None:
            detail = f"parameters of base version {env.base_version} are no longer kept"
            await self._refuse(delivery, "base_unavailable", detail, env.participant, env.update_id)
            return
        update = AcceptedUpdate(
            update_id=env.update_id,
            participant=env.participant,
            base_version=env.base_version,
            staleness=self.head_version - env.base_version,
            num_samples=env.num_samples,
            delta=env.tensors,
            content_hash=env.content_hash,
        )
        try:
            step = await asyncio.to_thread(self.strategy.offer, self.head_params, base, update)
        except ValueError as e:
            await self._refuse(delivery, "invalid_update", str(e), env.participant, env.update_id)
            return
        self._pending[env.update_id] = delivery
        self._updates[env.update_id] = update
        self.metrics.staleness.labels(self.task).observe(update.staleness)
        if step is None and self._overdue:
            # An overdue round closes as soon as it has its minimum.
            step = await asyncio.to_thread(self.strategy.flush, self.head_params)
        if step is not None:
            await self._emit(step)

    async def _emit(self, step: Step) -> None:
        """Commit a step, unless its parameters are not finite.

        A non-finite result is never committed: the updates that make it so are
        refused (``non_finite_result``) and the head stays. In a buffer or a round,
        an update is a culprit if the head plus its own weighted delta is already not
        finite; the others go back into the buffer. If no single update is to blame
        (the sum overflows), every update of the step is refused.
        """
        bad = await asyncio.to_thread(_non_finite, step.params)
        if not bad:
            await self._commit(step)
            return
        updates = [self._updates[e.update_id] for e in step.lineage]
        culprits = await asyncio.to_thread(_culprits, self.head_params, step, updates)
        blamed = culprits or {e.update_id for e in step.lineage}
        self.log.error(
            "aggregate not finite; refusing the updates that cause it",
            version=self.head_version + 1,
            tensors=bad,
            refused=sorted(blamed),
        )
        for entry in step.lineage:
            if entry.update_id not in blamed:
                continue
            delivery = self._pending.pop(entry.update_id)
            self._updates.pop(entry.update_id, None)
            detail = (
                f"the aggregate for version {self.head_version + 1} would hold NaN or Inf "
                f"in {', '.join(bad)}" + ("" if culprits else " (the sum of the buffer overflows)")
            )
            await self._refuse(
                delivery, "non_finite_result", detail, entry.participant, entry.update_id
            )
        for update in updates:
            if update.update_id in blamed:
                continue
            # Back into the buffer or round (only strategies with several updates per
            # step get here, and those apply deltas to the head: no base needed).
            again = await asyncio.to_thread(
                self.strategy.offer, self.head_params, self.head_params, update
            )
            if again is not None:
                await self._emit(again)

    async def _commit_until_saved(self, parent: int, step: Step) -> CommitResult:
        """Commit; while Redis is unreachable, wait and retry (nothing is acked meanwhile).

        A commit whose reply was lost may have been applied: before retrying, a head
        that already holds exactly this lineage counts as committed.
        """
        info = {
            "strategy": self.strategy.name,
            "settings": self.strategy.settings(),
            "owner": self.config.owner,
            "fence": self.lease.token if self.lease else None,
        }
        ids = [e.update_id for e in step.lineage]
        delay = 0.2
        while True:
            lease = self.lease
            try:
                result = await self.store.commit(
                    self.task,
                    parent=parent,
                    params=step.params,
                    lineage=step.lineage,
                    info={**info, "fence": lease.token if lease else None},
                    lease=lease,
                    parent_hash=self.head_hash or None,
                )
                if result.outcome is not CommitOutcome.FENCED or not await self._reclaim(lease):
                    return result
                continue  # our own lease had expired (e.g. Redis restarted) and is ours again
            except StoreUnavailableError as e:
                self.log.warning(
                    "store unavailable; commit waits", error=str(e), version=parent + 1
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                if await self.store.head(self.task) == parent + 1:
                    record = await self.store.get_version(self.task, parent + 1)
                    if [e.update_id for e in record.lineage] == ids:
                        blob = await self.store.get_blob(self.task, parent + 1)
                        return CommitResult(CommitOutcome.COMMITTED, record, parent + 1, blob=blob)
            except StoreUnavailableError:
                continue

    async def _reclaim(self, used: Lease | None) -> bool:
        """After a fenced commit: whether we hold the lease again (renewed meanwhile, or
        expired with nobody else taking it). Safe: without the lease nobody committed."""
        if self.lease is not used:
            return True
        ttl = int(self.config.lease_ttl_s * 1000)
        fresh = await self._store_retry(
            "re-acquiring the writer lease",
            lambda: self.store.acquire_lease(self.task, self.config.owner, ttl),
        )
        if fresh is None:
            return False
        if used is not None:
            self._check_fence(fresh.token, used.token)
        self.log.warning("writer lease had expired; re-acquired", fence=fresh.token)
        self.lease = fresh
        return True

    async def _store_retry(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run a store read; while Redis is unreachable, wait and retry."""
        delay = 0.2
        while True:
            try:
                return await op()
            except StoreUnavailableError as e:
                self.log.warning("store unavailable; waiting", during=what, error=str(e))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _until_deadline(self) -> float | None:
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)

    async def _deadline_passed(self) -> None:
        """Sync: close the round if it has its minimum; else keep waiting for one."""
        step = await asyncio.to_thread(self.strategy.flush, self.head_params)
        if step is not None:
            self.log.info(
                "round deadline: closing with the updates present", version=self.head_version
            )
            await self._emit(step)
            return
        self.log.warning(
            "round deadline passed below the minimum; waiting",
            version=self.head_version,
            updates=len(self.strategy.pending()),
            minimum=self.spec.sync.min_updates,
        )
        self._deadline = None  # the next update that reaches the minimum closes the round
        self._overdue = True

    def _check(self, env: UpdateEnvelope, delivery: UpdateDelivery) -> tuple[str, str] | None:
        if env.task != self.task:
            return "unknown_task", f"update names task {env.task!r}"
        known = self.spec.participants
        if known and env.participant not in known:
            return "unknown_participant", f"{env.participant!r} is not a participant of the task"
        if self.config.require_sender_match and delivery.user_id != env.participant:
            return "sender_mismatch", (
                f"sent by broker user {delivery.user_id!r}, names participant {env.participant!r}"
            )
        bound = self.spec.sample_bound(env.participant)
        if env.num_samples > bound:
            return "too_many_samples", (
                f"claims {env.num_samples} samples; {env.participant!r} may claim at most {bound}"
            )
        if env.base_version > self.head_version:
            return "future_base", (
                f"base version {env.base_version} is ahead of the head {self.head_version}"
            )
        staleness = self.head_version - env.base_version
        if self.sync:
            if staleness > 0 and self.spec.sync.late == "refuse":
                return "stale_round", (
                    f"trained on round {env.base_version}, the current round is {self.head_version}"
                )
            if any(u.participant == env.participant for u in self.strategy.pending()):
                return "duplicate_in_round", (
                    f"{env.participant!r} already has an update in round {self.head_version}"
                )
        if staleness > self.spec.async_.max_staleness:
            return "too_stale", (
                f"staleness {staleness} exceeds the maximum {self.spec.async_.max_staleness}"
            )
        return None

    async def _refuse(
        self,
        delivery: UpdateDelivery,
        reason: str,
        detail: str,
        participant: str | None = None,
        update_id: str | None = None,
    ) -> None:
        await delivery.dead_letter(reason, detail)
        self.metrics.refused.labels(self.task, reason).inc()
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self.log.warning(
            "update refused",
            reason=reason,
            detail=detail,
            participant=participant,
            update_id=update_id,
        )
        try:
            await self._store_retry(
                "recording a refusal",
                lambda: self.store.record_refusal(
                    self.task,
                    head=self.head_version,
                    reason=reason,
                    detail=detail,
                    participant=participant,
                    update_id=update_id,
                    message_id=delivery.message_id,
                    body=delivery.body,
                ),
            )
        except FedqError as e:  # the dead-letter queue still holds it, with its reason
            self.log.error("refusal not recorded in the store", error=str(e))

    # ------------------------------------------------------------------ commit

    async def _commit(self, step: Step) -> None:
        started = time.perf_counter()
        parent = self.head_version
        result = await self._commit_until_saved(parent, step)
        if result.outcome is CommitOutcome.FENCED:
            self._fenced = True
            self._halt.set()
            raise FencedOutError(f"commit on version {parent} refused: the writer lease is gone")
        if result.outcome is CommitOutcome.LOST_RACE and (
            result.head is None or result.head < parent
        ):
            self._halt.set()
            raise self._regressed(
                f"committing version {parent + 1} found the head at {result.head}"
            )
        if not result.committed or result.record is None:
            raise FencedOutError(
                f"commit on version {parent} refused ({result.outcome.value}, head "
                f"{result.head}): another aggregator writes this task"
            )
        record = result.record
        self._set_head(record.version, step.params)
        self.head_hash = record.version_hash
        # Only now is the effect saved: ack what went into it. An ack that fails (the
        # channel was lost) is harmless: the redelivery is refused as a duplicate.
        for entry in step.lineage:
            delivery = self._pending.pop(entry.update_id)
            self._updates.pop(entry.update_id, None)
            try:
                await delivery.ack()
            except FedqError as e:
                self.log.warning("ack after commit failed", update_id=entry.update_id, error=str(e))
        elapsed = time.perf_counter() - started
        self.accepted += len(step.lineage)
        self.metrics.accepted.labels(self.task).inc(len(step.lineage))
        self.metrics.commit_seconds.labels(self.task).observe(elapsed)
        self._announce(record.version, result.blob, record.version_hash)
        self.log.info(
            "version committed",
            version=record.version,
            updates=len(step.lineage),
            participants=[e.participant for e in step.lineage],
            staleness=[e.staleness for e in step.lineage],
            weights=[round(e.weight, 6) for e in step.lineage],
            commit_ms=round(elapsed * 1000, 2),
        )
        if self.on_version is not None:
            await self.on_version(record, step.params)

    def _announce(self, version: int, blob: bytes, version_hash: bytes) -> None:
        """Queue the newest model for announcement, replacing one not yet sent.

        Model queues keep only the latest model anyway, so a superseded version need
        not be published; announcing off the commit path keeps ingest fast.
        """
        self._announce_slot = (version, blob, version_hash)
        self._announce_wake.set()

    async def _announcer(self) -> None:
        while True:
            await self._announce_wake.wait()
            self._announce_wake.clear()
            slot, self._announce_slot = self._announce_slot, None
            if slot is not None:
                version, blob, version_hash = slot
                try:
                    await self.transport.announce_model(
                        self.task,
                        version,
                        blob,
                        fence=self.lease.token if self.lease else None,
                        version_hash=version_hash,
                    )
                except Exception as e:  # noqa: BLE001 - the announcer must outlive any failure
                    self.log.error("announcement failed; will retry", version=slot[0], error=str(e))
                    if self._announce_slot is None:  # nothing newer meanwhile: retry this one
                        self._announce_slot = slot
                    if not self._closing:
                        await asyncio.sleep(1.0)
                    self._announce_wake.set()
                    if self._closing:
                        return
            if self._closing and self._announce_slot is None:
                return

    async def _flush_announcements(self, announcer: asyncio.Task[None]) -> None:
        """Send the last queued announcement, then stop the announcer."""
        self._closing = True
        self._announce_wake.set()
        try:
            async with asyncio.timeout(30):
                await announcer
        except TimeoutError:
            self.log.error("last announcement not confirmed in 30 s")

    def _set_head(self, version: int, params: Tensors) -> None:
        self.head_version, self.head_params = version, params
        if self.sync and self.spec.sync.deadline_s is not None:
            self._deadline = time.monotonic() + self.spec.sync.deadline_s
        self._overdue = False
        self.metrics.head.labels(self.task).set(version)
        self._bases[version] = params
        keep = self.spec.async_.max_staleness + 1
        while len(self._bases) > keep:
            self._bases.popitem(last=False)

    async def _base(self, version: int) -> Tensors | None:
        cached = self._bases.get(version)
        if cached is not None:
            return cached
        try:
            env = await self._store_retry(
                "reading a base version", lambda: self.store.get_params(self.task, version)
            )
        except (BlobPrunedError, NotFoundError):
            return None
        self._bases[version] = env.tensors
        self._bases.move_to_end(version, last=False)  # older than the head: evicted first
        return env.tensors

    async def _poll_depth(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                depth = await self.transport.queue_depth(self.task)
            except FedqError as e:
                self.log.warning("queue depth unavailable", error=str(e))
            else:
                self._depth = depth
                self.metrics.queue_depth.labels(self.task).set(depth)
            await asyncio.sleep(self.config.depth_poll_s)


def _non_finite(params: Tensors) -> list[str]:
    """Names of the tensors that hold NaN or Inf."""
    return [name for name, t in params.items() if not bool(torch.isfinite(t).all())]


def _culprits(head: Tensors, step: Step, updates: list[AcceptedUpdate]) -> set[str]:
    """Updates of a non-finite step that are not finite on their own.

    A step of one update: that update. Otherwise an update whose ``head + w * delta``
    (its own weight, float64, cast to the head's dtype) is not finite.
    """
    if len(updates) == 1:
        return {updates[0].update_id}
    out = set()
    for entry, u in zip(step.lineage, updates, strict=True):
        for name, h in head.items():
            alone = h.to(torch.float64) + entry.weight * u.delta[name].to(torch.float64)
            if not bool(torch.isfinite(alone.to(h.dtype)).all()):
                out.add(u.update_id)
                break
    return out
