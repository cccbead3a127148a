"""What one aggregator has done, in one object: the simulation and benchmarks read it.

Per bank as well: a bank whose updates keep being refused is *flagged* (a warning
in the log, ``fedq_participant_flagged`` in the metrics, ``flagged`` in /healthz and
in the simulation's report) instead of silently vanishing from the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.hooks import Stages, untimed
from common.refusals import Refusal

__all__ = ["BankStats", "ServiceStats", "Stages", "untimed"]


@dataclass(slots=True)
class BankStats:
    """One participant's updates, as this aggregator decided them."""

    accepted: int = 0
    #: Refusals by reason (the reason's string value).
    refused: dict[str, int] = field(default_factory=dict)
    #: Refusals since its last accepted update.
    refused_in_a_row: int = 0
    #: The last version one of its updates went into (-1: none yet).
    last_version: int = -1

    def as_dict(self) -> dict[str, object]:
        """JSON-able counts."""
        return {
            "accepted": self.accepted,
            "refused": dict(self.refused),
            "refused_in_a_row": self.refused_in_a_row,
            "last_version": self.last_version,
        }


@dataclass(slots=True)
class ServiceStats:
    """Counters of one service run."""

    #: A bank is flagged after this many refusals in a row (none accepted between).
    flag_after: int = 5
    accepted: int = 0
    #: Refusals by reason (the reason's string value).
    refused: dict[str, int] = field(default_factory=dict)
    banks: dict[str, BankStats] = field(default_factory=dict)

    @property
    def refused_total(self) -> int:
        """Every refusal, whatever its reason."""
        return sum(self.refused.values())

    @property
    def flagged(self) -> list[str]:
        """Banks whose last ``flag_after`` updates or more were all refused, sorted."""
        return sorted(n for n, b in self.banks.items() if b.refused_in_a_row >= self.flag_after)

    def count_refusal(self, reason: Refusal, participant: str | None = None) -> bool:
        """One more refusal; True when it makes ``participant`` flagged (just now)."""
        self.refused[reason.value] = self.refused.get(reason.value, 0) + 1
        if participant is None:
            return False
        bank = self.banks.setdefault(participant, BankStats())
        bank.refused[reason.value] = bank.refused.get(reason.value, 0) + 1
        bank.refused_in_a_row += 1
        return bank.refused_in_a_row == self.flag_after

    def count_accepted(self, participant: str, version: int) -> bool:
        """One more accepted update; True when it lifts the bank's flag."""
        self.accepted += 1
        bank = self.banks.setdefault(participant, BankStats())
        was_flagged = bank.refused_in_a_row >= self.flag_after
        bank.accepted += 1
        bank.refused_in_a_row = 0
        bank.last_version = version
        return was_flagged
