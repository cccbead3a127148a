"""A hostile bank and a store that loses data, through the real broker and Redis.

Each test here failed on the code before it: a store that went backwards started a
fresh chain, an overflowing aggregate crash-looped the service, one repeated update
id stalled every bank while /healthz said ok, and a claimed sample count of 2**62
was accepted.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
import torch

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, StoreConfig
from common.errors import StoreRegressedError
from common.models import build_task_model, model_tensors
from common.refusals import Refusal
from common.spec import AsyncSettings, NumericFeature, TargetSpec, TaskSpec
from common.transport import UpdateDelivery
from common.transport.amqp import AmqpTransport
from common.wire import UpdateEnvelope, encode_update
from tests.helpers import AMQP_URL, REDIS_URL, delete_queues, wait_for

pytestmark = [pytest.mark.real]


def _spec(**kw: object) -> TaskSpec:
    settings = {"strategy": "fedasync", **{k: v for k, v in kw.items() if k in _ASYNC}}
    rest = {k: v for k, v in kw.items() if k not in _ASYNC}
    return TaskSpec.model_validate(
        {
            "task_id": f"hostile{uuid.uuid4().hex[:8]}",
            "features": tuple(NumericFeature(name=f"x{i}") for i in range(4)),
            "target": TargetSpec(name="y"),
            "participants": ("bank-a", "bank-b", "bank-c"),
            "async": AsyncSettings.model_validate(settings),
            **rest,
        }
    )


_ASYNC = {"strategy", "buffer_size", "mixing", "max_staleness"}


class Rig:
    """A task on the real servers: its store, an aggregator, a bank's connection."""

    def __init__(self, spec: TaskSpec, prefix: str) -> None:
        self.spec, self.task, self.prefix = spec, spec.task_id, prefix
        self.client = aioredis.Redis.from_url(REDIS_URL)
        self.store = RedisModelStore(self.client, StoreConfig(prefix=prefix))
        self.services: list[tuple[AggregatorService, asyncio.Task[None], asyncio.Event]] = []
        self.agg: AmqpTransport | None = None
        self.bank: AmqpTransport | None = None

    async def start(self, config: ServiceConfig | None = None) -> AggregatorService:
        if self.agg is None:
            self.agg = await AmqpTransport.connect(AMQP_URL, name="hostile-aggregator")
            self.bank = await AmqpTransport.connect(AMQP_URL, name="hostile-bank")
        service = AggregatorService(
            self.spec,
            self.store,
            self.agg,
            config or ServiceConfig(require_sender_match=False, lease_ttl_s=2.0),
        )
        stop = asyncio.Event()
        running = asyncio.create_task(service.run(stop))
        self.services.append((service, running, stop))
        return service

    async def publish(
        self,
        *,
        participant: str = "bank-a",
        base: int = 0,
        value: float = 0.01,
        n: int = 10,
        uid: str | None = None,
    ) -> str:
        assert self.bank is not None
        uid = uid or uuid.uuid4().hex
        delta = {
            k: torch.full_like(v, value)
            for k, v in model_tensors(build_task_model(self.spec)).items()
        }
        body, _ = encode_update(
            UpdateEnvelope(
                task=self.task,
                participant=participant,
                update_id=uid,
                base_version=base,
                num_samples=n,
                tensors=delta,
                spec_hash=self.spec.spec_hash(),
            )
        )
        await self.bank.publish_update(self.task, participant, body, message_id=uid)
        return uid

    async def dead(self, n: int, seconds: float = 30) -> list[tuple[str, str]]:
        assert self.agg is not None
        out: list[tuple[str, str]] = []
        async with asyncio.timeout(seconds):
            while len(out) < n:
                out += [(d.reason, d.detail) for d in await self.agg.dead_letters(self.task)]
                if len(out) < n:
                    await asyncio.sleep(0.05)
        return out

    async def wipe_store(self) -> None:
        keys = [k async for k in self.client.scan_iter(match=f"{self.prefix}:*")]
        if keys:
            await self.client.delete(*keys)

    async def close(self) -> None:
        for _, running, stop in self.services:
            stop.set()
            try:
                async with asyncio.timeout(30):
                    await running
            except (StoreRegressedError, TimeoutError):
                pass
        for t in (self.agg, self.bank):
            if t is not None:
                await t.close()
        await delete_queues(self.task, self.spec.participants)
        await self.wipe_store()
        await self.store.close()


@pytest.fixture
async def make_rig() -> AsyncIterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(**kw: object) -> Rig:
        rig = Rig(_spec(**kw), f"fedqtest-{uuid.uuid4().hex[:8]}")
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.close()


async def _until(cond: Callable[[], bool]) -> None:
    """:func:`wait_for` with the longer patience of runs on the real servers."""
    await wait_for(cond, seconds=30)


# ------------------------------------------------------------- item 2: a store going back


async def test_an_emptied_store_stops_the_aggregator_instead_of_a_fresh_chain(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    first = await rig.start()
    await _until(first.ready.is_set)
    for v in range(3):
        await rig.publish(base=v)
        await _until(lambda v=v: first.head_version == v + 1)  # type: ignore[misc]
    rig.services[0][2].set()
    await rig.services[0][1]
    await rig.wipe_store()  # what a Redis restart that lost its AOF looks like

    second = await rig.start()
    with pytest.raises(StoreRegressedError, match=r"holds no version .* version 3 was announced"):
        async with asyncio.timeout(30):
            await rig.services[1][1]
    health = await second.health()
    assert health["ok"] is False
    assert "store went backwards" in str(health["error"])
    assert await rig.store.head(rig.task) is None  # no fresh version 0 was written


async def test_a_store_restored_to_an_older_head_stops_the_aggregator(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    first = await rig.start()
    await _until(first.ready.is_set)
    for v in range(3):
        await rig.publish(base=v)
        await _until(lambda v=v: first.head_version == v + 1)  # type: ignore[misc]
    rig.services[0][2].set()
    await rig.services[0][1]
    await rig.client.set(rig.store.keys.head(rig.task), 1)  # an old backup's head

    await rig.start()
    with pytest.raises(StoreRegressedError, match=r"head .* is version 1, but version 3"):
        async with asyncio.timeout(30):
            await rig.services[1][1]


async def test_a_store_emptied_while_running_stops_the_aggregator(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    service = await rig.start()
    await _until(service.ready.is_set)
    await rig.publish(base=0)
    await _until(lambda: service.head_version == 1)
    await rig.wipe_store()  # lease and fence gone too
    await rig.publish(base=1)
    with pytest.raises(StoreRegressedError, match="store went backwards"):
        async with asyncio.timeout(30):
            await rig.services[0][1]
    assert (await service.health())["ok"] is False
    assert await rig.store.head(rig.task) is None  # nothing was committed over the loss


async def test_a_fencing_token_that_went_back_stops_the_aggregator(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    first = await rig.start()
    await _until(first.ready.is_set)
    rig.services[0][2].set()
    await rig.services[0][1]
    assert first.lease is not None
    # Versions kept, but the fence counter lost (a partial restore): a new lease's
    # token would not exceed the one already announced.
    await rig.client.set(rig.store.keys.fence(rig.task), 0)
    await rig.client.delete(rig.store.keys.lease(rig.task))
    await rig.start()
    with pytest.raises(StoreRegressedError, match="fencing token"):
        async with asyncio.timeout(30):
            await rig.services[1][1]


# --------------------------------------------------------- item 3: an overflowing aggregate


async def test_an_overflowing_aggregate_is_refused_and_the_service_keeps_running(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    service = await rig.start()
    await _until(service.ready.is_set)
    # Finite deltas near float32's maximum: the first is mixed in (finite); the next
    # ones would make the head infinite.
    await rig.publish(base=0, value=3e38)
    await _until(lambda: service.head_version == 1)
    for _ in range(5):
        await rig.publish(base=1, value=3e38)
    dead = await rig.dead(5)
    assert [r for r, _ in dead] == [Refusal.NON_FINITE_RESULT] * 5
    assert all("NaN or Inf" in d for _, d in dead)
    assert not rig.services[0][1].done()  # still serving
    assert service.head_version == 1
    await rig.publish(base=1, value=-1e37, participant="bank-b")  # an honest update still counts
    await _until(lambda: service.head_version == 2)
    params = (await rig.store.get_params(rig.task, 2)).tensors
    assert all(bool(torch.isfinite(t).all()) for t in params.values())
    assert (await service.health())["ok"] is True


async def _buffer_head(rig: Rig, service: AggregatorService, value: float) -> None:
    """Version 1 of a FedBuff task (K = 3, weights 1/3) whose head is about ``value``."""
    for p in ("bank-a", "bank-b", "bank-c"):
        await rig.publish(participant=p, value=value)
    await _until(lambda: service.head_version == 1)


async def test_only_the_update_that_overflows_a_buffer_is_refused(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(strategy="fedbuff", buffer_size=3)
    service = await rig.start()
    await _until(service.ready.is_set)
    await _buffer_head(rig, service, 3.3e38)
    honest = [
        await rig.publish(participant="bank-a", base=1, value=-0.01),
        await rig.publish(participant="bank-b", base=1, value=-0.02),
    ]
    await rig.publish(participant="bank-c", base=1, value=3.3e38)  # head + w * delta: inf
    dead = await rig.dead(1)
    assert [r for r, _ in dead] == [Refusal.NON_FINITE_RESULT]
    assert service.head_version == 1
    assert service.stats.refused == {Refusal.NON_FINITE_RESULT: 1}
    # The honest two went back into the buffer: the next update completes it.
    third = await rig.publish(participant="bank-c", base=1, value=-0.03)
    await _until(lambda: service.head_version == 2)
    lineage = [e.update_id for e in (await rig.store.get_version(rig.task, 2)).lineage]
    assert lineage == [*honest, third]


async def test_a_buffer_whose_sum_overflows_is_refused_whole(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(strategy="fedbuff", buffer_size=3)
    service = await rig.start()
    await _until(service.ready.is_set)
    await _buffer_head(rig, service, 2e38)
    for p in ("bank-a", "bank-b", "bank-c"):  # each alone stays finite, the sum does not
        await rig.publish(participant=p, base=1, value=3e38)
    dead = await rig.dead(3)
    assert [r for r, _ in dead] == [Refusal.NON_FINITE_RESULT] * 3
    assert all("overflows" in d for _, d in dead)
    assert service.head_version == 1 and not rig.services[0][1].done()


# -------------------------------------------------------- item 4: one update id repeated


async def test_one_update_id_repeated_does_not_stall_the_federation(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(strategy="fedbuff", buffer_size=3)
    service = await rig.start()
    await _until(service.ready.is_set)
    assert service.prefetch == 64
    uid = uuid.uuid4().hex
    for _ in range(70):  # more copies than the prefetch
        await rig.publish(participant="bank-a", uid=uid)
    honest = [await rig.publish(participant=p) for p in ("bank-b", "bank-c")]
    await _until(lambda: service.head_version == 1)
    lineage = [e.update_id for e in (await rig.store.get_version(rig.task, 1)).lineage]
    assert lineage == [uid, *honest]
    dead = await rig.dead(69)
    assert {r for r, _ in dead} == {"duplicate"}
    assert rig.agg is not None
    assert await rig.agg.queue_depth(rig.task) == 0
    assert (await service.health())["ok"] is True


async def _healthy(service: AggregatorService) -> None:
    """Wait until /healthz says ok: ``ready`` is set just before the consumer starts."""
    async with asyncio.timeout(10):
        while not (await service.health())["ok"]:
            await asyncio.sleep(0.02)


async def test_health_turns_unhealthy_when_the_consumer_makes_no_progress(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = make_rig()
    service = await rig.start(
        ServiceConfig(require_sender_match=False, prefetch=2, stall_s=0.5, depth_poll_s=0.1)
    )
    await _healthy(service)
    held: list[UpdateDelivery] = []

    async def leak(delivery: UpdateDelivery) -> None:  # a consumer bug: never settles
        held.append(delivery)

    monkeypatch.setattr(service, "_handle", leak)
    for _ in range(5):
        await rig.publish()
    await _until(lambda: len(held) == 2)  # the prefetch is full; three wait
    async with asyncio.timeout(10):
        while (health := await service.health())["ok"]:
            await asyncio.sleep(0.1)
    assert health["stalled"] is True and health["waiting"] == 3


async def test_health_turns_unhealthy_while_one_update_hangs(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = make_rig()
    service = await rig.start(ServiceConfig(require_sender_match=False, stall_s=0.5))
    await _healthy(service)
    release = asyncio.Event()
    real = service._handle

    async def hang(delivery: UpdateDelivery) -> None:
        await release.wait()
        await real(delivery)

    monkeypatch.setattr(service, "_handle", hang)
    await rig.publish()
    async with asyncio.timeout(10):
        while (health := await service.health())["ok"]:
            await asyncio.sleep(0.1)
    assert health["stalled"] is True and health["consuming"] is True
    release.set()
    await _until(lambda: service.head_version == 1)
    assert (await service.health())["ok"] is True


# ------------------------------------------------------------ item 5: claimed sample counts


async def test_claimed_sample_counts_are_bounded(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(max_samples=1000, declared_samples={"bank-a": 100})
    service = await rig.start()
    await _until(service.ready.is_set)
    await rig.publish(participant="bank-a", n=2**62)
    await rig.publish(participant="bank-a", n=101)
    await rig.publish(participant="bank-b", n=1001)
    dead = await rig.dead(3)
    assert [r for r, _ in dead] == [Refusal.TOO_MANY_SAMPLES] * 3
    assert "may claim at most 100" in dead[1][1]
    assert "may claim at most 1000" in dead[2][1]
    assert service.head_version == 0
    await rig.publish(participant="bank-a", n=100)
    await rig.publish(participant="bank-b", base=1, n=1000)
    await _until(lambda: service.head_version == 2)


# ---------------------------------------------------------- a bank that keeps being refused


async def test_a_bank_refused_again_and_again_is_flagged_until_one_is_accepted(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(max_staleness=0)
    service = await rig.start(
        ServiceConfig(require_sender_match=False, flag_after=3, lease_ttl_s=2.0)
    )
    await _healthy(service)
    await rig.publish(participant="bank-b", base=0)
    await _until(lambda: service.head_version == 1)
    for _ in range(3):  # trained on version 0, the head is 1: too stale
        await rig.publish(participant="bank-a", base=0)
    await rig.dead(3)
    health = await service.health()
    assert health["flagged"] == ["bank-a"]
    metrics = service.metrics.render().decode()
    label = f'participant="bank-a",task="{rig.task}"'
    assert f"fedq_participant_flagged{{{label}}} 1.0" in metrics
    assert service.stats.banks["bank-a"].refused == {Refusal.TOO_STALE: 3}
    await rig.publish(participant="bank-a", base=1)
    await _until(lambda: service.head_version == 2)
    assert (await service.health())["flagged"] == []
    assert f"fedq_participant_flagged{{{label}}} 0.0" in service.metrics.render().decode()
