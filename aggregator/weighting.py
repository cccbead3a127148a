"""How async strategies weigh an update beyond its staleness. Pure and deterministic.

An async update's weight is its strategy's base weight times ``s(.)`` (staleness in
``AsyncSettings.staleness_unit``, see :mod:`common.staleness`) times a factor
``f`` from ``AsyncSettings.weighting``:

- ``staleness``: ``f = 1`` (the weights of FedAsync and FedBuff without weighting,
  bit for bit).
- ``samples``: ``f = clip(N * p_i, 1 / B, B)``, with ``p_i`` the update's data share
  (below), ``N = max(1, participants)`` and ``B = max_boost``: a bank with the mean
  share gets 1, one with 60% of the rows ``0.6 N``.
- ``balanced``: a bank counts by its data, not by its speed. Over the last ``W``
  accepted lineage entries (``W = balance_window``, or ``20 N`` when 0), each entry
  contributes its *mass* ``s(.)`` of its recorded staleness (its weight before any
  factor), so bank ``j``'s mass ``m_j`` grows with its update rate and freshness. The
  window starts as ``W`` vacant slots of mass 1 each, spread by data share ``d_j``,
  that real entries fill, plus a small prior ``PRIOR_MASS`` that stays; so with
  ``P = (W - entries) + PRIOR_MASS``::

      q_j = (m_j + P * d_j) / (M + P)         M = sum of the window's masses
      r_j = d_j / q_j                          (r_i = p_i / q_i for the update's bank i)
      f_i = clip(c * r_i, 1 / B, B)

  so bank ``i``'s share of weight ``~ q_i * f_i ~ p_i``: a bank ten times slower has a
  tenth of the mass and gets a factor ten times larger. At the start (empty window)
  ``q_j = d_j`` and every factor is 1, and the measured rates take over as the
  window fills; equal banks at equal speed stay near 1. ``c``
  keeps the factors' ratios within the bounds when it can: over ``r_i`` and the
  ``r_j`` of the banks ``j != i`` in the window that have a data share,
  ``lo = (1/B) / min r``, ``hi = B / max r``; ``c = 1`` when
  ``lo <= 1 <= hi`` (the mass-weighted mean factor stays 1: the total step is
  kept), the nearer end of ``[lo, hi]`` otherwise, and ``sqrt(lo * hi)`` when no
  ``c`` fits (the ratios are then compressed at both ends).

  Exactly, in binary64: ``m_j`` (the masses of bank ``j``'s entries) and ``M`` (all
  the window's masses) are *exactly rounded* sums, the float nearest the exact sum
  (ties to even; what :func:`math.fsum` gives), so they do not depend on the order of
  the entries; ``r_j`` is then ``d_j / ((m_j + P * d_j) / (M + P))`` evaluated as
  written, one rounding per operation (:func:`balanced_factor`, the reference), and
  ``min r`` and ``max r`` are the extremes of these floats.

Data shares. When every participant declared its samples (``spec.declared_samples``),
``d_j = bound_j / sum_k bound_k`` and an update's ``p_i = min(n_i, bound_i) / sum_k
bound_k`` (``bound = spec.sample_bound``). When some did not declare, there is no
reference: ``samples`` gives ``f = 1`` and ``balanced`` takes equal shares
``d_j = p_i = 1 / N`` (it still evens out the banks' speeds). A task with no
participant list has neither: every factor is 1.

The window's state is a pure function of the committed lineages (participant and
recorded ``t - v`` of each entry), its sums exactly rounded whatever the order they
were added and removed in, so an aggregator that restarts and
:meth:`Weighter.restore`\\ s it from the last ``W`` entries in the store weighs exactly
as one that never stopped. Replay never needs it: each version's lineage records the
weight actually used.

Cost. :class:`Weighter` does not walk the window: it keeps each bank's mass and the
total as exact integers in units of ``2**-1074`` (every finite float is a multiple of
it), rounded to a float once per change, and the banks with a data share in two heaps
ordered by ``m_j / d_j``. As ``r_j = d_j (M + P) / (m_j + P d_j)`` falls as ``m_j / d_j``
grows, ``max r`` and ``min r`` are among the banks whose ``m_j / d_j + P`` lies within a
relative ``NEAR_TIE`` (``2**-36``) of the smallest (the largest), far wider than the
few rounding errors of ``r_j``'s formula; ``r_j`` is evaluated for those alone (banks
with the same ``m_j`` and ``d_j`` once), so the extremes are the definition's, bit for
bit. A factor costs ``O(log N)``, a committed entry ``O(log N)`` (amortized: the
heaps drop stale entries lazily and are rebuilt when half stale), a restore
``O(W + N)``.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from common.hashing import LineageEntry
from common.spec import AsyncSettings, TaskSpec
from common.staleness import in_unit, staleness_weight

__all__ = [
    "NEAR_TIE",
    "PRIOR_MASS",
    "WINDOW_ROUNDS",
    "Remembering",
    "Weighter",
    "Windowed",
    "balanced_factor",
    "clip",
    "data_shares",
    "exact_units",
    "participant_count",
    "samples_factor",
    "window_size",
]

#: ``balance_window = 0`` means this many rounds of the federation (``20 N`` entries).
WINDOW_ROUNDS = 20

#: The prior's mass once the window is full (a quarter of one fresh update's mass):
#: keeps ``q_j > 0`` for a bank absent from the window, and small beside ``W`` entries.
PRIOR_MASS = 0.25


@runtime_checkable
class Remembering(Protocol):
    """A strategy whose weights depend on recently committed versions.

    The service calls :meth:`committed` after each commit, and :meth:`restore` at
    startup with the lineages of the last versions in the store (oldest first,
    together at least :attr:`history` entries, or all there are).
    """

    @property
    def history(self) -> int:
        """How many of the most recent lineage entries :meth:`restore` needs."""
        ...

    def committed(self, lineage: Sequence[LineageEntry]) -> None:
        """A version with this lineage was committed."""
        ...

    def restore(self, lineages: Iterable[Sequence[LineageEntry]]) -> None:
        """Forget everything, then take these committed lineages, oldest first."""
        ...


def participant_count(spec: TaskSpec | None) -> int:
    """``N = max(1, number of participants)``."""
    return max(1, len(spec.participants)) if spec is not None else 1


def window_size(settings: AsyncSettings, n: int) -> int:
    """``W``: ``balance_window``, or ``WINDOW_ROUNDS * N`` when it is 0."""
    return settings.balance_window or WINDOW_ROUNDS * max(1, n)


def declared_bounds(spec: TaskSpec | None) -> dict[str, int]:
    """Each participant's sample bound when every participant declared; else empty."""
    if spec is None or not spec.participants:
        return {}
    if any(p not in spec.declared_samples for p in spec.participants):
        return {}
    return {p: spec.sample_bound(p) for p in spec.participants}


def data_shares(spec: TaskSpec | None) -> dict[str, float]:
    """``d_j``: ``bound_j / sum bound`` when every participant declared, else ``1 / N``
    each; empty for a task without a participant list (see the module)."""
    if spec is None or not spec.participants:
        return {}
    bounds = declared_bounds(spec)
    if not bounds:
        equal = 1.0 / float(len(spec.participants))
        return dict.fromkeys(spec.participants, equal)
    total = float(sum(bounds.values()))
    return {p: float(b) / total for p, b in bounds.items()}


def clip(x: float, lo: float, hi: float) -> float:
    """``min(max(x, lo), hi)``."""
    return min(max(x, lo), hi)


def samples_factor(p_i: float | None, n: int, max_boost: float) -> float:
    """``clip(N * p_i, 1 / B, B)``; 1 when there is no data share."""
    if p_i is None:
        return 1.0
    b = float(max_boost)
    return clip(float(n) * p_i, 1.0 / b, b)


def _scale(ratios: Sequence[float], max_boost: float) -> float:
    """``c`` of the module: 1 when every ``c * r`` fits ``[1/B, B]``, else the nearest fit."""
    b = float(max_boost)
    lo, hi = (1.0 / b) / min(ratios), b / max(ratios)
    if lo > hi:
        return math.sqrt(lo * hi)
    return clip(1.0, lo, hi)


def _ratio(p: float, mass: float, share: float, prior: float, denominator: float) -> float:
    """``r = p / q`` with ``q = (mass + prior * share) / denominator`` (``M + P``), as
    written: every ``r`` of the module goes through here."""
    return p / ((mass + prior * share) / denominator)


def balanced_factor(
    participant: str,
    p_i: float,
    shares: Mapping[str, float],
    window: Iterable[tuple[str, float]],
    max_boost: float,
    prior: float = PRIOR_MASS,
) -> float:
    """``f_i = clip(c * p_i / q_i, 1/B, B)`` over ``window`` (participant, mass) entries,
    with a prior of mass ``prior > 0`` spread by ``shares`` (see the module).

    The reference definition: it walks the whole window (``O(W)``);
    :meth:`Weighter.factor` gives the same float without doing so."""
    entries = list(window)
    by_bank: dict[str, list[float]] = {}
    for name, mass in entries:
        by_bank.setdefault(name, []).append(mass)
    masses = {name: math.fsum(values) for name, values in by_bank.items()}
    denominator = math.fsum(mass for _, mass in entries) + prior
    r_i = _ratio(
        p_i, masses.get(participant, 0.0), shares.get(participant, 0.0), prior, denominator
    )
    others = [
        _ratio(shares[j], m, shares[j], prior, denominator)
        for j, m in masses.items()
        if j != participant and j in shares
    ]
    c = _scale([r_i, *others], max_boost)
    b = float(max_boost)
    return clip(c * r_i, 1.0 / b, b)


#: Banks whose ``m_j / d_j + P`` is within this relative distance of the extreme one
#: are near-ties: their ``r_j`` is evaluated (rounding could order them either way).
#: ``r_j``'s four operations and ``m_j / d_j + P``'s two err by a relative ``2**-53``
#: each (``P >= PRIOR_MASS`` and shares, ratios of sample counts, are far from
#: underflow), so rounding can swap two banks only within ``2**-49``: ample margin.
NEAR_TIE = 2.0**-36

#: ``2**1074``: a float ``x`` is the integer ``x * _ONE``, an integer ``n`` rounds to
#: ``n / _ONE`` (Python's int division is correctly rounded, subnormals included).
_ONE = 1 << 1074

#: A group of banks in the window with the same mass and data share: ``(m_j, d_j)``.
_Pair = tuple[float, float]
#: A heap entry: ``(m_j / d_j, m_j, d_j)``, the key negated in the high heap.
_Entry = tuple[float, float, float]


def exact_units(x: float) -> int:
    """``x`` (finite) as an exact integer number of ``2**-1074``."""
    num, den = x.as_integer_ratio()  # den is a power of two, at most 2**1074
    return num << (1075 - den.bit_length())


class _Balance:
    """``balanced``'s state of a window: each bank's mass and the total as exact
    integers (so every sum is exactly rounded, in any order of change), and the banks
    with a data share grouped by ``(m_j, d_j)`` in two heaps by ``m_j / d_j``, with
    lazy deletion: an entry whose group is gone is dropped when met (see the module)."""

    __slots__ = ("_count", "_groups", "_high", "_low", "_mass", "_shares", "_sum", "_total")

    def __init__(self, shares: Mapping[str, float]) -> None:
        self._shares = shares
        self._total = 0
        self._sum: dict[str, int] = {}  # bank -> its masses, in units of 2**-1074
        self._count: dict[str, int] = {}  # bank -> its entries in the window
        self._mass: dict[str, float] = {}  # bank -> m_j (its sum, rounded)
        self._groups: dict[_Pair, int] = {}  # (m_j, d_j) -> banks with a share there
        self._low: list[_Entry] = []  # min-heap on m_j / d_j
        self._high: list[_Entry] = []  # min-heap on -(m_j / d_j)

    def reset(self, entries: Iterable[tuple[str, int]]) -> None:
        """The state of a window of these (participant, units) entries, built in one go."""
        self._total = 0
        self._sum, self._count = {}, {}
        for name, units in entries:
            self._total += units
            self._sum[name] = self._sum.get(name, 0) + units
            self._count[name] = self._count.get(name, 0) + 1
        self._mass = {name: units / _ONE for name, units in self._sum.items()}
        self._groups = {}
        for name, mass in self._mass.items():
            share = self._shares.get(name)
            if share is not None:
                pair = (mass, share)
                self._groups[pair] = self._groups.get(pair, 0) + 1
        self._reheap()

    def _reheap(self) -> None:
        """Both heaps afresh from the live groups (no stale entries)."""
        self._low = [(m / d, m, d) for m, d in self._groups]
        self._high = [(-(m / d), m, d) for m, d in self._groups]
        heapq.heapify(self._low)
        heapq.heapify(self._high)

    def add(self, name: str, units: int) -> None:
        """An entry of ``name`` of ``units`` joined the window."""
        self._total += units
        old = self._mass.get(name)
        self._count[name] = self._count.get(name, 0) + 1
        self._sum[name] = total = self._sum.get(name, 0) + units
        self._mass[name] = mass = total / _ONE
        self._regroup(name, old, mass)

    def remove(self, name: str, units: int) -> None:
        """An entry of ``name`` of ``units`` left the window."""
        self._total -= units
        old = self._mass[name]
        count = self._count[name] - 1
        if count:
            self._count[name] = count
            self._sum[name] = total = self._sum[name] - units
            self._mass[name] = mass = total / _ONE
            self._regroup(name, old, mass)
        else:
            del self._count[name], self._sum[name], self._mass[name]
            self._regroup(name, old, None)

    def _regroup(self, name: str, old: float | None, new: float | None) -> None:
        """Bank ``name``'s mass went from ``old`` to ``new`` (None: not in the window)."""
        share = self._shares.get(name)
        if share is None or old == new:
            return
        groups = self._groups
        if old is not None:
            pair = (old, share)
            left = groups[pair] - 1
            if left:
                groups[pair] = left
            else:
                del groups[pair]
        if new is not None:
            pair = (new, share)
            banks = groups.get(pair, 0)
            groups[pair] = banks + 1
            if not banks:
                key = new / share
                heapq.heappush(self._low, (key, new, share))
                heapq.heappush(self._high, (-key, new, share))
                if len(self._low) + len(self._high) > 4 * len(groups) + 128:
                    self._reheap()

    def mass(self, name: str) -> float:
        """``m_j``: 0 for a bank absent from the window."""
        return self._mass.get(name, 0.0)

    def total(self) -> float:
        """``M``."""
        return self._total / _ONE

    def candidates(self, participant: str, prior: float) -> list[_Pair]:
        """The groups, bank ``participant`` left out, among which ``min r`` and ``max r``
        of the banks ``j != participant`` lie: the near-ties at each end."""
        alone: _Pair | None = None
        share = self._shares.get(participant)
        mass = self._mass.get(participant)
        if share is not None and mass is not None and self._groups[(mass, share)] == 1:
            alone = (mass, share)
        return [
            *self._end(self._low, alone, prior, 1.0),
            *self._end(self._high, alone, prior, -1.0),
        ]

    def _end(
        self, heap: list[_Entry], alone: _Pair | None, prior: float, sign: float
    ) -> list[_Pair]:
        """The near-ties at the front of ``heap`` (low: ``sign = 1``; high: ``-1``), the
        group ``alone`` left out. Stale entries met at the front are dropped."""
        groups = self._groups
        while heap and (heap[0][1], heap[0][2]) not in groups:
            heapq.heappop(heap)
        if not heap:
            return []
        if (heap[0][1], heap[0][2]) == alone:
            # Set it aside: the front is then the first group to count.
            entry = heapq.heappop(heap)
            rest = self._end(heap, alone, prior, sign)
            heapq.heappush(heap, entry)
            return rest
        first = sign * heap[0][0] + prior  # m / d + P of the first group
        widest = first * (1.0 + NEAR_TIE)
        found: list[_Pair] = []
        # Every entry within NEAR_TIE of the first: a subtree at the heap's root.
        stack = [0]
        while stack:
            at = stack.pop()
            key, m, d = heap[at]
            near = sign * key + prior
            if (near > widest) if sign > 0 else (near * (1.0 + NEAR_TIE) < first):
                continue
            pair = (m, d)
            if pair in groups and pair != alone and pair not in found:
                found.append(pair)
            stack.extend(i for i in (2 * at + 1, 2 * at + 2) if i < len(heap))
        return found


class Weighter:
    """The staleness and the factor of an async strategy's updates, and the window
    ``balanced`` measures banks' rates over (see the module). Pure, no I/O."""

    __slots__ = (
        "_balance",
        "_bounds",
        "_n",
        "_settings",
        "_shares",
        "_size",
        "_total",
        "_units",
        "_upv",
        "_window",
    )

    def __init__(
        self, settings: AsyncSettings, updates_per_version: int, spec: TaskSpec | None = None
    ) -> None:
        self._settings = settings
        self._upv = max(1, updates_per_version)
        self._n = participant_count(spec)
        self._bounds = declared_bounds(spec)
        self._total = float(sum(self._bounds.values()))
        self._shares = data_shares(spec)
        self._size = window_size(settings, self._n)
        self._window: deque[tuple[str, float]] = deque()
        # balanced only: each entry's mass in units of 2**-1074, and the sums.
        self._units: deque[int] = deque()
        self._balance = _Balance(self._shares) if settings.weighting == "balanced" else None

    @property
    def participants(self) -> int:
        """``N``."""
        return self._n

    @property
    def history(self) -> int:
        """``W``: the entries the window holds."""
        return self._size

    def staleness(self, versions_behind: int) -> float:
        """``t - v`` in the settings' unit (:func:`common.staleness.in_unit`)."""
        return in_unit(versions_behind, self._settings.staleness_unit, self._upv, self._n)

    def s(self, versions_behind: int) -> float:
        """``s(.)`` of ``t - v`` measured in the settings' unit."""
        return staleness_weight(self._settings.staleness, self.staleness(versions_behind))

    def share(self, participant: str, num_samples: int) -> float | None:
        """``p_i = min(n_i, bound_i) / sum bound`` when every participant declared; for
        ``balanced`` otherwise ``1 / N`` (a participant's equal share); else None."""
        bound = self._bounds.get(participant)
        if bound is not None:
            return float(min(num_samples, bound)) / self._total
        return self._shares.get(participant) if self._settings.weighting == "balanced" else None

    def factor(self, participant: str, num_samples: int) -> float:
        """``f`` of the settings' weighting for an update of ``participant`` now."""
        kind = self._settings.weighting
        if kind == "staleness":
            return 1.0
        p_i = self.share(participant, num_samples)
        if kind == "samples":
            return samples_factor(p_i, self._n, self._settings.max_boost)
        if p_i is None or self._balance is None:
            return 1.0
        balance = self._balance
        prior = float(self._size - len(self._window)) + PRIOR_MASS
        denominator = balance.total() + prior
        r_i = _ratio(
            p_i, balance.mass(participant), self._shares.get(participant, 0.0), prior, denominator
        )
        ratios = [r_i]
        for m, d in balance.candidates(participant, prior):
            ratios.append(_ratio(d, m, d, prior, denominator))
        b = float(self._settings.max_boost)
        return clip(_scale(ratios, b) * r_i, 1.0 / b, b)

    def recent(self) -> tuple[tuple[str, float], ...]:
        """The window: (participant, mass ``s(.)``) of the last ``W`` entries, oldest first."""
        return tuple(self._window)

    def committed(self, lineage: Sequence[LineageEntry]) -> None:
        """Add a committed version's entries to the window (mass ``s`` of their ``t - v``)."""
        self._extend([(e.participant, self.s(e.staleness)) for e in lineage])

    def _extend(self, entries: Iterable[tuple[str, float]]) -> None:
        """Add (participant, mass) entries to the window, the oldest leaving when full."""
        window, units, balance = self._window, self._units, self._balance
        for name, mass in entries:
            window.append((name, mass))
            if balance is not None:
                u = exact_units(mass)
                units.append(u)
                balance.add(name, u)
            if len(window) > self._size:
                gone, _ = window.popleft()
                if balance is not None:
                    balance.remove(gone, units.popleft())

    def restore(self, lineages: Iterable[Sequence[LineageEntry]]) -> None:
        """Empty the window, then add these committed lineages, oldest first."""
        window: deque[tuple[str, float]] = deque(maxlen=self._size)
        for lineage in lineages:
            window.extend((e.participant, self.s(e.staleness)) for e in lineage)
        self._window = deque(window)
        if self._balance is not None:
            self._units = deque(exact_units(mass) for _, mass in window)
            self._balance.reset(zip((name for name, _ in window), self._units, strict=True))


class Windowed:
    """What an async strategy with a :class:`Weighter` (in ``_weighter``) shows the
    service (the :class:`Remembering` protocol) and its readers."""

    __slots__ = ()
    _weighter: Weighter

    @property
    def weighter(self) -> Weighter:
        """The staleness unit, the factors and the recent window (read-only use)."""
        return self._weighter

    @property
    def history(self) -> int:
        """The lineage entries :meth:`restore` needs (``W``)."""
        return self._weighter.history

    def committed(self, lineage: Sequence[LineageEntry]) -> None:
        """A version with this lineage was committed (``balanced`` counts it)."""
        self._weighter.committed(lineage)

    def restore(self, lineages: Iterable[Sequence[LineageEntry]]) -> None:
        """The state after these committed lineages, oldest first (after a restart)."""
        self._weighter.restore(lineages)
