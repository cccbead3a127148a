"""Each bank's share of influence on a model, read from the recorded lineage.

Definition (docs/quality.md quotes it): a bank's **share of weight** over versions
``1..t`` is the sum of the weights its updates were given in those versions'
lineages divided by the sum of every update's weight::

    share_i = sum_{v <= t} sum_{e in lineage(v), e.participant = i} e.weight
              / sum_{v <= t} sum_{e in lineage(v)} e.weight

The weight is the one recorded with the version (FedAsync's ``a_t``, FedBuff's
``server_lr * s_i * f_i / K``, FedAvg's normalised ``n_i / sum n``), so the share is
what the aggregator actually did, reproducible from the audit trail alone. It
measures how much each bank was let move the model, not what its data was worth
(``fedq audit`` counterfactuals answer that); under FedAsync an early update's
mark on the final model also fades as later updates are mixed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from aggregator.store import VersionRecord
from common.hashing import LineageEntry


def weight_totals(lineages: Iterable[Sequence[LineageEntry]]) -> dict[str, float]:
    """Per participant, the sum of the weights its updates were given, in first-seen order."""
    totals: dict[str, float] = {}
    for lineage in lineages:
        for e in lineage:
            totals[e.participant] = totals.get(e.participant, 0.0) + float(e.weight)
    return totals


def weight_shares(lineages: Iterable[Sequence[LineageEntry]]) -> dict[str, float]:
    """Per participant, its share of the total recorded weight (see the module); the
    shares sum to 1. Empty when no version has a lineage."""
    totals = weight_totals(lineages)
    grand = sum(totals.values())
    if grand <= 0.0:
        return dict.fromkeys(totals, 0.0)
    return {name: total / grand for name, total in totals.items()}


def record_shares(records: Iterable[VersionRecord]) -> dict[str, float]:
    """:func:`weight_shares` over the lineages of these version records."""
    return weight_shares(r.lineage for r in records)


def share_ratios(shares: Mapping[str, float], data: Mapping[str, float]) -> dict[str, float]:
    """Per bank of ``data``, its share of weight over its data share (1: it counted by
    its data; 0: not at all); banks with no recorded weight get 0."""
    return {name: shares.get(name, 0.0) / d for name, d in data.items() if d > 0.0}
