"""What one aggregator has done, in one object: the simulation and benchmarks read it."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.hooks import Stages, untimed
from common.refusals import Refusal

__all__ = ["ServiceStats", "Stages", "untimed"]


@dataclass(slots=True)
class ServiceStats:
    """Counters of one service run."""

    accepted: int = 0
    #: Refusals by reason (the reason's string value).
    refused: dict[str, int] = field(default_factory=dict)

    @property
    def refused_total(self) -> int:
        """Every refusal, whatever its reason."""
        return sum(self.refused.values())

    def count_refusal(self, reason: Refusal) -> None:
        """One more refusal for ``reason``."""
        self.refused[reason.value] = self.refused.get(reason.value, 0) + 1
