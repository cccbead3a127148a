"""Async weighting: staleness in rounds, sample counts, balance by update rate, flagging.

Pure: strategies are driven through simulated arrival sequences, no servers. The
service side (restart, health) is in test_service.py.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import pytest
import torch

from aggregator.admission import Admission, AdmissionConfig
from aggregator.audit.influence import share_ratios, weight_shares
from aggregator.stats import LOW_WEIGHT, ServiceStats
from aggregator.strategies import AcceptedUpdate, FedAsync, FedBuff
from aggregator.weighting import Weighter, balanced_factor, data_shares, samples_factor
from common.hashing import LineageEntry
from common.models import build_task_model, model_tensors, tensor_specs
from common.spec import AsyncSettings, NumericFeature, StalenessSpec, TargetSpec, TaskSpec
from common.staleness import exceeds, in_unit, staleness_weight
from common.wire import DEFAULT_LIMITS

Strategy = FedAsync | FedBuff


def _spec(
    rows: dict[str, int] | None = None,
    banks: int = 5,
    declared: bool = True,
    settings: dict[str, object] | None = None,
    **kw: object,
) -> TaskSpec:
    settings = {**(settings or {}), **kw}
    rows = rows or {f"bank-{i:02d}": 100 for i in range(1, banks + 1)}
    return TaskSpec(
        task_id="w",
        features=(NumericFeature(name="x"),),
        target=TargetSpec(name="y"),
        participants=tuple(rows),
        declared_samples=rows if declared else {},
        **{"async": AsyncSettings.model_validate(settings)},
    )


def _update(i: int, participant: str, base: int, head: int, n: int = 100) -> AcceptedUpdate:
    return AcceptedUpdate(
        update_id=f"u{i:05d}",
        participant=participant,
        base_version=base,
        staleness=head - base,
        num_samples=n,
        delta={"w": torch.full((2,), 0.01)},
        content_hash=f"u{i}".encode().ljust(32, b"\0"),
    )


def _strategy(spec: TaskSpec) -> Strategy:
    return (
        FedAsync.from_spec(spec) if spec.async_.strategy == "fedasync" else FedBuff.from_spec(spec)
    )


def _arrivals(
    spec: TaskSpec, periods: dict[str, float], horizon: float, strategy: Strategy | None = None
) -> tuple[Strategy, list[tuple[LineageEntry, ...]]]:
    """Each bank sends an update every ``periods[bank]`` time units, trained on the head
    it saw after its previous one; every step is committed (``committed``)."""
    strategy = strategy or _strategy(spec)
    head, version = {"w": torch.zeros(2)}, 0
    base = dict.fromkeys(periods, 0)
    queue = [(p + 0.013 * k, k, name) for k, (name, p) in enumerate(periods.items())]
    heapq.heapify(queue)
    lineages: list[tuple[LineageEntry, ...]] = []
    i = 0
    while queue and queue[0][0] <= horizon:
        t, k, name = heapq.heappop(queue)
        n = spec.declared_samples.get(name, 100)
        step = strategy.offer(head, head, _update(i, name, base[name], version, n))
        i += 1
        if step is not None:
            version, head = version + 1, step.params
            strategy.committed(step.lineage)
            lineages.append(step.lineage)
        base[name] = version
        heapq.heappush(queue, (t + periods[name], k, name))
    return strategy, lineages


# ------------------------------------------------------------------ staleness in rounds


def test_staleness_in_rounds_does_not_grow_with_the_number_of_banks() -> None:
    # 20 banks, FedAsync: a typical update is one round = 20 versions old.
    spec = _spec(banks=20, strategy="fedasync")
    assert in_unit(20, "rounds", 1, 20) == 1.0
    assert not exceeds(20, spec.async_.max_staleness, "rounds", 1, 20)
    assert exceeds(401, 20, "rounds", 1, 20)  # 20.05 rounds
    assert not exceeds(400, 20, "rounds", 1, 20)  # the bound itself is admitted
    s = FedAsync.from_spec(spec).weighter.s(20)
    assert s == pytest.approx(2**-0.5, rel=1e-15)  # (1 + 1)^-0.5
    assert s > 0.5
    # In versions it would have been refused (20 > max 19) and weighed (21)^-0.5 < 0.22.
    assert exceeds(20, 19, "versions", 1, 20)
    assert staleness_weight(StalenessSpec(), 20) < 0.22
    # FedBuff with K = 4: one round of 20 banks is 5 versions.
    assert in_unit(5, "rounds", 4, 20) == 1.0


def test_admission_refuses_too_stale_only_beyond_the_bound_in_rounds() -> None:
    spec = _spec(banks=20, strategy="fedasync")
    expected = tensor_specs(model_tensors(build_task_model(spec)))
    adm = Admission(spec, AdmissionConfig(DEFAULT_LIMITS), expected, uses_base=True)
    assert adm.max_versions_behind == 400
    buff = Admission(
        _spec(banks=20, strategy="fedbuff", buffer_size=3),
        AdmissionConfig(DEFAULT_LIMITS),
        expected,
        uses_base=False,
        updates_per_version=3,
    )
    assert buff.max_versions_behind == 133  # floor(20 * 20 / 3)
    versions = _spec(banks=20, staleness_unit="versions")
    assert (
        Admission(
            versions, AdmissionConfig(DEFAULT_LIMITS), expected, uses_base=True
        ).max_versions_behind
        == 20
    )


# ------------------------------------------------------------------ factors


@pytest.mark.parametrize(
    "staleness", [StalenessSpec(kind="polynomial", a=0.5), StalenessSpec(kind="hinge", a=0.7, b=2)]
)
def test_staleness_weighting_reproduces_the_old_weights_bit_for_bit(
    staleness: StalenessSpec,
) -> None:
    def old_s(x: int) -> float:  # the formulas before weighting, written out
        if staleness.kind == "polynomial":
            return math.pow(float(x + 1), -float(staleness.a))
        return (
            1.0 if x <= staleness.b else 1.0 / (float(staleness.a) * float(x - staleness.b) + 1.0)
        )

    rows = {"bank-a": 900, "bank-b": 10, "bank-c": 90}

    old = {"staleness": staleness, "staleness_unit": "versions", "weighting": "staleness"}
    fa = FedAsync.from_spec(_spec(rows, settings={**old, "mixing": 0.7}))
    fb = FedBuff.from_spec(
        _spec(rows, settings={**old, "strategy": "fedbuff", "buffer_size": 3, "server_lr": 1.3})
    )
    head = {"w": torch.zeros(2)}
    for x in range(30):
        step = fa.offer(head, head, _update(x, "bank-a", 0, x, n=900))
        assert step.lineage[0].weight == 0.7 * old_s(x)
        fa.committed(step.lineage)
    ups = [
        _update(i, p, 0, x, n)
        for i, (p, x, n) in enumerate([("bank-a", 0, 900), ("bank-b", 5, 10), ("bank-c", 9, 90)])
    ]
    assert fb.offer(head, head, ups[0]) is None
    assert fb.offer(head, head, ups[1]) is None
    buffered = fb.offer(head, head, ups[2])
    assert buffered is not None
    assert [e.weight for e in buffered.lineage] == [1.3 * old_s(x) / 3.0 for x in (0, 5, 9)]


def test_samples_weights_a_big_bank_by_its_share_of_the_rows() -> None:
    rows = {"big": 600, "tiny": 10, "c": 130, "d": 130, "e": 130}
    spec = _spec(rows, strategy="fedasync", weighting="samples", max_boost=100.0)
    w = Weighter(spec.async_, 1, spec)
    f_big, f_tiny = w.factor("big", 600), w.factor("tiny", 10)
    assert f_big == pytest.approx(5 * 0.6)  # N * p = 5 * 600 / 1000
    assert f_tiny == pytest.approx(5 * 0.01)
    assert f_big / f_tiny == pytest.approx(60.0)
    assert w.factor("big", 10_000) == f_big  # a claim above the declared bound counts as it
    # Bounded by max_boost: with B = 10 the tiny bank's 0.05 is lifted to 0.1.
    assert samples_factor(0.01, 5, 10.0) == 0.1
    assert samples_factor(0.9, 50, 10.0) == 10.0
    # Without declared samples there is no reference: factor 1.
    undeclared = _spec(rows, declared=False, weighting="samples")
    assert Weighter(undeclared.async_, 1, undeclared).factor("big", 600) == 1.0


def test_data_shares_fall_back_to_equal_shares() -> None:
    assert data_shares(_spec({"a": 300, "b": 100})) == {"a": 0.75, "b": 0.25}
    assert data_shares(_spec({"a": 300, "b": 100}, declared=False)) == {"a": 0.5, "b": 0.5}


def test_balanced_factors_start_at_one_and_equal_banks_stay_near_one() -> None:
    spec = _spec(strategy="fedasync")
    w = Weighter(spec.async_, 1, spec)
    assert [w.factor(f"bank-{i:02d}", 100) for i in range(1, 6)] == [1.0] * 5
    periods = {f"bank-{i:02d}": 1.0 for i in range(1, 6)}
    for name in ("fedasync", "fedbuff"):
        strategy, _ = _arrivals(_spec(strategy=name), periods, 100.0)
        factors = [strategy.weighter.factor(p, 100) for p in periods]
        assert all(0.85 < f < 1.15 for f in factors), factors


@pytest.mark.parametrize("name", ["fedasync", "fedbuff"])
def test_balanced_gives_a_slow_big_bank_its_data_share(name: str) -> None:
    # 4 small banks sending every time unit, one bank with 60% of the rows 10x slower.
    rows = {"fast-1": 100, "fast-2": 100, "fast-3": 100, "fast-4": 100, "slow": 600}
    periods = {"fast-1": 1.0, "fast-2": 1.0, "fast-3": 1.0, "fast-4": 1.0, "slow": 10.0}
    data = data_shares(_spec(rows))
    strategy, lineages = _arrivals(_spec(rows, strategy=name), periods, 300.0)
    # After the first window (W = 100 entries), where the prior gives way to rates.
    shares = weight_shares(lineages[strategy.history // strategy.capacity :])
    ratios = share_ratios(shares, data)
    assert all(0.5 <= r <= 2.0 for r in ratios.values()), shares
    assert shares["slow"] > 0.3
    # Weighting by staleness only, the slow bank all but vanishes (the test can fail).
    _, old = _arrivals(_spec(rows, strategy=name, weighting="staleness"), periods, 300.0)
    assert weight_shares(old)["slow"] < 0.05


def test_a_t_stays_at_most_one() -> None:
    rows = {"a": 9_000, "b": 1, "c": 1}
    spec = _spec(rows, strategy="fedasync", mixing=1.0, max_boost=1000.0, weighting="balanced")
    periods = {"a": 7.0, "b": 1.0, "c": 1.3}
    _, lineages = _arrivals(spec, periods, 200.0)
    weights = [e.weight for lineage in lineages for e in lineage]
    assert max(weights) == 1.0
    assert all(0.0 < w <= 1.0 for w in weights)


def test_balanced_factor_is_bounded_and_scaled_within_the_bounds() -> None:
    shares = {"a": 0.5, "b": 0.5}
    # b absent from a full window: boosted, but never beyond B.
    assert balanced_factor("b", 0.5, shares, [("a", 1.0)] * 50, 10.0, 0.25) == 10.0
    # a over-represented: damped, never below 1/B.
    assert balanced_factor("a", 0.5, shares, [("a", 1.0)] * 50, 10.0, 0.25) >= 0.1
    # Matching the data: 1.
    assert balanced_factor("a", 0.5, shares, [("a", 1.0), ("b", 1.0)] * 5, 10.0, 0.25) == 1.0


# ------------------------------------------------------------------ restart


def _tail(
    lineages: Sequence[tuple[LineageEntry, ...]], entries: int
) -> list[tuple[LineageEntry, ...]]:
    """The last versions holding at least ``entries`` entries (what the service reads)."""
    out: list[tuple[LineageEntry, ...]] = []
    count = 0
    for lineage in reversed(lineages):
        if count >= entries:
            break
        out.append(lineage)
        count += len(lineage)
    return out[::-1]


@pytest.mark.parametrize("name", ["fedasync", "fedbuff"])
def test_a_restored_strategy_weighs_exactly_as_one_that_never_stopped(name: str) -> None:
    rows = {"a": 500, "b": 100, "c": 250, "d": 150}
    periods = {"a": 4.0, "b": 1.0, "c": 1.7, "d": 2.3}
    spec = _spec(rows, strategy=name, buffer_size=3)
    running, lineages = _arrivals(spec, periods, 120.0)
    held = running.flush({"w": torch.zeros(2)})  # a restart returns held updates anyway
    if held is not None:
        running.committed(held.lineage)
        lineages.append(held.lineage)
    restarted = _strategy(spec)
    restarted.restore(_tail(lineages, restarted.history))
    assert restarted.weighter.recent() == running.weighter.recent()
    for p, n in rows.items():
        assert restarted.weighter.factor(p, n) == running.weighter.factor(p, n)
    # And both go on identically.
    _, after_running = _arrivals(spec, periods, 40.0, running)
    _, after_restarted = _arrivals(spec, periods, 40.0, restarted)
    assert after_restarted == after_running


# ------------------------------------------------------------------ flagging


def _entry(i: int, participant: str, weight: float) -> LineageEntry:
    return LineageEntry(f"u{i}", participant, 0, 0, weight, b"\0" * 32)


def test_a_bank_whose_updates_carry_negligible_weight_is_flagged() -> None:
    stats = ServiceStats.for_task(_spec({"a": 400, "b": 300, "c": 300}), flag_after=3)
    assert stats.weight_window == 60  # 20 rounds of 3 banks
    changed: list[tuple[str, bool]] = []
    for i in range(30):
        lineage = (_entry(i, "abc"[i % 3], 0.001 if i % 3 == 2 else 0.5),)
        stats.count_accepted(lineage[0].participant, i + 1)
        changed += stats.count_weights(lineage)
    assert changed == [("c", True)]
    assert stats.flagged == ["c"]
    assert stats.flag_reasons == {"c": [LOW_WEIGHT]}
    bank = stats.banks["c"].as_dict()
    assert bank["low_weight"] is True
    assert 0.0 < float(str(bank["weight_share"])) < 0.03  # below a tenth of its 0.3
    # Its weight back to normal: the flag lifts once its share recovers.
    for i in range(30, 90):
        changed = stats.count_weights((_entry(i, "abc"[i % 3], 0.5),))
    assert stats.flagged == []
    assert stats.banks["c"].low_weight is False


def test_a_boosted_fedbuff_update_never_weighs_more_than_server_lr() -> None:
    spec = TaskSpec.parse(
        {
            "task_id": "t",
            "features": [{"name": "a", "kind": "numeric"}],
            "target": {"name": "y"},
            "participants": ["big", "s1", "s2"],
            "declared_samples": {"big": 9000, "s1": 500, "s2": 500},
            "async": {"strategy": "fedbuff", "buffer_size": 3, "server_lr": 0.5},
        }
    )
    buff = FedBuff.from_spec(spec)
    # The big bank holds 90% of the data and sent nothing recently: its factor is
    # boosted to max_boost (10), beyond K = 3, but its s * f is capped at K ...
    for i in range(60):
        buff.committed([_entry(i, "s1" if i % 2 else "s2", 0.1)])
    assert buff.weighter.factor("big", 9000) > 3.0
    (capped,) = buff.scaled([_update(0, "big", 60, 60, n=9000)])
    assert capped == 3.0
    # ... so in a full buffer its weight is at most server_lr: its delta applied once.
    step = buff.offer({}, {}, _update(1, "s1", 60, 60, n=500))
    assert step is None
    buff.offer({}, {}, _update(2, "s2", 60, 60, n=500))
    step = buff.offer({"w": torch.zeros(2)}, {}, _update(3, "big", 60, 60, n=9000))
    assert step is not None
    big = next(e for e in step.lineage if e.participant == "big")
    assert big.weight == pytest.approx(0.5)
    assert all(e.weight < 0.5 for e in step.lineage if e.participant != "big")
