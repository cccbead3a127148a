"""Async weighting: staleness in rounds, sample counts, balance by update rate, flagging.

Pure: strategies are driven through simulated arrival sequences, no servers. The
service side (restart, health) is in test_service.py.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence

import pytest
import torch

from aggregator.admission import Admission, AdmissionConfig
from aggregator.audit.influence import share_ratios, weight_shares
from aggregator.stats import LOW_WEIGHT, ServiceStats
from aggregator.strategies import AcceptedUpdate, FedAsync, FedBuff
from aggregator.weighting import (
    PRIOR_MASS,
    Weighter,
    balanced_factor,
    data_shares,
    exact_units,
    samples_factor,
)
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


# ------------------------------------------------------------------ incremental = reference


def _reference(w: Weighter, spec: TaskSpec, participant: str, n: int) -> float:
    """``f`` by :func:`balanced_factor`, the definition, over the weighter's window."""
    p_i = w.share(participant, n)
    assert p_i is not None
    prior = float(w.history - len(w.recent())) + PRIOR_MASS
    return balanced_factor(
        participant, p_i, data_shares(spec), w.recent(), spec.async_.max_boost, prior
    )


def _check(w: Weighter, spec: TaskSpec, names: Sequence[str], rng: random.Random) -> int:
    """The weighter's factors of a few banks are the reference's, bit for bit."""
    checked = 0
    for name in names:
        n = rng.randint(1, 2_000)
        f = w.factor(name, n)
        if name not in spec.participants:
            assert f == 1.0  # no data share: no factor
            continue
        assert f == _reference(w, spec, name, n), (name, n)
        assert w.factor(name, n) == f  # and asking again changes nothing
        checked += 1
    return checked


def test_exactly_rounded_sums_are_what_fsum_gives() -> None:
    rng = random.Random(7)
    pool = [0.0, 5e-324, 2.5e-308, 0.1, 0.2, 0.3, 1.0, 2**-0.5, 1e300, 2.0**1000]
    for _ in range(2_000):
        xs = [
            rng.choice(pool) if rng.random() < 0.5 else rng.random() * 2.0 ** rng.randint(-1074, 0)
            for _ in range(rng.randint(1, 40))
        ]
        units = sum(exact_units(x) for x in xs)
        assert units / 2**1074 == math.fsum(xs)
        rng.shuffle(xs)
        assert sum(exact_units(x) for x in xs) == units


@pytest.mark.parametrize("seed", range(8))
def test_balanced_factors_are_the_reference_over_random_lineages_and_restores(
    seed: int,
) -> None:
    rng = random.Random(seed)
    banks = rng.choice([1, 2, 3, 7, 40])
    rows = {f"bank-{i:02d}": rng.choice([1, 100, rng.randint(1, 10**9)]) for i in range(banks)}
    spec = _spec(
        rows,
        declared=rng.random() < 0.7,
        strategy=rng.choice(["fedasync", "fedbuff"]),
        buffer_size=3,
        balance_window=rng.choice([0, 1, 4, 25, 90]),
        max_boost=rng.choice([1.0, 2.0, 10.0, 1000.0]),
        staleness_unit=rng.choice(["versions", "rounds"]),
        staleness=rng.choice(
            [
                StalenessSpec(kind="polynomial", a=rng.choice([0.5, 1.7])),
                StalenessSpec(kind="hinge", a=0.3, b=2),
                StalenessSpec(kind="constant"),
            ]
        ),
    )
    w = Weighter(spec.async_, 3, spec)
    names = [*rows, "stranger"]  # a lineage may name a bank the spec does not list
    lineages: list[tuple[LineageEntry, ...]] = []
    checked = 0
    for v in range(300):
        senders = names[: rng.randint(1, len(names))]  # some banks are rarely seen
        lineage = tuple(
            LineageEntry(f"u{v}.{k}", rng.choice(senders), 0, rng.randint(0, 60), 1.0, b"")
            for k in range(rng.randint(1, 3))
        )
        w.committed(lineage)
        lineages.append(lineage)
        if rng.random() < 0.05:  # a restart mid-way: the restored one goes on instead
            restored = Weighter(spec.async_, 3, spec)
            restored.restore(_tail(lineages, restored.history))
            assert restored.recent() == w.recent()
            for name in rng.sample(names, min(3, len(names))):
                assert restored.factor(name, 50) == w.factor(name, 50)
            w = restored
        checked += _check(w, spec, rng.sample(names, min(2, len(names))), rng)
    assert checked > 100


@pytest.mark.parametrize("seed", range(6))
def test_balanced_factors_are_the_reference_over_random_masses(seed: int) -> None:
    # Masses a staleness function never gives (0, subnormal, any float): the sums stay
    # exact whatever enters and leaves, and banks leave and come back.
    rng = random.Random(100 + seed)
    rows = {f"b{i}": rng.choice([1, 7, 1000, rng.randint(1, 10**6)]) for i in range(30)}
    spec = _spec(rows, balance_window=rng.choice([1, 3, 20, 80]), max_boost=10.0)
    w = Weighter(spec.async_, 1, spec)
    names = [*rows, "stranger"]
    odd = [0.0, 5e-324, 1e-310, 1e-300, 0.1, 0.3, 2**-0.5, 1.0]
    for step in range(300):
        senders = names[: rng.randint(1, len(names))]
        w._extend(
            (rng.choice(senders), rng.choice(odd) if rng.random() < 0.5 else rng.random())
            for _ in range(rng.randint(1, 4))
        )
        if step % 37 == 0:  # the same window, built in one go
            restored = Weighter(spec.async_, 1, spec)
            restored._extend(w.recent())
            w = restored
        _check(w, spec, rng.sample(names, 3), rng)


def test_near_ties_give_the_extremes_of_the_computed_ratios() -> None:
    # A cluster of banks whose masses are proportional to their data shares up to a
    # few ulps (every m_j / d_j nearly the same), one bank with 8 times its share's
    # mass and one with 60: the spread is beyond B^2, so c = sqrt(lo * hi) depends on
    # max r, which lies in the cluster, and the middle bank's factor is not clipped.
    # Rounding orders the cluster's r_j otherwise than their m_j / d_j + P now and
    # then (the test checks it happens); the factors are the reference's all the same.
    inverted = 0
    for seed in range(150):
        rng = random.Random(seed)
        rows = {f"b{i}": rng.randint(1, 10**6) for i in range(rng.randint(2, 12))}
        rows |= {"middle": rng.randint(1, 10**6), "heavy": rng.randint(1, 10**6)}
        spec = _spec(rows, balance_window=rng.choice([1, 2, 5]) * len(rows), max_boost=2.0)
        shares = data_shares(spec)
        scale = rng.uniform(0.1, 3.0)
        over = {"middle": 8.0, "heavy": 60.0}
        masses = {
            j: over[j] * scale * d
            if j in over
            else scale * d + math.ulp(scale * d) * rng.randint(-2, 2)
            for j, d in shares.items()
        }
        w = Weighter(spec.async_, 1, spec)
        w._extend(masses.items())
        prior = float(w.history - len(masses)) + PRIOR_MASS
        denominator = math.fsum(masses.values()) + prior
        near = {j: masses[j] / shares[j] + prior for j in masses}
        ratio = {j: shares[j] / ((masses[j] + prior * shares[j]) / denominator) for j in masses}
        first = [ratio[j] for j in masses if near[j] == min(near.values())]
        inverted += max(first) != max(ratio.values())
        _check(w, spec, list(rows), rng)
        _check(w, spec, list(rows), rng)
    assert inverted > 0


def test_balanced_factors_are_the_reference_with_10_000_banks() -> None:
    rng = random.Random(10_000)
    rows = {f"bank-{i:05d}": rng.randint(100, 5_000) for i in range(10_000)}
    spec = _spec(rows, balance_window=30_000, staleness_unit="versions")
    w = Weighter(spec.async_, 1, spec)
    names = list(rows)
    lineages: list[tuple[LineageEntry, ...]] = []
    for v in range(8):
        # 9,000 updates: most banks at their own pace, a few much faster or slower.
        lineage = tuple(
            LineageEntry(
                f"u{v}.{k}",
                names[int(rng.betavariate(0.7, 1.3) * 10_000)],
                0,
                rng.randint(0, 40),
                1.0,
                b"",
            )
            for k in range(9_000)
        )
        w.committed(lineage)
        lineages.append(lineage)
        if v == 5:
            restored = Weighter(spec.async_, 1, spec)
            restored.restore(lineages)
            assert restored.recent() == w.recent()
            w = restored
        _check(w, spec, [*rng.sample(names, 3), "bank-00000", "bank-09999"], rng)


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
