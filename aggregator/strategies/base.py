"""What every strategy shares: the update it is offered, the step it emits, the protocol.

A strategy owns its whole story (see :mod:`aggregator.strategies`): how it folds
admitted updates into the next version (:meth:`Strategy.offer`,
:meth:`Strategy.flush`), how many updates it may hold before it steps
(:attr:`Strategy.capacity`), how to recompute a version from what was recorded
(:meth:`Strategy.recompute`, for replay) and which weights it would have given
without one participant (:meth:`Strategy.without`, for the counterfactual).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, Self

from aggregator import aggregate
from aggregator import robust as robust_fns
from aggregator.server_opt import ServerOptimizer, ServerState
from common.hashing import LineageEntry
from common.spec import RobustnessSpec, TaskSpec
from common.wire import Tensors

#: The modes a strategy may belong to, as in ``TaskSpec.mode``.
MODES = ("async", "sync")

#: Looks up the parameters of a version by number (the base an update was trained on).
BaseLookup = Callable[[int], Tensors]


@dataclass(frozen=True, slots=True)
class AcceptedUpdate:
    """An update the service has admitted, ready for a strategy.

    Admission has already checked everything a strategy relies on: the delta
    names exactly the head's tensors with the head's shapes and floating dtypes,
    its staleness is within the task's maximum (and 0 in a sync round unless late
    updates are allowed), its id and (in a sync round) its participant are not
    already pending. Strategies trust it and check none of this again.
    """

    update_id: str
    participant: str
    base_version: int
    #: ``t - v``: the head's version when the update arrived minus its base version.
    staleness: int
    num_samples: int
    #: The local model minus the base version's parameters.
    delta: Tensors
    content_hash: bytes
    #: The delta's tensors belong to this update alone and nothing reads them after
    #: its step: a step may write its result over them (:func:`aggregate.mix_into`),
    #: so that a large model is not held twice. The service sets it.
    spare: bool = False


@dataclass(frozen=True, slots=True)
class Step:
    """What a strategy emits: the next version's parameters and its ordered lineage,
    and the server optimizer's state after it (None without a stateful optimizer:
    sgd, FedAsync, or a strategy with none; see :func:`optimizer_step`)."""

    params: Tensors
    lineage: tuple[LineageEntry, ...]
    state: ServerState | None = None


class Strategy(Protocol):
    """An aggregation strategy: one class, registered under :attr:`name`."""

    #: The registry key, recorded with every version as ``info["strategy"]``
    #: (``^[a-z][a-z0-9_]*$``); for async strategies, the value of ``async.strategy``.
    name: ClassVar[str]
    #: ``"async"`` or ``"sync"``: the ``TaskSpec.mode`` the strategy serves.
    mode: ClassVar[str]
    #: Whether :meth:`offer` reads the base version's parameters (else the service
    #: passes the head and keeps no old versions for it).
    uses_base: ClassVar[bool]

    @classmethod
    def from_spec(cls, spec: TaskSpec) -> Self:
        """The strategy of a task, configured from its spec."""
        ...

    @property
    def capacity(self) -> int:
        """How many updates the strategy may hold: it steps at the latest on the offer
        that brings it to this many, so ``len(pending()) < capacity`` after each offer.
        The service keeps its prefetch above it (held updates stay unacked)."""
        ...

    def offer(self, head: Tensors, base: Tensors, update: AcceptedUpdate) -> Step | None:
        """Take one admitted update; return the next version's step, or None if it is held."""
        ...

    def flush(self, head: Tensors) -> Step | None:
        """Emit whatever is held (shutdown, deadline); None when nothing is to be emitted."""
        ...

    def pending(self) -> tuple[AcceptedUpdate, ...]:
        """Updates held and not yet emitted, in arrival order."""
        ...

    def settings(self) -> dict[str, object]:
        """JSON-able settings, recorded with each version (for people and tools)."""
        ...

    @classmethod
    def recompute(
        cls,
        parent: Tensors,
        base_of: BaseLookup,
        lineage: Sequence[LineageEntry],
        deltas: Mapping[str, Tensors],
    ) -> Tensors:
        """A version's parameters from recorded inputs only: its parent's parameters,
        the base versions' (``base_of``), its lineage (ordered, with the weights used)
        and the retained deltas by update id. Must equal, bit for bit, the ``params``
        of the step whose lineage this is; an empty lineage gives ``parent``. (A step
        that carries a server optimizer state, see :func:`optimizer_step`, is
        recomputed by replay from its record instead.)"""
        ...

    @classmethod
    def without(
        cls, lineage: tuple[LineageEntry, ...], participant: str
    ) -> tuple[LineageEntry, ...]:
        """The lineage with ``participant``'s entries left out and the others
        reweighted as this strategy would have weighted them (the counterfactual);
        the lineage itself when ``participant`` is not in it."""
        ...


class StrategyBase(ABC):
    """Defaults for a strategy class: nothing held, and a version that is
    ``parent + sum_i weight_i * delta_i`` over its recorded lineage.

    A subclass sets :attr:`name`, :attr:`mode` and :attr:`uses_base` and
    implements :meth:`from_spec`, :attr:`capacity`, :meth:`offer` and
    :meth:`settings`; it overrides :meth:`flush` and :meth:`pending` when it holds
    updates, :meth:`recompute` when its step is not the weighted sum above, and
    :meth:`without` when leaving an update out changes the others' weights.
    """

    __slots__ = ()

    name: ClassVar[str]
    mode: ClassVar[str]
    uses_base: ClassVar[bool]
    #: Whether a version is ``head + sum_i c_i * delta_i`` with coefficients read from
    #: its lineage (bank-level DP's sensitivity assumes it; aggregator/privacy.py). A
    #: strategy that is not (a median, a trimmed mean) cannot take ``privacy.bank``.
    dp_linear: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: TaskSpec) -> Self:
        """The strategy of a task, configured from its spec."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many updates the strategy may hold (see :class:`Strategy`)."""

    @abstractmethod
    def offer(self, head: Tensors, base: Tensors, update: AcceptedUpdate) -> Step | None:
        """Take one admitted update; return the next version's step, or None if it is held."""

    def flush(self, head: Tensors) -> Step | None:
        """Nothing is held: None."""
        return None

    def pending(self) -> tuple[AcceptedUpdate, ...]:
        """Nothing is held: empty."""
        return ()

    @abstractmethod
    def settings(self) -> dict[str, object]:
        """JSON-able settings, recorded with each version."""

    @classmethod
    def recompute(
        cls,
        parent: Tensors,
        base_of: BaseLookup,
        lineage: Sequence[LineageEntry],
        deltas: Mapping[str, Tensors],
    ) -> Tensors:
        """``parent + sum_i weight_i * delta_i`` over the lineage, in its order."""
        return aggregate.weighted_sum(
            parent, [deltas[e.update_id] for e in lineage], [e.weight for e in lineage]
        )

    @classmethod
    def without(
        cls, lineage: tuple[LineageEntry, ...], participant: str
    ) -> tuple[LineageEntry, ...]:
        """The lineage without ``participant``'s entries; the others keep their weights."""
        return left_out(lineage, participant)


def left_out(lineage: tuple[LineageEntry, ...], participant: str) -> tuple[LineageEntry, ...]:
    """``lineage`` without ``participant``'s entries, in order, weights unchanged."""
    return tuple(e for e in lineage if e.participant != participant)


def reweighted(
    lineage: Sequence[LineageEntry], weights: Sequence[float]
) -> tuple[LineageEntry, ...]:
    """The entries with new weights, in order."""
    return tuple(dataclasses.replace(e, weight=w) for e, w in zip(lineage, weights, strict=True))


def entry(update: AcceptedUpdate, weight: float) -> LineageEntry:
    """The lineage entry recording ``update`` with ``weight``."""
    return LineageEntry(
        update_id=update.update_id,
        participant=update.participant,
        base_version=update.base_version,
        staleness=update.staleness,
        weight=weight,
        content_hash=update.content_hash,
    )


def mix_step(head: Tensors, base: Tensors, update: AcceptedUpdate, a_t: float) -> Step:
    """FedAsync's step: ``(1 - a_t) * head + a_t * (base + delta)``, float64, cast back once.

    The lineage records ``a_t``; replay recomputes the step from that recorded weight.
    """
    params = aggregate.mix_into(head, base, update.delta, a_t) if update.spare else None
    if params is None:  # not spare, or its result is not finite (the delta untouched)
        params = aggregate.mix(head, base, update.delta, a_t)
    return Step(params=params, lineage=(entry(update, a_t),))


def weighted_step(
    head: Tensors, updates: Sequence[AcceptedUpdate], weights: Sequence[float]
) -> Step:
    """``head + sum_i weight_i * delta_i`` in float64, in order, cast back once.

    The lineage records exactly these weights, so it is a complete recipe for the
    version: replay recomputes the step from the recorded weights.
    """
    params = aggregate.weighted_sum(head, [u.delta for u in updates], weights)
    lineage = tuple(entry(u, w) for u, w in zip(updates, weights, strict=True))
    return Step(params=params, lineage=lineage)


def optimizer_step(
    server: ServerOptimizer,
    head: Tensors,
    updates: Sequence[AcceptedUpdate],
    weights: Sequence[float],
) -> Step:
    """A step over several updates through the strategy's server optimizer.

    The pseudo-gradient is ``sum_i weight_i * delta_i`` with exactly these weights
    (recorded in the lineage); ``server`` moves the head from its committed state
    (:mod:`aggregator.server_opt`). With ``sgd`` this is :func:`weighted_step`, bit
    for bit, and the step has no state. A strategy using it keeps its optimizer in
    an attribute ``server`` (see :func:`server_optimizer`), so that the service
    restores and advances the optimizer's state; replay recomputes such versions from
    their record (:func:`aggregator.server_opt.apply`), not through ``recompute``.
    """
    if server.spec.kind == "sgd":
        return weighted_step(head, updates, weights)
    params, state = server.step(head, [u.delta for u in updates], weights)
    lineage = tuple(entry(u, w) for u, w in zip(updates, weights, strict=True))
    return Step(params=params, lineage=lineage, state=state)


def server_optimizer(strategy: object) -> ServerOptimizer | None:
    """The strategy's server optimizer (its attribute ``server``), or None if it has none."""
    server = getattr(strategy, "server", None)
    return server if isinstance(server, ServerOptimizer) else None


def krum_sizes(robust: RobustnessSpec, n: int) -> tuple[int, int]:
    """Multi-Krum's ``f`` (attackers assumed) and ``m`` (updates kept) for ``n`` updates:
    the task's (None: ``n // 5`` and ``n - f``), lowered so that Krum is defined
    (``n - f - 2 >= 1``, ``1 <= m <= n - f``) when a round closes with fewer updates."""
    f = robust.krum_byzantine if robust.krum_byzantine is not None else n // 5
    f = max(0, min(f, n - 3))
    m = robust.krum_select if robust.krum_select is not None else n - f
    return f, max(1, min(m, n - f))


def robust_step(
    server: ServerOptimizer,
    robust: RobustnessSpec,
    head: Tensors,
    updates: Sequence[AcceptedUpdate],
    weights_of: Callable[[Sequence[AcceptedUpdate]], list[float]],
    server_lr: float,
) -> Step:
    """A buffer's or a round's step under the task's ``robustness.aggregator``.

    ``mean``: :func:`optimizer_step` with ``weights_of(updates)``. ``multi_krum``: the
    same over the updates Multi-Krum keeps (weights from ``weights_of`` of those alone);
    the others stay in the lineage with weight 0, so the version is still the weighted
    sum its lineage records. ``median`` / ``trimmed_mean``: ``head + server_lr *`` the
    coordinate-wise aggregate (aggregator/robust.py), staleness and sample counts
    aside; the lineage records ``server_lr / n`` for each update, for people (replay
    recomputes such a version from the spec's aggregator, not from the weights).
    """
    kind = robust.aggregator
    if kind == "mean" or (kind == "multi_krum" and len(updates) < 3):
        # (Krum needs n - f - 2 >= 1: fewer than 3 updates are all kept)
        return optimizer_step(server, head, updates, weights_of(updates))
    if kind == "multi_krum":
        f, m = krum_sizes(robust, len(updates))
        chosen = set(robust_fns.multi_krum([u.delta for u in updates], f, m))
        kept = [u for i, u in enumerate(updates) if i in chosen]
        some = iter(weights_of(kept))
        weights = [next(some) if i in chosen else 0.0 for i in range(len(updates))]
        return optimizer_step(server, head, updates, weights)
    params = robust_fns.robust_step(
        head,
        [u.delta for u in updates],
        kind=kind,
        server_lr=server_lr,
        trim=robust.trim_fraction,
    )
    nominal = server_lr / len(updates)
    return Step(params=params, lineage=tuple(entry(u, nominal) for u in updates))
