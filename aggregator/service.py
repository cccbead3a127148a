"""The aggregator service: consume -> admit -> offer -> commit -> ack, then announce.

The path of one update (docs/wire-format.md): admission decodes it with hard limits
and the task's shapes and applies every refusal rule (:mod:`aggregator.admission`);
the strategy takes what was admitted; when it emits a step, the step is checked
(never a non-finite model) and committed to the store in one transaction, and only
then are the deliveries that went into it acked; the announcer sends the new model.
A refused update goes to the dead-letter queue with its reason, is counted and
recorded; the service keeps running. The writer lease (:mod:`aggregator.lease`)
makes this the task's only writer; a store that went backwards stops it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import mmap
import os
import socket
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from aggregator.admission import (
    Admission,
    AdmissionConfig,
    Admitted,
    Redelivered,
    Refused,
)
from aggregator.announcer import Announcer
from aggregator.applied import RecentlyApplied
from aggregator.audit.rebuild import rebuild
from aggregator.bounds import Bounds, Verdict
from aggregator.guard import overflowing
from aggregator.identity import check_signing_key
from aggregator.lease import FencedOutError, LeaseConfig, WriterLease, check_fence
from aggregator.metrics import AggregatorMetrics
from aggregator.privacy import BankAggregation, VersionPrivacy
from aggregator.receipts import ReceiptSender
from aggregator.reports import ReportDesk
from aggregator.retry import store_retry
from aggregator.secagg import UNMASK_ROUNDS, Decision, OpenCohort, secure_step
from aggregator.stats import ServiceStats, Stages, untimed
from aggregator.status import StatusTracker
from aggregator.store import (
    CommitOutcome,
    GroupCommitResult,
    NewVersion,
    RedisModelStore,
    VersionRecord,
)
from aggregator.strategies import AcceptedUpdate, Step, Strategy, strategy_for
from aggregator.strategies.base import server_optimizer
from aggregator.weighting import Remembering
from common.errors import (
    BlobPrunedError,
    CommitConflictError,
    ConfigError,
    DecodeError,
    FedqError,
    NonFiniteError,
    NotFoundError,
    SecAggError,
    StoreRegressedError,
    StoreUnavailableError,
)
from common.hashing import LineageEntry
from common.model_segments import pack_model_segments
from common.models import initial_tensors, task_tensor_specs
from common.refusals import Refusal
from common.segments import Owned, Segments
from common.signing import MAX_ANCESTORS, PublicKey, SigningKey
from common.spec import TaskSpec
from common.transport import (
    Announcement,
    TaskTopology,
    Transport,
    UpdateDelivery,
    UpdateSubscription,
    next_or_none,
    refusal_of,
)
from common.wire import (
    DEFAULT_LIMITS,
    KIND_UNMASK_ANSWER,
    REPORT_KINDS,
    DecodeLimits,
    Tensors,
    TensorSpec,
    UnmaskAnswer,
    decode_unmask_answer,
    encode_unmask_request,
    first_non_finite,
    limits_for,
    peek_kind,
    raw_bytes,
    sign_model_segments,
)

__all__ = [
    "AggregatorService",
    "CommitConflictError",
    "FencedOutError",
    "ServiceConfig",
    "VersionHook",
]

log = structlog.get_logger("fedq.aggregator")

#: Called after each commit with the new version's record and parameters.
VersionHook = Callable[[VersionRecord, Tensors], Awaitable[None]]

#: Base versions kept in memory (with the head): every version admission still admits
#: (``max_staleness`` in rounds may span hundreds of versions), within BASE_BYTES of
#: float32 parameters; older ones are read from the store on demand. When the store
#: prunes parameters (``keep_blobs``, ``checkpoint_every``) up to BASE_CACHE are kept
#: within PRUNED_BASE_BYTES, since a pruned base is rebuilt from the nearest checkpoint.
#: The head and one base at least, unless two versions exceed PRUNED_BASE_BYTES (a
#: 100M-parameter version is 400 MB): then the head only, and a stale update's base is
#: read from the store when it comes. A strategy that reads no base keeps the head
#: only. See :func:`base_budget`.
BASE_CACHE = 32
BASE_BYTES = 64 * 1024**2
PRUNED_BASE_BYTES = 4 * BASE_BYTES

#: The model stream's retention in bytes at least (TaskTopology's default); more for a
#: model larger than a quarter of it.
MODELS_MAX_BYTES = 256 * 1024**2

#: Weight shares and low-weight flags are re-evaluated (a pass over every bank) once per
#: ``banks // WEIGHT_PASS_BANKS`` committed entries: O(WEIGHT_PASS_BANKS) per update.
WEIGHT_PASS_BANKS = 100

#: Versions read per round trip when the weighting state is rebuilt at start.
RESTORE_BATCH = 256

#: Versions whose applied update ids are loaded into memory at start at least (see
#: aggregator/applied.py): an update based on one of them is checked in memory.
APPLIED_VERSIONS = 256

_T = TypeVar("_T")


def base_budget(numel: int, *, uses_base: bool, prunes: bool) -> int:
    """Versions of parameters (the head included) the service keeps in memory for a
    model of ``numel`` float32 parameters: 1 when the strategy reads no base; else
    what BASE_BYTES holds, and with a pruning store up to BASE_CACHE within
    PRUNED_BASE_BYTES; at least 2, unless 2 exceed PRUNED_BASE_BYTES (then 1: the
    head). Bounded by bytes at every size: beyond the head, never more than
    max(BASE_BYTES, PRUNED_BASE_BYTES) of parameters."""
    if not uses_base:
        return 1
    size = max(1, 4 * numel)
    if 2 * size > PRUNED_BASE_BYTES:
        return 1  # a base other than the head is read from the store when needed
    by_bytes = BASE_BYTES // size
    if prunes:
        by_bytes = max(by_bytes, min(BASE_CACHE, PRUNED_BASE_BYTES // size))
    return max(2, by_bytes)


class _Conflict(FedqError):
    """The store refused a group commit: an update id in it was applied long ago (a
    bank re-sent an old id on a newer base). The in-memory state was reloaded from the
    store; the consumer must return what it holds to the queue and subscribe again."""


@dataclass(frozen=True, slots=True)
class _Staged:
    """A step applied to the in-memory head, waiting for the group commit."""

    step: Step
    info: dict[str, object]


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """How the aggregator consumes and validates."""

    #: Unacked deliveries at most (bounds memory together with the strategy's buffer).
    prefetch: int = 64
    #: ... and at most this many bytes of updates at the model's float32 size: a 1M
    #: parameter model (4 MB per update) gets a prefetch of 32.
    prefetch_bytes: int = 128 * 1024**2
    #: Group commit: deliveries already received are admitted and applied in order, and
    #: their versions committed in one store round trip, acked together, the last one
    #: announced; at most this many deliveries per group.
    group_max: int = 64
    #: CPU work on models with fewer parameters than this runs on the event loop: a
    #: worker thread costs more than the work.
    inline_below: int = 1 << 16
    #: Update ids of recent versions kept in memory to refuse duplicates without a store
    #: round trip (aggregator/applied.py).
    applied_memory: int = 200_000
    #: Make no version after this one (None: no limit): deliveries that would are not
    #: handled and stay in the queue (a simulation's version budget).
    last_version: int | None = None
    #: Refuse an update whose broker-validated sender is not the participant it names.
    require_sender_match: bool = True
    limits: DecodeLimits = DEFAULT_LIMITS
    #: How often the work queue's depth is sampled for metrics (seconds).
    depth_poll_s: float = 5.0
    #: How often the task's training pause (``fedq task pause``) is read (seconds).
    pause_poll_s: float = 1.0
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
    #: received for this long (seconds), or one update has been in hand that long.
    stall_s: float = 60.0
    #: A bank is flagged after this many of its updates in a row were refused.
    flag_after: int = 5
    #: Announce the head again after this many seconds without a new version (None:
    #: never): a participant that lost it (a refused or a restarted worker, a queue
    #: declared late) gets it without waiting for a commit, which in sync mode may
    #: never come without that participant.
    reannounce_s: float | None = 30.0
    #: The aggregator's Ed25519 key: signs every model announcement (and receipt). It
    #: must be the task spec's ``identity.aggregator_key`` when the spec names one.
    signing_key: SigningKey | None = None


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
        stages: Stages = untimed,
    ) -> None:
        self.spec = spec
        self.task = spec.task_id
        self.store = store
        self.transport = transport
        self.config = config or ServiceConfig()
        self.metrics = metrics or AggregatorMetrics()
        self.on_version = on_version
        self.stages = stages
        self.strategy: Strategy = strategy_for(spec)
        #: The strategy's server optimizer, if it has one: restored from the head's
        #: stored state at start, advanced after each commit.
        self.server = server_optimizer(self.strategy)
        #: Bank-level DP (``spec.privacy.bank``): clipping, noise, the bound and the
        #: accountant, restored from the head's record at start (aggregator.privacy).
        if spec.privacy.bank is not None and not getattr(self.strategy, "dp_linear", False):
            raise ConfigError(
                f"privacy.bank needs a strategy whose versions are linear in the deltas "
                f"(fedasync, fedbuff, fedavg); {self.strategy.name!r} is not declared so"
            )
        self.privacy = BankAggregation(spec.privacy.bank) if spec.privacy.bank is not None else None
        #: Bounded influence (``spec.robustness``, aggregator/bounds.py): each offered
        #: update's verdict (its norm, its clip factor) until its version is committed.
        self.bounds = Bounds(spec)
        self._verdicts: dict[str, Verdict] = {}
        #: Committed lineage entries since every bank's weight share was evaluated.
        self._weights_due = 0
        if spec.robustness.aggregator != "mean" and self.strategy.name not in ("fedbuff", "fedavg"):
            raise ConfigError(
                f"robustness.aggregator {spec.robustness.aggregator!r} is built into fedbuff "
                f"and sync rounds; strategy {self.strategy.name!r} does not take it"
            )
        expected = model_specs = task_tensor_specs(spec)
        numel = sum(_numel(t.shape) for t in expected.values())
        self._inline = numel < self.config.inline_below
        prunes = store.config.keep_blobs is not None or store.config.checkpoint_every is not None
        self._base_budget = base_budget(numel, uses_base=self.strategy.uses_base, prunes=prunes)
        # Buffered updates stay unacked until their commit: the prefetch must exceed
        # what the strategy holds, or the broker stops delivering. A model so large
        # that two updates exceed prefetch_bytes gets no update beyond what the
        # strategy needs at once (FedAsync: the one in hand; a buffer: its K).
        by_bytes = max(1, self.config.prefetch_bytes // max(1, 4 * numel))
        needs = self.strategy.capacity + (1 if by_bytes > 1 else 0)
        self.prefetch = max(min(self.config.prefetch, by_bytes), needs)
        #: Secure aggregation (aggregator/secagg.py): the open cohort, the answers'
        #: deliveries held until the commit, the banks' keys that sign the answers.
        self.secure = spec.secure_aggregation is not None
        self.cohort: OpenCohort | None = None
        self._answer_deliveries: dict[str, UpdateDelivery] = {}
        self._answer_keys = {
            p: PublicKey.parse(t) for p, t in spec.identity.participant_keys.items()
        }
        if self.secure:
            # masked updates are ring elements (i64) with the model's names and shapes;
            # a cohort's answers come on top of its updates
            expected = {k: TensorSpec(v.shape, "i64") for k, v in expected.items()}
            self.prefetch += len(spec.participants)
        limits = limits_for(expected, self.config.limits)
        update_bytes = raw_bytes(expected)
        #: The largest update expected (its tensors, the envelope's share): sizes the broker
        #: prefetch of chunked updates (common/transport/base.py Chunking).
        self._update_bytes = update_bytes + update_bytes // 64 + 64 * 1024
        #: The model stream keeps at least 4 models (a late reader finds the last one's
        #: first chunk), and never less than the default.
        self._models_max_bytes = max(MODELS_MAX_BYTES, 4 * raw_bytes(model_specs))
        self.admission = Admission(
            spec,
            AdmissionConfig(limits, self.config.require_sender_match),
            expected,
            uses_base=self.strategy.uses_base,
            updates_per_version=self.strategy.capacity,
        )
        self.lease = WriterLease(
            store, self.task, LeaseConfig(self.config.owner, self.config.lease_ttl_s)
        )
        self.announcer = Announcer(
            transport,
            self.task,
            lambda: self.lease.token,
            repeat_s=self.config.reannounce_s,
            stages=stages,
        )
        #: The fate of each update, to its sender (aggregator.receipts).
        self.receipts = ReceiptSender(
            transport,
            self.task,
            spec.participants,
            sender_match=self.config.require_sender_match,
            signing_key=self.config.signing_key,
            metrics=self.metrics,
        )
        self.stats = ServiceStats.for_task(spec, flag_after=self.config.flag_after)
        #: Per-bank activity and the version rate, for /status (aggregator/status.py).
        self.activity = StatusTracker(self.task, self.metrics)
        self.activity.watch(
            lease_held=lambda: self.lease.held, regressed=lambda: self.failure is not None
        )
        #: The head in memory: ahead of the store's by the versions staged for the group
        #: commit (the committed head is :attr:`head_version`).
        self.tip_version = -1
        self._tip = _Tip(self)
        self.head_params: Tensors = {}
        self.head_hash = b""
        self.spec_hash = spec.spec_hash()
        #: The newest version hashes, oldest first: the ancestors an announcement names.
        self._chain: deque[bytes] = deque(maxlen=MAX_ANCESTORS + 1)
        check_signing_key(spec, self.config.signing_key)
        self._bases: OrderedDict[int, Tensors] = OrderedDict()
        #: Offered updates not yet in a committed version: their live delivery and the
        #: update (those of staged versions too, until the group commit).
        self._pending: dict[str, tuple[UpdateDelivery, AcceptedUpdate]] = {}
        #: Versions applied to the in-memory head, not yet committed (group commit).
        self._group: list[_Staged] = []
        #: The head version and hash in the store (the in-memory head may be ahead).
        self._committed = -1
        self._applied = RecentlyApplied(self.config.applied_memory)
        #: Banks that re-sent an old update id on a newer base: checked in the store.
        self._suspects: set[str] = set()
        #: The work queue's consumer while serving (None when handle() is called directly).
        self._sub: UpdateSubscription | None = None
        self._consuming = False
        self._halt = asyncio.Event()
        #: Sync mode: when the current round's deadline passes (monotonic seconds).
        self._deadline: float | None = None
        self._overdue = False
        #: Set once the head is loaded and announced.
        self.ready = asyncio.Event()
        #: Why the service stopped for good (a store that went backwards), for /healthz.
        self.failure: str | None = None
        #: When a delivery last arrived, when the one in hand arrived, the queue's depth.
        self._last_delivery = time.monotonic()
        self._handling_since: float | None = None
        self._depth = 0
        #: The banks' drift summaries and evaluations (a task with monitoring only).
        self.reports = (
            ReportDesk(
                spec,
                store,
                self.metrics,
                self.admission.keys,
                require_sender_match=self.config.require_sender_match,
            )
            if spec.monitoring is not None
            else None
        )
        #: The task's training pause as last read from the store (None: training).
        self.paused: dict[str, Any] | None = None
        self.log = log.bind(task=self.task)

    @property
    def head_version(self) -> int:
        """The head version in the store (committed)."""
        return self._committed

    @property
    def unacked(self) -> int:
        """Deliveries held: offered to the strategy, not yet in a committed version."""
        return len(self._pending)

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
                models_max_bytes=self._models_max_bytes,
            )
        )
        announced = await self.transport.last_announcement(self.task)
        if await self.store.head(self.task) is None:
            if announced is not None and announced.version > 0:
                raise StoreRegressedError(
                    f"the store holds no version of task {self.task!r}, but version "
                    f"{announced.version} was announced"
                )
            await self.store.register_task(self.spec)
            genesis = initial_tensors(self.spec)
            await self.store.create_genesis(self.task, genesis, info={"strategy": "genesis"})
            del genesis  # not held while the head is read back
            self.log.info("version 0 created", seed=self.spec.seed)
        else:
            if self.privacy is not None:
                await self._check_private_chain()
            await self.store.register_task(self.spec)
        record = await self.store.get_head(self.task)
        self._check_announced(announced, record.version, record.version_hash)
        await self._load_head(record)
        if self.secure:
            await self._open_cohort(record.version)
        # The head's blob made again from the parameters in memory (byte for byte the
        # stored one: the same codec; tests/test_model_segments.py), not read twice.
        blob, _ = await asyncio.to_thread(  # a hash of the whole model: off the loop
            pack_model_segments,
            self.task,
            record.version,
            record.version_hash,
            self.head_params,
            self.store.config.blob_codec,
        )
        await self.announcer.send_now(
            record.version, self._announcement(record, blob), record.version_hash
        )
        self.ready.set()
        self.log.info("aggregator ready", version=record.version, strategy=self.strategy.name)

    async def _load_head(self, record: VersionRecord, *, count_stats: bool = True) -> None:
        """Everything the next version depends on, from the store's head ``record``: its
        parameters, the optimizer's state, the DP record, the weighting and bounds
        windows, the ancestors' hashes, the ids applied in the last versions."""
        env = await self.store.get_params(self.task, record.version)
        if self.server is not None:
            # Continue from the head's optimizer state, bit for bit (None: it has none).
            self.server.advance(await self.store.get_state(self.task, record.version))
        if self.privacy is not None:
            self.privacy.restore(record.info)  # the bound and the count carry on
        self._set_head(record.version, env.tensors)
        self.head_hash = record.version_hash
        self._committed = record.version
        self.metrics.head.labels(self.task).set(record.version)
        await self._restore_weighting(record.version, count_stats=count_stats)
        await self._restore_bounds(record.version)
        first = max(0, record.version - MAX_ANCESTORS)
        chain = await self.store.get_versions(self.task, range(first, record.version + 1))
        self._chain.clear()
        self._chain.extend(r.version_hash for r in chain)
        capacity = max(1, self.strategy.capacity)
        window = max(self.admission.max_versions_behind + 1, APPLIED_VERSIONS)
        window = min(record.version, window, max(1, self.config.applied_memory // capacity))
        applied = await self.store.recent_applied(self.task, record.version, window)
        self._applied.load(record.version - window, applied)

    async def _reload(self) -> None:
        """Forget every staged version and held update; start again from the store's head
        (after a group commit the store refused: the store is the authority)."""
        self._group.clear()
        self._pending.clear()
        self._verdicts.clear()
        self._bases.clear()
        self.strategy = strategy_for(self.spec)
        self.server = server_optimizer(self.strategy)
        if self.spec.privacy.bank is not None:
            self.privacy = BankAggregation(self.spec.privacy.bank)
        self.bounds = Bounds(self.spec)
        record = await store_retry(
            "reading the head", lambda: self.store.get_head(self.task), self.log
        )
        await self._load_head(record, count_stats=False)
        self.log.warning(
            "in-memory state reloaded from the store; held updates return to the queue",
            version=record.version,
        )

    def _announcement(
        self, record: VersionRecord, blob: bytes | Owned | Segments
    ) -> Callable[[], Segments]:
        """How to make ``record``'s announcement: the stored blob with the spec hash, the
        ancestors' version hashes (newest first) and the signature appended (section 15),
        as segments (a large model's tensors are neither copied nor joined). Called when
        the announcement is sent, so only the newest version is signed."""
        if isinstance(blob, bytes | bytearray | mmap.mmap):
            blob = (memoryview(blob),)
        newest_first = list(reversed(self._chain))
        if newest_first and newest_first[0] == record.version_hash:
            newest_first = newest_first[1:]  # at start the head is in the chain: not its own
        ancestors = tuple(newest_first[: min(record.version, MAX_ANCESTORS)])
        key = self.config.signing_key
        return functools.partial(
            sign_model_segments,
            blob,
            task=self.task,
            version=record.version,
            version_hash=record.version_hash,
            content_hash=record.param_hash,
            spec_hash=self.spec_hash,
            ancestors=ancestors,
            signing_key=key,
        )

    async def _check_private_chain(self) -> None:
        """Bank-level DP only on a chain that never released a version without it: the
        accountant composes the noisy versions, and a version made without noise after
        version 0 released the banks' updates outright (its epsilon is unbounded)."""
        head = await self.store.get_head(self.task)
        if head.version > 0 and "privacy" not in head.info:
            raise ConfigError(
                f"task {self.task!r} has versions made without bank-level DP (head "
                f"{head.version}): turning privacy.bank on now would understate what was "
                "released; start a new task id with privacy.bank from version 0"
            )

    def _check_announced(self, announced: Announcement | None, head: int, digest: bytes) -> None:
        """The store's head must not be behind the last announcement (see prepare)."""
        if announced is None:
            return
        if announced.version > head:
            raise StoreRegressedError(
                f"the store's head of {self.task!r} is version {head}, but version "
                f"{announced.version} was announced"
            )
        said = announced.version_hash
        if announced.version == head and said is not None and said != digest:
            raise StoreRegressedError(
                f"version {head} of {self.task!r} in the store is not the one announced "
                f"(hash {digest.hex()[:16]}, announced {said.hex()[:16]})"
            )
        token = self.lease.token
        if token is not None and announced.fence is not None:
            check_fence(self.task, token, announced.fence)

    async def run(self, stop: asyncio.Event) -> None:
        """Take the writer lease (waiting as a standby), then consume until ``stop``.

        The commit in flight finishes first; buffered, uncommitted updates go back to
        the queue. Raises FencedOutError if another aggregator took the task over and
        StoreRegressedError if the store went backwards.
        """
        if await self.lease.acquire(stop) is None:
            return
        halt = self._halt
        relays = [
            asyncio.create_task(_relay(stop, halt)),
            asyncio.create_task(_relay(self.lease.lost, halt)),
        ]
        keeper = asyncio.create_task(self.lease.keep())
        try:
            await self._serve(stop)
        except StoreRegressedError as e:
            self._fail(e)
            raise
        finally:
            keeper.cancel()
            for r in relays:
                r.cancel()
            await self.lease.release()
            self.log.info(
                "aggregator stopped",
                version=self.head_version,
                returned_to_queue=len(self._pending),
                fenced=self.lease.lost.is_set(),
            )
            self._pending.clear()
        if self.lease.error is not None:
            if isinstance(self.lease.error, StoreRegressedError):
                self._fail(self.lease.error)
            raise self.lease.error

    async def _serve(self, stop: asyncio.Event) -> None:
        halt = self._halt
        sub = None
        try:
            await self.prepare()
            if self.prefetch != self.config.prefetch:
                # raised above the strategy's buffer, or lowered to the bytes bound
                self.log.info("prefetch adjusted", prefetch=self.prefetch)
            sub = self._sub = await self.transport.consume_updates(
                self.task, prefetch=self.prefetch, update_bytes=self._update_bytes
            )
            self._consuming = True
            await self._read_pause()
            poller = asyncio.create_task(self._poll_depth(halt))
            pauses = asyncio.create_task(self._poll_pause(halt))
            self.announcer.start()
            self.receipts.start()
            try:
                while not (stop.is_set() or halt.is_set()):
                    delivery = await next_or_none(sub, halt, self._until_deadline())
                    if delivery is not None and (stop.is_set() or halt.is_set()):
                        break  # not handled: it goes back to the queue unacked
                    try:
                        if delivery is None:
                            if not (stop.is_set() or halt.is_set()):
                                await self._deadline_passed()
                                await self._flush()
                            continue
                        batch = [delivery]
                        if not self.secure:
                            batch.extend(sub.ready(self.config.group_max - 1))
                        await self._take(batch, stop)
                    except _Conflict:
                        # What it held goes back to the queue; the store's view stands.
                        self._sub = None
                        await sub.close()
                        sub = None
                        sub = self._sub = await self.transport.consume_updates(
                            self.task, prefetch=self.prefetch, update_bytes=self._update_bytes
                        )
            finally:
                self._consuming = False
                self._sub = None
                poller.cancel()
                pauses.cancel()
                await self.announcer.close()
                await self.receipts.close()
        finally:
            # Buffered updates were never acked: closing returns them to the queue.
            if sub is not None:
                await sub.close()

    async def _take(self, batch: Sequence[UpdateDelivery], stop: asyncio.Event) -> None:
        """Handle a group of deliveries in order, then commit what they made at once.
        Once ``stop`` is set the rest are not handled (they go back to the queue); the
        versions already made are committed first."""
        self._last_delivery = self._handling_since = time.monotonic()
        try:
            with self.stages("handle"):
                last = self.config.last_version
                for delivery in batch:
                    if stop.is_set() or self._halt.is_set():
                        break
                    if last is not None and self.tip_version >= last:
                        break  # not handled: it goes back to the queue unacked
                    await self._handle(delivery)
                await self._flush()
        finally:
            self._handling_since = None

    def _fail(self, error: StoreRegressedError) -> None:
        self.failure = str(error)
        self._halt.set()
        self.log.error("store went backwards; stopping", detail=error.what)

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
            "flagged": self.stats.flagged,
            "flag_reasons": self.stats.flag_reasons,
        }
        oc = self.cohort
        if oc is not None:  # secure aggregation: where the open cohort stands
            report["cohort"] = {
                "number": oc.number,
                "updates": len(oc.updates),
                "minimum": oc.minimum,
                "decided": oc.decision is not None,
                "answers": len(oc.answers),
                "threshold": oc.cohort.threshold,
                "asked": oc.asks,
            }
        if self.failure is not None:
            report["error"] = self.failure
        return report

    # ------------------------------------------------------------------ one update

    async def handle(self, delivery: UpdateDelivery) -> None:
        """Admit one delivery and offer it to the strategy; commit when it steps."""
        await self._handle(delivery)
        await self._flush()

    async def _handle(self, delivery: UpdateDelivery) -> None:
        """Admit one delivery and offer it; a step is applied and staged (see _flush)."""
        refusal = refusal_of(delivery)
        if refusal is not None:  # a chunk set the transport could not reassemble
            await self._refuse(delivery, Refused(refusal.reason, refusal.detail))
            return
        if self.secure and peek_kind(delivery.body) == KIND_UNMASK_ANSWER:
            await self._take_answer(delivery)
            return
        if self.reports is not None and peek_kind(delivery.body) in REPORT_KINDS:
            await self._take_report(delivery)
            return
        with self.stages("admit"):
            outcome = await self.admission.admit(delivery.body, delivery.user_id, self._tip)
        if isinstance(outcome, Redelivered):
            # The broker redelivered an update we hold (its channel was lost): the new
            # delivery is the live one; the buffered update itself is unchanged.
            _, update = self._pending[outcome.update_id]
            self._pending[outcome.update_id] = (delivery, update)
            self.log.info("buffered update redelivered", update_id=outcome.update_id)
            return
        if isinstance(outcome, Refused):
            await self._refuse(delivery, outcome)
            return
        update = outcome.update
        if self.paused is not None and not self.secure:  # (fedq task pause refuses those)
            since = self.paused.get("version")
            detail = f"the task's training is paused (at version {since}); send it again later"
            paused = Refused(Refusal.TRAINING_PAUSED, detail, update.participant, update.update_id)
            await self._refuse(delivery, paused)
            return
        with structlog.contextvars.bound_contextvars(
            update_id=update.update_id, participant=update.participant
        ):
            await self._offer(delivery, outcome)

    @property
    def _spares(self) -> bool:
        """Whether an update's delta may be overwritten by its step: nothing reads the
        deltas after the step (no bank-level DP recomputing it, no server optimizer
        state, no secure aggregation)."""
        return self.privacy is None and self.server is None and not self.secure

    async def _offer(self, delivery: UpdateDelivery, admitted: Admitted) -> None:
        update = admitted.update
        if isinstance(delivery.body, bytearray | mmap.mmap) and self._spares:
            # Reassembled from chunks: its tensors are views into the delivery's own
            # buffer, which the step may overwrite with the new version (one model
            # fewer in memory). Nothing dead-letters it after its step: a result that
            # is not finite is never written there (aggregate.mix_into), and
            # _applied_long_ago returns such a delivery to the queue instead.
            update = dataclasses.replace(update, spare=True)
        if self.secure:
            await self._offer_masked(delivery, admitted)
            return
        if self.bounds.active:
            verdict = await self._cpu(self.bounds.judge, update, self.strategy.pending())
            if verdict.refused is not None:
                reason, detail = verdict.refused
                await self._refuse(
                    delivery, Refused(reason, detail, update.participant, update.update_id)
                )
                return
            if verdict.factor < 1.0:
                update = await self._cpu(self.bounds.offered, update, verdict)
                self.log.info("update clipped to the norm bound", factor=verdict.factor)
            self._verdicts[update.update_id] = verdict
        try:
            with self.stages("offer"):
                step = await self._cpu(self.strategy.offer, self.head_params, admitted.base, update)
        except ValueError as e:
            await self._refuse(
                delivery,
                Refused(Refusal.INVALID_UPDATE, str(e), update.participant, update.update_id),
            )
            return
        self._pending[update.update_id] = (delivery, update)
        self.metrics.staleness.labels(self.task).observe(update.staleness)
        if step is None and self._overdue:
            # An overdue round closes as soon as it has its minimum.
            step = await self._cpu(self.strategy.flush, self.head_params)
        if step is not None:
            await self._emit(step)

    # --- AdmissionState: what admission reads from here

    def held(self, update_id: str) -> bool | None:
        """None if not held; else whether its delivery can still be settled."""
        entry = self._pending.get(update_id)
        return None if entry is None else entry[0].live

    def _held_by(self, update_id: str) -> str | None:
        """The participant of the update held under ``update_id`` (None if none is)."""
        entry = self._pending.get(update_id)
        return None if entry is None else entry[1].participant

    async def _lineage_of(self, version: int) -> Sequence[LineageEntry]:
        record = await store_retry(
            "reading a lineage", lambda: self.store.get_version(self.task, version), self.log
        )
        return record.lineage

    def pending(self) -> Sequence[AcceptedUpdate]:
        """The strategy's buffered updates (a sync round's so far; the open cohort's)."""
        if self.cohort is not None:
            return tuple(self.cohort.updates.values())
        return self.strategy.pending()

    async def applied_in(self, update_id: str, base_version: int, participant: str) -> int | None:
        """The version ``update_id`` went into, if any: from the ids kept in memory when
        they cover every version after ``base_version`` (aggregator/applied.py), else
        from the store (waiting out a Redis outage). Secure aggregation, and a bank
        that re-sent an old id on a newer base, always ask the store."""
        known = self._applied.get(update_id)
        if known is not None:
            return known
        if (
            not self.secure
            and participant not in self._suspects
            and self._applied.covers(base_version)
        ):
            return None
        return await self._stored_applied_in(update_id)

    async def _applied_version(self, update_id: str) -> int | None:
        """The version ``update_id`` went into (for a duplicate's receipt): memory first."""
        known = self._applied.get(update_id)
        return known if known is not None else await self._stored_applied_in(update_id)

    async def _stored_applied_in(self, update_id: str) -> int | None:
        """The version ``update_id`` went into, read from the store."""
        with self.stages("applied_in"):
            found = await store_retry(
                "checking duplicates",
                lambda: self.store.applied_in(self.task, [update_id]),
                self.log,
            )
        return found.get(update_id)

    async def base(self, version: int) -> Tensors | None:
        """Parameters of ``version`` (the head's when the strategy does not read them)."""
        if not self.strategy.uses_base:
            return self.head_params
        cached = self._bases.get(version)
        if cached is not None:
            return cached
        try:
            env = await store_retry(
                "reading a base version",
                lambda: self.store.get_params(self.task, version),
                self.log,
            )
            params = env.tensors
        except BlobPrunedError:
            rebuilt = await self._rebuild(version)
            if rebuilt is None:
                return None
            params = rebuilt
        except NotFoundError:
            return None
        self._bases[version] = params
        self._bases.move_to_end(version, last=False)  # older than the head: evicted first
        return params

    # ------------------------------------------------------------------ refusals

    async def _refuse(self, delivery: UpdateDelivery, refused: Refused) -> None:
        # Versions staged before this refusal are committed first: a refusal is recorded
        # against a head that exists in the store, in the order it was decided.
        await self._flush()
        if refused.update_id is not None and refused.update_id not in self._pending:
            # (a refused copy of a held update shares its id: the held one keeps its verdict)
            self._verdicts.pop(refused.update_id, None)
        reason = refused.reason
        await delivery.dead_letter(reason.value, refused.detail)
        self.metrics.refused.labels(self.task, reason.value).inc()
        self.activity.refused(refused.participant, reason.value)
        await self.receipts.refused(
            reason=reason.value,
            detail=refused.detail,
            participant=refused.participant,
            update_id=refused.update_id,
            user_id=delivery.user_id,
            message_id=delivery.message_id,
            held_by=self._held_by,
            applied_in=self._applied_version,
            lineage_of=self._lineage_of,
        )
        if self.stats.count_refusal(reason, refused.participant):
            self.log.warning(
                "participant flagged: its updates keep being refused",
                participant=refused.participant,
                refused_in_a_row=self.stats.flag_after,
                reasons=self.stats.banks[str(refused.participant)].refused,
            )
            self.metrics.flagged.labels(self.task, str(refused.participant)).set(1)
        self.log.warning(
            "update refused",
            reason=reason.value,
            detail=refused.detail,
            participant=refused.participant,
            update_id=refused.update_id,
        )
        try:
            await store_retry(
                "recording a refusal",
                lambda: self.store.record_refusal(
                    self.task,
                    head=self.head_version,
                    reason=reason.value,
                    detail=refused.detail,
                    participant=refused.participant,
                    update_id=refused.update_id,
                    message_id=delivery.message_id,
                    body=memoryview(delivery.body),
                ),
                self.log,
            )
        except FedqError as e:  # the dead-letter queue still holds it, with its reason
            self.log.error("refusal not recorded in the store", error=str(e))

    # ------------------------------------------------------------------ steps and commits

    async def _emit(self, step: Step) -> None:
        """Stage a step for the group commit, unless its parameters are not finite.

        A non-finite result is never applied nor committed (one numpy pass over the
        parameters); the updates that make it so are refused (``non_finite_result``)
        and the head stays. In a buffer or a round, an update is a culprit if the head
        plus its own weighted delta is already not finite; the others go back into the
        buffer. If no single update is to blame (the sum overflows), every update of
        the step is refused.
        """
        try:
            await self._stage(step)
            return
        except NonFiniteError as e:
            bad = [e.tensor]
        updates = [self._pending[e.update_id][1] for e in step.lineage]
        culprits = await self._cpu(overflowing, self.head_params, step, updates)
        blamed = culprits or {e.update_id for e in step.lineage}
        version = self.tip_version + 1
        self.log.error(
            "aggregate not finite; refusing the updates that cause it",
            version=version,
            tensors=bad,
            refused=sorted(blamed),
        )
        detail = f"the aggregate for version {version} would hold NaN or Inf in {', '.join(bad)}"
        if not culprits:
            detail += " (the sum of the buffer overflows)"
        for update in updates:
            if update.update_id in blamed:
                delivery, _ = self._pending.pop(update.update_id)
                await self._refuse(
                    delivery,
                    Refused(
                        Refusal.NON_FINITE_RESULT, detail, update.participant, update.update_id
                    ),
                )
        for update in updates:
            if update.update_id in blamed:
                continue
            # Back into the buffer or round (only strategies with several updates per
            # step get here, and those apply deltas to the head: no base needed).
            again = await self._cpu(self.strategy.offer, self.head_params, self.head_params, update)
            if again is not None:
                await self._emit(again)

    async def _commit(
        self,
        step: Step,
        extra: dict[str, object] | None = None,
        private: VersionPrivacy | None = None,
    ) -> None:
        """Commit a step now, with any versions staged before it; ``private``: its
        bank-level DP record when the caller made the noise (secure aggregation), else
        :meth:`_private` makes it here."""
        await self._stage(step, extra, private)
        await self._flush()

    async def _stage(
        self,
        step: Step,
        extra: dict[str, object] | None = None,
        private: VersionPrivacy | None = None,
    ) -> None:
        """Apply a step to the in-memory head and stage it for the group commit.

        Raises NonFiniteError, with nothing applied, when its parameters (or the server
        optimizer's state) hold NaN or Inf. What the next version depends on (the head,
        the optimizer's state, the DP record, the bounds' window, the weighting window)
        moves on now, exactly as after a commit, so the versions of a group are the
        ones single commits would make; nothing leaves the service before the commit.
        """
        with structlog.contextvars.bound_contextvars(version=self.tip_version + 1):
            if private is None:
                step, private = await self._private(step)
            bad = first_non_finite(step.params)
            if bad is None and step.state is not None:
                bad = first_non_finite(step.state.tensors())
            if bad is not None:
                raise NonFiniteError(bad)
            info = self._version_info(step, private, extra)
            self._bounded(step)
            self._set_head(self.tip_version + 1, step.params)
            if self.server is not None:
                self.server.advance(step.state)
            if self.privacy is not None and private is not None:
                self.privacy.advance(private)
            if isinstance(self.strategy, Remembering):
                self.strategy.committed(step.lineage)
            self._group.append(_Staged(step, info))

    async def _rebuild(self, version: int) -> Tensors | None:
        """A base version the store keeps no parameters of (``--checkpoint-every``):
        recomputed from the nearest checkpoint and the audit stream, checked against its
        record (aggregator/audit/rebuild.py). None when it cannot be."""
        self.log.warning("rebuilding a base version from its checkpoint", base=version)
        try:
            rebuilt = await rebuild(
                self.store, self.task, version, self.transport.read_audit(self.task)
            )
        except FedqError as e:  # ReplayError, a store or broker error
            self.log.error("base version could not be rebuilt", base=version, error=str(e))
            return None
        return rebuilt.params

    async def _private(self, step: Step) -> tuple[Step, VersionPrivacy | None]:
        """With bank-level DP: the step recomputed from the clipped deltas, with noise
        from a fresh seed (:func:`aggregator.privacy.private_version`), and its record."""
        if self.privacy is None or self.secure:
            return step, None  # secure: noised with the unmasked sum (aggregator/secagg.py)
        deltas = {e.update_id: self._pending[e.update_id][1].delta for e in step.lineage}
        bases: dict[int, Tensors] = {}
        if self.strategy.uses_base:
            for e in step.lineage:
                base = await self.base(e.base_version)
                if base is None:
                    raise NotFoundError(f"base version {e.base_version} is no longer stored")
                bases[e.base_version] = base
        params, record = await self._cpu(
            self.privacy.apply,
            type(self.strategy),
            self.head_params,
            bases.__getitem__,
            step.lineage,
            deltas,
        )
        return dataclasses.replace(step, params=params), record

    def _version_info(
        self, step: Step, private: VersionPrivacy | None, extra: dict[str, object] | None
    ) -> dict[str, object]:
        """A version's info: how it was made. A private version's record (seed, bound,
        noise, epsilon) goes in as ``privacy``; the fencing token is added at commit."""
        return {
            "strategy": self.strategy.name,
            "settings": self.strategy.settings(),
            **({"server": self.server.settings()} if self.server is not None else {}),
            **({"privacy": private.to_json()} if private is not None else {}),
            **self._robust_info(step),
            **(extra or {}),
            "owner": self.config.owner,
        }

    async def _flush(self) -> None:
        """Commit every staged version in one store round trip, then ack their
        deliveries together, send the receipts and announce the last version.

        Only now is the effect saved. An ack that fails (the channel was lost) is
        harmless: the redelivery is refused as a duplicate.
        """
        if not self._group:
            return
        group, self._group = self._group, []
        started = time.perf_counter()
        parent = self._committed
        with self.stages("commit"):
            result = await self._commit_until_saved(parent, group)
        if result.outcome is CommitOutcome.FENCED:
            self.lease.lost.set()
            raise FencedOutError(f"commit on version {parent} refused: the writer lease is gone")
        if result.outcome is CommitOutcome.LOST_RACE and (
            result.head is None or result.head < parent
        ):
            raise StoreRegressedError(
                f"committing version {parent + 1} of {self.task!r} found the head at {result.head}"
            )
        if result.outcome is CommitOutcome.DUPLICATE and not self.secure:
            await self._applied_long_ago(group, result.duplicates)
        if not result.committed or len(result.records) != len(group):
            raise CommitConflictError(
                f"commit on version {parent} of {self.task!r} refused ({result.outcome.value}, "
                f"head {result.head}): another writer committed without the lease"
            )
        records = result.records
        last = records[-1]
        self._committed = last.version
        self.metrics.head.labels(self.task).set(last.version)
        self.head_hash = last.version_hash
        deliveries: list[UpdateDelivery] = []
        for record in records:
            self._chain.append(record.version_hash)
            self._applied.add(record.version, [e.update_id for e in record.lineage])
            deliveries.extend(self._pending.pop(e.update_id)[0] for e in record.lineage)
        await self._ack(deliveries)
        elapsed = time.perf_counter() - started
        for record in records:
            self.receipts.accepted(record.lineage, record.version)
            for entry in record.lineage:
                if self.stats.count_accepted(entry.participant, record.version):
                    self.log.info("participant no longer flagged", participant=entry.participant)
                    self._flag_metric(entry.participant)
        lineage = [e for r in records for e in r.lineage]
        # Shares and low-weight flags once per group: each pass visits every bank.
        self._count_weights(lineage)
        self.metrics.accepted.labels(self.task).inc(len(deliveries))
        self.activity.accepted(lineage, len(records))
        self.metrics.commit_seconds.labels(self.task).observe(elapsed)
        self.announcer.announce(
            last.version, self._announcement(last, result.blobs[-1]), last.version_hash
        )
        self.log.info(
            "version committed" if len(records) == 1 else "versions committed",
            version=last.version,
            versions=len(records),
            updates=len(lineage),
            participants=[e.participant for e in lineage],
            staleness=[e.staleness for e in lineage],
            weights=[round(e.weight, 6) for e in lineage],
            commit_ms=round(elapsed * 1000, 2),
        )
        if self.on_version is not None:
            for record, staged in zip(records, group, strict=True):
                with structlog.contextvars.bound_contextvars(**_context(record)):
                    await self.on_version(record, staged.step.params)

    async def _ack(self, deliveries: Sequence[UpdateDelivery]) -> None:
        """Ack committed deliveries: with one multiple ack where the transport can."""
        if self._sub is not None:
            try:
                await self._sub.ack_all(deliveries)
                return
            except FedqError as e:
                self.log.warning("ack after commit failed", error=str(e))
        for delivery in deliveries:
            if not delivery.live:
                continue
            try:
                await delivery.ack()
            except FedqError as e:
                self.log.warning("ack after commit failed", error=str(e))

    async def _applied_long_ago(self, group: Sequence[_Staged], found: Mapping[str, int]) -> None:
        """The store found update ids of the group applied before (a bank re-sent an old
        id on a newer base, beyond the ids kept in memory): refuse them, ask the store
        about that bank from now on, reload from the store and resubscribe."""
        staged = {e.update_id: e for s in group for e in s.step.lineage}
        for update_id, version in sorted(found.items()):
            entry = staged.get(update_id)
            held = self._pending.pop(update_id, None)
            if entry is None or held is None:
                continue
            self._suspects.add(entry.participant)
            if held[1].spare:
                # Its body now holds the staged version: it goes back to the queue with
                # the subscription, and its copy is refused as a duplicate on arrival.
                continue
            await self._refuse(
                held[0],
                Refused(
                    Refusal.DUPLICATE,
                    f"already applied in version {version}",
                    entry.participant,
                    update_id,
                ),
            )
        await self._reload()
        for update_id, version in found.items():  # a copy is refused at once from now on
            self._applied.remember(update_id, version)
        raise _Conflict(sorted(found))

    def _bounded(self, step: Step) -> None:
        """A staged step's updates' norms join the bounds' window."""
        if self.bounds.active:
            norms = [
                (e.participant, self._verdicts.pop(e.update_id).accepted_norm)
                for e in step.lineage
                if e.update_id in self._verdicts
            ]
            self.bounds.committed(norms, self.head_params, step.params)

    def _robust_info(self, step: Step) -> dict[str, object]:
        """``info["robust"]`` when any bound applies: the bound, the norms, the clips."""
        if not self.bounds.active:
            return {}
        ids = [e.update_id for e in step.lineage]
        return {"robust": self.bounds.record(ids, self._verdicts)}

    async def _commit_until_saved(self, parent: int, group: Sequence[_Staged]) -> GroupCommitResult:
        """Commit the group; while Redis is unreachable, wait and retry (nothing is acked
        meanwhile). A commit whose reply was lost may have been applied: before retrying,
        a head that already holds exactly this group's last lineage counts as committed.
        """
        last_ids = [e.update_id for e in group[-1].step.lineage]
        top = parent + len(group)
        delay = 0.2
        while True:
            lease = self.lease.current
            fence = {"fence": lease.token if lease else None}
            versions = [
                NewVersion(
                    params=s.step.params,
                    lineage=s.step.lineage,
                    info={**s.info, **fence},
                    state=s.step.state,
                )
                for s in group
            ]
            try:
                result = await self.store.commit_many(
                    self.task,
                    parent=parent,
                    versions=versions,
                    lease=lease,
                    parent_hash=self.head_hash or None,
                )
                if result.outcome is not CommitOutcome.FENCED or not await self.lease.reclaim(
                    lease
                ):
                    return result
                continue  # our own lease had expired (e.g. Redis restarted) and is ours again
            except StoreUnavailableError as e:
                self.log.warning("store unavailable; commit waits", error=str(e), version=top)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                if await self.store.head(self.task) == top:
                    records = await self.store.get_versions(self.task, range(parent + 1, top + 1))
                    if [e.update_id for e in records[-1].lineage] == last_ids:
                        blob = await self.store.get_blob(self.task, top)
                        blobs = ((b"",),) * (len(records) - 1) + ((blob,),)
                        return GroupCommitResult(
                            CommitOutcome.COMMITTED, tuple(records), blobs, head=top
                        )
            except StoreUnavailableError:
                continue

    async def _cpu(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run CPU work: on the event loop for small models, else in a worker thread."""
        if self._inline:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    # ------------------------------------------------------------------ secure aggregation

    async def _open_cohort(self, version: int) -> None:
        """Open the cohort masked for ``version``. After a restart it carries the decision
        saved before the crash: the same question is asked again, never another one."""
        self.cohort = OpenCohort(self.spec, version, self.strategy.capacity)
        self._answer_deliveries = {}
        saved = await store_retry(
            "reading a cohort decision",
            lambda: self.store.get_cohort(self.task, version),
            self.log,
        )
        if saved is not None:
            self.cohort.decision = Decision.from_json(json.loads(saved))
            self.cohort.decided_at = time.monotonic()
            self.log.info(
                "cohort was closed before this start; waiting for its updates and answers",
                cohort=version,
                survivors=list(self.cohort.decision.survivors),
            )

    def _cohort_deadline(self, deadline: float | None) -> float | None:
        """When the open cohort needs attention: FedBuff's cohort deadline while it fills
        (sync rounds keep their own), then every ``cohort_deadline_s`` while survivors
        have not answered (they are asked again)."""
        oc, sa = self.cohort, self.spec.secure_aggregation
        assert oc is not None and sa is not None
        if oc.decision is None:
            if self.spec.mode == "async" and oc.opened_at is not None and not self._overdue:
                return oc.opened_at + sa.cohort_deadline_s
            return deadline
        if oc.ready:
            return None
        if oc.asked_at is None:  # after a restart: until the survivors' updates are back
            assert oc.decided_at is not None
            return oc.decided_at + UNMASK_ROUNDS * sa.cohort_deadline_s
        return oc.asked_at + sa.cohort_deadline_s

    async def _cohort_due(self) -> None:
        """The cohort's deadline: close it with its minimum, or ask again for answers."""
        oc = self.cohort
        assert oc is not None
        if oc.decision is not None:
            if not oc.complete:
                back = sum(1 for s in oc.decision.survivors if s in oc.updates)
                await self._cohort_failed(
                    oc,
                    f"only {back} of the {len(oc.decision.survivors)} survivors' updates came "
                    "back after the restart",
                )
                return
            if oc.asks >= UNMASK_ROUNDS:
                await self._cohort_failed(
                    oc,
                    f"{len(oc.answers)} answers after {oc.asks} rounds of requests, below the "
                    f"threshold {oc.cohort.threshold}",
                )
                return
            missing = [s for s in oc.decision.survivors if s not in oc.answers]
            self.log.warning(
                "survivors have not answered; asking them again",
                cohort=oc.number,
                missing=missing,
                answers=len(oc.answers),
                threshold=oc.cohort.threshold,
            )
            await self._ask()
            return
        if len(oc.updates) >= oc.minimum:
            self.log.info(
                "cohort deadline: closing with the updates present",
                cohort=oc.number,
                updates=len(oc.updates),
            )
            await self._close_cohort()
            return
        self.log.warning(
            "cohort deadline passed below the minimum; nothing is revealed, waiting",
            cohort=oc.number,
            updates=len(oc.updates),
            minimum=oc.minimum,
        )
        self._deadline = None  # the update that reaches the minimum closes the cohort
        self._overdue = True

    async def _offer_masked(self, delivery: UpdateDelivery, admitted: Admitted) -> None:
        """A masked update joins the open cohort (or is refused: cohort_closed...)."""
        oc, update = self.cohort, admitted.update
        assert oc is not None
        why = oc.refusal(update, admitted.secagg)
        if why is not None or admitted.secagg is None:
            reason, detail = why or ("not_masked", "no sa block")
            await self._refuse(
                delivery, Refused(Refusal(reason), detail, update.participant, update.update_id)
            )
            return
        oc.add(update, admitted.secagg, time.monotonic())
        self._pending[update.update_id] = (delivery, update)
        self.metrics.staleness.labels(self.task).observe(update.staleness)
        if oc.decision is None:
            if oc.full or (self._overdue and len(oc.updates) >= oc.minimum):
                await self._close_cohort()
            return
        if oc.asked_at is None:
            await self._ask()  # after a restart: once every survivor's update is back
        await self._unmask_if_ready()

    async def _close_cohort(self) -> None:
        """Decide who survived, save the decision (before any request leaves), ask."""
        oc = self.cohort
        assert oc is not None
        decision = oc.close()
        text = json.dumps(decision.to_json(), sort_keys=True)
        saved = await store_retry(
            "saving a cohort decision",
            lambda: self.store.settle_cohort(self.task, oc.number, text),
            self.log,
        )
        oc.decision = Decision.from_json(json.loads(saved))
        oc.decided_at = time.monotonic()
        self.log.info(
            "cohort closed; asking the survivors for their shares",
            cohort=oc.number,
            survivors=list(oc.decision.survivors),
            dropped=list(oc.decision.dropped),
        )
        for name, update in list(oc.updates.items()):
            if name not in oc.decision.survivors:  # a decision saved by an earlier writer
                del oc.updates[name]
                delivery, _ = self._pending.pop(update.update_id)
                await self._refuse(
                    delivery,
                    Refused(
                        Refusal.COHORT_CLOSED,
                        f"cohort {oc.number} was closed without it",
                        name,
                        update.update_id,
                    ),
                )
        await self._ask()

    async def _ask(self) -> None:
        """Send each survivor that has not answered its unmask request (signed)."""
        oc = self.cohort
        assert oc is not None
        if not oc.complete:
            return  # after a restart: the ciphertexts are in the survivors' updates
        for request in oc.requests(time.time()):
            body = await asyncio.to_thread(encode_unmask_request, request, self.config.signing_key)
            try:
                await self.transport.publish_receipt(
                    self.task,
                    request.recipient,
                    body,
                    message_id=f"ur-{request.cohort}-{request.recipient}",
                )
            except FedqError as e:
                self.log.warning(
                    "unmask request not sent; it is sent again at the cohort deadline",
                    participant=request.recipient,
                    error=str(e),
                )
        oc.asked_at = time.monotonic()
        oc.asks += 1

    async def _take_answer(self, delivery: UpdateDelivery) -> None:
        """Hold a survivor's answer (unacked until the commit); unmask when ready."""
        oc = self.cohort
        assert oc is not None
        try:
            answer = await asyncio.to_thread(decode_unmask_answer, delivery.body)
        except DecodeError as e:
            await self._drop_answer(delivery, e.reason, e.detail, None)
            return
        if self.config.require_sender_match and delivery.user_id != answer.participant:
            detail = f"sent by broker user {delivery.user_id!r}, names {answer.participant!r}"
            await self._drop_answer(delivery, Refusal.SENDER_MISMATCH, detail, answer)
            return
        if answer.cohort < oc.number:
            # A copy of an answer whose cohort is committed: its effect is saved.
            self.log.info("answer for a committed cohort; acked", cohort=answer.cohort)
            await self._settle(delivery)
            return
        why = oc.answer_refusal(answer, self.spec_hash, self._answer_keys.get(answer.participant))
        if why is not None:
            await self._drop_answer(delivery, Refusal.INVALID_UPDATE, why, answer)
            return
        earlier = self._answer_deliveries.get(answer.participant)
        if earlier is not None:
            await self._settle(earlier)  # asked twice, answered twice: keep the newest
        oc.answers[answer.participant] = answer
        self._answer_deliveries[answer.participant] = delivery
        await self._unmask_if_ready()

    async def _drop_answer(
        self, delivery: UpdateDelivery, reason: Refusal, detail: str, answer: UnmaskAnswer | None
    ) -> None:
        await delivery.dead_letter(reason.value, detail)
        self.metrics.refused.labels(self.task, reason.value).inc()
        self.log.warning(
            "unmask answer refused",
            reason=reason.value,
            detail=detail,
            participant=None if answer is None else answer.participant,
            cohort=None if answer is None else answer.cohort,
        )

    async def _settle(self, delivery: UpdateDelivery) -> None:
        try:
            await delivery.ack()
        except FedqError as e:  # the channel is gone: the broker requeued it already
            self.log.info("answer ack skipped", error=str(e))

    async def _unmask_if_ready(self) -> None:
        """With every survivor's update and t answers: the sum, the version, the commit;
        then the answers are acked and the next cohort opens."""
        oc = self.cohort
        assert oc is not None
        if not oc.ready:
            return
        try:
            with self.stages("unmask"):
                step, record, private = await asyncio.to_thread(
                    secure_step, self.spec, self.head_params, oc, self.privacy
                )
        except SecAggError as e:
            await self._cohort_failed(oc, str(e))
            return
        try:
            await self._commit(step, {"secagg": record.to_json()}, private)
        except NonFiniteError as e:
            await self._cohort_failed(oc, str(e))
            return
        for delivery in self._answer_deliveries.values():
            await self._settle(delivery)
        self.log.info(
            "cohort unmasked",
            cohort=oc.number,
            survivors=len(record.decision.survivors),
            dropped=len(record.decision.dropped),
            answers=len(record.answers),
        )
        await self._open_cohort(self.tip_version)

    async def _cohort_failed(self, oc: OpenCohort, reason: str) -> None:
        """A cohort given up (a wrong share, values beyond the bounds, too few answers):
        version ``v + 1`` is committed with the head's parameters and no update, its
        record saying why, so the next cohort has a fresh number (a cohort is never
        asked a second question); the cohort's updates are refused."""
        self.log.error("cohort given up: committed unchanged", cohort=oc.number, reason=reason)
        failed: dict[str, object] = {"cohort": oc.number, "reason": reason[:1024]}
        if oc.decision is not None:
            failed.update(oc.decision.to_json())
        empty = Step(params=self.head_params, lineage=())
        private = self.privacy.secure(()) if self.privacy is not None else None
        await self._commit(empty, {"secagg_failed": failed}, private)
        for update in list(oc.updates.values()):
            delivery, _ = self._pending.pop(update.update_id)
            await self._refuse(
                delivery,
                Refused(
                    Refusal.INVALID_UPDATE,
                    f"cohort {oc.number} refused: {reason}",
                    update.participant,
                    update.update_id,
                ),
            )
        for delivery in self._answer_deliveries.values():
            await self._settle(delivery)
        await self._open_cohort(self.tip_version)

    # ------------------------------------------------------------------ sync rounds

    def _until_deadline(self) -> float | None:
        deadline = self._deadline
        if self.cohort is not None:
            deadline = self._cohort_deadline(deadline)
        if deadline is None:
            return None
        return max(deadline - time.monotonic(), 0.0)

    async def _deadline_passed(self) -> None:
        """Sync: close the round if it has its minimum; else keep waiting for one."""
        if self.cohort is not None:
            await self._cohort_due()
            return
        step = await self._cpu(self.strategy.flush, self.head_params)
        if step is not None:
            self.log.info(
                "round deadline: closing with the updates present", version=self.tip_version
            )
            await self._emit(step)
            return
        self.log.warning(
            "round deadline passed below the minimum; waiting",
            version=self.tip_version,
            updates=len(self.strategy.pending()),
            minimum=self.spec.sync.min_updates,
        )
        self._deadline = None  # the next update that reaches the minimum closes the round
        self._overdue = True

    # ------------------------------------------------------------------ head and queue

    def _set_head(self, version: int, params: Tensors) -> None:
        self.tip_version, self.head_params = version, params
        if self.spec.mode == "sync" and self.spec.sync.deadline_s is not None:
            self._deadline = time.monotonic() + self.spec.sync.deadline_s
        self._overdue = False
        self._bases[version] = params
        # Bases older than the cache are read from the store on demand (see base()).
        keep = min(self.admission.max_versions_behind + 1, self._base_budget)
        while len(self._bases) > keep:
            self._bases.popitem(last=False)

    async def _restore_weighting(self, head: int, *, count_stats: bool = True) -> None:
        """Rebuild what weights depend on (the strategy's window, if it remembers, and
        the stats' recent weights) from the lineages of the last versions in the store,
        so a restarted aggregator weighs exactly as one that never stopped."""
        wanted = max(self.stats.weight_window, 0)
        if isinstance(self.strategy, Remembering):
            wanted = max(wanted, self.strategy.history)
        lineages: list[tuple[LineageEntry, ...]] = []
        entries, version = 0, head
        while entries < wanted and version > 0:
            # Newest first, RESTORE_BATCH versions per round trip.
            batch = range(version, max(0, version - RESTORE_BATCH), -1)
            for record in await self.store.get_versions(self.task, batch):
                if entries >= wanted:
                    break
                lineages.append(record.lineage)
                entries += len(record.lineage)
            version = batch[-1] - 1
        lineages.reverse()
        if isinstance(self.strategy, Remembering):
            self.strategy.restore(lineages)
        if not count_stats:  # a reload: the stats counted these versions already
            return
        for lineage in lineages:
            self.stats.count_weights(lineage, evaluate=False)
        self._count_weights((), log_changes=False, now=True)  # one pass over every bank
        if lineages:
            self.log.info("weighting state restored", versions=len(lineages), entries=entries)

    async def _restore_bounds(self, head: int) -> None:
        """Rebuild the adaptive norm bound's window from the norms the last versions
        recorded (``info["robust"]``), so a restarted aggregator bounds as before."""
        r = self.spec.robustness
        if not r.adaptive_norm:
            return
        versions: list[tuple[Sequence[LineageEntry], Mapping[str, Any]]] = []
        norms, version = 0, head
        while norms < r.norm_window and version > 0:
            batch = range(version, max(0, version - RESTORE_BATCH), -1)
            for record in await self.store.get_versions(self.task, batch):
                robust = record.info.get("robust")
                versions.append((record.lineage, record.info))
                norms += len(robust.get("norms", {})) if isinstance(robust, dict) else 0
            version = batch[-1] - 1
        versions.reverse()
        self.bounds.restore(versions)

    def _count_weights(
        self, lineage: Sequence[LineageEntry], *, log_changes: bool = True, now: bool = False
    ) -> None:
        """Count a committed lineage in the recent weight shares; re-evaluate every bank's
        share and ``low_weight`` flag (a pass over every bank) once per ``banks //
        WEIGHT_PASS_BANKS`` entries (every group up to 2 x WEIGHT_PASS_BANKS banks), or
        ``now``: the cost per update stays flat as banks are added."""
        self._weights_due += len(lineage)
        due = now or self._weights_due >= len(self.stats.banks) // WEIGHT_PASS_BANKS
        changed = self.stats.count_weights(lineage, evaluate=due)
        if not due:
            return
        self._weights_due = 0
        for name, low in changed:
            if low and log_changes:
                bank = self.stats.banks[name]
                self.log.warning(
                    "participant flagged: its updates carry negligible weight",
                    participant=name,
                    weight_share=round(bank.weight_share, 6),
                    data_share=self.stats.data_shares.get(name),
                    recent_updates=bank.recent_updates,
                )
            elif log_changes:
                self.log.info("participant no longer flagged for low weight", participant=name)
            self.metrics.low_weight.labels(self.task, name).set(1 if low else 0)
            self._flag_metric(name)
        for name, bank in self.stats.banks.items():
            self.metrics.weight_share.labels(self.task, name).set(bank.weight_share)

    def _flag_metric(self, participant: str) -> None:
        """``fedq_participant_flagged``: 1 while the bank is flagged for any reason."""
        flagged = participant in self.stats.flag_reasons
        self.metrics.flagged.labels(self.task, participant).set(1 if flagged else 0)

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

    async def _take_report(self, delivery: UpdateDelivery) -> None:
        """A bank's drift summary or evaluation (aggregator/reports.py); a retraining
        signal that resumed a pause takes effect at once."""
        assert self.reports is not None
        await self._flush()  # its version check reads the store: commit what is staged
        reports = self.reports
        await store_retry(
            "saving a report", lambda: reports.take(delivery, self.head_version), self.log
        )
        if self.paused is not None and reports.resumed:
            reports.resumed = False
            await self._read_pause()

    async def _poll_pause(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._read_pause()
            await asyncio.sleep(self.config.pause_poll_s)

    async def _read_pause(self) -> None:
        try:
            paused = await self.store.monitoring.paused(self.task)
        except FedqError as e:
            self.log.warning("training pause unreadable; kept as it was", error=str(e))
            return
        if (paused is None) != (self.paused is None):
            self.log.warning("training paused" if paused else "training resumed", pause=paused)
        self.paused = paused
        self.metrics.training_paused.labels(self.task).set(0 if paused is None else 1)

    async def status(self) -> dict[str, object]:
        """What /status reports (aggregator/status.py, docs/status.md)."""
        return await self.activity.snapshot(self, self._depth if self._consuming else None)


def _context(record: VersionRecord) -> dict[str, object]:
    """What log lines about a committed version carry: the version and, for a version
    of one update, the update and its bank."""
    if len(record.lineage) == 1:
        e = record.lineage[0]
        return {"update_id": e.update_id, "participant": e.participant, "version": record.version}
    return {"version": record.version}


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class _Tip:
    """What admission reads (aggregator.admission.AdmissionState): the head in memory,
    with the versions staged for the group commit, and the service's answers."""

    def __init__(self, service: AggregatorService) -> None:
        self._service = service

    @property
    def head_version(self) -> int:
        return self._service.tip_version

    def held(self, update_id: str) -> bool | None:
        return self._service.held(update_id)

    def pending(self) -> Sequence[AcceptedUpdate]:
        return self._service.pending()

    async def applied_in(self, update_id: str, base_version: int, participant: str) -> int | None:
        return await self._service.applied_in(update_id, base_version, participant)

    async def base(self, version: int) -> Tensors | None:
        return await self._service.base(version)


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()
