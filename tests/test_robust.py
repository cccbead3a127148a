"""Robust aggregation (aggregator/robust.py): hand-computed examples, bitwise order
invariance and determinism, robustness against a few attackers, and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import aggregate, privacy, robust
from common.wire import Tensors

F64 = torch.float64


def _d(**tensors: list[float] | list[list[float]] | float) -> Tensors:
    """A delta of float64 tensors from nested lists (or a scalar)."""
    return {name: torch.tensor(v, dtype=F64) for name, v in tensors.items()}


def _col(xs: list[float]) -> list[Tensors]:
    """One single-element delta ``{"w": [x]}`` per value."""
    return [_d(w=[x]) for x in xs]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw IEEE bits of a float64 tensor (so -0.0 and +0.0 differ)."""
    assert t.dtype == F64
    return t.contiguous().view(torch.int64)


def _same_bits(a: Tensors, b: Tensors) -> bool:
    return list(a) == list(b) and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


# -- delta_norm, cosine ---------------------------------------------------------------


def test_delta_norm_over_all_tensors() -> None:
    assert robust.delta_norm(_d(b=[[4.0]], a=[3.0])) == 5.0
    assert robust.delta_norm(_d(w=[0.0, -0.0])) == 0.0
    assert robust.delta_norm(_d(w=[1.0, 2.0], v=2.0, u=[[4.0, 0.0]])) == 5.0


def test_delta_norm_is_the_privacy_norm_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(7)
    delta = {
        "layer.weight": torch.randn(17, 5, generator=g, dtype=torch.float32),
        "layer.bias": torch.randn(5, generator=g, dtype=F64) * 1e-3,
        "out": torch.randn(3, generator=g).to(torch.bfloat16),
    }
    assert privacy.delta_norm is robust.delta_norm  # one definition, shared
    assert robust.delta_norm(delta) == privacy.delta_norm(delta)


def test_cosine_examples() -> None:
    a = _d(w=[1.0, 0.0])
    assert robust.cosine(a, _d(w=[0.0, 2.0])) == 0.0
    assert robust.cosine(a, _d(w=[2.0, 0.0])) == 1.0
    assert robust.cosine(a, _d(w=[-3.0, 0.0])) == -1.0
    assert robust.cosine(_d(w=[1.0, 1.0]), a) == 1.0 / math.sqrt(2.0)
    # Over all tensors: (1*1 + 2*0) / (sqrt(5) * 1).
    assert robust.cosine(_d(x=1.0, y=[2.0]), _d(x=1.0, y=[0.0])) == 1.0 / math.sqrt(5.0)


def test_cosine_is_none_for_a_zero_delta() -> None:
    assert robust.cosine(_d(w=[0.0, 0.0]), _d(w=[1.0, 2.0])) is None
    assert robust.cosine(_d(w=[1.0, 2.0]), _d(w=[-0.0, 0.0])) is None


# -- coordinate_median ----------------------------------------------------------------


def test_median_odd_count() -> None:
    deltas = [
        _d(w=[1.0, 5.0], b=3.0),
        _d(w=[2.0, -1.0], b=0.0),
        _d(w=[9.0, 0.0], b=-2.0),
    ]
    med = robust.coordinate_median(deltas)
    assert list(med) == ["b", "w"]
    assert med["w"].dtype == F64
    assert med["w"].tolist() == [2.0, 0.0]
    assert med["b"].shape == torch.Size([])
    assert med["b"].item() == 0.0


def test_median_even_count_is_the_mean_of_the_middle_two() -> None:
    deltas = _col([10.0, 1.0, 3.0, 2.0])
    assert robust.coordinate_median(deltas)["w"].tolist() == [2.5]  # torch.median: 2.0
    two = [_d(w=[[1.0, -4.0]]), _d(w=[[2.0, 4.0]])]
    assert robust.coordinate_median(two)["w"].tolist() == [[1.5, 0.0]]


def test_median_of_one_delta_is_that_delta() -> None:
    delta = _d(w=[[1.5, -2.0], [0.25, 7.0]])
    assert torch.equal(robust.coordinate_median([delta])["w"], delta["w"])


def test_median_of_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="no deltas"):
        robust.coordinate_median([])


def test_median_signed_zeros_do_not_depend_on_order() -> None:
    one = robust.coordinate_median(_col([-0.0, 0.0, 5.0]))
    other = robust.coordinate_median(_col([0.0, -0.0, 5.0]))
    assert _same_bits(one, other)
    assert _bits(one["w"]).tolist() == _bits(torch.tensor([0.0], dtype=F64)).tolist()


def test_median_accepts_lower_precision_inputs() -> None:
    deltas = [{"w": torch.tensor([x], dtype=torch.float32)} for x in (0.1, 0.2)]
    got = robust.coordinate_median(deltas)["w"]
    assert got.dtype == F64
    lo, hi = (torch.tensor(x, dtype=torch.float32).double() for x in (0.1, 0.2))
    want = (lo + hi) / 2
    assert got.item() == want.item()


# -- trimmed_mean ---------------------------------------------------------------------


def test_trimmed_mean_drops_k_of_each_end() -> None:
    # n = 5, trim 0.2: k = 1, so mean(2, 3, 4) = 3.
    assert robust.trimmed_mean(_col([100.0, 3.0, 1.0, 4.0, 2.0]), 0.2)["w"].tolist() == [3.0]
    # n = 4, trim 0.25: k = 1, so mean(2, 3) = 2.5.
    assert robust.trimmed_mean(_col([10.0, 1.0, 3.0, 2.0]), 0.25)["w"].tolist() == [2.5]
    # n = 4, trim 0.2: k = floor(0.8) = 0, the plain mean 16 / 4.
    assert robust.trimmed_mean(_col([10.0, 1.0, 3.0, 2.0]), 0.2)["w"].tolist() == [4.0]
    # n = 10, trim 0.2: k = 2, mean(2, 3, 4, 5, 6, 7) = 4.5.
    ten = _col([9.0, 0.0, 8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0])
    assert robust.trimmed_mean(ten, 0.2)["w"].tolist() == [4.5]


def test_trimmed_mean_several_tensors() -> None:
    deltas = [
        _d(w=[1.0, -6.0], b=[[0.5]]),
        _d(w=[2.0, 6.0], b=[[-0.5]]),
        _d(w=[4.0, 0.0], b=[[2.5]]),
        _d(w=[-50.0, 3.0], b=[[1.5]]),
        _d(w=[3.0, 9.0], b=[[1.0]]),
    ]
    tm = robust.trimmed_mean(deltas, 0.2)  # k = 1: drop min and max per coordinate
    assert list(tm) == ["b", "w"]
    assert tm["w"].tolist() == [2.0, 3.0]  # mean(1, 2, 3), mean(0, 3, 6)
    assert tm["b"].tolist() == [[1.0]]  # mean(0.5, 1.0, 1.5)


def test_trimmed_mean_summation_order_is_the_sorted_order() -> None:
    # Sorted ascending: 1, 1, 1e16. From the smallest, (1 + 1) + 1e16 = 1e16 + 2 exactly;
    # in the given order, (1e16 + 1) + 1 = 1e16 (each 1 is rounded away).
    got = robust.trimmed_mean(_col([1e16, 1.0, 1.0]), 0.0)["w"].item()
    assert got == (2.0 + 1e16) / 3.0
    assert got != (1e16 + 1.0 + 1.0) / 3.0


@pytest.mark.parametrize("trim", [-0.1, 0.5, 0.7, math.nan])
def test_trimmed_mean_refuses_a_bad_trim(trim: float) -> None:
    with pytest.raises(ValueError, match="trim"):
        robust.trimmed_mean(_col([1.0, 2.0, 3.0]), trim)


def test_trimmed_mean_refuses_no_deltas() -> None:
    with pytest.raises(ValueError, match="leaves no value"):
        robust.trimmed_mean([], 0.2)


# -- Krum, multi-Krum -----------------------------------------------------------------


def test_krum_scores_by_hand() -> None:
    # n = 4, f = 0: the 2 closest others. Squared distances from
    #   0: 1, 9, 100  -> 10      1: 1, 4, 81 -> 5
    #   3: 9, 4, 49   -> 13     10: 100, 81, 49 -> 130
    assert robust.krum_scores(_col([0.0, 1.0, 3.0, 10.0]), 0) == [10.0, 5.0, 13.0, 130.0]
    # n = 5, f = 2: the single closest other.
    assert robust.krum_scores(_col([0.0, 1.0, 3.0, 10.0, 12.0]), 2) == [1.0, 1.0, 4.0, 4.0, 4.0]
    # n = 5, f = 1: the 2 closest others.
    assert robust.krum_scores(_col([0.0, 1.0, 3.0, 10.0, 12.0]), 1) == [10.0, 5.0, 13.0, 53.0, 85.0]


def test_krum_distances_span_all_tensors() -> None:
    # Points (0, 0), (3, 4), (0, 1) split over two tensors; f = 0, n = 3: 1 closest.
    deltas = [_d(x=[0.0], y=0.0), _d(x=[3.0], y=4.0), _d(x=[0.0], y=1.0)]
    # |p0-p1|^2 = 25, |p0-p2|^2 = 1, |p1-p2|^2 = 9 + 9 = 18.
    assert robust.krum_scores(deltas, 0) == [1.0, 18.0, 1.0]


def test_multi_krum_by_hand() -> None:
    deltas = _col([0.0, 1.0, 3.0, 10.0])  # scores 10, 5, 13, 130
    assert robust.multi_krum(deltas, 0, 1) == [1]
    assert robust.multi_krum(deltas, 0, 2) == [0, 1]
    assert robust.multi_krum(deltas, 0, 3) == [0, 1, 2]
    assert robust.multi_krum(deltas, 0, 4) == [0, 1, 2, 3]


def test_multi_krum_ties_go_to_the_lower_index() -> None:
    deltas = _col([4.0, 2.0, 0.0])  # every score is 4 (f = 0, 1 closest)
    assert robust.krum_scores(deltas, 0) == [4.0, 4.0, 4.0]
    assert robust.multi_krum(deltas, 0, 1) == [0]
    assert robust.multi_krum(deltas, 0, 2) == [0, 1]


@pytest.mark.parametrize(("n", "f"), [(3, 1), (2, 0), (5, 3), (4, -1), (0, 0)])
def test_krum_refuses_too_few_updates(n: int, f: int) -> None:
    with pytest.raises(ValueError, match="n - f - 2 >= 1"):
        robust.krum_scores(_col([float(i) for i in range(n)]), f)


@pytest.mark.parametrize("m", [0, 5, -1])
def test_multi_krum_refuses_a_bad_m(m: int) -> None:
    with pytest.raises(ValueError, match="1 <= m <= n"):
        robust.multi_krum(_col([0.0, 1.0, 2.0, 3.0]), 0, m)


def test_multi_krum_refuses_a_bad_f() -> None:
    with pytest.raises(ValueError, match="n - f - 2 >= 1"):
        robust.multi_krum(_col([0.0, 1.0, 2.0, 3.0]), 2, 1)


def test_multi_krum_weights_make_the_mean_of_the_selection() -> None:
    assert robust.multi_krum_weights(4, [1, 3], 0.5) == [0.0, 0.25, 0.0, 0.25]
    assert robust.multi_krum_weights(3, [0, 1, 2], 1.5) == [0.5, 0.5, 0.5]
    head = {"w": torch.tensor([1.0, 1.0], dtype=torch.float32)}
    deltas = [_d(w=[2.0, 4.0]), _d(w=[1e30, 1e30]), _d(w=[6.0, 0.0])]
    weights = robust.multi_krum_weights(3, [0, 2], 1.0)
    got = aggregate.weighted_sum(head, deltas, weights)
    assert got["w"].tolist() == [5.0, 3.0]  # 1 + mean(2, 6), 1 + mean(4, 0)
    assert got["w"].dtype == torch.float32


@pytest.mark.parametrize("selected", [[], [1, 1], [3], [-1]])
def test_multi_krum_weights_refuse_a_bad_selection(selected: list[int]) -> None:
    with pytest.raises(ValueError, match="bad selection"):
        robust.multi_krum_weights(3, selected, 1.0)


# -- norm bound, clipping -------------------------------------------------------------


def test_norm_bound_from() -> None:
    assert robust.norm_bound_from([3.0, 1.0, 2.0], 2.0) == 4.0
    assert robust.norm_bound_from([4.0, 1.0, 3.0, 2.0], 2.0) == 5.0  # median 2.5
    assert robust.norm_bound_from([7.0], 1.5) == 10.5
    assert robust.norm_bound_from([], 3.0) is None


@pytest.mark.parametrize("multiplier", [0.0, -1.0, math.inf, math.nan])
def test_norm_bound_refuses_a_bad_multiplier(multiplier: float) -> None:
    with pytest.raises(ValueError, match="multiplier"):
        robust.norm_bound_from([1.0], multiplier)


def test_clip_factor() -> None:
    assert robust.clip_factor(0.0, 1.0) == 1.0
    assert robust.clip_factor(0.0, 0.0) == 1.0
    assert robust.clip_factor(2.0, 1.0) == 0.5
    assert robust.clip_factor(1.0, 2.0) == 1.0
    assert robust.clip_factor(3.0, 3.0) == 1.0


# -- robust_step ----------------------------------------------------------------------


def test_robust_step_median_and_trimmed_mean() -> None:
    head = {"w": torch.tensor([1.0, 1.0], dtype=torch.float32), "b": torch.tensor(0.5)}
    deltas = [
        _d(w=[2.0, 0.0], b=1.0),
        _d(w=[4.0, -2.0], b=-1.0),
        _d(w=[99.0, 2.0], b=3.0),
    ]
    med = robust.robust_step(head, deltas, kind="median", server_lr=0.5)
    assert list(med) == ["w", "b"]  # the head's order
    assert med["w"].dtype == torch.float32
    assert med["w"].tolist() == [3.0, 1.0]  # 1 + 0.5 * [4, 0]
    assert med["b"].item() == 1.0  # 0.5 + 0.5 * 1
    tm = robust.robust_step(head, deltas, kind="trimmed_mean", server_lr=1.0, trim=0.4)
    assert tm["w"].tolist() == [5.0, 1.0]  # k = 1: the middle value
    full = robust.robust_step(head, deltas, kind="trimmed_mean", server_lr=1.0, trim=0.0)
    assert full["w"].tolist() == [36.0, 1.0]  # 1 + the plain mean (2 + 4 + 99) / 3


def test_robust_step_casts_once() -> None:
    g = torch.Generator().manual_seed(3)
    head = {
        "w": torch.randn(6, 4, generator=g).to(torch.float16),
        "b": torch.randn(4, generator=g),
    }
    deltas = [{k: torch.randn(t.shape, generator=g) * 1e-3 for k, t in head.items()}]
    deltas += [{k: torch.randn(t.shape, generator=g) * 1e-3 for k, t in head.items()}]
    got = robust.robust_step(head, deltas, kind="median", server_lr=0.7)
    med = robust.coordinate_median(deltas)
    for name, h in head.items():
        want = (h.to(F64) + 0.7 * med[name]).to(h.dtype)
        assert got[name].dtype == h.dtype
        assert torch.equal(got[name], want)


def test_robust_step_without_deltas_is_the_head() -> None:
    head = {"w": torch.tensor([1.0, 2.0])}
    assert robust.robust_step(head, [], kind="median", server_lr=1.0) is head


def test_robust_step_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown robust aggregator"):
        robust.robust_step({"w": torch.zeros(1)}, _col([1.0]), kind="krum", server_lr=1.0)


# -- robustness -----------------------------------------------------------------------

ATTACKERS = (3, 7)  # positions of the two attackers among the ten updates


def _honest(seed: int) -> list[Tensors]:
    """Eight honest deltas near +0.1 (two tensors)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "layer.weight": 0.1 + 0.01 * torch.randn(5, 3, generator=g),
            "layer.bias": 0.1 + 0.01 * torch.randn(3, generator=g, dtype=F64),
        }
        for _ in range(8)
    ]


def _attack(kind: str, honest: list[Tensors]) -> list[Tensors]:
    if kind == "huge":
        bad = [{k: torch.full_like(t, 1e30) for k, t in honest[0].items()}] * 2
    elif kind == "scaled":
        bad = [{k: 100.0 * t for k, t in h.items()} for h in honest[:2]]
    else:  # sign-flipped
        bad = [{k: -t for k, t in h.items()} for h in honest[:2]]
    everyone = list(honest)
    for pos, b in zip(ATTACKERS, bad, strict=True):
        everyone.insert(pos, b)
    return everyone


@pytest.mark.parametrize("attack", ["huge", "scaled", "sign_flipped"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_robust_aggregates_stay_within_the_honest_range(attack: str, seed: int) -> None:
    honest = _honest(seed)
    everyone = _attack(attack, honest)
    assert len(everyone) == 10
    for agg in (robust.coordinate_median(everyone), robust.trimmed_mean(everyone, 0.2)):
        for name in honest[0]:
            stacked = torch.stack([h[name].to(F64) for h in honest])
            assert bool((agg[name] >= stacked.min(dim=0).values).all())
            assert bool((agg[name] <= stacked.max(dim=0).values).all())
    assert robust.multi_krum(everyone, 2, 8) == [i for i in range(10) if i not in ATTACKERS]
    scores = robust.krum_scores(everyone, 2)
    assert min(scores[i] for i in ATTACKERS) > max(
        s for i, s in enumerate(scores) if i not in ATTACKERS
    )


def test_mean_is_not_robust_but_median_is() -> None:
    """The point of it all: one huge update drags the mean away, not the median."""
    everyone = _attack("huge", _honest(5))
    mean = robust.trimmed_mean(everyone, 0.0)
    med = robust.coordinate_median(everyone)
    assert bool((mean["layer.bias"] > 1e28).all())
    assert bool((med["layer.bias"] < 0.2).all())


# -- determinism and order invariance -------------------------------------------------


def test_two_calls_are_bit_identical() -> None:
    everyone = _attack("scaled", _honest(9))
    assert _same_bits(robust.coordinate_median(everyone), robust.coordinate_median(everyone))
    assert _same_bits(robust.trimmed_mean(everyone, 0.2), robust.trimmed_mean(everyone, 0.2))
    assert robust.krum_scores(everyone, 2) == robust.krum_scores(everyone, 2)
    head = {k: torch.zeros_like(t) for k, t in everyone[0].items()}
    one = robust.robust_step(head, everyone, kind="trimmed_mean", server_lr=0.3)
    two = robust.robust_step(head, everyone, kind="trimmed_mean", server_lr=0.3)
    assert all(torch.equal(one[k].view(torch.uint8), two[k].view(torch.uint8)) for k in one)


def test_results_do_not_depend_on_the_number_of_threads() -> None:
    g = torch.Generator().manual_seed(11)
    deltas = [{"w": torch.randn(257, 129, generator=g), "b": torch.randn(129, generator=g)}]
    deltas += [{k: t * float(i) for k, t in deltas[0].items()} for i in range(2, 7)]

    def compute() -> tuple[Tensors, Tensors, list[float], float]:
        return (
            robust.coordinate_median(deltas),
            robust.trimmed_mean(deltas, 0.2),
            robust.krum_scores(deltas, 1),
            robust.delta_norm(deltas[0]),
        )

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = compute()
    finally:
        torch.set_num_threads(before)
    many = compute()
    assert _same_bits(single[0], many[0]) and _same_bits(single[1], many[1])
    assert single[2:] == many[2:]


VALUES = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.1, 1e-300, -1e-300]),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
)
TRIMS = st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.45, 0.49])


@st.composite
def delta_lists(draw: st.DrawFn, min_n: int = 1, max_n: int = 9) -> list[Tensors]:
    """``n`` deltas of two tensors: ``w`` (a vector) and ``b`` (a scalar), float32 or 64."""
    n = draw(st.integers(min_n, max_n))
    width = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([torch.float32, F64]))
    out: list[Tensors] = []
    for _ in range(n):
        w = draw(st.lists(VALUES, min_size=width, max_size=width))
        b = draw(VALUES)
        out.append({"w": torch.tensor(w, dtype=dtype), "b": torch.tensor(b, dtype=dtype)})
    return out


@given(data=st.data(), deltas=delta_lists(), trim=TRIMS)
@settings(max_examples=200, deadline=None)
def test_median_and_trimmed_mean_are_order_invariant_bit_for_bit(
    data: st.DataObject, deltas: list[Tensors], trim: float
) -> None:
    order = data.draw(st.permutations(range(len(deltas))))
    shuffled = [deltas[i] for i in order]
    assert _same_bits(robust.coordinate_median(deltas), robust.coordinate_median(shuffled))
    assert _same_bits(robust.trimmed_mean(deltas, trim), robust.trimmed_mean(shuffled, trim))


@given(deltas=delta_lists(), trim=TRIMS)
@settings(max_examples=200, deadline=None)
def test_median_and_trimmed_mean_lie_between_min_and_max(
    deltas: list[Tensors], trim: float
) -> None:
    med = robust.coordinate_median(deltas)
    tm = robust.trimmed_mean(deltas, trim)
    for name in ("w", "b"):
        stacked = torch.stack([d[name].to(F64) for d in deltas])
        lo, hi = stacked.min(dim=0).values, stacked.max(dim=0).values
        assert bool((med[name] >= lo).all()) and bool((med[name] <= hi).all())
        # The mean's rounding may step an ulp or so past the extreme values.
        slack = 1e-12 * torch.maximum(lo.abs(), hi.abs())
        assert bool((tm[name] >= lo - slack).all()) and bool((tm[name] <= hi + slack).all())


@given(deltas=delta_lists(min_n=3), data=st.data())
@settings(max_examples=150, deadline=None)
def test_krum_scores_follow_a_permutation_exactly(
    deltas: list[Tensors], data: st.DataObject
) -> None:
    f = data.draw(st.integers(0, len(deltas) - 3))
    order = data.draw(st.permutations(range(len(deltas))))
    scores = robust.krum_scores(deltas, f)
    shuffled = robust.krum_scores([deltas[i] for i in order], f)
    assert shuffled == [scores[i] for i in order]
    assert all(s >= 0.0 for s in scores)
    m = data.draw(st.integers(1, len(deltas)))
    chosen = robust.multi_krum(deltas, f, m)
    assert chosen == sorted(chosen) and len(set(chosen)) == m
    worst_kept = max(scores[i] for i in chosen)
    assert all(scores[i] >= worst_kept for i in range(len(deltas)) if i not in chosen)


@given(a=delta_lists(min_n=1, max_n=1), b=delta_lists(min_n=1, max_n=1))
@settings(max_examples=150, deadline=None)
def test_norm_and_cosine_properties(a: list[Tensors], b: list[Tensors]) -> None:
    x = a[0]
    y = {"w": torch.flip(x["w"], dims=[0]) + 1.0, "b": b[0]["b"]}
    norm = robust.delta_norm(x)
    want = math.sqrt(sum(float((t.to(F64) ** 2).sum()) for t in x.values()))
    assert norm == pytest.approx(want, rel=1e-12, abs=1e-300)
    c = robust.cosine(x, y)
    if norm == 0.0 or robust.delta_norm(y) == 0.0:
        assert c is None
    else:
        assert c is not None and -1.0 <= c <= 1.0
        assert c == robust.cosine(y, x)
        assert robust.cosine(x, x) == pytest.approx(1.0, rel=1e-12)
