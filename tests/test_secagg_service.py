"""Secure aggregation through the aggregator service, on the in-process and the real
broker and store: masked updates, the cohort's decision, unmask requests and answers,
dropouts, a restart while unmasking, and whole simulations in sync and FedBuff mode."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import fakeredis
import pytest
import redis.asyncio as aioredis
import torch

from aggregator import aggregate
from aggregator.audit.replay import index_answers, index_updates, replay
from aggregator.privacy import draw
from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, StoreConfig
from common.models import build_task_model, model_tensors
from common.refusals import Refusal
from common.secagg import quantization_bound
from common.spec import NumericFeature, SecureAggregationSpec, SyncSettings, TargetSpec, TaskSpec
from common.transport import Transport, next_or_none
from common.transport.amqp import AmqpTransport
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import (
    KIND_UNMASK_REQUEST,
    Tensors,
    UpdateEnvelope,
    decode_receipt,
    encode_update,
    peek_kind,
)
from fedq.simulate import SimulationConfig, run_simulation
from participant.secagg import Masker, Revealer
from tests.bank_users import shared_bank_urls
from tests.helpers import AMQP_URL, REDIS_URL, delete_queues, party_key, secagg_identity, wait_for

AGGREGATOR = "fedq-aggregator"
N = 10


def _spec(n: int = N, **sync: object) -> TaskSpec:
    names = tuple(f"bank-{i + 1:02d}" for i in range(n))
    return TaskSpec(
        task_id=f"sas{uuid.uuid4().hex[:10]}",
        features=tuple(NumericFeature(name=f"x{i}") for i in range(12)),
        target=TargetSpec(name="y"),
        participants=names,
        mode="sync",
        sync=SyncSettings.model_validate({"deadline_s": 1.0, "min_updates": 2, **sync}),
        identity=secagg_identity(names, AGGREGATOR),
        secure_aggregation=SecureAggregationSpec(cohort_deadline_s=1.0),
    )


@dataclass
class Rig:
    spec: TaskSpec
    store: RedisModelStore
    agg: Transport
    banks: dict[str, Transport]
    real: bool
    client: aioredis.Redis
    prefix: str
    broker: MemoryBroker | None = None
    extra: list[Transport] = field(default_factory=list)

    def config(self) -> ServiceConfig:
        return ServiceConfig(signing_key=party_key(AGGREGATOR), depth_poll_s=0.2)


@pytest.fixture(params=["memory", pytest.param("real", marks=pytest.mark.real)])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    spec = _spec()
    prefix = f"fedqtest-{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        broker = MemoryBroker()
        client: aioredis.Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        banks: dict[str, Transport] = {p: MemoryTransport(broker, p) for p in spec.participants}
        rig = Rig(
            spec,
            RedisModelStore(client, StoreConfig(prefix=prefix)),
            MemoryTransport(broker, AGGREGATOR),
            banks,
            False,
            client,
            prefix,
            broker,
        )
    else:
        # every bank as its own broker user: the aggregator checks each sender
        urls = shared_bank_urls(len(spec.participants))
        client = aioredis.Redis.from_url(REDIS_URL)
        banks = {p: await AmqpTransport.connect(urls[p], name=p) for p in spec.participants}
        rig = Rig(
            spec,
            RedisModelStore(client, StoreConfig(prefix=prefix)),
            await AmqpTransport.connect(AMQP_URL, name="secagg-aggregator"),
            banks,
            True,
            client,
            prefix,
        )
    yield rig
    for t in [rig.agg, *rig.banks.values(), *rig.extra]:
        await t.close()
    if rig.real:
        await delete_queues(spec.task_id, spec.participants)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    await rig.store.close()


def _deltas(spec: TaskSpec) -> dict[str, Tensors]:
    g = torch.Generator().manual_seed(3)
    like = model_tensors(build_task_model(spec))
    return {
        p: {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in like.items()}
        for p in spec.participants
    }


def _samples(spec: TaskSpec) -> dict[str, int]:
    return {p: 40 + 7 * i for i, p in enumerate(spec.participants)}


def _masked_body(
    spec: TaskSpec, name: str, delta: Tensors, samples: int, cohort: int = 0
) -> tuple[str, bytes]:
    tensors, block = Masker(spec, name, party_key(name)).masked(delta, cohort, cohort, samples)
    uid = uuid.uuid4().hex
    body, _ = encode_update(
        UpdateEnvelope(
            task=spec.task_id,
            participant=name,
            update_id=uid,
            base_version=cohort,
            num_samples=samples,
            tensors=tensors,
            codec="raw",
            spec_hash=spec.spec_hash(),
            secagg=block,
        ),
        party_key(name),
    )
    return uid, body


@dataclass
class Bank:
    """A hand-driven bank: answers the unmask requests on its receipt queue."""

    name: str
    transport: Transport
    spec: TaskSpec
    requests: int = 0
    receipts: list[tuple[str, str]] = field(default_factory=list)

    async def answer(self, stop: asyncio.Event) -> None:
        revealer = Revealer(
            self.spec, self.name, party_key(self.name), party_key(AGGREGATOR).public
        )
        sub = await self.transport.consume_receipts(self.spec.task_id, self.name)
        try:
            while not stop.is_set():
                d = await next_or_none(sub, stop)
                if d is None:
                    break
                if peek_kind(d.body) == KIND_UNMASK_REQUEST:
                    self.requests += 1
                    answer_id, _, out = revealer.answer(d.body)
                    await self.transport.publish_update(
                        self.spec.task_id, self.name, out, message_id=answer_id
                    )
                else:
                    r = decode_receipt(d.body)
                    self.receipts.append((r.outcome, r.reason))
                await d.ack()
        finally:
            await sub.close()


async def _replays(transport: Transport, store: RedisModelStore, task: str, secure: int) -> None:
    bodies = [b async for b in transport.read_audit(task)]
    report = await replay(store, index_updates(bodies), task, answers=index_answers(bodies))
    assert report.ok, report.note
    assert report.secure_versions == secure
    assert report.individually_unmasked == [] and report.cohort_problems == []
    assert report.cohorts_checked >= secure


def _plain(
    spec: TaskSpec,
    head: Tensors,
    deltas: dict[str, Tensors],
    samples: dict[str, int],
    names: list[str],
) -> Tensors:
    raw = [float(samples[p]) for p in names]
    return aggregate.weighted_sum(head, [deltas[p] for p in names], aggregate.round_weights(raw))


def _close_to(got: Tensors, want: Tensors, bound: float) -> float:
    worst = 0.0
    for name in want:
        diff = (got[name].double() - want[name].double()).abs().max().item()
        ulp = float(torch.finfo(torch.float32).eps) * max(1.0, want[name].abs().max().item())
        assert diff <= bound + ulp, (name, diff, bound)
        worst = max(worst, diff)
    return worst


async def test_ten_banks_three_drop_out_after_sharing_keys_and_the_round_is_the_seven(
    rig: Rig,
) -> None:
    spec, task = rig.spec, rig.spec.task_id
    service = AggregatorService(spec, rig.store, rig.agg, rig.config())
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set(), 20)
    head = (await rig.store.get_params(task, 0)).tensors
    deltas, samples = _deltas(spec), _samples(spec)
    banks = {p: Bank(p, rig.banks[p], spec) for p in spec.participants}
    answering = [asyncio.create_task(b.answer(stop)) for b in banks.values()]
    # every bank masks its update and shares its seeds; three never send theirs
    bodies = {p: _masked_body(spec, p, deltas[p], samples[p]) for p in spec.participants}
    gone = list(spec.participants[2:5])
    stayed = [p for p in spec.participants if p not in gone]
    for p in stayed:
        uid, body = bodies[p]
        await rig.banks[p].publish_update(task, p, body, message_id=uid)
    await wait_for(lambda: service.head_version == 1, 30)
    record = await rig.store.get_version(task, 1)
    info = record.info["secagg"]
    assert info["survivors"] == stayed and info["dropped"] == gone
    assert len(info["answers"]) >= info["threshold"] == 6
    params = (await rig.store.get_params(task, 1)).tensors
    sa = spec.secure_aggregation
    assert sa is not None
    bound = quantization_bound(len(stayed), sa.fraction_bits) * float(info["scale"])
    _close_to(params, _plain(spec, head, deltas, samples, stayed), bound)
    assert [e.participant for e in record.lineage] == stayed
    # the three that dropped were asked nothing; the seven got one request each
    await wait_for(lambda: all(banks[p].receipts for p in stayed), 10)
    assert all(banks[p].requests == 0 for p in gone)
    assert all(banks[p].requests == 1 for p in stayed)
    assert all(banks[p].receipts == [("accepted", "")] for p in stayed)
    # the decision was saved before the requests left
    saved = json.loads(await rig.store.get_cohort(task, 0) or "{}")
    assert saved == {
        "cohort": 0,
        "survivors": stayed,
        "dropped": gone,
        "updates": {p: bodies[p][0] for p in stayed},
    }
    # a masked update of that round arriving now is late (its cohort is committed)
    late_uid, late = bodies[gone[0]]
    await rig.banks[gone[0]].publish_update(task, gone[0], late, message_id=late_uid)
    await wait_for(lambda: ("refused", Refusal.STALE_ROUND.value) in banks[gone[0]].receipts, 10)
    stop.set()
    await running
    # The audit stream holds the masked updates and the answers: replay recomputes the
    # sum and the version bit for bit, and finds no bank unmasked on its own.
    await _replays(rig.agg, rig.store, task, secure=1)
    for t in answering:
        await t


async def test_below_the_minimum_nothing_is_asked_and_a_restart_asks_the_same_question() -> None:
    spec = _spec(min_updates=2)
    task = spec.task_id
    broker = MemoryBroker()
    client: aioredis.Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    store = RedisModelStore(client)
    config = ServiceConfig(signing_key=party_key(AGGREGATOR), depth_poll_s=0.2)
    service = AggregatorService(spec, store, MemoryTransport(broker, AGGREGATOR), config)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set())
    head = (await store.get_params(task, 0)).tensors
    deltas, samples = _deltas(spec), _samples(spec)
    banks = {p: MemoryTransport(broker, p) for p in spec.participants}
    threshold = 6  # a majority of 10
    early = list(spec.participants[: threshold - 1])
    for p in early:
        uid, body = _masked_body(spec, p, deltas[p], samples[p])
        await banks[p].publish_update(task, p, body, message_id=uid)
    await wait_for(lambda: service.cohort is not None and len(service.cohort.updates) == 5)
    await asyncio.sleep(1.5)  # the round's deadline passes below the minimum cohort
    assert service.cohort is not None and service.cohort.decision is None
    assert await store.get_cohort(task, 0) is None  # nothing decided, nothing asked
    # the sixth closes the overdue round; the aggregator saves its decision and asks,
    # then stops before any bank answers (the banks are not listening yet)
    sixth = spec.participants[threshold - 1]
    uid, body = _masked_body(spec, sixth, deltas[sixth], samples[sixth])
    await banks[sixth].publish_update(task, sixth, body, message_id=uid)
    await wait_for(lambda: service.cohort is not None and service.cohort.decision is not None)
    health = await service.health()
    assert health["cohort"] == {
        "number": 0,
        "updates": 6,
        "minimum": 6,
        "decided": True,
        "answers": 0,
        "threshold": 6,
        "asked": 1,
    }
    stayed = [*early, sixth]
    stop.set()
    await running
    # A new aggregator: the same decision, asked again once the updates are back.
    service2 = AggregatorService(spec, store, MemoryTransport(broker, AGGREGATOR), config)
    stop2 = asyncio.Event()
    running2 = asyncio.create_task(service2.run(stop2))
    await wait_for(lambda: service2.ready.is_set())
    assert service2.cohort is not None and service2.cohort.decision is not None
    assert list(service2.cohort.decision.survivors) == stayed
    # a seventh bank arrives now: too late for the decided cohort
    seventh = spec.participants[threshold]
    uid7, body7 = _masked_body(spec, seventh, deltas[seventh], samples[seventh])
    await banks[seventh].publish_update(task, seventh, body7, message_id=uid7)
    hands = {p: Bank(p, banks[p], spec) for p in [*stayed, seventh]}
    answering = [asyncio.create_task(b.answer(stop2)) for b in hands.values()]
    await wait_for(lambda: service2.head_version == 1, 20)
    params = (await store.get_params(task, 1)).tensors
    record = await store.get_version(task, 1)
    sa = spec.secure_aggregation
    assert sa is not None
    bound = quantization_bound(len(stayed), sa.fraction_bits) * float(
        record.info["secagg"]["scale"]
    )
    _close_to(params, _plain(spec, head, deltas, samples, stayed), bound)
    # each survivor was asked twice (before and after the restart), the same question,
    # and answered both times; the version used one answer per survivor
    assert all(hands[p].requests == 2 for p in stayed)
    await wait_for(lambda: ("refused", Refusal.COHORT_CLOSED.value) in hands[seventh].receipts, 10)
    stop2.set()
    await running2
    for t in answering:
        await t
    await _replays(MemoryTransport(broker, AGGREGATOR), store, task, secure=1)
    await store.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_simulated_federation_with_secure_aggregation_learns(mode: str) -> None:
    config = SimulationConfig(
        mode=mode,  # type: ignore[arg-type]
        participants=5,
        versions=6 if mode == "sync" else 12,
        seconds=90.0,
        patience=0,
        secure_aggregation={},
        baseline_epochs=5,
    )
    result = await run_simulation(config)
    assert result.versions >= (6 if mode == "sync" else 12)
    assert result.final_auc > 0.7 > result.initial_auc
    assert result.updates_accepted > 0
    if mode == "sync":
        assert result.updates_refused == 0  # every bank's update is in every round's sum
    else:  # only late arrivals at a closed cohort are refused, never anything else
        assert set(result.refused_by_reason) <= {Refusal.COHORT_CLOSED.value}


async def test_bank_level_dp_with_secure_aggregation_noises_the_sum_of_clipped_updates() -> None:
    base = _spec(n=5, min_updates=5)
    spec = TaskSpec.parse(
        {
            **base.model_dump(mode="json", by_alias=True),
            "privacy": {"bank": {"clip": 0.2, "noise_multiplier": 1.5}},
        }
    )
    task = spec.task_id
    broker = MemoryBroker()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    config = ServiceConfig(signing_key=party_key(AGGREGATOR), depth_poll_s=0.2)
    service = AggregatorService(spec, store, MemoryTransport(broker, AGGREGATOR), config)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set())
    head = (await store.get_params(task, 0)).tensors
    deltas, samples = _deltas(spec), _samples(spec)
    banks = {p: Bank(p, MemoryTransport(broker, p), spec) for p in spec.participants}
    answering = [asyncio.create_task(b.answer(stop)) for b in banks.values()]
    for p in spec.participants:
        uid, body = _masked_body(spec, p, deltas[p], samples[p])
        await banks[p].transport.publish_update(task, p, body, message_id=uid)
    await wait_for(lambda: service.head_version == 1, 20)
    record = await store.get_version(task, 1)
    privacy = record.info["privacy"]
    assert privacy["clipped_fraction"] is None  # each bank clipped its own update
    assert privacy["noise_std"] > 0 and privacy["epsilon"] > 0
    # The version is the FedAvg of the clipped deltas (each bank scaled its delta to L2
    # norm 0.2 before masking) plus the recorded seed's noise, up to the quantization.
    clipped = {}
    for p, d in deltas.items():
        norm = sum(float((t.double() ** 2).sum()) for t in d.values()) ** 0.5
        assert norm > 0.2  # the bound did clip
        clipped[p] = {k: (t.double() * (0.2 / norm)).float() for k, t in d.items()}
    plain = _plain(spec, head, clipped, samples, list(spec.participants))
    shapes = {k: t.shape for k, t in head.items()}
    noise, _ = draw(shapes, privacy["noise_std"], privacy["seed"])
    want = {k: (plain[k].double() + noise[k]).float() for k in plain}
    params = (await store.get_params(task, 1)).tensors
    sa = spec.secure_aggregation
    assert sa is not None
    bound = quantization_bound(5, sa.fraction_bits) * float(record.info["secagg"]["scale"])
    _close_to(params, want, bound + 1e-6)  # + float32 rounding of the clipped deltas
    assert any((params[k] - plain[k]).abs().max() > 10 * bound for k in params)  # noised
    stop.set()
    await running
    for t in answering:
        await t
    await _replays(MemoryTransport(broker, AGGREGATOR), store, task, secure=1)
    await store.close()


async def test_a_cohort_without_enough_answers_is_given_up_and_the_next_one_goes_on() -> None:
    spec = _spec(n=5, min_updates=3)
    task = spec.task_id
    broker = MemoryBroker()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    config = ServiceConfig(signing_key=party_key(AGGREGATOR), depth_poll_s=0.2)
    service = AggregatorService(spec, store, MemoryTransport(broker, AGGREGATOR), config)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set())
    head = (await store.get_params(task, 0)).tensors
    deltas, samples = _deltas(spec), _samples(spec)
    banks = {p: Bank(p, MemoryTransport(broker, p), spec) for p in spec.participants}
    # every bank sends; only two (below t = 3) answer: the cohort cannot be unmasked
    for p in spec.participants:
        uid, body = _masked_body(spec, p, deltas[p], samples[p])
        await banks[p].transport.publish_update(task, p, body, message_id=uid)
    quiet = asyncio.Event()
    answering = [asyncio.create_task(banks[p].answer(quiet)) for p in spec.participants[:2]]
    await wait_for(lambda: service.head_version == 1, 20)  # after 3 rounds of requests
    record = await store.get_version(task, 1)
    assert record.lineage == ()
    assert "below the threshold 3" in record.info["secagg_failed"]["reason"]
    params = (await store.get_params(task, 1)).tensors
    assert all(torch.equal(params[k], head[k]) for k in head)  # nothing was revealed
    # the next cohort opens under a new number, and a round with every answer commits
    await wait_for(lambda: service.cohort is not None and service.cohort.number == 1)
    listening = [asyncio.create_task(banks[p].answer(quiet)) for p in spec.participants[2:]]
    for p in spec.participants:
        uid, body = _masked_body(spec, p, deltas[p], samples[p], cohort=1)
        await banks[p].transport.publish_update(task, p, body, message_id=uid)
    await wait_for(lambda: service.head_version == 2, 20)
    assert len((await store.get_version(task, 2)).lineage) == 5
    # the banks' first updates were refused, with the reason, and counted
    assert all(("refused", "invalid_update") in banks[p].receipts for p in spec.participants[:2])
    stop.set()
    await running
    quiet.set()
    for t in [*answering, *listening]:
        await t
    await store.close()
