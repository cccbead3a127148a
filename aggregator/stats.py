"""What one aggregator has done, in one object: the simulation and benchmarks read it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from common.refusals import Refusal

#: A named hook around a stage of the service's work ("decode", "offer", "commit",
#: ...): benchmarks pass one that times each stage; the default does nothing.
Stages = Callable[[str], AbstractContextManager[object]]


def untimed(_: str) -> AbstractContextManager[object]:
    """The default :data:`Stages`: no timing."""
    return nullcontext()


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
