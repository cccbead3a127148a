"""What ``GET /status`` reports: the task, the lease, the head and each bank's activity.

:class:`StatusTracker` follows what the service settles (each accepted lineage entry
at its commit, each refusal) and keeps, per bank, when it last settled one of its
updates and the staleness of its accepted ones; the rate of versions over a recent
window; and the per-bank Prometheus series (``fedq_participant_updates_total``,
``fedq_participant_last_update_timestamp_seconds``, ``fedq_lease_held``,
``fedq_store_regressed``). :meth:`StatusTracker.snapshot` reads the rest from the
service (its stats, its lease, its privacy record) and :func:`build_status` makes the
JSON document, schema 1, described field by field in docs/status.md.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aggregator.metrics import AggregatorMetrics
from aggregator.stats import BankStats, ServiceStats
from common.errors import FedqError
from common.hashing import LineageEntry

if TYPE_CHECKING:
    from aggregator.privacy import VersionPrivacy
    from aggregator.service import AggregatorService

__all__ = ["SCHEMA", "SERVICE", "BankActivity", "StatusTracker", "build_status"]

#: The document's schema version: a field is never renamed or removed within one.
SCHEMA = 1
#: The document's ``service`` field: what ``fedq status`` checks it is talking to.
SERVICE = "fedq-aggregator"
#: Versions per second are measured over this many recent seconds.
RATE_WINDOW_S = 60.0


@dataclass(slots=True)
class BankActivity:
    """When a bank's updates were last settled, and how stale its accepted ones were."""

    #: Unix time the aggregator last settled (accepted or refused) one of its updates.
    last_update: float | None = None
    last_staleness: int | None = None
    staleness_sum: int = 0
    staleness_count: int = 0

    @property
    def mean_staleness(self) -> float | None:
        """Mean staleness of its accepted updates since this aggregator started."""
        return self.staleness_sum / self.staleness_count if self.staleness_count else None


class StatusTracker:
    """Per-bank activity and the version rate of one aggregator, and their metrics."""

    def __init__(
        self,
        task: str,
        metrics: AggregatorMetrics,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        window_s: float = RATE_WINDOW_S,
    ) -> None:
        self.task = task
        self.metrics = metrics
        self.clock = clock
        self.monotonic = monotonic
        self.window_s = window_s
        #: Unix time this aggregator started.
        self.started_at = clock()
        self._started = monotonic()
        self.banks: dict[str, BankActivity] = {}
        #: (monotonic time, versions committed then), newer than the window.
        self._commits: deque[tuple[float, int]] = deque()
        metrics.store_regressed.labels(task).set(0)
        metrics.lease_held.labels(task).set(0)

    def watch(self, *, lease_held: Callable[[], bool], regressed: Callable[[], bool]) -> None:
        """``fedq_lease_held`` and ``fedq_store_regressed`` read these when scraped."""
        self.metrics.lease_held.labels(self.task).set_function(lambda: float(lease_held()))
        self.metrics.store_regressed.labels(self.task).set_function(lambda: float(regressed()))

    def accepted(self, lineage: Sequence[LineageEntry], versions: int) -> None:
        """``versions`` versions were committed with these lineage entries."""
        now = self.clock()
        self._commits.append((self.monotonic(), versions))
        self._prune()
        for e in lineage:
            bank = self._bank(e.participant, now)
            bank.last_staleness = e.staleness
            bank.staleness_sum += e.staleness
            bank.staleness_count += 1
            self.metrics.participant_updates.labels(self.task, e.participant, "accepted", "").inc()

    def refused(self, participant: str | None, reason: str) -> None:
        """One update refused; ``participant`` None when the update named none readable
        (it is counted in ``fedq_updates_refused_total`` only)."""
        if participant is None:
            return
        self._bank(participant, self.clock())
        self.metrics.participant_updates.labels(self.task, participant, "refused", reason).inc()

    def versions_per_s(self) -> float:
        """Versions committed per second over the last ``window_s`` seconds (or since the
        start, when it is more recent)."""
        self._prune()
        span = min(self.window_s, self.monotonic() - self._started)
        return sum(n for _, n in self._commits) / span if span > 0 else 0.0

    def _prune(self) -> None:
        cutoff = self.monotonic() - self.window_s
        while self._commits and self._commits[0][0] <= cutoff:
            self._commits.popleft()

    def _bank(self, participant: str, now: float) -> BankActivity:
        bank = self.banks.setdefault(participant, BankActivity())
        bank.last_update = now
        self.metrics.participant_last_update.labels(self.task, participant).set(now)
        return bank

    async def snapshot(self, service: AggregatorService, waiting: int | None) -> dict[str, Any]:
        """The /status document of ``service``; ``waiting``: the work queue's depth as
        last sampled while consuming (None: read it now)."""
        lease = service.lease
        active = lease.held
        holder, standbys, head = None, None, service.head_version if active else None
        try:
            current = await lease.holder()
            holder = current.owner if current is not None else None
            standbys = await lease.standbys()
            if not active:
                head = await service.store.head(service.task)
        except FedqError:
            pass  # Redis does not answer: null, and /healthz says why
        if waiting is None:
            try:
                waiting = await service.transport.queue_depth(service.task)
            except FedqError:
                waiting = None
        monitoring, drift = await _monitoring(service)
        privacy = service.privacy
        return build_status(
            task=service.task,
            mode=service.spec.mode,
            strategy=service.strategy.name,
            secure_aggregation=service.secure,
            owner=service.config.owner,
            lease_state=lease.state,
            active=active,
            holder=holder,
            fence=lease.token if active else None,
            lease_ttl_s=lease.config.ttl_s,
            standbys=standbys,
            head=head,
            versions_per_s=self.versions_per_s() if active else None,
            window_s=self.window_s,
            started_at=self.started_at,
            now=self.clock(),
            waiting=waiting,
            unacked=service.unacked if active else 0,
            participants=service.spec.participants,
            stats=service.stats if active else None,
            activity=self.banks,
            bank_dp=privacy.head if privacy is not None else None,
            bank_dp_on=privacy is not None,
            error=service.failure,
            monitoring=monitoring,
            drift=drift,
        )


async def _monitoring(
    service: AggregatorService,
) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The task's monitoring settings, pause and signals, and each bank's newest drift
    summary, as the store holds them (None and {} without monitoring or Redis)."""
    spec = service.spec.monitoring
    if spec is None:
        return None, {}
    out: dict[str, Any] = {
        "psi_threshold": spec.psi_threshold,
        "on_drift": spec.on_drift,
        "paused": service.paused,
        "retrain_signals": None,
    }
    try:
        store = service.store.monitoring
        drift = await store.drift(service.task)
        out["retrain_signals"] = await store.retrain_count(service.task)
    except FedqError:
        return out, {}
    return out, drift


def build_status(
    *,
    task: str,
    mode: str,
    strategy: str,
    secure_aggregation: bool,
    owner: str,
    lease_state: str,
    active: bool,
    holder: str | None,
    fence: int | None,
    lease_ttl_s: float,
    standbys: Sequence[str] | None,
    head: int | None,
    versions_per_s: float | None,
    window_s: float,
    started_at: float,
    now: float,
    waiting: int | None,
    unacked: int,
    participants: Sequence[str],
    stats: ServiceStats | None,
    activity: Mapping[str, BankActivity],
    bank_dp: VersionPrivacy | None,
    bank_dp_on: bool,
    error: str | None,
    monitoring: dict[str, Any] | None = None,
    drift: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The /status document (docs/status.md). A standby (``stats`` None) lists no bank:
    it has settled nothing; the lease holder's /status has them."""
    privacy: dict[str, Any] | None = None
    if bank_dp_on:
        privacy = {
            "epsilon": bank_dp.epsilon if bank_dp else 0.0,
            "delta": bank_dp.delta if bank_dp else None,
            "versions": bank_dp.versions if bank_dp else 0,
            "noise_multiplier": bank_dp.noise_multiplier if bank_dp else None,
            "clip": bank_dp.clip if bank_dp else None,
        }
    banks: list[dict[str, Any]] = []
    if stats is not None:
        flags = stats.flag_reasons
        epsilon = privacy["epsilon"] if privacy is not None else None
        for name in sorted(set(participants) | set(stats.banks) | set(activity)):
            bank = _bank(name, stats.banks.get(name), activity.get(name), flags, epsilon, now)
            bank["drift"] = _drift(drift.get(name) if drift else None, now)
            banks.append(bank)
    return {
        "schema": SCHEMA,
        "service": SERVICE,
        "task": task,
        "mode": mode,
        "strategy": strategy,
        "secure_aggregation": secure_aggregation,
        "role": "active" if active else "standby",
        "owner": owner,
        "lease": {"state": lease_state, "holder": holder, "fence": fence, "ttl_s": lease_ttl_s},
        "standbys": None if standbys is None else list(standbys),
        "head": {"version": head, "versions_per_s": versions_per_s, "window_s": window_s},
        "started_at": started_at,
        "now": now,
        "queue": {"waiting": waiting, "unacked": unacked},
        "totals": None
        if stats is None
        else {"accepted": stats.accepted, "refused": dict(sorted(stats.refused.items()))},
        "privacy": {"bank": privacy},
        "monitoring": monitoring,
        "banks": banks,
        "error": error,
    }


def _bank(
    name: str,
    counts: BankStats | None,
    seen: BankActivity | None,
    flags: Mapping[str, list[str]],
    epsilon: float | None,
    now: float,
) -> dict[str, Any]:
    counts = counts or BankStats()
    last = seen.last_update if seen else None
    return {
        "participant": name,
        "last_update": last,
        "age_s": None if last is None else max(0.0, now - last),
        "accepted": counts.accepted,
        "refused": dict(sorted(counts.refused.items())),
        "refused_total": sum(counts.refused.values()),
        "last_version": counts.last_version if counts.last_version >= 0 else None,
        "staleness_last": seen.last_staleness if seen else None,
        "staleness_mean": seen.mean_staleness if seen else None,
        "weight_share": counts.weight_share,
        "recent_updates": counts.recent_updates,
        "low_weight": counts.low_weight,
        "flagged": name in flags,
        "flag_reasons": list(flags.get(name, [])),
        "epsilon": epsilon,
    }


def _drift(summary: Mapping[str, Any] | None, now: float) -> dict[str, Any] | None:
    """A bank's newest drift summary in brief: what is over the threshold, the largest
    feature PSI, the score's PSI, its rows, version and age (None: none yet)."""
    if summary is None:
        return None
    features = summary.get("features", {})
    return {
        "drifted": list(summary.get("drifted", [])),
        "max_feature_psi": max((f["psi"] for f in features.values()), default=None),
        "score_psi": summary.get("score", {}).get("psi"),
        "rows": summary.get("rows"),
        "version": summary.get("version"),
        "age_s": max(0.0, now - float(summary.get("at", now))),
    }
