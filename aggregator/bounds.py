"""Bounded influence: what one update may weigh before any strategy sees it. Pure.

The task's :class:`common.spec.RobustnessSpec` bounds every update's L2 norm (fixed, or
``norm_multiplier`` times the median norm of the recent accepted updates), caps the
updates of one bank in one FedBuff buffer, and, for FedAsync, refuses an update whose
direction disagrees with where the model has been going. An update over the norm bound
is scaled down to it (``clip``) or refused ``outlier`` (``refuse``).

A clipped update's delta is ``(delta as float64 * factor)`` cast back to its dtype;
the factor of every clipped update is recorded with the version (``info["robust"]``),
so replay applies the same factor to the retained delta and recomputes the version bit
for bit. The adaptive bound's window is rebuilt at start from the recorded norms of the
last versions, so a restarted aggregator bounds as one that never stopped. Refusals
are decisions at admission, recorded as such: replay does not repeat them.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aggregator.robust import clip_factor, cosine, delta_norm, norm_bound_from
from aggregator.strategies.base import AcceptedUpdate
from common.hashing import LineageEntry
from common.refusals import Refusal
from common.spec import RobustnessSpec, TaskSpec
from common.wire import Tensors

#: FedAsync's reference direction is an exponential average of the recent version
#: steps with this weight on the newest.
DIRECTION_DECAY = 0.1


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the bounds say of one update: its norm, its clip factor (1.0: as sent) and,
    when refused, the reason and detail."""

    norm: float
    factor: float = 1.0
    refused: tuple[Refusal, str] | None = None

    @property
    def accepted_norm(self) -> float:
        """The norm the strategy got: the bound for a clipped update. The adaptive
        window keeps it, so a bank's huge updates cannot lift the bound."""
        return self.norm * self.factor


def clipped(delta: Mapping[str, torch.Tensor], factor: float) -> Tensors:
    """``delta`` scaled by ``factor``: each tensor as float64 times the factor, cast back
    to its dtype (what the service offers and what replay recomputes from)."""
    return {k: (t.to(torch.float64) * factor).to(t.dtype) for k, t in delta.items()}


def apply_clips(deltas: Mapping[str, Tensors], factors: Mapping[str, float]) -> dict[str, Tensors]:
    """The retained deltas with the recorded clip factors applied (replay)."""
    return {
        uid: clipped(d, factors[uid]) if uid in factors else dict(d) for uid, d in deltas.items()
    }


class Bounds:
    """The bounds of one task, with the state the adaptive bound and the direction check
    keep (the recent accepted norms; the recent step direction)."""

    __slots__ = ("_direction", "_norms", "spec")

    def __init__(self, spec: TaskSpec) -> None:
        self.spec: RobustnessSpec = spec.robustness
        #: (bank, norm as accepted: at most the bound in force) of the last accepted
        #: updates, oldest first.
        self._norms: deque[tuple[str, float]] = deque(maxlen=self.spec.norm_window)
        self._direction: Tensors | None = None

    @property
    def active(self) -> bool:
        """Whether any bound applies (else the service skips the checks)."""
        r = self.spec
        return r.bounded or r.max_per_bank is not None or r.min_cosine is not None

    def bound(self) -> float | None:
        """The norm bound in force now: the fixed one, the adaptive one (once the window
        is full), the smaller of both, or None."""
        r = self.spec
        bounds = []
        if r.norm_bound is not None:
            bounds.append(r.norm_bound)
        if r.adaptive_norm and len(self._norms) >= r.norm_window:
            # One vote per bank (the median of its own recent norms), so that no bank
            # moves the bound by sending many updates, tiny or large.
            by_bank: dict[str, list[float]] = {}
            for bank, norm in self._norms:
                by_bank.setdefault(bank, []).append(norm)
            votes = [norm_bound_from(v, 1.0) for _, v in sorted(by_bank.items())]
            adaptive = norm_bound_from([v for v in votes if v is not None], r.norm_multiplier)
            if adaptive is not None:
                bounds.append(adaptive)
        return min(bounds) if bounds else None

    def judge(self, update: AcceptedUpdate, pending: Sequence[AcceptedUpdate]) -> Verdict:
        """The verdict on one admitted update, given the updates already buffered."""
        r = self.spec
        norm = delta_norm(update.delta)
        if r.max_per_bank is not None:
            held = sum(1 for u in pending if u.participant == update.participant)
            if held >= r.max_per_bank:
                return Verdict(
                    norm,
                    refused=(
                        Refusal.OVER_CAP,
                        f"{update.participant!r} already has {held} updates in this buffer "
                        f"(at most {r.max_per_bank})",
                    ),
                )
        bound = self.bound()
        factor = 1.0
        if bound is not None and norm > bound:
            if r.outlier == "refuse":
                return Verdict(
                    norm,
                    refused=(Refusal.OUTLIER, f"L2 norm {norm:.6g} over the bound {bound:.6g}"),
                )
            factor = clip_factor(norm, bound)
        if r.min_cosine is not None and self._direction is not None:
            c = cosine(update.delta, self._direction)
            if c is not None and c < r.min_cosine:
                return Verdict(
                    norm,
                    refused=(
                        Refusal.OUTLIER,
                        f"direction: cosine {c:.4g} with the recent aggregate, below "
                        f"{r.min_cosine:g}",
                    ),
                )
        return Verdict(norm, factor)

    def offered(self, update: AcceptedUpdate, verdict: Verdict) -> AcceptedUpdate:
        """The update as the strategy gets it: clipped when the verdict says so."""
        if verdict.factor >= 1.0:
            return update
        return dataclasses.replace(update, delta=clipped(update.delta, verdict.factor))

    def committed(self, norms: Iterable[tuple[str, float]], old: Tensors, new: Tensors) -> None:
        """A version was committed: its updates' (bank, norm as accepted) join the window,
        in lineage order; the step from ``old`` to ``new`` moves the reference direction
        (FedAsync's check)."""
        self._norms.extend(norms)
        if self.spec.min_cosine is None:
            return
        step = {k: new[k].to(torch.float64) - old[k].to(torch.float64) for k in new}
        if self._direction is None:
            self._direction = step
        else:
            self._direction = {
                k: self._direction[k] * (1 - DIRECTION_DECAY) + step[k] * DIRECTION_DECAY
                for k in step
            }

    def restore(self, versions: Iterable[tuple[Sequence[LineageEntry], Mapping[str, Any]]]) -> None:
        """Rebuild the norm window from the last versions (lineage, info), oldest first:
        each entry's recorded ``info["robust"]["norms"]``, in lineage order, as the
        window took them when they were committed."""
        self._norms.clear()
        for lineage, info in versions:
            robust = info.get("robust")
            norms = robust.get("norms", {}) if isinstance(robust, Mapping) else {}
            if not isinstance(norms, Mapping):
                continue
            for e in lineage:
                if e.update_id in norms:
                    self._norms.append((e.participant, float(norms[e.update_id])))

    def record(
        self,
        lineage_ids: Sequence[str],
        verdicts: Mapping[str, Verdict],
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """What a version records (``info["robust"]``): the bound in force, each
        update's norm and the clip factor of each clipped one."""
        out: dict[str, Any] = {
            "bound": self.bound(),
            "norms": {u: verdicts[u].accepted_norm for u in lineage_ids if u in verdicts},
            "clipped": {
                u: verdicts[u].factor
                for u in lineage_ids
                if u in verdicts and verdicts[u].factor < 1.0
            },
        }
        if extra:
            out.update(extra)
        return out
