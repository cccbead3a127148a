"""FedBuff (Nguyen et al., 2022): buffer K deltas, then one server step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from aggregator import aggregate
from aggregator.server_opt import ServerOptimizer
from aggregator.strategies.base import (
    AcceptedUpdate,
    Step,
    StrategyBase,
    left_out,
    reweighted,
    robust_step,
)
from aggregator.weighting import Weighter, Windowed
from common.hashing import LineageEntry
from common.spec import AsyncSettings, RobustnessSpec, TaskSpec
from common.wire import Tensors


class FedBuff(Windowed, StrategyBase):
    """FedBuff: buffer K deltas, then take one server step from the head.

    At ``K = buffer_size`` the server steps
    ``head + server_lr * (1/K) * sum_i s_i * f_i * delta_i``. Lineage: the K
    updates in arrival order with ``weight_i = server_lr * (s_i * f_i) / K``, and the
    step is computed from those very weights as ``head + sum_i weight_i * delta_i``,
    so the lineage is a complete recipe for the version. ``s_i`` is ``s(.)`` of the
    staleness in ``staleness_unit`` (in rounds: ``(t - v_i) * K / N``), ``f_i`` the
    factor of ``weighting`` (:mod:`aggregator.weighting`: sample count and, for
    ``balanced``, the bank's recent update rate), every factor of one step computed
    from the same state. With ``weighting = "staleness"`` every ``f_i = 1`` and the
    weights are ``server_lr * s_i / K`` bit for bit. ``s_i * f_i`` is capped at K,
    so that no single update weighs more than ``server_lr`` (see :meth:`scaled`).

    ``base`` is not used: FedBuff applies the buffered deltas to the current head,
    not to the versions they were trained from, as in the FedBuff paper; staleness
    enters only through ``s(t - v)``. Each delta's staleness is the one computed
    when it arrived; as FedBuff is the only writer of its task, the head does not
    move while the buffer fills, so that is also its staleness at the step.
    """

    __slots__ = ("_buffer", "_robust", "_settings", "_weighter", "server")

    name = "fedbuff"
    dp_linear = True
    mode = "async"
    uses_base = False

    def __init__(self, settings: AsyncSettings, spec: TaskSpec | None = None) -> None:
        """``spec`` gives the participants, their declared samples (none: ``N = 1``) and
        the server optimizer (none: ``sgd``, the FedBuff step above)."""
        self._settings = settings
        #: The server optimizer the step goes through (:mod:`aggregator.server_opt`):
        #: with ``sgd`` the step is the one above; otherwise the weighted sum above is
        #: its pseudo-gradient.
        self.server = ServerOptimizer(spec.server if spec is not None else None)
        self._buffer: list[AcceptedUpdate] = []
        self._weighter = Weighter(settings, settings.buffer_size, spec)
        #: How a buffer is combined (``robustness.aggregator``; ``mean``: the step above).
        self._robust = spec.robustness if spec is not None else RobustnessSpec()

    @classmethod
    def from_spec(cls, spec: TaskSpec) -> Self:
        """From ``spec.async_``, its participants and their declared samples."""
        return cls(spec.async_, spec)

    @property
    def buffer_size(self) -> int:
        """K, the number of updates per server step."""
        return self._settings.buffer_size

    @property
    def capacity(self) -> int:
        """K: the K-th update steps."""
        return self._settings.buffer_size

    def offer(self, head: Tensors, base: Tensors, update: AcceptedUpdate) -> Step | None:
        """Buffer the update; at K updates, emit the step and clear the buffer.

        ``base`` is accepted for the common interface and ignored (see the class).
        """
        if len(self._buffer) + 1 < self._settings.buffer_size:
            self._buffer.append(update)
            return None
        step = self._step(head, [*self._buffer, update])
        self._buffer.clear()
        return step

    def flush(self, head: Tensors) -> Step | None:
        """Emit a partial buffer of K' < K updates (shutdown, deadline); None when empty.

        The mean is over the K' updates present: ``weight_i = server_lr * s_i / K'``,
        so a partial step has the size of a full one rather than K'/K of it.
        """
        if not self._buffer:
            return None
        step = self._step(head, self._buffer)
        self._buffer.clear()
        return step

    def pending(self) -> tuple[AcceptedUpdate, ...]:
        """The buffered updates, in arrival order."""
        return tuple(self._buffer)

    def settings(self) -> dict[str, object]:
        """All of :class:`AsyncSettings` as JSON data, for ``AsyncSettings.model_validate``."""
        return self._settings.model_dump(mode="json")

    @classmethod
    def without(
        cls, lineage: tuple[LineageEntry, ...], participant: str
    ) -> tuple[LineageEntry, ...]:
        """The mean over the K' updates left: each weight times ``K / K'``."""
        kept = left_out(lineage, participant)
        if not kept or len(kept) == len(lineage):
            return kept
        # Counted over the updates that carried weight: multi-Krum's rejected updates
        # (weight 0) stay rejected, and leaving one out changes nothing.
        carried = sum(1 for e in lineage if e.weight != 0.0)
        carried_kept = sum(1 for e in kept if e.weight != 0.0)
        if carried_kept == 0 or carried == carried_kept:
            return kept
        scale = carried / carried_kept
        return reweighted(kept, aggregate.rescaled([e.weight for e in kept], scale))

    def scaled(self, updates: Sequence[AcceptedUpdate]) -> list[float]:
        """``min(s_i * f_i, K)`` of each update, in order (``s_i`` alone for ``staleness``).

        The cap at ``K = buffer_size`` keeps any one update's weight at most
        ``server_lr`` in a full buffer: a boost (``f_i > 1``, a slow bank's update) may
        apply its delta once in full, never beyond it, where a stale delta applied to
        the head would overshoot. It depends on nothing but the update and K, so the
        counterfactual of :meth:`without` stays exact.
        """
        w = self._weighter
        k = float(self._settings.buffer_size)
        return [min(w.s(u.staleness) * w.factor(u.participant, u.num_samples), k) for u in updates]

    def _step(self, head: Tensors, updates: Sequence[AcceptedUpdate]) -> Step:
        lr = self._settings.server_lr

        def weights_of(chosen: Sequence[AcceptedUpdate]) -> list[float]:
            return aggregate.buffer_weights(lr, self.scaled(chosen))

        return robust_step(self.server, self._robust, head, updates, weights_of, lr)
