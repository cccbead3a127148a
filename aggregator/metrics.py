"""Prometheus metrics of one aggregator (own registry: no process-wide globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class AggregatorMetrics:
    """Counters, gauges and histograms the service updates; served at /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.accepted = Counter(
            "fedq_updates_accepted", "Updates accepted into a version", ["task"], registry=r
        )
        self.refused = Counter(
            "fedq_updates_refused", "Updates refused, by reason", ["task", "reason"], registry=r
        )
        self.staleness = Histogram(
            "fedq_update_staleness",
            "Staleness (head - base version, in versions) of accepted updates",
            ["task"],
            buckets=(0, 1, 2, 3, 5, 8, 13, 21, 34, 55),
            registry=r,
        )
        self.head = Gauge("fedq_head_version", "Head version of the task", ["task"], registry=r)
        self.commit_seconds = Histogram(
            "fedq_commit_seconds", "Time to commit a version to the store", ["task"], registry=r
        )
        self.flagged = Gauge(
            "fedq_participant_flagged",
            "1 while a participant is flagged: its recent updates were all refused "
            "(flag_after in a row) or carry negligible weight (see fedq_participant_low_weight)",
            ["task", "participant"],
            registry=r,
        )
        self.low_weight = Gauge(
            "fedq_participant_low_weight",
            "1 while a participant's recent accepted updates carry negligible weight "
            "(share of recent recorded weight below a tenth of its data share)",
            ["task", "participant"],
            registry=r,
        )
        self.weight_share = Gauge(
            "fedq_participant_weight_share",
            "A participant's share of the recorded weight of recent accepted updates",
            ["task", "participant"],
            registry=r,
        )
        self.receipts_sent = Counter(
            "fedq_receipts_sent",
            "Receipts the broker confirmed, by outcome (accepted, refused)",
            ["task", "outcome"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "fedq_queue_depth", "Updates waiting in the work queue", ["task"], registry=r
        )
        self.participant_updates = Counter(
            "fedq_participant_updates",
            "Updates the aggregator settled, per participant: accepted into a committed "
            "version, or refused (reason: the refusal's reason; empty when accepted)",
            ["task", "participant", "outcome", "reason"],
            registry=r,
        )
        self.participant_last_update = Gauge(
            "fedq_participant_last_update_timestamp_seconds",
            "Unix time at which the aggregator last settled one of the participant's updates",
            ["task", "participant"],
            registry=r,
        )
        self.store_regressed = Gauge(
            "fedq_store_regressed",
            "1 when the aggregator found the store behind its own commits or announcements "
            "(it stops), else 0",
            ["task"],
            registry=r,
        )
        self.lease_held = Gauge(
            "fedq_lease_held",
            "1 while this process holds the task's writer lease, 0 while it waits as standby",
            ["task"],
            registry=r,
        )

        # Monitoring (docs/drift.md): the newest summary of each bank.
        self.drift_psi = Gauge(
            "fedq_drift_psi",
            "PSI of a bank's recent rows against the task's reference, per feature (and "
            "'score': its model's scores against its own training rows)",
            ["task", "participant", "feature"],
            registry=r,
        )
        self.drift_ks = Gauge(
            "fedq_drift_ks",
            "KS statistic of a bank's recent rows, per numeric feature and 'score'",
            ["task", "participant", "feature"],
            registry=r,
        )
        self.drift_over = Gauge(
            "fedq_drift_over_threshold",
            "How many of a bank's features (and its score) drift above the task's "
            "psi_threshold in its newest summary (0 with fewer than min_rows recent rows)",
            ["task", "participant"],
            registry=r,
        )
        self.drift_rows = Gauge(
            "fedq_drift_rows",
            "Recent rows in a bank's newest drift summary",
            ["task", "participant"],
            registry=r,
        )
        self.drift_last = Gauge(
            "fedq_drift_last_summary_timestamp_seconds",
            "Unix time at which the aggregator took a bank's newest drift summary",
            ["task", "participant"],
            registry=r,
        )
        self.retrain_signals = Counter(
            "fedq_retrain_signals",
            "Retraining signals recorded: a bank's summary drifted above the threshold",
            ["task", "participant"],
            registry=r,
        )
        self.evaluation = Gauge(
            "fedq_bank_evaluation",
            "A bank's newest evaluation of the version it holds, per metric",
            ["task", "participant", "metric"],
            registry=r,
        )
        self.reports_refused = Counter(
            "fedq_reports_refused",
            "Drift summaries and evaluations refused, by reason",
            ["task", "reason"],
            registry=r,
        )
        self.training_paused = Gauge(
            "fedq_training_paused",
            "1 while the task's training is paused (fedq task pause), else 0",
            ["task"],
            registry=r,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
