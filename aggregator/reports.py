"""The banks' drift summaries and evaluations at the aggregator (docs/drift.md).

They arrive on the task's work queue beside the updates (kinds ``ds`` and ``ev``).
Each is checked as an update is (task, participant, broker sender, signature, spec
hash; an evaluation also names a version whose hash must match the store's), kept in
Redis, exposed as metrics, and acked once saved; a refused one is dead-lettered with
its reason. A drift summary over the task's threshold is a retraining signal: it is
recorded and, with ``monitoring.on_drift = "resume"``, ends a pause of training.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import structlog

from aggregator.metrics import AggregatorMetrics
from aggregator.store import RedisModelStore
from common.drift import EVALUATION_METRICS, SCORE, over_threshold
from common.errors import DecodeError, FedqError, NotFoundError
from common.refusals import Refusal
from common.signing import PublicKey
from common.spec import TaskSpec
from common.transport import UpdateDelivery
from common.wire import DriftSummary, Evaluation, decode_report


class ReportDesk:
    """Takes one task's drift summaries and evaluations."""

    def __init__(
        self,
        spec: TaskSpec,
        store: RedisModelStore,
        metrics: AggregatorMetrics,
        keys: Mapping[str, PublicKey],
        *,
        require_sender_match: bool,
    ) -> None:
        self.spec = spec
        self.task = spec.task_id
        self.spec_hash = spec.spec_hash()
        self.store = store
        self.metrics = metrics
        self.keys = keys
        self.require_sender_match = require_sender_match
        self.log = structlog.get_logger("fedq.aggregator").bind(task=self.task)
        #: Counts for tests and /status.
        self.taken = 0
        self.refused = 0
        #: Set when a retraining signal ended a pause (the service reads the pause again).
        self.resumed = False

    async def take(self, delivery: UpdateDelivery, head: int) -> None:
        """Check, keep and ack one report; dead-letter it with the reason if refused.
        A store failure propagates (the delivery stays unacked and comes again)."""
        try:
            report = decode_report(delivery.body)
        except DecodeError as e:
            await self._refuse(delivery, e.reason, e.detail, None)
            return
        why = self._check(report, delivery.user_id, head)
        if why is None and isinstance(report, Evaluation):
            why = await self._check_version(report)
        if why is not None:
            await self._refuse(delivery, why[0], why[1], report.participant)
            return
        if isinstance(report, DriftSummary):
            await self._keep_drift(report)
        else:
            await self._keep_evaluation(report)
        self.taken += 1
        try:
            await delivery.ack()
        except FedqError as e:  # the channel is gone: it comes again, saved idempotently
            self.log.info("report ack skipped", error=str(e))

    def _check(
        self, report: DriftSummary | Evaluation, sender: str | None, head: int
    ) -> tuple[Refusal, str] | None:
        spec = self.spec
        if report.task != self.task:
            return Refusal.UNKNOWN_TASK, f"names task {report.task!r}"
        if spec.monitoring is None:
            return Refusal.WRONG_KIND, "this task's spec has no monitoring"
        if spec.participants and report.participant not in spec.participants:
            return Refusal.UNKNOWN_PARTICIPANT, f"{report.participant!r} is not a participant"
        if self.require_sender_match and sender != report.participant:
            return (
                Refusal.SENDER_MISMATCH,
                f"sent by broker user {sender!r}, names participant {report.participant!r}",
            )
        refused = self._signature(report)
        if refused is not None:
            return refused
        if report.spec_hash != self.spec_hash:
            return Refusal.SPEC_MISMATCH, "made under another spec than the task's"
        if report.version > head:
            return Refusal.FUTURE_BASE, f"names version {report.version}, the head is {head}"
        if isinstance(report, DriftSummary):
            names = sorted(report.features)
            expected = sorted(f.name for f in spec.features)
            if names != expected:
                return Refusal.INVALID_FIELD, "f: not one entry per feature of the task"
        else:
            unknown = sorted(set(report.metrics) - set(EVALUATION_METRICS))
            if unknown:
                return Refusal.INVALID_FIELD, f"m: {unknown[:3]} are not evaluation metrics"
        return None

    def _signature(self, report: DriftSummary | Evaluation) -> tuple[Refusal, str] | None:
        """As for updates: required when the task says so, checked whenever there is a key."""
        required = self.spec.identity.require_signatures
        key = self.keys.get(report.participant)
        if report.signature is None:
            if required:
                return Refusal.UNSIGNED, "the task requires signed reports; this one has no sg"
        elif key is None:
            if required:
                return Refusal.BAD_SIGNATURE, f"no public key for {report.participant!r}"
        elif not key.verify(report.signature, report.signing_message()):
            return Refusal.BAD_SIGNATURE, f"signature does not verify under {key.fingerprint}"
        return None

    async def _check_version(self, report: Evaluation) -> tuple[Refusal, str] | None:
        try:
            record = await self.store.get_version(self.task, report.version)
        except NotFoundError:
            return Refusal.BASE_UNAVAILABLE, f"version {report.version} is not in the store"
        if record.version_hash != report.version_hash:
            return Refusal.INVALID_FIELD, f"vh: not the hash of version {report.version}"
        return None

    async def _keep_drift(self, s: DriftSummary) -> None:
        monitoring = self.spec.monitoring
        assert monitoring is not None
        psis = {name: d.psi for name, d in s.features.items()} | {SCORE: s.score.psi}
        drifted = over_threshold(psis, monitoring.psi_threshold, s.rows, monitoring.min_rows)
        summary = drift_record(s, drifted, time.time())
        signal = None
        if drifted:
            signal = {
                "summary_id": s.summary_id,
                "participant": s.participant,
                "version": s.version,
                "drifted": drifted,
                "at": summary["at"],
                "action": monitoring.on_drift,
            }
        taken = await self.store.monitoring.save_drift(
            self.task, s.participant, summary, signal, resume=monitoring.on_drift == "resume"
        )
        if not taken.taken:  # a redelivery of the newest summary taken: nothing changes
            self.log.info("drift summary taken before", participant=s.participant)
            return
        self.resumed = self.resumed or taken.resumed
        m, who = self.metrics, (self.task, s.participant)
        for name, d in [*s.features.items(), (SCORE, s.score)]:
            m.drift_psi.labels(*who, name).set(d.psi)
            if d.ks is not None:
                m.drift_ks.labels(*who, name).set(d.ks)
        m.drift_over.labels(*who).set(len(drifted))
        m.drift_rows.labels(*who).set(s.rows)
        m.drift_last.labels(*who).set(summary["at"])
        if signal is not None:
            m.retrain_signals.labels(*who).inc()
            self.log.warning(
                "retraining signal: a bank's recent rows drifted",
                participant=s.participant,
                drifted=drifted,
                action=monitoring.on_drift,
                resumed=taken.resumed,
            )
        else:
            self.log.info("drift summary taken", participant=s.participant, rows=s.rows)

    async def _keep_evaluation(self, e: Evaluation) -> None:
        await self.store.monitoring.save_evaluation(
            self.task, e.version, e.participant, evaluation_record(e, time.time())
        )
        for name, value in e.metrics.items():
            self.metrics.evaluation.labels(self.task, e.participant, name).set(value)
        self.log.info("evaluation taken", participant=e.participant, version=e.version, rows=e.rows)

    async def _refuse(
        self, delivery: UpdateDelivery, reason: Refusal, detail: str, participant: str | None
    ) -> None:
        await delivery.dead_letter(reason.value, detail)
        self.refused += 1
        self.metrics.reports_refused.labels(self.task, reason.value).inc()
        self.log.warning(
            "report refused", reason=reason.value, detail=detail, participant=participant
        )


def drift_record(s: DriftSummary, drifted: list[str], taken_at: float) -> dict[str, Any]:
    """A drift summary as kept in Redis and shown by ``fedq drift`` and /status: ``at``
    is when the aggregator took it (the bank's own time, unsigned, is ``bank_at``)."""
    return {
        "summary_id": s.summary_id,
        "participant": s.participant,
        "version": s.version,
        "rows": s.rows,
        "at": taken_at,
        "bank_at": s.created_at,
        "features": {n: {"psi": d.psi, "ks": d.ks} for n, d in sorted(s.features.items())},
        "score": {"psi": s.score.psi, "ks": s.score.ks},
        "drifted": drifted,
    }


def evaluation_record(e: Evaluation, taken_at: float) -> dict[str, Any]:
    """An evaluation as kept in Redis and shown in the report (``at``: when the
    aggregator took it; ``bank_at``: the bank's own time)."""
    return {
        "evaluation_id": e.evaluation_id,
        "participant": e.participant,
        "version": e.version,
        "rows": e.rows,
        "at": taken_at,
        "bank_at": e.created_at,
        "metrics": dict(sorted(e.metrics.items())),
    }
