"""Which updates make a step non-finite (the store never commits such a step).

A pure function over tensors: :func:`overflowing` finds the updates of a non-finite
step that overflow on their own, so that only they are refused and the others stay
in the buffer.
"""

from __future__ import annotations

import torch

from aggregator.strategies import AcceptedUpdate, Step
from common.wire import Tensors


def overflowing(head: Tensors, step: Step, updates: list[AcceptedUpdate]) -> set[str]:
    """Updates of a non-finite step that are not finite on their own.

    A step of one update: that update. Otherwise an update whose ``head + w * delta``
    (its own weight, float64, cast to the head's dtype) is not finite.
    """
    if len(updates) == 1:
        return {updates[0].update_id}
    out = set()
    for entry, u in zip(step.lineage, updates, strict=True):
        for name, h in head.items():
            alone = h.to(torch.float64) + entry.weight * u.delta[name].to(torch.float64)
            if not bool(torch.isfinite(alone.to(h.dtype)).all()):
                out.add(u.update_id)
                break
    return out
