"""A strategy added here, through the registry alone, runs end to end and replays.

:class:`FedMedian` is one class (a coordinate-wise median of K buffered deltas,
which is not a weighted sum, so it brings its own ``recompute`` and ``without``)
and one registry line (the fixture). Nothing else in fedq knows of it: the
service builds it from a spec that names it, commits versions with it, and
replay recomputes them by asking it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Self

import fakeredis
import pytest
import torch

from aggregator.audit.replay import index_updates, replay
from aggregator.service import AggregatorService
from aggregator.store import RedisModelStore
from aggregator.strategies import (
    STRATEGIES,
    AcceptedUpdate,
    FedAvg,
    Step,
    StrategyBase,
    entry,
    left_out,
    register,
    registered,
    reweighted,
    strategy_for,
    unregister,
)
from common.errors import ConfigError, SpecError
from common.hashing import LineageEntry
from common.models import build_task_model, model_tensors
from common.spec import (
    AsyncSettings,
    BankPrivacy,
    NumericFeature,
    PrivacySpec,
    TargetSpec,
    TaskSpec,
)
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import Tensors, UpdateEnvelope, encode_update
from tests.helpers import wait_for
from tests.strategy_contract import check_contract


class FedMedian(StrategyBase):
    """Buffer K deltas; step the head by their coordinate-wise median (float64).

    With an even count the lower of the two middle values is taken (``torch.median``).
    Each lineage entry records ``1/K``, for people; the step does not use it.
    """

    __slots__ = ("_buffer", "_k")

    name = "fedmedian"
    mode = "async"
    uses_base = False

    def __init__(self, k: int) -> None:
        self._k = k
        self._buffer: list[AcceptedUpdate] = []

    @classmethod
    def from_spec(cls, spec: TaskSpec) -> Self:
        return cls(spec.async_.buffer_size)

    @property
    def capacity(self) -> int:
        return self._k

    def offer(self, head: Tensors, base: Tensors, update: AcceptedUpdate) -> Step | None:
        self._buffer.append(update)
        return self.flush(head) if len(self._buffer) == self._k else None

    def flush(self, head: Tensors) -> Step | None:
        if not self._buffer:
            return None
        updates, self._buffer = self._buffer, []
        params = _median_step(head, [u.delta for u in updates])
        return Step(params, tuple(entry(u, 1.0 / len(updates)) for u in updates))

    def pending(self) -> tuple[AcceptedUpdate, ...]:
        return tuple(self._buffer)

    def settings(self) -> dict[str, object]:
        return {"buffer_size": self._k}

    @classmethod
    def recompute(
        cls,
        parent: Tensors,
        base_of: Callable[[int], Tensors],
        lineage: Sequence[LineageEntry],
        deltas: Mapping[str, Tensors],
    ) -> Tensors:
        if not lineage:
            return parent
        return _median_step(parent, [deltas[e.update_id] for e in lineage])

    @classmethod
    def without(
        cls, lineage: tuple[LineageEntry, ...], participant: str
    ) -> tuple[LineageEntry, ...]:
        kept = left_out(lineage, participant)
        if not kept or len(kept) == len(lineage):
            return kept
        return reweighted(kept, [1.0 / len(kept)] * len(kept))


def _median_step(head: Tensors, deltas: Sequence[Tensors]) -> Tensors:
    out: Tensors = {}
    for name, h in head.items():
        stacked = torch.stack([d[name].to(torch.float64) for d in deltas])
        moved = h.to(torch.float64, copy=True)
        moved.add_(stacked.median(dim=0).values)
        out[name] = moved.to(h.dtype)
    return out


@pytest.fixture
def fedmedian() -> Iterator[type[FedMedian]]:
    with registered(FedMedian) as cls:  # the one registry line
        yield cls


BANKS = ("bank-a", "bank-b", "bank-c")


def _spec() -> TaskSpec:
    return TaskSpec(
        task_id=f"median{uuid.uuid4().hex[:8]}",
        features=tuple(NumericFeature(name=f"x{i}") for i in range(3)),
        target=TargetSpec(name="y"),
        participants=BANKS,
        **{"async": AsyncSettings(strategy="fedmedian", buffer_size=3)},
    )


def _body(spec: TaskSpec, participant: str, base: int, gen: torch.Generator) -> bytes:
    delta = {
        k: torch.randn(v.shape, generator=gen) * 0.1
        for k, v in model_tensors(build_task_model(spec)).items()
    }
    body, _ = encode_update(
        UpdateEnvelope(
            task=spec.task_id,
            participant=participant,
            update_id=uuid.uuid4().hex,
            base_version=base,
            num_samples=10,
            tensors=delta,
            spec_hash=spec.spec_hash(),
        )
    )
    return body


def test_the_contract_holds_for_the_new_strategy(fedmedian: type[FedMedian]) -> None:
    check_contract(fedmedian)


async def test_a_registered_strategy_runs_end_to_end_and_replays(
    fedmedian: type[FedMedian],
) -> None:
    spec = _spec()
    broker = MemoryBroker()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    agg = MemoryTransport(broker, "fedq-aggregator")
    banks = {b: MemoryTransport(broker, b) for b in BANKS}
    service = AggregatorService(spec, store, agg)
    assert isinstance(service.strategy, fedmedian)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    try:
        await wait_for(service.ready.is_set)
        gen = torch.Generator().manual_seed(3)
        for version in range(1, 5):
            for i, bank in enumerate(BANKS):
                # Some updates are a version behind (admitted: within max_staleness).
                base = max(version - 1 - (i == 2 and version > 2), 0)
                body = _body(spec, bank, base, gen)
                await banks[bank].publish_update(
                    spec.task_id, bank, body, message_id=f"{version}{i}"
                )
            await wait_for(lambda: service.head_version == version)  # noqa: B023
    finally:
        stop.set()
        await running
    head = await store.head(spec.task_id)
    assert head == 4
    record = await store.get_version(spec.task_id, 4)
    assert record.info["strategy"] == "fedmedian"
    assert [e.weight for e in record.lineage] == [1 / 3] * 3

    updates = index_updates([b async for b in agg.read_audit(spec.task_id)])
    report = await replay(store, updates, spec.task_id)
    assert report.ok, report.reason
    assert report.checked == 4
    assert report.param_hash == record.param_hash
    # The counterfactual asks the strategy too: without bank-b, medians of two.
    without = await replay(store, updates, spec.task_id, exclude="bank-b")
    assert without.ok, without.reason
    assert without.left_out == 4
    assert without.param_hash != record.param_hash
    for transport in banks.values():
        await transport.close()
    await agg.close()
    await store.close()


def test_registration_does_not_leak_and_names_are_guarded() -> None:
    assert "fedmedian" not in STRATEGIES
    with pytest.raises(SpecError, match=r"'fedmedian' is not registered.*fedasync, fedbuff"):
        strategy_for(_spec())
    with registered(FedMedian):
        assert STRATEGIES["fedmedian"] is FedMedian
        assert isinstance(strategy_for(_spec()), FedMedian)
        register(FedMedian)  # the same class again is harmless
    assert "fedmedian" not in STRATEGIES

    class Clash(FedMedian):
        name = "fedavg"

    class BadName(FedMedian):
        name = "Fed-Median"

    class BadMode(FedMedian):
        mode = "batch"

    for cls, match in ((Clash, "already registered"), (BadName, "must match"), (BadMode, "mode")):
        with pytest.raises(ValueError, match=match):
            register(cls)
    with pytest.raises(ValueError, match="built in"):
        unregister("fedavg")
    assert STRATEGIES["fedavg"] is FedAvg


def test_a_median_cannot_take_bank_level_dp(fedmedian: type[FedMedian]) -> None:
    """The DP noise is calibrated to a sum of the deltas: a median is not one."""
    spec = _spec().model_copy(
        update={"privacy": PrivacySpec(bank=BankPrivacy(noise_multiplier=1.0))}
    )
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    with pytest.raises(ConfigError, match="linear in the deltas"):
        AggregatorService(spec, store, MemoryTransport(MemoryBroker(), "fedq-aggregator"))
