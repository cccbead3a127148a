"""Staleness functions, FedAsync and FedBuff against hand-computed values.

Every expected number is written out as a literal, with its arithmetic in a
comment; none is computed by the code under test. What every registered strategy
must satisfy (determinism, replay, counterfactual) is in test_strategy_contract.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from aggregator.strategies import (
    AcceptedUpdate,
    FedAsync,
    FedBuff,
    Step,
    Strategy,
    strategy_for,
)
from common.errors import SpecError
from common.hashing import LineageEntry
from common.spec import AsyncSettings, NumericFeature, StalenessSpec, TargetSpec, TaskSpec
from common.staleness import staleness_weight
from common.wire import Tensors

CONSTANT = StalenessSpec(kind="constant")
POLY_HALF = StalenessSpec(kind="polynomial", a=0.5)
POLY_ONE = StalenessSpec(kind="polynomial", a=1.0)
POLY_TWO = StalenessSpec(kind="polynomial", a=2.0)
POLY_ZERO = StalenessSpec(kind="polynomial", a=0.0)
HINGE = StalenessSpec(kind="hinge", a=0.5, b=4)
HINGE_B0 = StalenessSpec(kind="hinge", a=2.0, b=0)
HINGE_A0 = StalenessSpec(kind="hinge", a=0.0, b=2)


def _versions(**settings: object) -> AsyncSettings:
    """Settings whose weights are the pre-weighting ones: raw ``t - v``, factor 1."""
    return AsyncSettings.model_validate(
        {"staleness_unit": "versions", "weighting": "staleness", **settings}
    )


def _t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _update(
    uid: str, staleness: int, delta: Tensors, *, base_version: int = 0, participant: str = "bank-a"
) -> AcceptedUpdate:
    return AcceptedUpdate(
        update_id=uid,
        participant=participant,
        base_version=base_version,
        staleness=staleness,
        num_samples=100,
        delta=delta,
        content_hash=uid.encode().ljust(32, b"\0"),
    )


Raw = list[tuple[str, str, tuple[int, ...], bytes]]


def _task(settings: AsyncSettings) -> TaskSpec:
    return TaskSpec(
        task_id="t",
        features=(NumericFeature(name="x"),),
        target=TargetSpec(name="y"),
        **{"async": settings},
    )


def _raw(params: Tensors) -> Raw:
    return [
        (name, str(t.dtype), tuple(t.shape), t.contiguous().numpy().tobytes())
        for name, t in params.items()
    ]


# --------------------------------------------------------------------------- staleness


@pytest.mark.parametrize("staleness", [0, 1, 5, 1000])
def test_constant_is_one(staleness: int) -> None:
    assert staleness_weight(CONSTANT, staleness) == 1.0


@pytest.mark.parametrize(
    ("spec", "staleness", "expected"),
    [
        (POLY_HALF, 0, 1.0),  # (0+1)^-0.5 = 1
        (POLY_HALF, 3, 0.5),  # (3+1)^-0.5 = 1/2
        (POLY_HALF, 8, 1 / 3),  # (8+1)^-0.5 = 1/3
        (POLY_HALF, 15, 0.25),  # (15+1)^-0.5 = 1/4
        (POLY_HALF, 99, 0.1),  # (99+1)^-0.5 = 1/10
        (POLY_ONE, 1, 0.5),  # (1+1)^-1 = 1/2
        (POLY_ONE, 4, 0.2),  # (4+1)^-1 = 1/5
        (POLY_TWO, 2, 1 / 9),  # (2+1)^-2 = 1/9
        (POLY_ZERO, 0, 1.0),  # x^0 = 1
        (POLY_ZERO, 1, 1.0),
        (POLY_ZERO, 7, 1.0),
        (POLY_ZERO, 1000, 1.0),
    ],
)
def test_polynomial(spec: StalenessSpec, staleness: int, expected: float) -> None:
    assert staleness_weight(spec, staleness) == pytest.approx(expected, rel=1e-15, abs=0)


@pytest.mark.parametrize(
    ("spec", "staleness", "expected"),
    [
        (HINGE, 0, 1.0),  # 0 <= b=4
        (HINGE, 3, 1.0),
        (HINGE, 4, 1.0),  # boundary: staleness == b is still flat
        (HINGE, 5, 2 / 3),  # b+1: 1/(0.5*(5-4)+1) = 1/1.5
        (HINGE, 6, 0.5),  # 1/(0.5*(6-4)+1) = 1/2
        (HINGE, 14, 1 / 6),  # 1/(0.5*(14-4)+1) = 1/6
        (HINGE_B0, 0, 1.0),  # 0 <= b=0
        (HINGE_B0, 1, 1 / 3),  # 1/(2*(1-0)+1) = 1/3
        (HINGE_B0, 3, 1 / 7),  # 1/(2*(3-0)+1) = 1/7
        (HINGE_A0, 3, 1.0),  # 1/(0*(3-2)+1) = 1
        (HINGE_A0, 50, 1.0),
    ],
)
def test_hinge(spec: StalenessSpec, staleness: int, expected: float) -> None:
    # Only correctly rounded operations: the result is the double nearest the exact value.
    assert staleness_weight(spec, staleness) == expected


@pytest.mark.parametrize("spec", [CONSTANT, POLY_HALF, POLY_ZERO, HINGE, HINGE_A0])
def test_negative_staleness_is_refused(spec: StalenessSpec) -> None:
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        staleness_weight(spec, -1)


# --------------------------------------------------------------------------- FedAsync


def test_fedasync_mixes_with_polynomial_staleness() -> None:
    settings = _versions(strategy="fedasync", mixing=0.5, staleness=POLY_HALF)
    strategy = FedAsync(settings)
    head = {"w": _t(1.0, 2.0)}
    base = {"w": _t(0.0, 0.0)}
    update = _update("u1", 3, {"w": _t(1.0, 1.0)}, base_version=7)
    step = strategy.offer(head, base, update)
    # a_t = 0.5 * (3+1)^-0.5 = 0.25; w_new = [0,0] + [1,1] = [1,1]
    # params = 0.75*[1,2] + 0.25*[1,1] = [1.0, 1.75] (exact in float32)
    assert step.params["w"].dtype == torch.float32
    assert torch.equal(step.params["w"], _t(1.0, 1.75))
    assert len(step.lineage) == 1
    entry = step.lineage[0]
    assert entry.update_id == "u1"
    assert entry.participant == "bank-a"
    assert entry.base_version == 7
    assert entry.staleness == 3
    assert entry.weight == 0.25
    assert entry.content_hash == update.content_hash
    assert strategy.pending() == ()
    # Inputs are not modified.
    assert torch.equal(head["w"], _t(1.0, 2.0))


def test_fedasync_fresh_update_constant_keeps_tensor_order() -> None:
    settings = _versions(strategy="fedasync", mixing=0.6, staleness=CONSTANT)
    head = {"w": _t(1.0, 2.0), "b": _t(0.5)}
    delta = {"b": _t(0.25), "w": _t(0.5, -1.0)}  # order of the delta does not matter
    step = FedAsync(settings).offer(head, head, _update("u1", 0, delta))
    # a_t = 0.6 * 1 = 0.6; w_new: w = [1.5, 1.0], b = [0.75]
    # w = 0.4*[1,2] + 0.6*[1.5,1] = [0.4+0.9, 0.8+0.6] = [1.3, 1.4]
    # b = 0.4*0.5 + 0.6*0.75 = 0.2 + 0.45 = 0.65
    assert list(step.params) == ["w", "b"]
    torch.testing.assert_close(step.params["w"], _t(1.3, 1.4), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(step.params["b"], _t(0.65), rtol=1e-6, atol=1e-7)
    assert step.lineage[0].weight == pytest.approx(0.6, rel=1e-15, abs=0)


def test_fedasync_hinge_boundary() -> None:
    settings = _versions(
        strategy="fedasync", mixing=0.8, staleness=StalenessSpec(kind="hinge", a=1.0, b=2)
    )
    strategy = FedAsync(settings)
    head = {"w": _t(0.0, 4.0)}
    base = {"w": _t(2.0, 2.0)}
    delta = {"w": _t(2.0, -2.0)}  # w_new = [4, 0]
    at_b = strategy.offer(head, base, _update("u1", 2, delta))
    past_b = strategy.offer(head, base, _update("u2", 3, delta))
    # staleness 2 == b: a_t = 0.8*1 = 0.8 -> 0.2*[0,4] + 0.8*[4,0] = [3.2, 0.8]
    assert at_b.lineage[0].weight == 0.8
    torch.testing.assert_close(at_b.params["w"], _t(3.2, 0.8), rtol=1e-6, atol=1e-7)
    # staleness 3 == b+1: a_t = 0.8 * 1/(1*(3-2)+1) = 0.4 -> 0.6*[0,4] + 0.4*[4,0] = [1.6, 2.4]
    assert past_b.lineage[0].weight == 0.4
    torch.testing.assert_close(past_b.params["w"], _t(1.6, 2.4), rtol=1e-6, atol=1e-7)


def test_fedasync_preserves_each_dtype() -> None:
    settings = _versions(strategy="fedasync", mixing=0.6, staleness=CONSTANT)
    head = {
        "w": torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64),
        "b": _t(1.0),
    }
    base = {"w": torch.zeros(2, 2, dtype=torch.float64), "b": _t(0.0)}
    delta = {"w": torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64), "b": _t(2.0)}
    step = FedAsync(settings).offer(head, base, _update("u1", 0, delta))
    # a_t = 0.6: w = 0.4*head + 0.6*delta
    #   = [[0.4+0.06, 0.8+0.12], [1.2+0.18, 1.6+0.24]] = [[0.46, 0.92], [1.38, 1.84]]
    # b = 0.4*1 + 0.6*2 = 1.6
    assert step.params["w"].dtype == torch.float64
    assert step.params["b"].dtype == torch.float32
    torch.testing.assert_close(
        step.params["w"],
        torch.tensor([[0.46, 0.92], [1.38, 1.84]], dtype=torch.float64),
        rtol=1e-14,
        atol=1e-15,
    )
    torch.testing.assert_close(step.params["b"], _t(1.6), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- FedBuff

FEDBUFF = _versions(strategy="fedbuff", buffer_size=3, server_lr=1.5, staleness=POLY_ONE)
HEAD = {"w": _t(1.0, 1.0), "b": _t(0.0)}
U1 = _update("u1", 0, {"w": _t(2.0, 4.0), "b": _t(8.0)}, base_version=5, participant="bank-a")
U2 = _update("u2", 1, {"w": _t(4.0, -8.0), "b": _t(-4.0)}, base_version=4, participant="bank-b")
U3 = _update("u3", 3, {"w": _t(8.0, 16.0), "b": _t(16.0)}, base_version=2, participant="bank-c")


def test_fedbuff_buffers_until_k_then_steps() -> None:
    strategy = FedBuff(FEDBUFF)
    assert strategy.offer(HEAD, HEAD, U1) is None
    assert strategy.pending() == (U1,)
    assert strategy.offer(HEAD, HEAD, U2) is None
    assert strategy.pending() == (U1, U2)
    step = strategy.offer(HEAD, HEAD, U3)
    assert step is not None
    assert strategy.pending() == ()
    # s = (0+1)^-1 = 1, (1+1)^-1 = 0.5, (3+1)^-1 = 0.25; K = 3, server_lr = 1.5
    # weights: 1.5*1/3 = 0.5, 1.5*0.5/3 = 0.25, 1.5*0.25/3 = 0.125
    # w = [1,1] + 0.5*[2,4] + 0.25*[4,-8] + 0.125*[8,16] = [1,1] + [1,2] + [1,-2] + [1,2] = [4, 3]
    # b = 0 + 0.5*8 + 0.25*(-4) + 0.125*16 = 4 - 1 + 2 = 5
    assert list(step.params) == ["w", "b"]
    assert torch.equal(step.params["w"], _t(4.0, 3.0))
    assert torch.equal(step.params["b"], _t(5.0))
    assert [e.update_id for e in step.lineage] == ["u1", "u2", "u3"]
    assert [e.participant for e in step.lineage] == ["bank-a", "bank-b", "bank-c"]
    assert [e.weight for e in step.lineage] == [0.5, 0.25, 0.125]
    assert [e.staleness for e in step.lineage] == [0, 1, 3]
    assert [e.base_version for e in step.lineage] == [5, 4, 2]
    assert [e.content_hash for e in step.lineage] == [u.content_hash for u in (U1, U2, U3)]
    # The buffer starts afresh.
    assert strategy.offer(step.params, step.params, U1) is None
    assert strategy.pending() == (U1,)


def test_fedbuff_with_k_one_steps_every_update() -> None:
    settings = _versions(
        strategy="fedbuff",
        buffer_size=1,
        server_lr=0.5,
        staleness=StalenessSpec(kind="hinge", a=1.0, b=0),
    )
    step = FedBuff(settings).offer(HEAD, HEAD, _update("u1", 1, {"w": _t(4.0, 8.0), "b": _t(2.0)}))
    assert step is not None
    # s(1) = 1/(1*(1-0)+1) = 0.5; weight = 0.5*0.5/1 = 0.25
    # w = [1,1] + 0.25*[4,8] = [2, 3]; b = 0 + 0.25*2 = 0.5
    assert torch.equal(step.params["w"], _t(2.0, 3.0))
    assert torch.equal(step.params["b"], _t(0.5))
    assert step.lineage[0].weight == 0.25


def test_fedbuff_ignores_base() -> None:
    other_base = {"w": _t(-100.0, 7.0), "b": _t(3.0)}
    a = FedBuff(FEDBUFF)
    b = FedBuff(FEDBUFF)
    for u in (U1, U2):
        assert a.offer(HEAD, HEAD, u) is None
        assert b.offer(HEAD, other_base, u) is None
    step_a = a.offer(HEAD, HEAD, U3)
    step_b = b.offer(HEAD, other_base, U3)
    assert step_a is not None
    assert step_b is not None
    assert _raw(step_a.params) == _raw(step_b.params)


def test_fedbuff_flush_divides_by_buffered_count() -> None:
    strategy = FedBuff(FEDBUFF)
    assert strategy.flush(HEAD) is None  # nothing buffered
    assert strategy.offer(HEAD, HEAD, U1) is None
    assert strategy.offer(HEAD, HEAD, U2) is None
    step = strategy.flush(HEAD)
    assert step is not None
    assert strategy.pending() == ()
    # K' = 2: weights 1.5*1/2 = 0.75, 1.5*0.5/2 = 0.375
    # w = [1,1] + 0.75*[2,4] + 0.375*[4,-8] = [1,1] + [1.5,3] + [1.5,-3] = [4, 1]
    # b = 0 + 0.75*8 + 0.375*(-4) = 6 - 1.5 = 4.5
    assert torch.equal(step.params["w"], _t(4.0, 1.0))
    assert torch.equal(step.params["b"], _t(4.5))
    assert [e.update_id for e in step.lineage] == ["u1", "u2"]
    assert [e.weight for e in step.lineage] == [0.75, 0.375]
    assert strategy.flush(HEAD) is None


def test_fedbuff_preserves_float64() -> None:
    settings = _versions(strategy="fedbuff", buffer_size=2, server_lr=1.0, staleness=CONSTANT)
    head = {"w": torch.tensor([0.1, 0.2], dtype=torch.float64)}
    strategy = FedBuff(settings)
    d1 = {"w": torch.tensor([0.3, 0.0], dtype=torch.float64)}
    d2 = {"w": torch.tensor([0.1, 0.4], dtype=torch.float64)}
    assert strategy.offer(head, head, _update("u1", 0, d1)) is None
    step = strategy.offer(head, head, _update("u2", 0, d2))
    assert step is not None
    # weights 1*1/2 = 0.5 each: w = [0.1,0.2] + 0.5*[0.3,0] + 0.5*[0.1,0.4] = [0.3, 0.4]
    assert step.params["w"].dtype == torch.float64
    torch.testing.assert_close(
        step.params["w"], torch.tensor([0.3, 0.4], dtype=torch.float64), rtol=1e-15, atol=1e-16
    )


def test_fedasync_flush_and_pending_are_empty() -> None:
    strategy = FedAsync(AsyncSettings())
    assert strategy.flush(HEAD) is None
    assert strategy.pending() == ()


# --------------------------------------------------------------------------- determinism


def _random_tensors(gen: torch.Generator, scale: float) -> Tensors:
    return {
        "layer.weight": torch.randn(64, 33, generator=gen) * scale,
        "layer.bias": torch.randn(33, generator=gen) * scale,
        "out.weight": torch.randn(1, 33, generator=gen, dtype=torch.float64) * scale,
    }


def _simulate(settings: AsyncSettings) -> list[tuple[Raw, tuple[LineageEntry, ...]]]:
    gen = torch.Generator().manual_seed(1234)
    strategy: Strategy = strategy_for(_task(settings))
    versions = [_random_tensors(gen, 1.0)]
    out: list[tuple[Raw, tuple[LineageEntry, ...]]] = []
    for i in range(12):
        t = len(versions) - 1
        staleness = min((0, 2, 1, 3)[i % 4], t)
        base = versions[t - staleness]
        update = _update(f"u{i}", staleness, _random_tensors(gen, 0.1), base_version=t - staleness)
        step = strategy.offer(versions[t], base, update)
        if step is not None:
            versions.append(step.params)
            out.append((_raw(step.params), step.lineage))
    return out


@pytest.mark.parametrize(
    "settings",
    [
        AsyncSettings(strategy="fedasync", mixing=0.6, staleness=POLY_HALF),
        AsyncSettings(strategy="fedasync", mixing=0.9, staleness=HINGE_B0),
        AsyncSettings(strategy="fedbuff", buffer_size=3, server_lr=0.7, staleness=POLY_HALF),
    ],
)
def test_identical_inputs_give_bit_identical_outputs(settings: AsyncSettings) -> None:
    first = _simulate(settings)
    second = _simulate(settings)
    assert len(first) == (12 if settings.strategy == "fedasync" else 4)
    assert first == second


# --------------------------------------------------------------------------- trust


def test_strategies_trust_admission_and_do_not_validate_again() -> None:
    # Admission refuses too-stale updates; the strategy weighs what it is given.
    fedasync = FedAsync(AsyncSettings(max_staleness=2, mixing=0.5, staleness=CONSTANT))
    step = fedasync.offer(HEAD, HEAD, _update("u1", 3, {"w": _t(2.0, 2.0), "b": _t(2.0)}))
    # a_t = 0.5 * 1: w = 0.5*[1,1] + 0.5*[3,3] = [2, 2]; b = 0.5*0 + 0.5*2 = 1
    assert torch.equal(step.params["w"], _t(2.0, 2.0))
    assert torch.equal(step.params["b"], _t(1.0))
    # The staleness function itself still has its domain.
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        fedasync.offer(HEAD, HEAD, _update("u2", -1, HEAD))


# --------------------------------------------------------------------------- factory


@pytest.mark.parametrize(
    ("settings", "kind"),
    [
        (AsyncSettings(strategy="fedasync", mixing=0.3, staleness=HINGE), FedAsync),
        (AsyncSettings(strategy="fedbuff", buffer_size=4, server_lr=2.0), FedBuff),
    ],
)
def test_strategy_for_and_settings_round_trip(settings: AsyncSettings, kind: type) -> None:
    strategy = strategy_for(_task(settings))
    assert isinstance(strategy, kind)
    assert strategy.name == settings.strategy
    assert strategy.capacity == (1 if kind is FedAsync else 4)
    recorded = json.loads(json.dumps(strategy.settings()))
    assert AsyncSettings.model_validate(recorded) == settings


@pytest.mark.parametrize("name", ["fedprox2", "fedavg"])
def test_an_unregistered_or_sync_name_is_a_spec_error_naming_the_registered_ones(
    name: str,
) -> None:
    spec = _task(AsyncSettings(strategy=name))
    with pytest.raises(SpecError, match=rf"'{name}' is not registered.*fedasync, fedbuff"):
        strategy_for(spec)


@pytest.mark.parametrize("name", ["FedAsync", "fed-buff", "", "1x"])
def test_a_malformed_strategy_name_is_refused_by_the_spec(name: str) -> None:
    with pytest.raises(ValueError, match="strategy"):
        AsyncSettings(strategy=name)


def test_step_is_frozen() -> None:
    step = Step(params={}, lineage=())
    with pytest.raises(AttributeError):
        step.lineage = ()  # type: ignore[misc]


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("spec", "rounds", "expected"),
    [
        (POLY_HALF, 0.5, 1.5**-0.5),  # (0.5 + 1)^-0.5
        (POLY_ONE, 1.25, 1 / 2.25),  # (1.25 + 1)^-1
        (HINGE, 4.0, 1.0),  # still flat at b
        (HINGE, 4.5, 0.8),  # 1/(0.5*(4.5-4)+1) = 1/1.25
    ],
)
def test_staleness_in_rounds_is_a_float(
    spec: StalenessSpec, rounds: float, expected: float
) -> None:
    assert staleness_weight(spec, rounds) == pytest.approx(expected, rel=1e-15, abs=0)


def test_fedbuff_measures_staleness_in_rounds_of_its_participants() -> None:
    # 6 banks, K = 3: a delta 4 versions old is 4 * 3 / 6 = 2 rounds old.
    spec = TaskSpec(
        task_id="t",
        features=(NumericFeature(name="x"),),
        target=TargetSpec(name="y"),
        participants=tuple(f"bank-{c}" for c in "abcdef"),
        **{"async": AsyncSettings(strategy="fedbuff", buffer_size=3, weighting="staleness")},
    )
    strategy = FedBuff.from_spec(spec)
    ups = [_update(f"u{i}", x, dict(HEAD)) for i, x in enumerate((0, 4, 2))]
    assert strategy.offer(HEAD, HEAD, ups[0]) is None
    assert strategy.offer(HEAD, HEAD, ups[1]) is None
    step = strategy.offer(HEAD, HEAD, ups[2])
    assert step is not None
    # s = (0+1)^-0.5 = 1, (2+1)^-0.5, (1+1)^-0.5; weights s / 3; raw t - v kept.
    assert [e.weight for e in step.lineage] == pytest.approx(
        [1 / 3, 3**-0.5 / 3, 2**-0.5 / 3], rel=1e-15
    )
    assert [e.staleness for e in step.lineage] == [0, 4, 2]
