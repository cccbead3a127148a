"""The facts of ``fedq audit report``: what a model-risk reviewer reads about one
version of a task, gathered from the model store, the retained audit stream and the
auditor's own labelled holdout set. Nothing here writes anywhere; the page is drawn
by :mod:`fedq.report_html`.

:func:`gather` returns a :class:`Report`:

- the task spec (as the store holds it) and its hash;
- the lineage up to the version: each version's strategy and updates, the updates per
  bank, the refusals recorded while the head was below the version, by reason and bank;
- replay verification (:func:`aggregator.audit.replay.replay`) of versions 1..version:
  every parameter hash, chained hash and update signature;
- per bank: updates, share of the summed lineage weights, mean staleness, the metrics
  its last applied update carried (``m``: train_loss, val_auc, dp_epsilon_total, ...)
  and, with a holdout, leave-one-out and Shapley values over replayed coalitions
  (:func:`aggregator.audit.contributions.replay_contributions`);
- with a holdout: the version's scores on it (:func:`common.evaluation.risk_metrics`:
  AUC, PR AUC, KS, calibration, PR curve) and its ROC curve;
- privacy: the spec's mechanisms and the version's recorded bank-level DP record;
- the settings: the spec's sections (mode, strategy settings, training, robustness).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregator.audit.contributions import ContributionError, Holdout, replay_contributions
from aggregator.audit.rebuild import rebuild
from aggregator.audit.replay import (
    READ_LIMITS,
    ReplayError,
    index_answers,
    index_updates,
    replay,
)
from aggregator.store import RedisModelStore, VersionRecord
from common.errors import DecodeError, FedqError, NotFoundError
from common.evaluation import predict_proba, risk_metrics
from common.spec import TaskSpec
from common.wire import peek_header

#: The most points of the ROC curve kept for plotting (evenly picked, ends kept).
ROC_POINTS = 201
#: Banks up to which contributions are exact (every order); sampled above.
EXACT_BANKS = 5
#: The spec's sections shown as settings (in this order; ``async`` by its alias).
SETTINGS = (
    "mode",
    "async",
    "sync",
    "training",
    "server",
    "robustness",
    "secure_aggregation",
    "compression",
    "seed",
    "max_samples",
    "declared_samples",
)


class ReportError(FedqError):
    """The report cannot be made (no such task or version); one line."""


@dataclass(frozen=True, slots=True)
class HoldoutData:
    """The auditor's labelled rows, encoded with the task's spec, and where they came from."""

    source: str
    x: Any
    y: Any


@dataclass(slots=True)
class BankFacts:
    """One bank's part in the versions up to the report's."""

    name: str
    updates: int = 0
    weight: float = 0.0
    staleness: list[int] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)
    #: The metrics (``m``) of the bank's last applied update found in the audit stream.
    metrics: dict[str, float] = field(default_factory=dict)
    leave_one_out: float | None = None
    shapley: float | None = None
    shapley_stderr: float | None = None

    @property
    def mean_staleness(self) -> float | None:
        return float(np.mean(self.staleness)) if self.staleness else None


@dataclass(frozen=True, slots=True)
class Verification:
    """What replay found for versions ``from_version + 1 .. to_version``."""

    ok: bool
    checked: int
    signatures: int
    to_version: int
    first_bad_version: int | None = None
    reason: str = ""
    note: str = ""
    secure_versions: int = 0
    #: Set when replay could not start at all (no retained update, a pruned start).
    error: str = ""


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The version's scores on the holdout set."""

    source: str
    risk: dict[str, Any]
    roc: dict[str, list[float]]


@dataclass(frozen=True, slots=True)
class Contributions:
    """The estimator of the per-bank values (or why there are none)."""

    metric: str = ""
    value_all: float | None = None
    value_empty: float | None = None
    how: str = ""
    error: str = ""


@dataclass(slots=True)
class Report:
    """Everything the page shows (:mod:`fedq.report_html` draws it)."""

    task: str
    version: int
    head: int
    generated_at: float
    spec: dict[str, Any]
    spec_hash: str
    version_hash: str
    param_hash: str
    created_at: float
    #: One row per version 1..version: version, strategy, updates, banks, created_at.
    versions: list[dict[str, Any]]
    banks: list[BankFacts]
    refusals: dict[str, int]
    audit_messages: int
    verification: Verification
    evaluation: Evaluation | None
    #: Why there is no evaluation though a holdout was given ("" otherwise).
    evaluation_error: str
    contributions: Contributions | None
    #: The version's recorded bank-level DP record (cumulative epsilon), if any.
    privacy_record: dict[str, Any] | None
    settings: dict[str, Any]
    #: The banks' own evaluations of versions up to this one (docs/drift.md), by version
    #: then bank; empty without monitoring or before any bank reported.
    bank_evaluations: list[dict[str, Any]] = field(default_factory=list)
    #: Monitoring: each bank's newest drift summary, the retraining signals, the pause
    #: and the threshold; None when the task does not monitor.
    drift: dict[str, Any] | None = None


async def gather(
    store: RedisModelStore,
    task: str,
    version: int | None,
    bodies: Sequence[bytes],
    holdout: HoldoutData | None,
    *,
    contributions: bool = True,
) -> Report:
    """The facts of ``version`` of ``task`` (default: the head); ``bodies`` is the
    task's audit stream, oldest first. ReportError for a task or version that is not
    in the store."""
    head = await store.head(task)
    if head is None:
        raise ReportError(f"task {task!r} has no versions in the store")
    v = head if version is None else version
    if not 0 <= v <= head:
        raise ReportError(f"task {task!r} has no version {v} (versions 0..{head})")
    try:
        spec = await store.get_spec(task)
        records = await store.get_versions(task, list(range(v + 1)))
    except NotFoundError as err:
        raise ReportError(str(err)) from err
    updates, answers = index_updates(bodies), index_answers(bodies)
    banks = _banks(spec, records[1:], updates)
    refusals = _refusals(await store.decisions(task), v, banks)
    verification = await _verify(store, task, v, updates, answers)
    evaluation = contrib = None
    evaluation_error = ""
    if holdout is not None:
        try:
            params = (await rebuild(store, task, v, updates, answers=answers)).params
        except ReplayError as err:
            evaluation_error = f"the parameters of version {v} could not be read: {err}"
        else:
            evaluation = _evaluate(spec, params, holdout)
        if contributions and evaluation is not None:
            contrib = await _contributions(store, task, v, spec, holdout, updates, answers, banks)
    bank_evaluations, drift = await _monitoring(store, spec, v)
    rec = records[v]
    privacy = rec.info.get("privacy")
    doc = spec.model_dump(mode="json", by_alias=True)
    return Report(
        task=task,
        version=v,
        head=head,
        generated_at=time.time(),
        spec=doc,
        spec_hash=spec.spec_hash().hex(),
        version_hash=rec.version_hash.hex(),
        param_hash=rec.param_hash.hex(),
        created_at=rec.created_at,
        versions=[_version_row(r) for r in records[1:]],
        banks=[banks[b] for b in sorted(banks)],
        refusals=dict(Counter(refusals).most_common()),
        audit_messages=len(bodies),
        verification=verification,
        evaluation=evaluation,
        evaluation_error=evaluation_error,
        contributions=contrib,
        privacy_record=privacy if isinstance(privacy, dict) else None,
        settings={k: doc[k] for k in SETTINGS if k in doc},
        bank_evaluations=bank_evaluations,
        drift=drift,
    )


async def _monitoring(
    store: RedisModelStore, spec: TaskSpec, version: int
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The banks' evaluations of versions up to ``version`` and the drift state."""
    if spec.monitoring is None:
        return [], None
    m = store.monitoring
    evaluations = [e for e in await m.evaluations(spec.task_id) if e["version"] <= version]
    drift = {
        "psi_threshold": spec.monitoring.psi_threshold,
        "banks": await m.drift(spec.task_id),
        "retrain_signals": await m.retrain_signals(spec.task_id),
        "paused": await m.paused(spec.task_id),
    }
    return evaluations, drift


def _version_row(rec: VersionRecord) -> dict[str, Any]:
    return {
        "version": rec.version,
        "strategy": rec.info.get("strategy"),
        "updates": len(rec.lineage),
        "banks": sorted({e.participant for e in rec.lineage}),
        "created_at": rec.created_at,
    }


def _banks(
    spec: TaskSpec, records: Sequence[VersionRecord], updates: Mapping[str, bytes]
) -> dict[str, BankFacts]:
    """Every spec participant and every bank with an update in ``records``."""
    banks = {p: BankFacts(p) for p in spec.participants}
    last: dict[str, str] = {}
    for rec in records:
        for e in rec.lineage:
            b = banks.setdefault(e.participant, BankFacts(e.participant))
            b.updates += 1
            b.weight += e.weight
            b.staleness.append(e.staleness)
            last[e.participant] = e.update_id
    for name, uid in last.items():
        body = updates.get(uid)
        if body is not None:
            banks[name].metrics = reported_metrics(body)
    return banks


def reported_metrics(body: bytes) -> dict[str, float]:
    """The metrics (``m``) an update carries, read from its header alone (the tensors
    of a large model are not decoded); finite numbers only, by name."""
    try:
        m = peek_header(body, READ_LIMITS).get("m")
    except DecodeError:
        return {}
    if not isinstance(m, dict):
        return {}
    return {
        str(k): float(v)
        for k, v in sorted(m.items(), key=lambda kv: str(kv[0]))
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def _refusals(
    decisions: Sequence[Mapping[str, str]], version: int, banks: dict[str, BankFacts]
) -> list[str]:
    """The reasons of the refusals recorded while the head was below ``version``; each
    counted for its bank too (a sender the spec does not name gets a row of its own)."""
    reasons: list[str] = []
    for d in decisions:
        if d.get("decision") != "refused":
            continue
        try:
            if int(d.get("head", "-1")) >= version:
                continue
        except ValueError:
            continue
        reason = d.get("reason", "?")
        reasons.append(reason)
        who = d.get("participant")
        if who:
            b = banks.setdefault(who, BankFacts(who))
            b.refusals[reason] = b.refusals.get(reason, 0) + 1
    return reasons


async def _verify(
    store: RedisModelStore,
    task: str,
    version: int,
    updates: Mapping[str, bytes],
    answers: Mapping[str, Sequence[bytes]],
) -> Verification:
    try:
        r = await replay(store, updates, task, to_version=version, answers=answers)
    except ReplayError as err:
        return Verification(ok=False, checked=0, signatures=0, to_version=version, error=str(err))
    return Verification(
        ok=r.ok,
        checked=r.checked,
        signatures=r.signatures,
        to_version=r.to_version,
        first_bad_version=r.first_bad_version,
        reason=r.reason,
        note=r.note,
        secure_versions=r.secure_versions,
    )


def _evaluate(spec: TaskSpec, params: Any, holdout: HoldoutData) -> Evaluation:
    p = predict_proba(spec, params, holdout.x).double().numpy()
    y = holdout.y.detach().double().numpy()
    p = np.nan_to_num(p, nan=0.5)
    return Evaluation(holdout.source, risk_metrics(y, p), roc_curve(y, p))


def roc_curve(y: Any, p: Any) -> dict[str, list[float]]:
    """At most :data:`ROC_POINTS` points of the ROC curve (empty with one class)."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    if not 0 < y.sum() < len(y):
        return {"fpr": [], "tpr": []}
    from sklearn.metrics import roc_curve as sk_roc  # slow to load

    fpr, tpr, _ = sk_roc(y, p)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(ROC_POINTS, len(fpr))).round())
    idx = keep.astype(np.int64)
    return {"fpr": [float(x) for x in fpr[idx]], "tpr": [float(x) for x in tpr[idx]]}


async def _contributions(
    store: RedisModelStore,
    task: str,
    version: int,
    spec: TaskSpec,
    holdout: HoldoutData,
    updates: Mapping[str, bytes],
    answers: Mapping[str, Sequence[bytes]],
    banks: dict[str, BankFacts],
) -> Contributions:
    if version == 0:
        return Contributions(error="version 0 has no updates: nothing to value")
    try:
        scorer = Holdout(spec, holdout.x, holdout.y, "auc")
        exact = len(banks) <= EXACT_BANKS
        report = await replay_contributions(
            store,
            updates,
            task,
            scorer,
            answers=answers,
            to_version=version,
            exact=exact,
            metric=scorer.description,
        )
    except (ContributionError, ReplayError) as err:
        return Contributions(error=str(err))
    for name in report.banks:
        b = banks.setdefault(name, BankFacts(name))
        b.leave_one_out = report.leave_one_out[name]
        b.shapley = report.shapley[name]
        b.shapley_stderr = None if report.exact else report.stderr[name]
    how = (
        f"exact Shapley: every order of the {len(report.banks)} banks"
        if report.exact
        else f"truncated Monte Carlo Shapley: {report.permutations} permutations, "
        f"seed {report.seed}"
    )
    return Contributions(
        metric=report.metric,
        value_all=report.value_all,
        value_empty=report.value_empty,
        how=f"{how}; {report.evaluations} coalitions replayed",
    )
