"""FedAsync (Xie, Koyejo and Gupta, 2019): every update yields a version."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Self

from aggregator import aggregate
from aggregator.strategies.base import (
    AcceptedUpdate,
    BaseLookup,
    Step,
    StrategyBase,
    mix_step,
)
from aggregator.weighting import Weighter, Windowed
from common.hashing import LineageEntry
from common.spec import AsyncSettings, TaskSpec
from common.wire import Tensors


class FedAsync(Windowed, StrategyBase):
    """FedAsync: mix every update into the head, weighted by its staleness and its data.

    ``w_new = base + delta``, ``a_t = min(1, mixing * (s * f))`` and
    ``params = (1 - a_t) * head + a_t * w_new``, in float64, cast back to each
    tensor's dtype; ``s`` is ``s(.)`` of the staleness in ``staleness_unit`` (in
    rounds: ``(t - v) / N``) and ``f`` the factor of ``weighting``
    (:mod:`aggregator.weighting`; 1 for ``staleness``, which gives
    ``a_t = mixing * s(t - v)`` bit for bit). ``a_t <= 1`` always. Nothing is ever
    held. Lineage: the update with weight ``a_t``. Without its participant a
    version is its parent unchanged.
    """

    __slots__ = ("_settings", "_weighter")

    name = "fedasync"
    dp_linear = True
    mode = "async"
    uses_base = True

    def __init__(self, settings: AsyncSettings, spec: TaskSpec | None = None) -> None:
        """``spec`` gives the participants and their declared samples (none: ``N = 1``)."""
        self._settings = settings
        self._weighter = Weighter(settings, 1, spec)

    @classmethod
    def from_spec(cls, spec: TaskSpec) -> Self:
        """From ``spec.async_``, its participants and their declared samples."""
        return cls(spec.async_, spec)

    @property
    def capacity(self) -> int:
        """1: every update steps at once."""
        return 1

    def mixing_weight(self, staleness: int, factor: float = 1.0) -> float:
        """``a_t = min(1, mixing * (s * factor))`` with ``s`` of ``staleness`` in the unit."""
        s = self._weighter.s(staleness)
        return min(1.0, aggregate.mixing_weight(self._settings.mixing, s * factor))

    def offer(self, head: Tensors, base: Tensors, update: AcceptedUpdate) -> Step:
        """Mix the update in; always emits a step."""
        f = self._weighter.factor(update.participant, update.num_samples)
        return mix_step(head, base, update, self.mixing_weight(update.staleness, f))

    def settings(self) -> dict[str, object]:
        """All of :class:`AsyncSettings` as JSON data, for ``AsyncSettings.model_validate``."""
        return self._settings.model_dump(mode="json")

    @classmethod
    def recompute(
        cls,
        parent: Tensors,
        base_of: BaseLookup,
        lineage: Sequence[LineageEntry],
        deltas: Mapping[str, Tensors],
    ) -> Tensors:
        """``(1 - a_t) * parent + a_t * (base + delta)`` with the recorded ``a_t``."""
        if not lineage:
            return parent
        (e,) = lineage
        return aggregate.mix(parent, base_of(e.base_version), deltas[e.update_id], e.weight)
