"""Prometheus metrics of one participant worker (own registry: no process-wide globals).

``fedq participant run --metrics-port`` serves them at ``/metrics``. They are for the
bank's own operators: the validation scores and the training time are computed from
the bank's rows and no privacy mechanism covers them (participant/privacy.py), so
only the bank's own Prometheus should scrape them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

#: Buckets of ``fedq_participant_training_seconds``: a small model on a few thousand
#: rows trains in well under a second, a large one or DP-SGD on many rows in minutes.
TRAINING_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ParticipantMetrics:
    """Counters, gauges and the histogram the worker and its receipt tracker update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Info(
            "fedq_participant",
            "Which task and participant this worker serves (labels; value 1)",
            registry=r,
        )
        self.published = Counter(
            "fedq_participant_updates_published",
            "Updates the broker confirmed to this participant",
            registry=r,
        )
        self.receipts = Counter(
            "fedq_participant_receipts",
            "Receipts counted (one per update id), by outcome and refusal reason "
            "(reason empty when accepted)",
            ["outcome", "reason"],
            registry=r,
        )
        self.receipts_bad_signature = Counter(
            "fedq_participant_receipts_bad_signature",
            "Receipts ignored: unsigned or not signed by the task's aggregator key",
            registry=r,
        )
        self.models_refused = Counter(
            "fedq_participant_models_refused",
            "Announced models this participant refused, by reason",
            ["reason"],
            registry=r,
        )
        self.training_seconds = Histogram(
            "fedq_participant_training_seconds",
            "Wall time of each local training (one per local round, under the task's "
            "local privacy mechanism if any)",
            buckets=TRAINING_BUCKETS,
            registry=r,
        )
        self.model_version = Gauge(
            "fedq_participant_model_version",
            "Version of the newest model this participant accepted (the one it trains from)",
            registry=r,
        )
        self.validation_auc = Gauge(
            "fedq_participant_validation_auc",
            "ROC AUC of the newest accepted model on this bank's validation split "
            "(set when the split holds both classes)",
            registry=r,
        )
        # Privacy: labelled by the task's local mechanism (``record``: DP-SGD,
        # ``laplace``), so a task without one serves none of them.
        self.privacy_epsilon = Gauge(
            "fedq_participant_privacy_epsilon",
            "Cumulative epsilon this bank has spent under the task's local privacy "
            "mechanism (its privacy ledger)",
            ["mechanism"],
            registry=r,
        )
        self.privacy_epsilon_budget = Gauge(
            "fedq_participant_privacy_epsilon_budget",
            "The spec's epsilon_budget for this bank (served when the spec sets one)",
            ["mechanism"],
            registry=r,
        )
        self.privacy_budget_exhausted = Gauge(
            "fedq_participant_privacy_budget_exhausted",
            "1 once one more update would pass the epsilon budget: the bank publishes "
            "no more updates",
            ["mechanism"],
            registry=r,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
