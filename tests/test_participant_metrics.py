"""A participant worker's Prometheus metrics: what it serves after real local rounds.

Each test runs an aggregator and a bank worker in process (the memory transport,
fakeredis) and reads the worker's own registry and its text exposition.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import fakeredis
import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, StoreConfig
from common.evaluation import evaluate
from common.spec import (
    AsyncSettings,
    NumericFeature,
    PrivacySpec,
    RecordPrivacy,
    TargetSpec,
    TaskSpec,
    TrainingSettings,
)
from common.transport.memory import MemoryBroker, MemoryTransport
from participant.metrics import ParticipantMetrics
from participant.privacy import PrivacyLedger, dpsgd_steps
from participant.worker import ParticipantWorker, WorkerConfig

BANK = "bank-a"


def _spec(record: RecordPrivacy | None = None) -> TaskSpec:
    return TaskSpec.model_validate(
        {
            "task_id": f"pm{uuid.uuid4().hex[:10]}",
            "features": tuple(NumericFeature(name=f"x{i}") for i in range(3)),
            "target": TargetSpec(name="y"),
            "training": TrainingSettings(batch_size=16),
            "privacy": PrivacySpec(record=record),
            "participants": (BANK,),
            "declared_samples": {BANK: 48} if record is not None else {},
            "async": AsyncSettings(max_staleness=50),
        }
    )


def _frame(rows: int) -> pd.DataFrame:
    """Both classes in every split: the validation AUC is defined."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 3))
    return pd.DataFrame(
        {"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2], "y": (x[:, 0] > 0).astype(int)}
    )


@dataclass
class Federation:
    spec: TaskSpec
    service: AggregatorService
    store: RedisModelStore
    bank: MemoryTransport


async def _federation(spec: TaskSpec) -> AsyncIterator[Federation]:
    broker = MemoryBroker()
    store = RedisModelStore(
        fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), StoreConfig(prefix="fedq")
    )
    service = AggregatorService(
        spec, store, MemoryTransport(broker, "fedq-aggregator"), ServiceConfig(lease_ttl_s=5.0)
    )
    stop = asyncio.Event()
    serving = asyncio.create_task(service.run(stop))
    try:
        async with asyncio.timeout(30):
            await service.ready.wait()
        yield Federation(spec, service, store, MemoryTransport(broker, BANK))
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await serving
        await store.close()


def _value(metrics: ParticipantMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def _served(metrics: ParticipantMetrics) -> dict[str, float]:
    """Every sample of the text exposition, by name (the last one of each name)."""
    text = metrics.render().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


async def test_a_worker_serves_its_rounds_training_time_and_validation_auc() -> None:
    async for fed in _federation(_spec()):
        config = WorkerConfig(participant=BANK, wait_for_model_s=0.1, max_updates=3)
        worker = ParticipantWorker(fed.spec, config, fed.bank, _frame(80))
        stats = await asyncio.wait_for(worker.run(asyncio.Event()), 60)  # ends by itself
        # The model it trained from last, scored again here on the worker's split.
        last = await fed.store.get_params(fed.spec.task_id, stats.last_version)
        expected = evaluate(fed.spec, last.tensors, worker.x_val, worker.y_val)["auc"]
    m = worker.metrics
    assert stats.published == 3
    assert _value(m, "fedq_participant_updates_published_total") == 3
    # One training per published update (none gave a non-finite delta).
    assert stats.not_finite == 0
    assert _value(m, "fedq_participant_training_seconds_count") == 3
    total = _value(m, "fedq_participant_training_seconds_sum")
    assert total is not None and total > 0
    assert _value(m, "fedq_participant_training_seconds_bucket", le="+Inf") == 3
    # The receipts of its three updates, drained before run() returned.
    assert _value(m, "fedq_participant_receipts_total", outcome="accepted", reason="") == 3
    assert _value(m, "fedq_participant_model_version") == stats.last_version
    assert _value(m, "fedq_participant_validation_auc") == pytest.approx(expected)
    assert _value(m, "fedq_participant_info", task=fed.spec.task_id, participant=BANK) == 1
    # No local privacy mechanism: no privacy gauge is served at all.
    served = _served(m)
    assert served["fedq_participant_validation_auc"] == pytest.approx(expected)
    assert served["fedq_participant_training_seconds_count"] == 3
    assert not [name for name in served if name.startswith("fedq_participant_privacy")]


async def test_a_worker_under_dp_sgd_serves_its_spending_and_its_exhausted_budget(
    tmp_path: Path,
) -> None:
    def record(budget: float | None) -> RecordPrivacy:
        return RecordPrivacy(noise_multiplier=2.0, epsilon_budget=budget)

    # 48 declared rows, batch 16: 3 DP-SGD steps an update. A budget between the
    # cumulative epsilon after 2 and after 3 updates: the worker publishes 2.
    probe = PrivacyLedger(_spec(record(None)), 48)
    totals = []
    for _ in range(3):
        probe.spend(dpsgd_steps(probe.spec, 48))
        totals.append(probe.epsilon)
    budget = (totals[1] + totals[2]) / 2
    spec = _spec(record(budget))
    ledger = tmp_path / "ledger.json"
    config = WorkerConfig(
        participant=BANK, wait_for_model_s=0.1, privacy_seed=3, privacy_ledger=ledger
    )
    async for fed in _federation(spec):
        worker = ParticipantWorker(spec, config, fed.bank, _frame(60))
        # Before any update: spent nothing, budget known, not exhausted.
        assert _value(worker.metrics, "fedq_participant_privacy_epsilon", mechanism="record") == 0
        assert (
            _value(worker.metrics, "fedq_participant_privacy_budget_exhausted", mechanism="record")
            == 0
        )
        stats = await asyncio.wait_for(worker.run(asyncio.Event()), 60)  # stops at budget
        # Restarted on the same ledger: it serves what the bank spent before.
        again = ParticipantWorker(spec, config, fed.bank, _frame(60))
    m = worker.metrics
    assert stats.budget_exhausted and stats.published == 2
    assert _value(m, "fedq_participant_privacy_epsilon", mechanism="record") == pytest.approx(
        totals[1]
    )
    assert _value(
        m, "fedq_participant_privacy_epsilon_budget", mechanism="record"
    ) == pytest.approx(budget)
    assert _value(m, "fedq_participant_privacy_budget_exhausted", mechanism="record") == 1
    assert _value(m, "fedq_participant_training_seconds_count") == 2
    text = m.render().decode()
    assert 'fedq_participant_privacy_budget_exhausted{mechanism="record"} 1.0' in text
    assert _value(
        again.metrics, "fedq_participant_privacy_epsilon", mechanism="record"
    ) == pytest.approx(totals[1])
    assert (
        _value(again.metrics, "fedq_participant_privacy_budget_exhausted", mechanism="record") == 1
    )
