"""FedBuff (Nguyen et al., 2022): buffer K deltas, then one server step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from aggregator import aggregate
from aggregator.staleness import staleness_weight
from aggregator.strategies.base import (
    AcceptedUpdate,
    Step,
    StrategyBase,
    left_out,
    reweighted,
    weighted_step,
)
from common.hashing import LineageEntry
from common.spec import AsyncSettings, TaskSpec
from common.wire import Tensors


class FedBuff(StrategyBase):
    """FedBuff: buffer K deltas, then take one server step from the head.

    At ``K = buffer_size`` the server steps
    ``head + server_lr * (1/K) * sum_i s(t - v_i) * delta_i``. Lineage: the K
    updates in arrival order with ``weight_i = server_lr * s(t - v_i) / K``, and the
    step is computed from those very weights as ``head + sum_i weight_i * delta_i``,
    so the lineage is a complete recipe for the version. Sample counts are not
    used: the FedBuff server step is an unweighted mean over the buffer.

    ``base`` is not used: FedBuff applies the buffered deltas to the current head,
    not to the versions they were trained from, as in the FedBuff paper; staleness
    enters only through ``s(t - v)``. Each delta's staleness is the one computed
    when it arrived; as FedBuff is the only writer of its task, the head does not
    move while the buffer fills, so that is also its staleness at the step.
    """

    __slots__ = ("_buffer", "_settings")

    name = "fedbuff"
    mode = "async"
    uses_base = False

    def __init__(self, settings: AsyncSettings) -> None:
        self._settings = settings
        self._buffer: list[AcceptedUpdate] = []

    @classmethod
    def from_spec(cls, spec: TaskSpec) -> Self:
        """From ``spec.async_``."""
        return cls(spec.async_)

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
        scale = len(lineage) / len(kept)
        return reweighted(kept, aggregate.rescaled([e.weight for e in kept], scale))

    def _step(self, head: Tensors, updates: Sequence[AcceptedUpdate]) -> Step:
        s = [staleness_weight(self._settings.staleness, u.staleness) for u in updates]
        return weighted_step(head, updates, aggregate.buffer_weights(self._settings.server_lr, s))
