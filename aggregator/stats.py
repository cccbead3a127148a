"""What one aggregator has done, in one object: the simulation and benchmarks read it.

Per bank as well: a bank whose updates keep being refused, or whose accepted
updates carry negligible weight, is *flagged* (a warning in the log,
``fedq_participant_flagged`` and ``fedq_participant_low_weight`` in the metrics,
``flagged`` and ``flag_reasons`` in /healthz, ``flagged`` in the simulation's report)
instead of silently vanishing from the model.

Negligible weight: over the last ``W`` accepted lineage entries (``W`` as in
:func:`aggregator.weighting.window_size`), a bank's share of the recorded weight
``share_i = sum of its weights / sum of all weights`` (as
:mod:`aggregator.audit.influence`, over the window) is below
``low_weight_fraction * d_i``, with ``d_i`` its data share
(:func:`aggregator.weighting.data_shares`: declared samples, else ``1 / N``; for a
task without a participant list ``1 /`` the banks in the window), while at least
``flag_after`` of its updates are in the window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from aggregator.weighting import data_shares, participant_count, window_size
from common.hashing import LineageEntry
from common.hooks import Stages, untimed
from common.refusals import Refusal
from common.spec import TaskSpec

__all__ = ["LOW_WEIGHT_FRACTION", "BankStats", "ServiceStats", "Stages", "untimed"]

#: A bank is flagged when its share of recent weight is below this fraction of its data share.
LOW_WEIGHT_FRACTION = 0.1

#: Flag reasons, as in ``ServiceStats.flag_reasons`` and the log.
REFUSED = "refused"
LOW_WEIGHT = "low_weight"


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
    #: Its share of the recorded weight of the last ``W`` accepted entries.
    weight_share: float = 0.0
    #: Its accepted updates in those ``W`` entries.
    recent_updates: int = 0
    #: Whether its recent accepted updates carry negligible weight (see the module).
    low_weight: bool = False

    def as_dict(self) -> dict[str, object]:
        """JSON-able counts."""
        return {
            "accepted": self.accepted,
            "refused": dict(self.refused),
            "refused_in_a_row": self.refused_in_a_row,
            "last_version": self.last_version,
            "weight_share": self.weight_share,
            "recent_updates": self.recent_updates,
            "low_weight": self.low_weight,
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
    #: Each bank's data share ``d_i`` (empty: ``1 /`` the banks in the window).
    data_shares: dict[str, float] = field(default_factory=dict)
    #: ``W``: how many recent accepted entries weight shares are measured over.
    weight_window: int = 100
    #: Flag a bank whose recent weight share is below this fraction of its data share.
    low_weight_fraction: float = LOW_WEIGHT_FRACTION
    _recent: deque[tuple[str, float]] = field(init=False, repr=False, compare=False)
    #: Per bank, the sum of the window's weights and its number of entries, kept as
    #: entries come and go (metrics only: no replay depends on them).
    _totals: dict[str, float] = field(init=False, repr=False, compare=False)
    _counts: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._recent = deque()
        self._totals, self._counts = {}, {}

    @classmethod
    def for_task(cls, spec: TaskSpec, flag_after: int = 5) -> ServiceStats:
        """Stats of a task: its data shares and its window ``W``."""
        n = participant_count(spec)
        return cls(
            flag_after=flag_after,
            data_shares=data_shares(spec),
            weight_window=window_size(spec.async_, n),
        )

    @property
    def refused_total(self) -> int:
        """Every refusal, whatever its reason."""
        return sum(self.refused.values())

    @property
    def flagged(self) -> list[str]:
        """Banks flagged for any reason (see :attr:`flag_reasons`), sorted."""
        return sorted(self.flag_reasons)

    @property
    def flag_reasons(self) -> dict[str, list[str]]:
        """Per flagged bank, sorted by name, why: ``refused`` (its last ``flag_after``
        updates or more were all refused), ``low_weight`` (see the module)."""
        out: dict[str, list[str]] = {}
        for name in sorted(self.banks):
            bank = self.banks[name]
            why = [REFUSED] if bank.refused_in_a_row >= self.flag_after else []
            if bank.low_weight:
                why.append(LOW_WEIGHT)
            if why:
                out[name] = why
        return out

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

    def count_weights(
        self, lineage: Sequence[LineageEntry], *, evaluate: bool = True
    ) -> list[tuple[str, bool]]:
        """Add a committed version's entries to the window; with ``evaluate``, update
        every bank's recent weight share (O(banks)) and return the banks whose
        ``low_weight`` flag changed (and its value)."""
        totals, counts = self._totals, self._counts
        for e in lineage:  # O(entries) per commit, not O(W): the window is kept summed
            self._recent.append((e.participant, float(e.weight)))
            totals[e.participant] = totals.get(e.participant, 0.0) + float(e.weight)
            counts[e.participant] = counts.get(e.participant, 0) + 1
        while len(self._recent) > max(1, self.weight_window):
            name, weight = self._recent.popleft()
            counts[name] -= 1
            if counts[name] == 0:
                del counts[name], totals[name]  # exactly 0, no rounding left over
            else:
                totals[name] -= weight
        if not evaluate:
            return []
        grand = sum(totals.values())
        changed: list[tuple[str, bool]] = []
        for name in sorted(set(self.banks) | set(totals)):
            bank = self.banks.setdefault(name, BankStats())
            bank.weight_share = totals.get(name, 0.0) / grand if grand > 0.0 else 0.0
            bank.recent_updates = counts.get(name, 0)
            reference = self.data_shares.get(name, 1.0 / float(max(1, len(totals))))
            low = (
                bank.recent_updates >= self.flag_after
                and bank.weight_share < self.low_weight_fraction * reference
            )
            if low != bank.low_weight:
                bank.low_weight = low
                changed.append((name, low))
        return changed
