"""Forged updates and models through a real RabbitMQ loaded with broker_config/, over TLS.

Each party connects as its own user of definitions.json (bank-a, bank-b,
fedq-aggregator) to a private node running the shipped configuration: TLS only,
the shipped permissions. What a thief of a bank's broker password (but not of its
signing key) or of the aggregator's broker password can send is refused with its
reason, nothing is applied, and both sides' metrics and the bank's receipts count
it. Then a whole simulation runs over TLS on both servers with per-bank users and
signatures required, and the auditor's replay verifies every signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import uuid
from collections.abc import AsyncIterator, Callable

import numpy as np
import pandas as pd
import pytest
import torch

from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, connect_redis
from common.models import build_task_model, model_tensors
from common.refusals import Refusal
from common.signing import SigningKey
from common.spec import NumericFeature, TargetSpec, TaskSpec
from common.transport.amqp import AmqpTransport
from common.wire import (
    ModelEnvelope,
    UpdateEnvelope,
    decode_update,
    encode_model,
    encode_update,
    sign_model,
)
from fedq.simulate import SimulationConfig, run_simulation
from participant.metrics import ParticipantMetrics
from participant.receipts import ReceiptTracker, aggregator_key
from participant.worker import ParticipantWorker, WorkerConfig, WorkerStats
from tests.helpers import party_key, signed_identity
from tests.servers import (  # noqa: F401
    AGGREGATOR,
    PrivateRabbit,
    PrivateRedis,
    private_rabbit_fixture,
    private_redis_fixture,
    replay_as_auditor,
)

pytestmark = [pytest.mark.real, pytest.mark.slow]

BANKS = ("bank-a", "bank-b")


def _spec() -> TaskSpec:
    return TaskSpec(
        task_id=f"id{uuid.uuid4().hex[:10]}",
        features=tuple(NumericFeature(name=f"x{i}") for i in range(3)),
        target=TargetSpec(name="y"),
        participants=BANKS,
        identity=signed_identity(BANKS, AGGREGATOR),
    )


def _rows(seed: int, n: int = 120) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = (x @ np.array([1.0, -1.0, 0.5]) + rng.normal(scale=0.5, size=n) > 0).astype(int)
    return pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2], "y": y})


@dataclasses.dataclass
class _Rig:
    spec: TaskSpec
    store: RedisModelStore
    service: AggregatorService
    metrics: AggregatorMetrics
    agg: AmqpTransport
    stop: asyncio.Event
    task: asyncio.Task[None]


@pytest.fixture
async def rig(private_rabbit: PrivateRabbit) -> AsyncIterator[_Rig]:
    spec = _spec()
    store = RedisModelStore(connect_redis("memory://"))
    agg = await AmqpTransport.connect(private_rabbit.url_for(AGGREGATOR), name="id-aggregator")
    metrics = AggregatorMetrics()
    service = AggregatorService(
        spec,
        store,
        agg,
        ServiceConfig(signing_key=party_key(AGGREGATOR), lease_ttl_s=5.0),
        metrics,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    async with asyncio.timeout(30):
        await service.ready.wait()
    yield _Rig(spec, store, service, metrics, agg, stop, task)
    stop.set()
    await asyncio.gather(task, return_exceptions=True)
    await agg.close()
    await store.close()


async def _until(cond: Callable[[], bool], seconds: float = 30.0) -> None:
    async with asyncio.timeout(seconds):
        while not cond():
            await asyncio.sleep(0.05)


def _seen(worker: ParticipantWorker, reason: str) -> bool:
    return worker.stats.models_refused[reason] > 0


def _delta(spec: TaskSpec, value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in model_tensors(build_task_model(spec)).items()}


def _body(spec: TaskSpec, key: SigningKey | None, value: float, uid: str) -> bytes:
    body, _ = encode_update(
        UpdateEnvelope(
            task=spec.task_id,
            participant="bank-a",
            update_id=uid,
            base_version=0,
            num_samples=10,
            tensors=_delta(spec, value),
            spec_hash=spec.spec_hash(),
        ),
        key,
    )
    return body


async def test_forged_updates_and_models_are_refused_and_counted_on_both_sides(
    rig: _Rig, private_rabbit: PrivateRabbit
) -> None:
    spec, own = rig.spec, party_key("bank-a")
    bank = await AmqpTransport.connect(private_rabbit.url_for("bank-a"), name="id-bank-a")
    stats, bank_metrics = WorkerStats(), ParticipantMetrics()
    tracker = ReceiptTracker(
        bank, spec.task_id, "bank-a", stats, key=aggregator_key(spec), metrics=bank_metrics
    )
    tracker.linked(asyncio.Event())
    try:
        good = _body(spec, own, 0.01, "good")
        good_env = decode_update(good)
        assert good_env.signature is not None
        # Altered in transit: a payload byte flipped (the content hash no longer matches).
        flipped = bytearray(_body(spec, own, 0.02, "flipped"))
        payload_at = len(flipped) // 2
        flipped[payload_at] ^= 0x01
        # Altered in transit and re-hashed: other values under the bank's signature.
        rehashed, _ = encode_update(
            dataclasses.replace(
                decode_update(_body(spec, own, 0.03, "rehashed")), tensors=_delta(spec, 9.0)
            )
        )
        # Signed with another bank's key; an old signature on new content; unsigned.
        other_key = _body(spec, party_key("bank-b"), 0.04, "other-key")
        replayed, _ = encode_update(
            dataclasses.replace(
                decode_update(_body(spec, None, 0.05, "replayed")), signature=good_env.signature
            )
        )
        unsigned = _body(spec, None, 0.06, "unsigned")
        sent = {
            "good": good,
            "flipped": bytes(flipped),
            "rehashed": rehashed,
            "other-key": other_key,
            "replayed": replayed,
            "unsigned": unsigned,
        }
        for uid, body in sent.items():
            await bank.publish_update(spec.task_id, "bank-a", body, message_id=uid)
            stats.published += 1
            stats.published_ids.append(uid)
        async with asyncio.timeout(30):
            while tracker.counted < len(sent):
                await asyncio.sleep(0.05)

        assert await rig.store.head(spec.task_id) == 1  # only the good one was applied
        record = await rig.store.get_version(spec.task_id, 1)
        assert [e.update_id for e in record.lineage] == ["good"]
        fates = {uid: (r.outcome, r.reason) for uid, r in tracker.fates.items()}
        assert fates["good"][0] == "accepted"
        expected = {
            "rehashed": Refusal.BAD_SIGNATURE,
            "other-key": Refusal.BAD_SIGNATURE,
            "replayed": Refusal.BAD_SIGNATURE,
            "unsigned": Refusal.UNSIGNED,
        }
        for uid, reason in expected.items():
            assert fates[uid] == ("refused", reason), (uid, fates[uid])
        assert fates["flipped"][0] == "refused"
        assert fates["flipped"][1] in (Refusal.HASH_MISMATCH, Refusal.CODEC_ERROR)
        # The bank's counts (stats and its Prometheus counters) and the aggregator's.
        assert stats.accepted == 1 and sum(stats.refused.values()) == 5
        assert stats.refused[Refusal.BAD_SIGNATURE] == 3
        assert stats.refused[Refusal.UNSIGNED] == 1
        assert bank_metrics.receipts.labels("refused", "bad_signature")._value.get() == 3
        refused = rig.metrics.refused
        assert refused.labels(spec.task_id, "bad_signature")._value.get() == 3
        assert refused.labels(spec.task_id, "unsigned")._value.get() == 1
        # A permanent refusal stops the bank's worker from publishing more.
        assert tracker.stopped is not None
    finally:
        await tracker.close()
        await bank.close()

    # Forged model announcements, sent with the aggregator's broker credentials but
    # without its signing key: bank-b's worker refuses them and trains only on real ones.
    transport = await AmqpTransport.connect(private_rabbit.url_for("bank-b"), name="id-bank-b")
    metrics = ParticipantMetrics()
    worker = ParticipantWorker(
        spec,
        WorkerConfig(participant="bank-b", signing_key=party_key("bank-b"), wait_for_model_s=0.2),
        transport,
        _rows(1),
        metrics=metrics,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        await _until(lambda: worker.stats.models_seen >= 1, 30)
        head = rig.service.head_version
        forged_version = head + 1000
        tensors = {k: v + 5.0 for k, v in model_tensors(build_task_model(spec)).items()}
        blob, digest = encode_model(
            ModelEnvelope(
                task=spec.task_id,
                version=forged_version,
                tensors=tensors,
                version_hash=b"\x09" * 32,
            )
        )
        for key, why in ((party_key("bank-a"), "bad_signature"), (None, "unsigned")):
            body = sign_model(
                blob,
                task=spec.task_id,
                version=forged_version,
                version_hash=b"\x09" * 32,
                content_hash=digest,
                spec_hash=spec.spec_hash(),
                ancestors=(rig.service.head_hash,),
                signing_key=key,
            )
            # A worker takes only the newest announcement it received: a real one right
            # after the forged one supersedes it. Send it again until the worker saw it.
            async with asyncio.timeout(30):
                while worker.stats.models_refused[why] == 0:
                    await rig.agg.announce_model(spec.task_id, forged_version, body)
                    with contextlib.suppress(TimeoutError):
                        await _until(functools.partial(_seen, worker, why), 2)
        assert set(worker.stats.models_refused) == {"bad_signature", "unsigned"}
        for name, count in worker.stats.models_refused.items():
            assert metrics.models_refused.labels(name)._value.get() == count
        assert worker.stats.last_version < head + 1000  # never trained on a forged model
        await _until(lambda: worker.stats.published >= 2, 30)
    finally:
        stop.set()
        await asyncio.gather(running, return_exceptions=True)
        await transport.close()
    bases = [
        e.base_version
        for v in range(1, rig.service.head_version + 1)
        for e in (await rig.store.get_version(spec.task_id, v)).lineage
    ]
    assert bases and max(bases) < head + 1000


async def test_a_simulation_over_tls_with_per_bank_users_and_signatures_verifies(
    private_rabbit: PrivateRabbit, private_redis: PrivateRedis
) -> None:
    result = await run_simulation(
        SimulationConfig(
            participants=len(BANKS),
            versions=30,
            seconds=60,
            amqp_url=private_rabbit.url_for(AGGREGATOR),
            bank_urls={b: private_rabbit.url_for(b) for b in BANKS},
            redis_url=private_redis.url_for(AGGREGATOR),
        )
    )
    assert result.versions == 30
    assert set(result.participants) == set(BANKS)
    assert result.updates_refused == 0
    report = await asyncio.to_thread(replay_as_auditor, private_rabbit, private_redis, result.task)
    assert report["checked"] == 30
    assert report["signatures"] == result.updates_accepted
