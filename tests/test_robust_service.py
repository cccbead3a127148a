"""Bounded influence and robust aggregation through the aggregator service (in-process
broker and store): norm bounds that clip or refuse, a cap per bank per buffer, the
coordinate-wise median and multi-Krum, FedAsync's direction check; replay reproduces
every version bit for bit."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import fakeredis
import pytest
import torch

from aggregator.audit.replay import index_updates, replay
from aggregator.robust import delta_norm
from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore
from common.models import build_task_model, model_tensors
from common.spec import AsyncSettings, NumericFeature, TargetSpec, TaskSpec
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import Tensors, UpdateEnvelope, decode_receipt, encode_update
from tests.helpers import wait_for

BANKS = ("bank-a", "bank-b", "bank-c", "bank-d", "bank-e")


def _spec(
    mode: str = "async", robustness: dict[str, object] | None = None, **async_kw: object
) -> TaskSpec:
    return TaskSpec.parse(
        {
            "task_id": f"rob{uuid.uuid4().hex[:10]}",
            "features": [NumericFeature(name=f"x{i}").model_dump() for i in range(6)],
            "target": TargetSpec(name="y").model_dump(),
            "participants": list(BANKS),
            "mode": mode,
            "async": AsyncSettings.model_validate(
                {"max_staleness": 50, "staleness_unit": "versions", **async_kw}
            ).model_dump(mode="json"),
            "robustness": robustness or {},
        }
    )


@dataclass
class Rig:
    spec: TaskSpec
    store: RedisModelStore
    broker: MemoryBroker
    service: AggregatorService
    banks: dict[str, MemoryTransport]

    async def send(self, bank: str, delta: Tensors, base: int = 0, uid: str | None = None) -> str:
        uid = uid or uuid.uuid4().hex
        body, _ = encode_update(
            UpdateEnvelope(
                task=self.spec.task_id,
                participant=bank,
                update_id=uid,
                base_version=base,
                num_samples=10,
                tensors=delta,
                codec="raw",
                spec_hash=self.spec.spec_hash(),
            )
        )
        await self.banks[bank].publish_update(self.spec.task_id, bank, body, message_id=uid)
        return uid

    async def receipts(self, bank: str) -> list[tuple[str, str]]:
        sub = await self.banks[bank].consume_receipts(self.spec.task_id, bank)
        out: list[tuple[str, str]] = []
        try:
            while True:
                try:
                    async with asyncio.timeout(0.3):
                        d = await sub.get()
                except TimeoutError:
                    return out
                r = decode_receipt(d.body)
                out.append((r.outcome, r.reason))
                await d.ack()
        finally:
            await sub.close()

    async def replays(self) -> None:
        agg = MemoryTransport(self.broker, "fedq-aggregator")
        bodies = [b async for b in agg.read_audit(self.spec.task_id)]
        report = await replay(self.store, index_updates(bodies), self.spec.task_id)
        assert report.ok, report.note
        assert report.checked == self.service.head_version


@pytest.fixture
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    spec: TaskSpec = request.param
    broker = MemoryBroker()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    service = AggregatorService(
        spec, store, MemoryTransport(broker, "fedq-aggregator"), ServiceConfig(depth_poll_s=0.2)
    )
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set())
    banks = {b: MemoryTransport(broker, b) for b in BANKS}
    yield Rig(spec, store, broker, service, banks)
    stop.set()
    await running
    await store.close()


def _like(spec: TaskSpec, value: float) -> Tensors:
    return {k: torch.full_like(v, value) for k, v in model_tensors(build_task_model(spec)).items()}


def _honest(spec: TaskSpec, seed: int) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    return {
        k: 0.05 + 0.01 * torch.randn(v.shape, generator=g)
        for k, v in model_tensors(build_task_model(spec)).items()
    }


@pytest.mark.parametrize(
    "rig",
    [_spec(strategy="fedbuff", buffer_size=3, robustness={"norm_bound": 1.0})],
    indirect=True,
)
async def test_a_huge_update_is_clipped_to_the_bound_and_replay_agrees(rig: Rig) -> None:
    head = (await rig.store.get_params(rig.spec.task_id, 0)).tensors
    await rig.send("bank-a", _honest(rig.spec, 1))
    await rig.send("bank-b", _honest(rig.spec, 2))
    huge = await rig.send("bank-c", _like(rig.spec, 3e38))  # finite, every value
    await wait_for(lambda: rig.service.head_version == 1)
    record = await rig.store.get_version(rig.spec.task_id, 1)
    robust = record.info["robust"]
    assert set(robust["clipped"]) == {huge} and robust["bound"] == 1.0
    params = (await rig.store.get_params(rig.spec.task_id, 1)).tensors
    step = {k: params[k].double() - head[k].double() for k in head}
    assert all(torch.isfinite(t).all() for t in params.values())
    # a third of the server step at most per update: ||step|| <= (1/3)(3 * 1.0)
    assert delta_norm(step) <= 1.0 + 1e-6
    await rig.replays()


@pytest.mark.parametrize(
    "rig",
    [
        _spec(
            strategy="fedbuff",
            buffer_size=3,
            robustness={"norm_bound": 1.0, "outlier": "refuse", "max_per_bank": 1},
        )
    ],
    indirect=True,
)
async def test_outliers_and_copies_beyond_the_cap_are_refused_with_their_reasons(rig: Rig) -> None:
    await rig.send("bank-a", _like(rig.spec, 100.0))  # over the bound
    await rig.send("bank-a", _honest(rig.spec, 1))
    await rig.send("bank-a", _honest(rig.spec, 2))  # a second copy in the same buffer
    await rig.send("bank-b", _honest(rig.spec, 3))
    await rig.send("bank-c", _honest(rig.spec, 4))
    await wait_for(lambda: rig.service.head_version == 1)
    receipts = await rig.receipts("bank-a")
    assert ("refused", "outlier") in receipts and ("refused", "over_cap") in receipts
    lineage = (await rig.store.get_version(rig.spec.task_id, 1)).lineage
    assert sorted(e.participant for e in lineage) == ["bank-a", "bank-b", "bank-c"]
    await rig.replays()


@pytest.mark.parametrize(
    "rig",
    [
        _spec(strategy="fedbuff", buffer_size=5, robustness={"aggregator": "median"}),
        _spec(strategy="fedbuff", buffer_size=5, robustness={"aggregator": "trimmed_mean"}),
        _spec(strategy="fedbuff", buffer_size=5, robustness={"aggregator": "multi_krum"}),
    ],
    indirect=True,
)
async def test_a_robust_buffer_resists_one_attacker_and_replays_bit_for_bit(rig: Rig) -> None:
    head = (await rig.store.get_params(rig.spec.task_id, 0)).tensors
    for i, bank in enumerate(BANKS[:4]):
        await rig.send(bank, _honest(rig.spec, i))
    await rig.send("bank-e", _like(rig.spec, -500.0))  # scaled and sign-flipped
    await wait_for(lambda: rig.service.head_version == 1)
    params = (await rig.store.get_params(rig.spec.task_id, 1)).tensors
    for k in head:
        moved = params[k].double() - head[k].double()
        assert moved.min() > 0.0 and moved.max() < 0.1, (rig.spec.robustness.aggregator, k)
    await rig.replays()


@pytest.mark.parametrize(
    "rig",
    [_spec(mode="sync", robustness={"aggregator": "multi_krum", "krum_byzantine": 1})],
    indirect=True,
)
async def test_multi_krum_in_a_sync_round_leaves_the_attacker_out_with_weight_zero(
    rig: Rig,
) -> None:
    for i, bank in enumerate(BANKS[:4]):
        await rig.send(bank, _honest(rig.spec, i))
    await rig.send("bank-e", _like(rig.spec, 50.0))
    await wait_for(lambda: rig.service.head_version == 1)
    lineage = (await rig.store.get_version(rig.spec.task_id, 1)).lineage
    weights = {e.participant: e.weight for e in lineage}
    assert weights["bank-e"] == 0.0
    assert math.isclose(sum(weights.values()), 1.0)
    await rig.replays()


@pytest.mark.parametrize(
    "rig",
    [_spec(robustness={"min_cosine": 0.0}, mixing=0.5)],
    indirect=True,
)
async def test_fedasync_refuses_an_update_against_the_recent_direction(rig: Rig) -> None:
    await rig.send("bank-a", _honest(rig.spec, 1))
    await wait_for(lambda: rig.service.head_version == 1)
    await rig.send("bank-b", _honest(rig.spec, 2), base=1)
    await wait_for(lambda: rig.service.head_version == 2)
    flipped = {k: -v for k, v in _honest(rig.spec, 3).items()}
    await rig.send("bank-c", flipped, base=2)
    await rig.send("bank-d", _honest(rig.spec, 4), base=2)
    await wait_for(lambda: rig.service.head_version == 3)
    assert ("refused", "outlier") in await rig.receipts("bank-c")
    assert (await rig.store.get_version(rig.spec.task_id, 3)).lineage[0].participant == "bank-d"
    await rig.replays()


async def test_the_adaptive_bound_is_restored_after_a_restart() -> None:
    spec = _spec(
        strategy="fedbuff",
        buffer_size=3,
        robustness={
            "adaptive_norm": True,
            "norm_bound": 100.0,
            "norm_window": 3,
            "norm_multiplier": 2.0,
        },
    )
    broker = MemoryBroker()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    service = AggregatorService(spec, store, MemoryTransport(broker, "fedq-aggregator"))
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set())
    rig = Rig(spec, store, broker, service, {b: MemoryTransport(broker, b) for b in BANKS})
    for i, bank in enumerate(BANKS[:3]):
        await rig.send(bank, _like(spec, 0.1 * (i + 1)))
    await wait_for(lambda: service.head_version == 1)
    bound = service.bounds.bound()
    norms = sorted(delta_norm(_like(spec, 0.1 * (i + 1))) for i in range(3))
    assert bound == pytest.approx(2.0 * norms[1])
    # an update over the adaptive bound is clipped to it
    big = await rig.send("bank-d", _like(spec, 5.0), base=1)
    stop.set()
    await running
    again = AggregatorService(spec, store, MemoryTransport(broker, "fedq-aggregator"))
    stop2 = asyncio.Event()
    running2 = asyncio.create_task(again.run(stop2))
    await wait_for(lambda: again.ready.is_set())
    assert again.bounds.bound() == bound  # the same window, read back from the store
    rig.service = again
    await rig.send("bank-a", _honest(spec, 1), base=1)
    await rig.send("bank-b", _honest(spec, 2), base=1)
    await wait_for(lambda: again.head_version == 2)
    assert big in (await store.get_version(spec.task_id, 2)).info["robust"]["clipped"]
    await rig.replays()
    stop2.set()
    await running2
    await store.close()


@pytest.mark.parametrize(
    ("settings", "robustness", "message"),
    [
        ({}, {"aggregator": "median"}, "needs a buffer or a round"),
        ({"strategy": "fedbuff"}, {"min_cosine": 0.5}, "FedAsync's check"),
        ({"strategy": "fedbuff"}, {"krum_select": 2}, "multi_krum's"),
        ({"strategy": "fedbuff"}, {"adaptive_norm": True}, "needs a fixed norm_bound"),
        ({}, {"max_per_bank": 1}, "fedasync has none"),
        ({"strategy": "fedbuff", "buffer_size": 4}, {"aggregator": "multi_krum"}, "assumes 0"),
    ],
)
def test_robustness_settings_that_cannot_work_are_refused(
    settings: dict[str, object], robustness: dict[str, object], message: str
) -> None:
    from common.errors import SpecError

    with pytest.raises(SpecError, match=message):
        _spec("async", robustness, **settings)


def test_a_coordinate_wise_aggregator_refuses_bank_level_dp_and_optimizers() -> None:
    from common.errors import SpecError

    base = _spec(strategy="fedbuff").model_dump(mode="json", by_alias=True)
    with pytest.raises(SpecError, match="linear in the deltas"):
        TaskSpec.parse(
            {
                **base,
                "robustness": {"aggregator": "median"},
                "privacy": {"bank": {"noise_multiplier": 1.0}},
            }
        )
    with pytest.raises(SpecError, match="its own step"):
        TaskSpec.parse(
            {**base, "robustness": {"aggregator": "trimmed_mean"}, "server": {"kind": "adam"}}
        )


@pytest.mark.parametrize(
    "rig",
    [_spec(strategy="fedbuff", buffer_size=3, robustness={"norm_bound": 1.0})],
    indirect=True,
)
async def test_a_refused_copy_of_a_held_update_keeps_its_clip_factor(rig: Rig) -> None:
    """A bank that publishes again after a lost confirm sends the same id twice: the
    copy is refused duplicate, and the held update keeps its clip factor for replay."""
    big = _like(rig.spec, 5.0)
    uid = await rig.send("bank-c", big)
    await wait_for(lambda: len(rig.service.strategy.pending()) == 1)
    await rig.send("bank-c", big, uid=uid)  # the same update again
    await rig.send("bank-a", _honest(rig.spec, 1))
    await rig.send("bank-b", _honest(rig.spec, 2))
    await wait_for(lambda: rig.service.head_version == 1)
    assert uid in (await rig.store.get_version(rig.spec.task_id, 1)).info["robust"]["clipped"]
    await rig.replays()


def test_one_bank_cannot_move_the_adaptive_bound_by_sending_many_updates() -> None:
    from aggregator.bounds import Bounds

    spec = _spec(
        strategy="fedbuff",
        robustness={
            "adaptive_norm": True,
            "norm_bound": 1e6,
            "norm_window": 10,
            "norm_multiplier": 3.0,
        },
    )
    bounds = Bounds(spec)
    head = model_tensors(build_task_model(spec))
    honest = [("bank-a", 1.0), ("bank-b", 1.2), ("bank-c", 0.9)]
    flood = [("bank-e", 1e-9)] * 7  # seven tiny updates of one bank, the window's majority
    bounds.committed([*honest, *flood], head, head)
    # per bank: a 1.0, b 1.2, c 0.9, e 1e-9 -> median of the four 0.95, bound 2.85
    assert bounds.bound() == pytest.approx(3.0 * 0.95)


def test_multi_krum_counterfactuals_keep_rejected_updates_rejected() -> None:
    from aggregator.strategies import FedAvg, FedBuff
    from tests.helpers import lineage_entry

    def entries(weights: list[float]) -> tuple:  # type: ignore[type-arg]
        return tuple(
            dataclasses.replace(lineage_entry(f"u{i}", weight=w), participant=f"b{i}")
            for i, w in enumerate(weights)
        )

    buffered = entries([0.25, 0.25, 0.25, 0.25, 0.0])
    assert [e.weight for e in FedBuff.without(buffered, "b4")] == [0.25] * 4
    assert [e.weight for e in FedBuff.without(buffered, "b0")] == pytest.approx(
        [1 / 3, 1 / 3, 1 / 3, 0.0]
    )
    rounds = entries([0.5, 0.5, 0.0])
    only_rejected = FedAvg.without(FedAvg.without(rounds, "b0"), "b1")
    assert [e.weight for e in only_rejected] == [0.0]  # no division by zero: stays put
