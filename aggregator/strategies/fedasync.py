"""FedAsync (Xie, Koyejo and Gupta, 2019): every update yields a version."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Self

from aggregator import aggregate
from aggregator.staleness import staleness_weight
from aggregator.strategies.base import (
    AcceptedUpdate,
    BaseLookup,
    Step,
    StrategyBase,
    mix_step,
)
from common.hashing import LineageEntry
from common.spec import AsyncSettings, TaskSpec
from common.wire import Tensors


class FedAsync(StrategyBase):
    """FedAsync: mix every update into the head, weighted by its staleness.

    ``w_new = base + delta``, ``a_t = mixing * s(t - v)`` and
    ``params = (1 - a_t) * head + a_t * w_new``, in float64, cast back to each
    tensor's dtype. Nothing is ever held. Lineage: the update with weight ``a_t``.
    Without its participant a version is its parent unchanged.
    """

    __slots__ = ("_settings",)

    name = "fedasync"
    mode = "async"
    uses_base = True

    def __init__(self, settings: AsyncSettings) -> None:
        self._settings = settings

    @classmethod
    def from_spec(cls, spec: TaskSpec) -> Self:
        """From ``spec.async_``."""
        return cls(spec.async_)

    @property
    def capacity(self) -> int:
        """1: every update steps at once."""
        return 1

    def mixing_weight(self, staleness: int) -> float:
        """``a_t = mixing * s(staleness)``."""
        s = staleness_weight(self._settings.staleness, staleness)
        return aggregate.mixing_weight(self._settings.mixing, s)

    def offer(self, head: Tensors, base: Tensors, update: AcceptedUpdate) -> Step:
        """Mix the update in; always emits a step."""
        return mix_step(head, base, update, self.mixing_weight(update.staleness))

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
