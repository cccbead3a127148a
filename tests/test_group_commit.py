"""Group commit: the deliveries already received are applied in order and committed in
one store round trip, and make exactly the versions single commits make; duplicates are
refused from memory; the store stays the authority on conflict."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Sequence
from typing import Any

import fakeredis
import pytest
import torch

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, StoreConfig
from common.models import build_task_model, model_tensors
from common.refusals import Refusal
from common.spec import (
    AsyncSettings,
    ModelSpec,
    NumericFeature,
    RobustnessSpec,
    TargetSpec,
    TaskSpec,
)
from common.transport import Chunking
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import UpdateEnvelope, encode_update
from tests.helpers import wait_for

BANKS = ("bank-a", "bank-b", "bank-c")


class Delivery:
    """A delivery handed straight to the service: records how it was settled."""

    def __init__(self, body: bytes, user_id: str) -> None:
        self.body, self.user_id, self.message_id, self.redelivered = body, user_id, None, False
        self.live = True
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def dead_letter(self, reason: str, detail: str = "") -> None:
        self.settled.append(f"dead:{reason}")


def _spec(
    task_id: str, robust: bool = False, model: ModelSpec | None = None, **async_kw: object
) -> TaskSpec:
    settings = {"max_staleness": 50, "staleness_unit": "versions", **async_kw}
    return TaskSpec(
        task_id=task_id,
        model=model or ModelSpec(),
        features=tuple(NumericFeature(name=f"x{i}") for i in range(3)),
        target=TargetSpec(name="y"),
        participants=BANKS,
        robustness=RobustnessSpec(norm_bound=5.0, adaptive_norm=True, norm_window=3)
        if robust
        else RobustnessSpec(),
        **{"async": AsyncSettings.model_validate(settings)},
    )


def _body(spec: TaskSpec, participant: str, base: int, seed: int, uid: str | None = None) -> bytes:
    g = torch.Generator().manual_seed(seed)
    scale = 0.05 * (1 + seed % 7)  # unequal norms: the adaptive bound clips some
    delta = {
        k: torch.randn(v.shape, generator=g) * scale
        for k, v in model_tensors(build_task_model(spec)).items()
    }
    body, _ = encode_update(
        UpdateEnvelope(
            task=spec.task_id,
            participant=participant,
            update_id=uid or f"u{seed}",
            base_version=base,
            num_samples=10 + seed,
            tensors=delta,
            spec_hash=spec.spec_hash(),
        )
    )
    return body


async def _service(spec: TaskSpec, **config: Any) -> tuple[AggregatorService, list[int]]:
    """A prepared service on fakeredis; the returned list grows by the number of versions
    of each ``commit_many`` call (one store round trip each)."""
    store = RedisModelStore(
        fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()),
        StoreConfig(prefix=f"g{uuid.uuid4().hex[:6]}"),
    )
    calls: list[int] = []
    commit_many = store.commit_many

    async def counted(task: str, **kw: Any) -> Any:
        calls.append(len(kw["versions"]))
        return await commit_many(task, **kw)

    store.commit_many = counted  # type: ignore[method-assign]
    service = AggregatorService(
        spec, store, MemoryTransport(MemoryBroker(), "agg"), ServiceConfig(**config)
    )
    await service.prepare()
    return service, calls


def _at(service: AggregatorService, version: int) -> bool:
    return service.head_version == version


def _inputs(spec: TaskSpec, n: int) -> list[tuple[bytes, str]]:
    """``n`` updates from three banks on bases 0, 0, 0, 0, 1, ... (stale ones too)."""
    return [(_body(spec, BANKS[i % 3], i // 4, i), BANKS[i % 3]) for i in range(n)]


@pytest.mark.parametrize(
    "settings",
    [
        {"strategy": "fedasync"},
        {"strategy": "fedbuff", "buffer_size": 3},
        {"strategy": "fedasync", "robust": True},
        {"strategy": "fedbuff", "buffer_size": 2, "robust": True},
    ],
    ids=["fedasync", "fedbuff", "fedasync-adaptive-bound", "fedbuff-adaptive-bound"],
)
async def test_one_group_makes_the_versions_single_commits_make(settings: dict[str, Any]) -> None:
    settings = dict(settings)
    robust = bool(settings.pop("robust", False))
    task = f"grp{uuid.uuid4().hex[:8]}"
    # The same task (same id, same spec) on two stores: one group, or one by one.
    grouped, grouped_calls = await _service(_spec(task, robust, **settings))
    single, single_calls = await _service(_spec(task, robust, **settings))
    spec = grouped.spec
    inputs = _inputs(spec, 12)

    batch = [Delivery(body, who) for body, who in inputs]
    await grouped._take(batch, asyncio.Event())
    for body, who in inputs:
        await single.handle(Delivery(body, who))

    head = single.head_version
    assert head >= 4 and grouped.head_version == head
    assert await grouped.store.head(task) == head
    assert len(grouped_calls) == 1 and grouped_calls == [head]  # one round trip
    assert len(single_calls) == head
    a = await grouped.store.get_versions(task, range(1, head + 1))
    b = await single.store.get_versions(task, range(1, head + 1))
    assert [r.version_hash for r in a] == [r.version_hash for r in b]
    assert [r.lineage for r in a] == [r.lineage for r in b]
    assert [r.info.get("robust") for r in a] == [r.info.get("robust") for r in b]
    if robust:
        assert any(r.info["robust"].get("clipped") for r in a)  # the bound did something
    for version in range(1, head + 1):
        pa = (await grouped.store.get_params(task, version)).tensors
        pb = (await single.store.get_params(task, version)).tensors
        assert all(torch.equal(pa[k], pb[k]) for k in pb)
    committed = {e.update_id for r in a for e in r.lineage}
    assert [d.settled for d in batch] == [
        ["ack"] if f"u{i}" in committed else [] for i in range(len(batch))
    ]
    assert grouped.unacked == single.unacked == len(batch) - len(committed)


async def test_a_refusal_inside_a_group_is_recorded_against_a_committed_head() -> None:
    spec = _spec(f"grp{uuid.uuid4().hex[:8]}", max_staleness=1)
    service, calls = await _service(spec)
    inputs = _inputs(spec, 2)
    # the third is based on version 0 once the head is 2: too stale (bound 1)
    stale = Delivery(_body(spec, "bank-c", 0, 99), "bank-c")
    after = Delivery(_body(spec, "bank-a", 2, 100), "bank-a")
    batch = [Delivery(b, w) for b, w in inputs] + [stale, after]
    await service._take(batch, asyncio.Event())
    assert stale.settled == [f"dead:{Refusal.TOO_STALE.value}"]
    assert [d.settled for d in batch if d is not stale] == [["ack"]] * 3
    assert calls == [2, 1]  # the refusal closed the first group
    refused = [d for d in await service.store.decisions(spec.task_id) if d["decision"] == "refused"]
    assert refused[0]["head"] == "2" and await service.store.head(spec.task_id) == 3


async def test_a_copy_of_an_applied_update_is_refused_from_memory() -> None:
    spec = _spec(f"grp{uuid.uuid4().hex[:8]}")
    service, _ = await _service(spec)
    body = _body(spec, "bank-a", 0, 1)
    await service.handle(Delivery(body, "bank-a"))
    asked: list[Sequence[str]] = []

    async def applied_in(task: str, ids: Sequence[str]) -> dict[str, int]:
        asked.append(ids)
        return {}

    service.store.applied_in = applied_in  # type: ignore[method-assign,assignment]
    again = Delivery(body, "bank-a")
    await service.handle(again)
    assert again.settled == [f"dead:{Refusal.DUPLICATE.value}"]
    fresh = Delivery(_body(spec, "bank-b", 1, 2), "bank-b")
    await service.handle(fresh)
    assert fresh.settled == ["ack"]
    assert asked == []  # neither the copy nor the fresh one cost a store read


@pytest.mark.parametrize("chunk_size", [None, 16384])
async def test_an_old_id_resent_on_a_newer_base_is_refused_by_the_store_and_nothing_is_lost(
    chunk_size: int | None,
) -> None:
    """Beyond the ids kept in memory, a bank re-sends the id of an update applied in
    version 1, now claiming a recent base: the commit script refuses the group, the
    copy is dead-lettered as a duplicate, the service reloads from the store and takes
    the rest again; that bank's ids are asked of the store from then on.

    With chunked updates (``chunk_size``) the step wrote the new version over the copy's
    own reassembled buffer (``AcceptedUpdate.spare``; an MLP whose first weight is
    large enough to be decoded as a view into it): the copy goes back to the queue with
    the others and is refused when it comes again, its body intact."""
    model = ModelSpec(kind="mlp", hidden=(8192,)) if chunk_size else None
    spec = _spec(f"grp{uuid.uuid4().hex[:8]}", model=model)
    broker = MemoryBroker()
    store = RedisModelStore(
        fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()),
        StoreConfig(prefix=f"g{uuid.uuid4().hex[:6]}"),
    )
    chunking = Chunking(chunk_size=chunk_size) if chunk_size else None

    def transport(user: str) -> MemoryTransport:
        return MemoryTransport(broker, user, chunking=chunking)

    service = AggregatorService(spec, store, transport("agg"), ServiceConfig(applied_memory=1))
    bank = transport("bank-a")
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set())
    task = spec.task_id
    for i in range(5):
        who = BANKS[i % 3]
        body = _body(spec, who, i, i, uid=f"old{i}")
        await transport(who).publish_update(task, who, body, message_id=f"old{i}")
        await wait_for(functools.partial(_at, service, i + 1))
    assert service._applied.get("old0") is None  # only the newest version's ids are kept
    replayed = _body(spec, "bank-a", 5, 50, uid="old0")
    await bank.publish_update(task, "bank-a", replayed, message_id="again")
    honest = _body(spec, "bank-a", 5, 51, uid="new1")
    await bank.publish_update(task, "bank-a", honest, message_id="new1")
    await wait_for(lambda: service.head_version == 6, 10)
    dead = await service.transport.dead_letters(task)
    assert [(d.reason, d.detail) for d in dead] == [
        (Refusal.DUPLICATE.value, "already applied in version 1")
    ]
    assert dead[0].body == replayed  # the bytes the bank sent, not the version made in them
    assert (await store.applied_in(task, ["old0", "new1"])) == {"old0": 1, "new1": 6}
    assert "bank-a" in service._suspects
    stop.set()
    await running
    assert service.unacked == 0


def test_recently_applied_covers_exactly_the_versions_it_holds() -> None:
    from aggregator.applied import RecentlyApplied

    kept = RecentlyApplied(max_ids=4)
    assert not kept.covers(10**6)  # nothing loaded: the store is asked
    kept.load(3, {"a": 4, "b": 5, "c": 5})
    assert kept.covers(3) and not kept.covers(2)
    kept.add(6, ["d", "e"])  # 5 ids: version 4 goes
    assert kept.get("a") is None and kept.get("e") == 6
    assert kept.since == 4 and kept.covers(4) and not kept.covers(3)
    kept.add(7, ["f", "g", "h", "i", "j"])  # one version larger than the bound stays whole
    assert kept.get("f") == 7 and kept.get("d") is None and kept.since == 6
    kept.remember("old", 1)
    assert kept.get("old") == 1


async def test_weight_shares_are_evaluated_once_per_banks_over_100_and_once_at_restore(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every bank's weight share and low-weight flag is a pass over every bank: with
    many banks it runs once per ``banks // 100`` committed entries (not per commit), and
    a restart restores the window and makes ONE pass (not one per restored version),
    ending with the shares of the aggregator that never stopped."""
    from aggregator import service as service_module
    from aggregator.stats import ServiceStats

    calls: list[tuple[int, bool, int]] = []  # (stats object, evaluate, banks seen)
    count = ServiceStats.count_weights

    def counted(self: ServiceStats, lineage: Any, *, evaluate: bool = True) -> Any:
        calls.append((id(self), evaluate, len(self.banks)))
        return count(self, lineage, evaluate=evaluate)

    monkeypatch.setattr(ServiceStats, "count_weights", counted)

    banks = tuple(f"bank-{i:03d}" for i in range(450))
    task = f"grp{uuid.uuid4().hex[:8]}"
    spec = TaskSpec(
        task_id=task,
        features=tuple(NumericFeature(name=f"x{i}") for i in range(3)),
        target=TargetSpec(name="y"),
        participants=banks,
        **{
            "async": AsyncSettings.model_validate(
                {"max_staleness": 50, "staleness_unit": "versions"}
            )
        },
    )
    service, _ = await _service(spec)
    for i, bank in enumerate(banks):
        await service.handle(Delivery(_body(spec, bank, i, i), bank))
    assert service.head_version == len(banks)
    passes = [n for who, evaluate, n in calls if who == id(service.stats) and evaluate]
    # Every commit while there were fewer than 200 banks, then every banks // 100.
    assert 200 <= len(passes) < 200 + (len(banks) - 200) // 2 + 1
    assert passes[-1] >= 400

    service._count_weights((), now=True)
    before = {n: (b.weight_share, b.recent_updates) for n, b in service.stats.banks.items()}
    restarted = AggregatorService(
        spec, service.store, MemoryTransport(MemoryBroker(), "agg"), ServiceConfig()
    )
    await restarted.prepare()
    restored = [evaluate for who, evaluate, _ in calls if who == id(restarted.stats)]
    assert restored.count(True) == 1 and len(restored) == len(banks) + 1
    after = {n: (b.weight_share, b.recent_updates) for n, b in restarted.stats.banks.items()}
    assert after == before
    assert service_module.WEIGHT_PASS_BANKS == 100
