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
  keeps the factors' ratios within the bounds when it can: over the banks in the
  window and ``i``, ``lo = (1/B) / min r_j``, ``hi = B / max r_j``; ``c = 1`` when
  ``lo <= 1 <= hi`` (the mass-weighted mean factor stays 1: the total step is
  kept), the nearer end of ``[lo, hi]`` otherwise, and ``sqrt(lo * hi)`` when no
  ``c`` fits (the ratios are then compressed at both ends).

Data shares. When every participant declared its samples (``spec.declared_samples``),
``d_j = bound_j / sum_k bound_k`` and an update's ``p_i = min(n_i, bound_i) / sum_k
bound_k`` (``bound = spec.sample_bound``). When some did not declare, there is no
reference: ``samples`` gives ``f = 1`` and ``balanced`` takes equal shares
``d_j = p_i = 1 / N`` (it still evens out the banks' speeds). A task with no
participant list has neither: every factor is 1.

The window's state is a pure function of the committed lineages (participant and
recorded ``t - v`` of each entry), all sums taken afresh in window order, so an
aggregator that restarts and :meth:`Weighter.restore`\\ s it from the last ``W``
entries in the store weighs exactly as one that never stopped. Replay never needs
it: each version's lineage records the weight actually used.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from common.hashing import LineageEntry
from common.spec import AsyncSettings, TaskSpec
from common.staleness import in_unit, staleness_weight

__all__ = [
    "PRIOR_MASS",
    "WINDOW_ROUNDS",
    "Remembering",
    "Weighter",
    "Windowed",
    "balanced_factor",
    "clip",
    "data_shares",
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


def balanced_factor(
    participant: str,
    p_i: float,
    shares: Mapping[str, float],
    window: Iterable[tuple[str, float]],
    max_boost: float,
    prior: float = PRIOR_MASS,
) -> float:
    """``f_i = clip(c * p_i / q_i, 1/B, B)`` over ``window`` (participant, mass) entries,
    with a prior of mass ``prior > 0`` spread by ``shares`` (see the module)."""
    masses: dict[str, float] = {}
    total = 0.0
    for name, mass in window:
        masses[name] = masses.get(name, 0.0) + mass
        total += mass

    def ratio(name: str, p: float) -> float:
        q = (masses.get(name, 0.0) + prior * shares.get(name, 0.0)) / (total + prior)
        return p / q

    r_i = ratio(participant, p_i)
    others = [ratio(j, shares[j]) for j in masses if j != participant and j in shares]
    c = _scale([r_i, *others], max_boost)
    b = float(max_boost)
    return clip(c * r_i, 1.0 / b, b)


class Weighter:
    """The staleness and the factor of an async strategy's updates, and the window
    ``balanced`` measures banks' rates over (see the module). Pure, no I/O."""

    __slots__ = ("_bounds", "_n", "_settings", "_shares", "_total", "_upv", "_window")

    def __init__(
        self, settings: AsyncSettings, updates_per_version: int, spec: TaskSpec | None = None
    ) -> None:
        self._settings = settings
        self._upv = max(1, updates_per_version)
        self._n = participant_count(spec)
        self._bounds = declared_bounds(spec)
        self._total = float(sum(self._bounds.values()))
        self._shares = data_shares(spec)
        self._window: deque[tuple[str, float]] = deque(maxlen=window_size(settings, self._n))

    @property
    def participants(self) -> int:
        """``N``."""
        return self._n

    @property
    def history(self) -> int:
        """``W``: the entries the window holds."""
        return self._window.maxlen or 0

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
        if p_i is None:
            return 1.0
        prior = float(self.history - len(self._window)) + PRIOR_MASS
        return balanced_factor(
            participant, p_i, self._shares, self._window, self._settings.max_boost, prior
        )

    def recent(self) -> tuple[tuple[str, float], ...]:
        """The window: (participant, mass ``s(.)``) of the last ``W`` entries, oldest first."""
        return tuple(self._window)

    def committed(self, lineage: Sequence[LineageEntry]) -> None:
        """Add a committed version's entries to the window (mass ``s`` of their ``t - v``)."""
        for e in lineage:
            self._window.append((e.participant, self.s(e.staleness)))

    def restore(self, lineages: Iterable[Sequence[LineageEntry]]) -> None:
        """Empty the window, then add these committed lineages, oldest first."""
        self._window.clear()
        for lineage in lineages:
            self.committed(lineage)


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
