"""Prometheus metrics of one participant worker (own registry: no process-wide globals).

``fedq participant run --metrics-port`` serves them at ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest


class ParticipantMetrics:
    """Counters the worker and its receipt tracker update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
