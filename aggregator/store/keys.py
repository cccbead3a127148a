"""Every Redis key fedq uses, in one place.

Per-task keys carry the task in a hash tag (``{task}``) so that one task's keys
live in one Redis Cluster slot and a commit stays a single-slot transaction.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under a prefix (``fedq`` by default)."""

    prefix: str = "fedq"

    def tasks(self) -> str:
        """Set of registered task ids."""
        return f"{self.prefix}:tasks"

    def spec(self, task: str) -> str:
        """The task's spec (JSON)."""
        return f"{self.prefix}:{{{task}}}:spec"

    def spec_history(self, task: str) -> str:
        """List of the task's specs over time: ``{"from_version", "spec"}`` (JSON)."""
        return f"{self.prefix}:{{{task}}}:spec_history"

    def lease(self, task: str) -> str:
        """The writer lease: ``owner:token`` with a TTL (one active aggregator per task)."""
        return f"{self.prefix}:{{{task}}}:lease"

    def standbys(self, task: str) -> str:
        """Sorted set: aggregators waiting for the writer lease, each scored with the Unix
        time in milliseconds until which it counts as waiting (refreshed while it waits;
        see aggregator/lease.py). Read by /status; the writer never depends on it."""
        return f"{self.prefix}:{{{task}}}:standbys"

    def fence(self, task: str) -> str:
        """Counter issuing fencing tokens: each new lease gets a larger one."""
        return f"{self.prefix}:{{{task}}}:fence"

    def head(self, task: str) -> str:
        """The task's head version number."""
        return f"{self.prefix}:{{{task}}}:head"

    def applied(self, task: str) -> str:
        """Hash: update id -> the version it was applied in."""
        return f"{self.prefix}:{{{task}}}:applied"

    def decisions(self, task: str) -> str:
        """Stream of the aggregator's decisions: accepted into version N, or refused."""
        return f"{self.prefix}:{{{task}}}:decisions"

    def cohort(self, task: str, cohort: int) -> str:
        """Secure aggregation: who survived cohort N and who dropped (JSON), written once
        before any unmask request leaves (aggregator/secagg.py)."""
        return f"{self.prefix}:{{{task}}}:cohort:{cohort}"

    def meta(self, task: str, version: int) -> str:
        """A version's metadata (JSON)."""
        return f"{self.prefix}:{{{task}}}:v:{version}:meta"

    def lineage(self, task: str, version: int) -> str:
        """A version's lineage: its ordered input updates with weights (JSON)."""
        return f"{self.prefix}:{{{task}}}:v:{version}:lineage"

    def blob(self, task: str, version: int) -> str:
        """A version's parameters (a model envelope, docs/wire-format.md)."""
        return f"{self.prefix}:{{{task}}}:v:{version}:blob"

    def state(self, task: str, version: int) -> str:
        """A version's server optimizer state, when it has one (a model envelope of
        float64 tensors, docs/wire-format.md section 12)."""
        return f"{self.prefix}:{{{task}}}:v:{version}:state"

    def drift(self, task: str) -> str:
        """Hash: participant -> its newest drift summary as the aggregator took it (JSON;
        docs/drift.md)."""
        return f"{self.prefix}:{{{task}}}:drift"

    def drift_log(self, task: str) -> str:
        """Stream of every drift summary taken (capped; field ``summary``, JSON)."""
        return f"{self.prefix}:{{{task}}}:drift_log"

    def evaluations(self, task: str) -> str:
        """Hash: ``<version>:<participant>`` -> that bank's newest evaluation of that
        version (JSON)."""
        return f"{self.prefix}:{{{task}}}:evaluations"

    def drift_ids(self, task: str) -> str:
        """Hash: participant -> the id of its newest drift summary taken (a redelivered
        summary is taken once)."""
        return f"{self.prefix}:{{{task}}}:drift_ids"

    def retrain(self, task: str) -> str:
        """Hash: participant -> its newest retraining signal (JSON)."""
        return f"{self.prefix}:{{{task}}}:retrain"

    def retrain_log(self, task: str) -> str:
        """Stream of every retraining signal recorded (capped; field ``signal``, JSON)."""
        return f"{self.prefix}:{{{task}}}:retrain_log"

    def paused(self, task: str) -> str:
        """Hash: the task's training pause, while paused: ``since`` (Unix time),
        ``version`` (the head when paused), ``note``."""
        return f"{self.prefix}:{{{task}}}:paused"
