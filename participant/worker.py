"""The participant worker: receive the global model, train locally, publish the delta.

Its only connection is the transport (AMQP with the bank's own credentials); it
never talks to Redis. It holds the newest model delivery unacked while it trains
on it and acks it only when a newer one arrives, so a worker that restarts finds
the current head waiting in its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import secrets
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import structlog
import torch

from common.drift import SCORE, over_threshold
from common.errors import (
    ConfigError,
    DecodeError,
    EncodeError,
    SecAggError,
    TransportError,
)
from common.evaluation import evaluate
from common.hooks import Stages, untimed
from common.models import task_tensor_specs
from common.refusals import Refusal
from common.signing import SigningKey
from common.spec import TaskSpec
from common.transport import ModelDelivery, Subscription, Transport, next_or_none
from common.wire import (
    EncodedTensors,
    ModelEnvelope,
    Tensors,
    UpdateEnvelope,
    decode_model,
    encode_update,
    limits_for,
)
from participant.compression import Compressor
from participant.data import encode, train_val_split
from participant.identity import ModelChecker, check_participant_key
from participant.metrics import ParticipantMetrics
from participant.monitor import Monitor
from participant.privacy import PrivacyLedger, laplace_release, train_dpsgd
from participant.receipts import ReceiptTracker, aggregator_key
from participant.secagg import Masker, Revealer
from participant.training import train_local

log = structlog.get_logger("fedq.participant")


#: A worker stops after this many model announcements in a row made under another spec.
SPEC_MISMATCHES_TO_STOP = 3
#: The longest wait between two updates sent to a paused task (seconds): the wait starts
#: at ``paused_retry_s`` and doubles with each training_paused receipt in a row.
PAUSED_RETRY_MAX_S = 900.0


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How one participant works."""

    participant: str
    val_fraction: float = 0.2
    seed: int = 0
    #: Stop after publishing this many updates (None: until stopped).
    max_updates: int | None = None
    #: Extra pause after each local training (seconds): a slower bank, or a pace limit.
    delay_s: float = 0.0
    #: After publishing, how long to wait for a newer model before training again on the
    #: one it has (a version usually follows soon: waiting keeps staleness low).
    wait_for_model_s: float = 5.0
    #: How update tensors are compressed (docs/wire-format.md): ``raw`` by default, since
    #: zstd saves about 7% of a float32 delta's bytes for several times the CPU on both
    #: sides; ``zstd`` stays available (it pays on sparse or low-entropy tensors). A task
    #: whose spec chooses a lossy ``compression`` gets that codec instead.
    codec: str = "raw"
    #: This bank's Ed25519 key: signs every update (the task spec holds its public key).
    signing_key: SigningKey | None = None
    #: Seed of the privacy noise (DP-SGD's sampling and noise, Laplace's noise) of update
    #: k: ``SHA-256("<privacy_seed>:<participant>:<k>")``. None (the default, and the
    #: only safe choice in a real federation): a fresh secret seed from the operating
    #: system for every update, since whoever knows the seed can subtract the noise.
    privacy_seed: int | None = None
    #: The bank's privacy ledger file (participant.privacy.PrivacyLedger): its spending
    #: survives restarts. None: counted in memory only, from 0 at every start.
    privacy_ledger: Path | None = None
    #: Secure aggregation: the file recording the unmask questions this bank answered
    #: (participant.secagg.Revealer), so that a restart never answers a second one for
    #: a cohort. None: remembered in memory only.
    secagg_state: Path | None = None
    #: The bank's recent rows (CSV or Parquet, read again at every monitoring pass): with
    #: ``monitoring`` in the spec the worker publishes drift summaries and, when the rows
    #: carry the target, evaluations of the version it holds (participant/monitor.py).
    recent: Path | None = None
    #: After a receipt says the task's training is paused (``training_paused``), how long
    #: the worker waits before training again on the model it holds (doubling with each
    #: such receipt in a row, up to PAUSED_RETRY_MAX_S); also the longest a sync worker
    #: waits for a round before it looks at its receipts again.
    paused_retry_s: float = 30.0


@dataclass(slots=True)
class WorkerStats:
    """What a worker did, for reports and tests."""

    published: int = 0
    #: The newest published update ids (bounded).
    published_ids: deque[str] = field(default_factory=lambda: deque(maxlen=1024))
    models_seen: int = 0
    first_version: int = -1
    last_version: int = -1
    #: Models refused, by reason (unsigned, bad_signature, spec_mismatch, not_descendant...).
    models_refused: Counter[str] = field(default_factory=Counter)
    #: Newer models whose descent from the last one seen could not be checked (too far).
    descent_unchecked: int = 0
    #: Receipts (participant.receipts): updates accepted; refused, by reason; receipts
    #: ignored for a bad or missing signature.
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    receipts_bad_signature: int = 0
    #: The task's local privacy budget is spent: the worker stopped publishing.
    budget_exhausted: bool = False
    #: What the worker said when it stopped for its privacy budget.
    budget_note: str = ""
    #: The bank's cumulative epsilon under the task's local mechanism (0 without one).
    dp_epsilon: float = 0.0
    #: Local trainings whose delta was not finite (nothing published for them).
    not_finite: int = 0
    #: Secure aggregation: unmask requests answered, and refused (participant/secagg.py).
    unmask_answered: int = 0
    unmask_refused: int = 0
    #: Monitoring (participant/monitor.py): summaries and evaluations published, and
    #: passes that could not read or encode the recent rows.
    drift_published: int = 0
    evaluations_published: int = 0
    monitor_errors: int = 0


class ParticipantWorker:
    """One bank's worker for one task."""

    def __init__(
        self,
        spec: TaskSpec,
        config: WorkerConfig,
        transport: Transport,
        data: pd.DataFrame,
        stages: Stages = untimed,
        metrics: ParticipantMetrics | None = None,
    ) -> None:
        self.spec = spec
        #: A named hook around each stage of the loop (benchmarks time them).
        self.stages = stages
        self.config = config
        self.transport = transport
        x, y = encode(data, spec)
        train_idx, val_idx = train_val_split(len(x), config.val_fraction, config.seed)
        self.x_train, self.y_train = x[train_idx], y[train_idx]
        self.x_val, self.y_val = x[val_idx], y[val_idx]
        self.expected = task_tensor_specs(spec)
        self.stats = WorkerStats()
        self.log = log.bind(task=spec.task_id, participant=config.participant)
        self.spec_hash = spec.spec_hash()
        self.checker = ModelChecker(spec)
        self.metrics = metrics or ParticipantMetrics()
        check_participant_key(spec, config.participant, config.signing_key)
        #: Secure aggregation: masks each update for its cohort, answers unmask requests.
        self.masker: Masker | None = None
        self.revealer: Revealer | None = None
        if spec.secure_aggregation is not None:
            self.masker = Masker(spec, config.participant, config.signing_key)
            assert config.signing_key is not None  # Masker refuses to start without it
            self.revealer = Revealer(
                spec,
                config.participant,
                config.signing_key,
                aggregator_key(spec),
                config.secagg_state,
            )
        #: The task's lossy compression and its error-feedback residual (in memory:
        #: a restart starts again from none); None: updates go out in ``config.codec``.
        self.compressor = (
            Compressor(spec.compression)
            if spec.compression is not None and self.masker is None
            else None
        )
        self.receipts = ReceiptTracker(
            transport,
            spec.task_id,
            config.participant,
            self.stats,
            key=aggregator_key(spec),
            metrics=self.metrics,
            on_request=self._answer if self.revealer is not None else None,
        )
        #: The model delivery held unacked, the model trained on, its validation metrics.
        self._held: ModelDelivery | None = None
        self._current: ModelEnvelope | None = None
        self._val_metrics: dict[str, float] = {}
        #: Secure aggregation: the cohort of the last masked update published.
        self._cohort = self.revealer.masked if self.revealer is not None else -1
        #: Models refused spec_mismatch in a row (see SPEC_MISMATCHES_TO_STOP).
        self._spec_mismatches = 0
        #: The bank's privacy spending (participant.privacy): counts published updates.
        #: The row count the bank publishes: under record-level DP the one it declared
        #: in the spec (public), never its real count (which the noise does not cover).
        self.public_rows = len(self.x_train)
        if spec.privacy.record is not None:
            declared = spec.declared_samples.get(config.participant)
            if declared is None:
                raise ConfigError(
                    f"task {spec.task_id!r} uses record-level DP: the spec's declared_samples "
                    f"must name {config.participant!r} (its row count is then public, and "
                    "the only one its updates carry)"
                )
            self.public_rows = declared
        elif spec.privacy.laplace is not None:
            # The whole-update guarantee does not cover the row count: publish the
            # declared one where the spec has it.
            self.public_rows = spec.declared_samples.get(config.participant, self.public_rows)
        self.ledger = PrivacyLedger(spec, self.public_rows, config.privacy_ledger)
        self.monitor = self._monitor(spec, config)
        #: training_paused refusals already acted on, and how many in a row (accepted
        #: updates end a row) with the accepted count then (see _resume_after_pause).
        self._paused_seen = 0
        self._paused_row = 0
        self._accepted_seen = 0
        self.metrics.info.info({"task": spec.task_id, "participant": config.participant})
        self._privacy_metrics()

    async def run(self, stop: asyncio.Event) -> WorkerStats:
        """Work until ``stop`` is set or ``max_updates`` are published, counting receipts.

        Raises ParticipantStoppedError when a receipt says an update was refused for a
        reason that can never heal (common.refusals.PERMANENT).
        """
        linked = self.receipts.linked(stop)
        try:
            stats = await self._work(linked)
        finally:
            # Ended by itself (max_updates): wait a little for the last receipts.
            await self.receipts.close(drain=not linked.is_set())
        self.receipts.raise_if_stopped()
        return stats

    async def _work(self, stop: asyncio.Event) -> WorkerStats:
        """Work until ``stop`` is set or ``max_updates`` are published."""
        cfg = self.config
        sub = await self._subscribe(stop)
        if sub is None:
            return self.stats
        monitoring = (
            asyncio.create_task(self._monitor_loop(stop)) if self.monitor is not None else None
        )
        self._forget()
        # Under secure aggregation: never again for a cohort already masked for (the
        # state file remembers it across restarts).
        trained_on = self._cohort
        # Sync rounds, and every task under secure aggregation: one update per version
        # (a cohort takes one update per bank).
        sync = self.spec.mode == "sync" or self.masker is not None
        try:
            while not stop.is_set():
                if self._budget_spent():
                    break
                current = self._current
                # Sync: train once per round, then wait for the next one. Async: if no
                # newer version comes within wait_for_model_s, train again on this one.
                if self._resume_after_pause():
                    trained_on = -1  # refused while paused: train on it again, later
                    wait: float | None = min(
                        cfg.paused_retry_s * 2 ** (self._paused_row - 1), PAUSED_RETRY_MAX_S
                    )
                elif current is None:
                    wait = None
                elif sync and trained_on == current.version:
                    wait = cfg.paused_retry_s  # to look at the receipts now and then
                elif trained_on == current.version:
                    wait = cfg.wait_for_model_s
                else:
                    wait = 0.0
                with self.stages("worker: wait for the newest model"):
                    newest = await self._newest_model(sub, wait, stop)
                if newest is not None:
                    await self._take(newest)
                current = self._current
                if current is None or stop.is_set() or (sync and trained_on == current.version):
                    continue
                with self.stages("worker: train, encode, publish"):
                    await self._train_and_publish(current, self._val_metrics, sub, stop)
                trained_on = max(current.version, self._cohort)
                if cfg.max_updates is not None and self.stats.published >= cfg.max_updates:
                    break
        finally:
            if monitoring is not None:
                monitoring.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitoring
            await sub.close()  # a held model goes back to the queue for the next start
        return self.stats

    def _resume_after_pause(self) -> bool:
        """Whether a receipt said training_paused since the last look (once per look),
        counting such looks in a row until an update is accepted again."""
        if self.stats.accepted > self._accepted_seen:
            self._accepted_seen = self.stats.accepted
            self._paused_row = 0
        paused = self.stats.refused.get(Refusal.TRAINING_PAUSED.value, 0)
        if paused > self._paused_seen:
            self._paused_seen = paused
            self._paused_row += 1
            return True
        return False

    @staticmethod
    def _monitor(spec: TaskSpec, config: WorkerConfig) -> Monitor | None:
        if config.recent is None:
            return None
        if spec.monitoring is None:
            raise ConfigError(
                f"task {spec.task_id!r} has no monitoring reference in its spec: recent rows "
                "are compared with it (`fedq task init --monitoring`)"
            )
        if not config.recent.is_file():
            raise ConfigError(f"recent rows {config.recent}: no such file")
        return Monitor(spec, config.participant, config.recent, config.signing_key)

    async def _monitor_loop(self, stop: asyncio.Event) -> None:
        """Every ``monitoring.interval_s``: summarise the recent rows with the held model."""
        assert self.spec.monitoring is not None
        interval = self.spec.monitoring.interval_s
        while not stop.is_set():
            current = self._current
            if current is not None:
                await self._monitor_once(current)
            wait = interval if current is not None else min(interval, 0.2)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stop.wait()

    async def _monitor_once(self, model: ModelEnvelope) -> None:
        """One monitoring pass: publish the drift summary, then the evaluation, if any."""
        monitor = self.monitor
        assert monitor is not None
        try:
            reports = await asyncio.to_thread(monitor.reports, model, self.x_train)
        except (ConfigError, EncodeError) as e:
            self.stats.monitor_errors += 1
            self.log.error("recent rows not summarised; tried again next time", error=str(e))
            return
        sent = [(reports.drift.summary_id, reports.drift_body, "drift")]
        if reports.evaluation is not None and reports.evaluation_body is not None:
            sent.append((reports.evaluation.evaluation_id, reports.evaluation_body, "evaluation"))
        for message_id, body, what in sent:
            try:
                await self.transport.publish_update(
                    self.spec.task_id, self.config.participant, body, message_id=message_id
                )
            except TransportError as e:
                self.log.warning(f"{what} summary not sent; sent again next time", error=str(e))
                return
            if what == "drift":
                self.stats.drift_published += 1
            else:
                self.stats.evaluations_published += 1
        monitoring = self.spec.monitoring
        assert monitoring is not None  # a Monitor exists only then
        s = reports.drift
        psis = {name: d.psi for name, d in s.features.items()} | {SCORE: s.score.psi}
        # The aggregator's own rule (common.drift.over_threshold): score and min_rows too.
        drifted = over_threshold(psis, monitoring.psi_threshold, s.rows, monitoring.min_rows)
        self.log.info(
            "drift summary published",
            version=model.version,
            rows=reports.drift.rows,
            score_psi=round(reports.drift.score.psi, 4),
            over_threshold=drifted,
        )

    def _privacy_metrics(self) -> None:
        """The ledger's spending, budget and exhaustion as gauges (a task with a local
        privacy mechanism only)."""
        ledger, m = self.ledger, self.metrics
        if not ledger.active:
            return
        mechanism = "record" if ledger.record is not None else "laplace"
        m.privacy_epsilon.labels(mechanism).set(ledger.epsilon)
        if ledger.budget is not None:
            m.privacy_epsilon_budget.labels(mechanism).set(ledger.budget)
        m.privacy_budget_exhausted.labels(mechanism).set(1 if ledger.exhausted else 0)

    def _budget_spent(self) -> bool:
        """True (once said in the log) when one more update would pass the budget."""
        if not self.ledger.exhausted:
            return False
        if not self.stats.budget_exhausted:
            self.stats.budget_exhausted = True
            self._privacy_metrics()
            self.stats.budget_note = (
                f"privacy budget spent: epsilon {self.ledger.epsilon:.4g} of "
                f"{self.ledger.budget:.4g}; this bank publishes no more updates"
            )
            self.log.warning(
                self.stats.budget_note,
                epsilon=self.ledger.epsilon,
                budget=self.ledger.budget,
                next_update_would_reach=self.ledger.next_cost(),
            )
        return True

    def _privacy_seed(self) -> int:
        """The seed of this update's privacy noise (see WorkerConfig.privacy_seed)."""
        cfg = self.config
        if cfg.privacy_seed is None:
            return secrets.randbits(63)
        key = f"{cfg.privacy_seed}:{cfg.participant}:{self.stats.published}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1

    def _compression_seed(self) -> int:
        """The seed of this update's stochastic rounding (not a secret: it only picks
        which way each value rounds): ``SHA-256("<seed>:<participant>:<k>:compression")``."""
        cfg = self.config
        key = f"{cfg.seed}:{cfg.participant}:{self.stats.published}:compression".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")

    def _train(self, model: ModelEnvelope, seed: int) -> tuple[Tensors, dict[str, float], int]:
        """Local training under the task's local privacy mechanism, if any: the delta,
        the training metrics and the DP-SGD steps taken (0 otherwise)."""
        privacy = self.spec.privacy
        if privacy.record is not None:
            return train_dpsgd(
                self.spec,
                model.tensors,
                self.x_train,
                self.y_train,
                seed=self._privacy_seed(),
                public_rows=self.public_rows,
            )
        delta, metrics = train_local(
            self.spec, model.tensors, self.x_train, self.y_train, seed=seed
        )
        if privacy.laplace is not None:
            # The training loss is a function of the rows that no noise covers.
            return laplace_release(self.spec, delta, seed=self._privacy_seed()), {}, 0
        return delta, metrics, 0

    def _forget(self) -> None:
        """A fresh start: no model held (a held delivery went back to its queue)."""
        self._held, self._current = None, None

    async def _take(self, newest: ModelDelivery) -> None:
        """Make ``newest`` the model trained on if it is newer and passes the checks;
        hold its delivery unacked until a newer one replaces it, ack the rest."""
        with self.stages("worker: decode the model"):
            model = await self._decode(newest)
        current = self._current
        if (
            model is not None
            and current is not None
            and (model.version, model.version_hash) == (current.version, current.version_hash)
        ):
            # The model we hold, delivered again (the head re-announced, or our channel
            # was lost and the stream read again from its last): hold this copy.
            if self._held is not None:
                await self._ack(self._held)
            self._held = newest
            return
        if model is None or (current is not None and model.version <= current.version):
            await self._ack(newest)
            return
        if self._held is not None:
            await self._ack(self._held)
        self._held, self._current = newest, model
        self.stats.models_seen += 1
        if self.stats.first_version < 0:
            self.stats.first_version = model.version
        self.stats.last_version = model.version
        self._val_metrics = await asyncio.to_thread(
            evaluate, self.spec, model.tensors, self.x_val, self.y_val
        )
        self.metrics.model_version.set(model.version)
        auc = self._val_metrics.get("auc")
        if auc is not None and math.isfinite(auc):
            self.metrics.validation_auc.set(auc)

    async def _subscribe(self, stop: asyncio.Event) -> Subscription[ModelDelivery] | None:
        """Subscribe to the task's model stream; until the aggregator has declared it,
        wait and retry."""
        delay = 0.1
        while not stop.is_set():
            try:
                return await self.transport.consume_models(
                    self.spec.task_id, self.config.participant
                )
            except TransportError as e:
                self.log.warning("model stream not available yet; retrying", error=str(e))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
            delay = min(delay * 2, 10.0)
        return None

    async def _newest_model(
        self, sub: Subscription[ModelDelivery], wait: float | None, stop: asyncio.Event
    ) -> ModelDelivery | None:
        """Wait up to ``wait`` seconds (forever if None) for a model; take the newest queued."""
        newest = await next_or_none(sub, stop, wait)
        if newest is None:
            return None
        while True:  # drain what is already there (no waiting); keep the newest
            try:
                async with asyncio.timeout(0):
                    nxt = await sub.get()
            except TimeoutError:
                return newest
            if nxt.version >= newest.version:
                await self._ack(newest)
                newest = nxt
            else:
                await self._ack(nxt)

    async def _ack(self, delivery: ModelDelivery) -> None:
        """Ack a model we are done with. After a reconnect the old channel is gone and
        the broker has requeued it already: a failed ack is harmless, so it is ignored."""
        try:
            await delivery.ack()
        except TransportError as e:
            self.log.info(
                "model ack skipped (channel gone)", version=delivery.version, error=str(e)
            )

    async def _decode(self, delivery: ModelDelivery) -> ModelEnvelope | None:
        try:
            model = await asyncio.to_thread(
                decode_model, delivery.body, limits_for(self.expected), self.expected
            )
        except DecodeError as e:
            self._refuse_model(e.reason, e.detail, delivery.version)
            return None
        if model.task != self.spec.task_id:
            self._refuse_model(Refusal.UNKNOWN_TASK, f"names task {model.task!r}", model.version)
            return None
        refused = self.checker.check(model)
        if refused is not None:
            reason, detail = refused
            self._refuse_model(reason, detail, model.version)
            if reason == Refusal.SPEC_MISMATCH:
                # One announcement from before a spec change may still be queued (the
                # aggregator announces its head again under the new spec). Several in a
                # row, with none accepted in between: this worker's spec is out of date.
                self._spec_mismatches += 1
                if self._spec_mismatches >= SPEC_MISMATCHES_TO_STOP:
                    raise ConfigError(
                        f"{self.config.participant}: {self._spec_mismatches} models in a row "
                        f"were made under another spec than this worker's ({detail}): its "
                        "spec file is out of date; get the current one and restart"
                    )
            return None
        self._spec_mismatches = 0
        if self.checker.unchecked:
            self.stats.descent_unchecked += 1
            self.log.warning(
                "model's descent not checked: too many versions since the last one seen",
                version=model.version,
                last_seen=self.checker.previous,
            )
        return model

    def _refuse_model(self, reason: str, detail: str, version: int) -> None:
        self.stats.models_refused[reason] += 1
        self.metrics.models_refused.labels(str(reason)).inc()
        self.log.warning("model refused", reason=reason, detail=detail, version=version)

    async def _train_and_publish(
        self,
        model: ModelEnvelope,
        val_metrics: dict[str, float],
        sub: Subscription[ModelDelivery] | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        cfg = self.config
        key = f"{cfg.seed}:{cfg.participant}:{self.stats.published}".encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:4], "little")
        started = time.perf_counter()
        delta, train_metrics, steps = await asyncio.to_thread(self._train, model, seed)
        self.metrics.training_seconds.observe(time.perf_counter() - started)
        if cfg.delay_s > 0:
            await asyncio.sleep(cfg.delay_s)
        if not await asyncio.to_thread(_finite, delta):
            # A model gone wild (another bank's update pushed it to ~1e38) trains to NaN:
            # nothing sensible to send. Wait for the next version instead of dying.
            self.stats.not_finite += 1
            self.log.warning(
                "local training gave a non-finite delta; nothing published",
                version=model.version,
            )
            return
        train_metrics = {k: v for k, v in train_metrics.items() if math.isfinite(v)}
        val_metrics = {k: v for k, v in val_metrics.items() if math.isfinite(v)}
        if self.masker is not None:
            # Under secure aggregation the aggregator sees sums only: no per-bank metric.
            metrics = self.ledger.quote(steps) if self.ledger.active else {}
        elif self.ledger.active:
            # Under DP nothing computed from the bank's rows leaves it un-noised: the
            # validation metrics stay in the worker's log, out of the update.
            metrics = {**train_metrics, **self.ledger.quote(steps)}
        else:
            metrics = {**train_metrics, **{f"val_{k}": v for k, v in val_metrics.items()}}
        update_id = uuid.uuid4().hex
        tensors, block, codec = delta, None, cfg.codec
        encoded: EncodedTensors | None = None
        residual: Tensors = {}
        if self.masker is not None and self.revealer is not None:
            cohort = await self._open_cohort(model, sub, stop)
            if cohort <= self._cohort:
                self.log.info("already masked an update for this cohort", cohort=cohort)
                return
            self.revealer.note_masked(cohort)  # recorded before the update can leave
            tensors, block = await asyncio.to_thread(
                self.masker.masked, delta, cohort, model.version, self.public_rows
            )
            codec = "raw"  # masked values are uniformly random: nothing to compress
            self._cohort = cohort
        elif self.compressor is not None:
            # After training and any privacy mechanism, before signing; the content
            # hash covers what the aggregator will decode (encoded.decoded).
            compressed, residual = await asyncio.to_thread(
                self.compressor.compress, delta, self._compression_seed()
            )
            encoded, codec = compressed, compressed.codec
            tensors = compressed.decoded or delta
        body, _ = await asyncio.to_thread(
            encode_update,
            UpdateEnvelope(
                task=self.spec.task_id,
                participant=cfg.participant,
                update_id=update_id,
                base_version=model.version,
                num_samples=self.public_rows,
                tensors=tensors,
                metrics=metrics,
                codec=codec,
                created_at=time.time(),
                spec_hash=self.spec_hash,
                secagg=block,
            ),
            cfg.signing_key,
            encoded=encoded,
        )
        await self.transport.publish_update(
            self.spec.task_id, cfg.participant, body, message_id=update_id
        )
        if self.compressor is not None and encoded is not None:
            self.compressor.keep(residual)  # what this update lost goes into the next
        self.stats.published += 1
        if self.ledger.active:
            self.ledger.spend(steps)  # counted once it has left the bank
            self.stats.dp_epsilon = self.ledger.epsilon
            self._privacy_metrics()
        self.metrics.published.inc()
        self.stats.published_ids.append(update_id)
        self.log.info(
            "update published",
            version=model.version,
            update_id=update_id,
            bytes=len(body),
            seconds=round(time.perf_counter() - started, 3),
            val_auc=val_metrics.get("auc"),
        )

    async def _open_cohort(
        self,
        model: ModelEnvelope,
        sub: Subscription[ModelDelivery] | None,
        stop: asyncio.Event | None,
    ) -> int:
        """The cohort a masked update joins: the round's in sync mode; in FedBuff the
        newest version announced by now (a version committed while the bank trained
        opened a new cohort; the update joins it, weighted by its staleness)."""
        if self.spec.mode == "sync" or sub is None or stop is None:
            return model.version
        newest = await self._newest_model(sub, 0.0, stop)
        if newest is not None:
            await self._take(newest)
        current = self._current
        return model.version if current is None else max(model.version, current.version)

    async def _answer(self, body: bytes) -> None:
        """Answer one unmask request (participant/secagg.py), or refuse it in the log."""
        assert self.revealer is not None
        try:
            answer_id, cohort, out = await asyncio.to_thread(self.revealer.answer, body)
        except SecAggError as e:
            self.stats.unmask_refused += 1
            self.log.error("unmask request refused", detail=str(e))
            return
        try:
            await self.transport.publish_update(
                self.spec.task_id, self.config.participant, out, message_id=answer_id
            )
        except TransportError as e:  # the aggregator asks again at its cohort deadline
            self.log.warning("unmask answer not sent", cohort=cohort, error=str(e))
            return
        self.stats.unmask_answered += 1
        self.log.info("unmask request answered", cohort=cohort, answer_id=answer_id)


def _finite(delta: Tensors) -> bool:
    """Whether every value of ``delta`` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in delta.values())
