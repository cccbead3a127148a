"""Drift monitoring and federated evaluation in a running federation (docs/drift.md).

Three banks train on German credit; each also has a file of recent rows. One bank's
recent rows are shifted in two features. Its drift summary names exactly those two
(and the score they move) and raises a retraining signal; the other banks' do not.
Every message each worker publishes is captured and read: updates, drift summaries
and evaluations only, none carrying a row.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import fakeredis
import msgpack
import pandas as pd
import pytest

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore
from common.drift import SCORE, published_rows
from common.refusals import Refusal
from common.signing import SigningKey
from common.spec import TaskSpec
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import (
    KIND_DRIFT,
    KIND_EVALUATION,
    KIND_UPDATE,
    DriftSummary,
    Evaluation,
    FeatureDrift,
    decode_drift,
    decode_evaluation,
    decode_update,
    encode_drift,
    encode_evaluation,
    peek_kind,
)
from fedq.simulate import SimulationConfig, prepare
from participant.drift import reference_of
from participant.worker import ParticipantWorker, WorkerConfig

SHIFTED = ("credit_amount", "duration_in_month")
DRIFTING_BANK_INDEX = 1


class _Recording(MemoryTransport):
    """A bank's transport that keeps a copy of every body it publishes."""

    def __init__(self, broker: MemoryBroker, user: str) -> None:
        super().__init__(broker, user)
        self.published: list[bytes] = []

    async def publish_update(
        self, task: str, participant: str, body: bytes, *, message_id: str
    ) -> None:
        self.published.append(bytes(body))
        await super().publish_update(task, participant, body, message_id=message_id)


AGGREGATOR_KEY = SigningKey.from_seed(bytes(range(32)))


def _spec(
    on_drift: str = "record", keys: dict[str, str] | None = None
) -> tuple[TaskSpec, dict[str, pd.DataFrame]]:
    prep = prepare(SimulationConfig(participants=3))
    pooled = pd.concat(prep.shards.values(), ignore_index=True)
    doc = prep.spec.model_dump(mode="json", by_alias=True)
    doc["monitoring"] = {
        "reference": [r.model_dump(mode="json") for r in reference_of(pooled, prep.spec.features)],
        "interval_s": 0.3,
        "min_rows": 100,
        "on_drift": on_drift,
    }
    if keys is not None:
        doc["identity"] = {
            "participant_keys": keys,
            "aggregator_key": AGGREGATOR_KEY.public.text,
            "require_signatures": True,
        }
    return TaskSpec.parse(doc), prep.shards


def _recent(shards: dict[str, pd.DataFrame], tmp: Path, spec: TaskSpec) -> dict[str, Path]:
    """Each bank's recent rows (a file): its own rows again; one bank's shifted."""
    out = {}
    for i, name in enumerate(spec.participants):
        df = shards[name].copy()
        if i == DRIFTING_BANK_INDEX:
            df["duration_in_month"] = df["duration_in_month"] * 2 + 12
            df["credit_amount"] = df["credit_amount"] * 3
        out[name] = tmp / f"{name}-recent.csv"
        df.to_csv(out[name], index=False)
    return out


async def _run(
    spec: TaskSpec,
    shards: dict[str, pd.DataFrame],
    recent: dict[str, Path],
    store: RedisModelStore,
    *,
    until: int,
    keys: dict[str, SigningKey] | None = None,
    also: Callable[[AggregatorService, list[ParticipantWorker]], bool] = lambda s, w: True,
) -> tuple[AggregatorService, list[ParticipantWorker], list[_Recording]]:
    """Run the federation until the aggregator took ``until`` reports and ``also``."""
    broker = MemoryBroker()
    service = AggregatorService(
        spec,
        store,
        MemoryTransport(broker, "fedq-aggregator"),
        ServiceConfig(pause_poll_s=0.1, signing_key=None if keys is None else AGGREGATOR_KEY),
    )
    stop, bank_stop = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    transports = [_Recording(broker, n) for n in spec.participants]
    workers = [
        ParticipantWorker(
            spec,
            WorkerConfig(
                participant=n,
                seed=i,
                delay_s=0.01,
                wait_for_model_s=0.2,
                recent=recent[n],
                paused_retry_s=0.2,
                signing_key=None if keys is None else keys[n],
            ),
            transports[i],
            shards[n],
        )
        for i, n in enumerate(spec.participants)
    ]
    tasks = [asyncio.create_task(w.run(bank_stop)) for w in workers]
    assert service.reports is not None
    async with asyncio.timeout(90):
        while service.reports.taken < until or not also(service, workers):
            await asyncio.sleep(0.02)
    bank_stop.set()
    await asyncio.gather(*tasks)
    stop.set()
    await running
    return service, workers, transports


def _store() -> RedisModelStore:
    return RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))


async def test_one_banks_drift_is_found_there_only_and_no_row_leaves_a_bank(tmp_path: Path) -> None:
    names = ("bank-01", "bank-02", "bank-03")
    keys = {n: SigningKey.generate() for n in names}
    spec, shards = _spec(keys={n: k.public.text for n, k in keys.items()})
    assert spec.participants == names
    recent = _recent(shards, tmp_path, spec)
    store = _store()
    service, workers, transports = await _run(spec, shards, recent, store, until=12, keys=keys)
    assert service.reports is not None and service.reports.refused == 0

    drift = await store.monitoring.drift(spec.task_id)
    assert sorted(drift) == list(names)
    drifting = names[DRIFTING_BANK_INDEX]
    over = {n: drift[n]["drifted"] for n in names}
    # The shifted bank: exactly its two shifted features, and the score they move.
    assert set(over[drifting]) - {SCORE} == set(SHIFTED)
    for name in SHIFTED:
        assert drift[drifting]["features"][name]["psi"] > 1.0
    # Everyone else: nothing over the threshold, every feature well below it.
    for name in names:
        if name != drifting:
            assert over[name] == [], (name, over[name])
            assert max(f["psi"] for f in drift[name]["features"].values()) < 0.1
    signals = await store.monitoring.retrain_signals(spec.task_id)
    assert signals and {s["participant"] for s in signals} == {drifting}
    assert all(set(s["drifted"]) - {SCORE} == set(SHIFTED) for s in signals)
    # Evaluations of versions the store holds, by the banks whose recent rows carry labels.
    evaluations = await store.monitoring.evaluations(spec.task_id)
    assert {e["participant"] for e in evaluations} == set(names)
    assert all(0.0 < e["metrics"]["auc"] < 1.0 for e in evaluations)

    # Every message every bank published: updates, summaries, evaluations; no rows.
    for worker, transport in zip(workers, transports, strict=True):
        kinds = {KIND_UPDATE: 0, KIND_DRIFT: 0, KIND_EVALUATION: 0}
        for body in transport.published:
            kind = peek_kind(body)
            assert kind in kinds, kind
            kinds[kind] += 1
            if kind == KIND_UPDATE:
                env = decode_update(body)
                assert {k: tuple(t.shape) for k, t in env.tensors.items()} == {
                    k: tuple(t.shape) for k, t in service.head_params.items()
                }
                assert set(env.metrics) <= {
                    "train_loss",
                    "val_loss",
                    "val_brier",
                    "val_positive_rate",
                    "val_n",
                    "val_auc",
                    "val_pr_auc",
                }
            elif kind == KIND_DRIFT:
                d = decode_drift(body)
                assert sorted(d.features) == sorted(f.name for f in spec.features)
                assert d.rows == published_rows(len(shards[worker.config.participant]))
                assert all(round(f.psi, 2) == f.psi for f in d.features.values())
            else:
                e = decode_evaluation(body)
                assert set(e.metrics) <= {
                    "auc",
                    "pr_auc",
                    "ks",
                    "log_loss",
                    "brier",
                    "positive_rate",
                }
            # At most a few numbers per feature: no array longer than the features, no
            # byte string but hashes, ids and signatures (and an update's tensors).
            if kind != KIND_UPDATE:
                _assert_small(msgpack.unpackb(body, raw=False), len(spec.features))
        assert kinds[KIND_DRIFT] == worker.stats.drift_published >= 1
        assert kinds[KIND_EVALUATION] == worker.stats.evaluations_published >= 1
        assert kinds[KIND_UPDATE] == worker.stats.published >= 1


def _assert_small(value: object, features: int) -> None:
    if isinstance(value, dict):
        assert len(value) <= max(features, 12)
        for v in value.values():
            _assert_small(v, features)
    elif isinstance(value, list):
        raise AssertionError(f"an array in a report: {value!r:.80}")
    elif isinstance(value, bytes):
        assert len(value) in (32, 64), len(value)  # a hash or a signature


async def test_hostile_reports_are_dead_lettered_with_their_reason_and_never_kept() -> None:
    names = ("bank-01", "bank-02", "bank-03")
    keys = {n: SigningKey.generate() for n in names}
    spec, _ = _spec(keys={n: k.public.text for n, k in keys.items()})
    store = _store()
    broker = MemoryBroker()
    agg = MemoryTransport(broker, "fedq-aggregator")
    service = AggregatorService(spec, store, agg, ServiceConfig(signing_key=AGGREGATOR_KEY))
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await asyncio.wait_for(service.ready.wait(), 30)
    head = await store.get_head(spec.task_id)
    features = {
        f.name: FeatureDrift(0.9, 0.5 if f.kind == "numeric" else None) for f in spec.features
    }

    def drift(who: str, **kw: object) -> DriftSummary:
        fields: dict[str, object] = {
            "task": spec.task_id,
            "participant": who,
            "summary_id": uuid.uuid4().hex,
            "spec_hash": spec.spec_hash(),
            "version": 0,
            "rows": 500,
            "features": features,
            "score": FeatureDrift(0.9, 0.5),
            "created_at": 1.0,
        }
        return DriftSummary(**(fields | kw))  # type: ignore[arg-type]

    def evaluation(who: str, **kw: object) -> Evaluation:
        fields: dict[str, object] = {
            "task": spec.task_id,
            "participant": who,
            "evaluation_id": uuid.uuid4().hex,
            "spec_hash": spec.spec_hash(),
            "version": 0,
            "version_hash": head.version_hash,
            "rows": 500,
            "metrics": {"auc": 0.99},
            "created_at": 1.0,
        }
        return Evaluation(**(fields | kw))  # type: ignore[arg-type]

    a, b = "bank-01", "bank-02"
    hostile = [
        # bank-01 speaks for bank-02 (signed with its own key, or with bank-02's name)
        (a, encode_drift(drift(b), keys[a]), Refusal.SENDER_MISMATCH),
        (b, encode_drift(drift(b), keys[a]), Refusal.BAD_SIGNATURE),
        (a, encode_drift(drift(a)), Refusal.UNSIGNED),
        (a, encode_drift(drift(a, spec_hash=bytes(32)), keys[a]), Refusal.SPEC_MISMATCH),
        (a, encode_drift(drift(a, version=99), keys[a]), Refusal.FUTURE_BASE),
        (
            a,
            encode_drift(drift(a, features={"x": FeatureDrift(9.0)}), keys[a]),
            Refusal.INVALID_FIELD,
        ),
        # an evaluation of a version that is not the store's version 0
        (
            a,
            encode_evaluation(evaluation(a, version_hash=bytes(32)), keys[a]),
            Refusal.INVALID_FIELD,
        ),
        # an evaluation with a metric of the bank's own naming (a label per name)
        (
            a,
            encode_evaluation(evaluation(a, metrics={"<img src=x>": 1.0}), keys[a]),
            Refusal.INVALID_FIELD,
        ),
        (a, b"\x81\xa1k\xa2ds", Refusal.UNSUPPORTED_VERSION),
    ]
    for sender, body, _ in hostile:
        await MemoryTransport(broker, sender).publish_update(
            spec.task_id, sender, body, message_id=uuid.uuid4().hex
        )
    # One honest summary and evaluation after them: taken.
    await MemoryTransport(broker, a).publish_update(
        spec.task_id, a, encode_drift(drift(a), keys[a]), message_id=uuid.uuid4().hex
    )
    await MemoryTransport(broker, a).publish_update(
        spec.task_id, a, encode_evaluation(evaluation(a), keys[a]), message_id=uuid.uuid4().hex
    )
    assert service.reports is not None
    async with asyncio.timeout(30):
        while service.reports.taken + service.reports.refused < len(hostile) + 2:
            await asyncio.sleep(0.01)
    stop.set()
    await running
    dead = await agg.dead_letters(spec.task_id)
    assert [d.reason for d in dead] == [r.value for _, _, r in hostile]
    assert service.reports.taken == 2
    assert list(await store.monitoring.drift(spec.task_id)) == [a]
    assert [e["participant"] for e in await store.monitoring.evaluations(spec.task_id)] == [a]
    assert service.head_version == 0  # no report moves the model


@pytest.mark.parametrize("on_drift", ["resume", "record"])
async def test_a_paused_task_refuses_updates_until_a_drift_signal_resumes_it(
    tmp_path: Path, on_drift: str
) -> None:
    spec, shards = _spec(on_drift=on_drift)
    recent = _recent(shards, tmp_path, spec)
    store = _store()
    assert await store.monitoring.pause(spec.task_id, 0.0, 0, "frozen for the test")
    paused = Refusal.TRAINING_PAUSED.value

    def banks_told(service: AggregatorService, workers: list[ParticipantWorker]) -> bool:
        # record: every bank got a training_paused receipt; resume: versions follow
        if on_drift == "resume":
            return service.head_version >= 2
        return all(w.stats.refused.get(paused, 0) >= 1 for w in workers)

    service, workers, _ = await _run(spec, shards, recent, store, until=9, also=banks_told)
    signals = await store.monitoring.retrain_signals(spec.task_id)
    assert signals and all(s["action"] == on_drift for s in signals)
    assert {s["participant"] for s in signals} == {spec.participants[DRIFTING_BANK_INDEX]}
    if on_drift == "resume":
        # The drifting bank's first summary resumed training: versions follow, from
        # updates the banks sent again after their training_paused receipts.
        assert await store.monitoring.paused(spec.task_id) is None
        assert service.paused is None
        assert service.head_version > 0
    else:
        # Recorded only: still paused, every update refused, the model untouched.
        assert await store.monitoring.paused(spec.task_id) is not None
        assert service.head_version == 0
        assert set(service.stats.refused) == {paused}  # nothing else refused, ...
        assert 3 <= service.stats.refused[paused] <= sum(w.stats.published for w in workers)
        assert service.stats.accepted == 0  # ... and nothing accepted


async def test_a_redelivered_or_stale_signal_never_ends_a_later_pause() -> None:
    spec, _ = _spec(on_drift="resume")
    store = _store()
    m, task = store.monitoring, spec.task_id

    def summary(version: int, sid: str) -> dict[str, object]:
        return {"summary_id": sid, "version": version, "at": 1.0}

    def signal(sid: str) -> dict[str, object]:
        return {"summary_id": sid, "participant": "bank-01", "at": 1.0}

    assert await m.pause(task, 0.0, 3, "")
    first = uuid.uuid4().hex
    taken = await m.save_drift(task, "bank-01", summary(4, first), signal(first), resume=True)
    assert (taken.taken, taken.resumed) == (True, True)
    assert await m.paused(task) is None
    # The operator pauses again at version 6; the same summary is delivered again.
    assert await m.pause(task, 0.0, 6, "frozen again")
    again = await m.save_drift(task, "bank-01", summary(4, first), signal(first), resume=True)
    assert (again.taken, again.resumed) == (False, False)
    # A new summary of a version before the pause: recorded, the pause stays.
    stale = uuid.uuid4().hex
    late = await m.save_drift(task, "bank-01", summary(5, stale), signal(stale), resume=True)
    assert (late.taken, late.resumed) == (True, False)
    assert (await m.paused(task) or {}).get("version") == 6
    # Signals: one per bank kept as its newest, every one in the capped log.
    for _ in range(30):
        sid = uuid.uuid4().hex
        await m.save_drift(task, "bank-01", summary(5, sid), signal(sid), resume=False)
    assert await m.retrain_count(task) == 32
    client = store._r
    assert await client.hlen(store.keys.retrain(task)) == 1
    assert await client.hlen(store.keys.drift(task)) == 1
