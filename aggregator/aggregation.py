"""Pure aggregation: tensors in, tensors out. No I/O, no asyncio.

Every function here is deterministic for the same inputs in the same order: sums
run in float64 in input order and are cast back once, so replaying the same
updates reproduces the same parameters bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from common.wire import Tensors


def weighted_mean(
    deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> Tensors:
    """The weighted mean of deltas (weights need not sum to one; they are normalised)."""
    if not deltas:
        raise ValueError("weighted_mean needs at least one delta")
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    total = float(sum(weights))
    names = list(deltas[0])
    out: Tensors = {}
    for name in names:
        ref = deltas[0][name]
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for delta, w in zip(deltas, weights, strict=True):
            acc.add_(delta[name].to(torch.float64), alpha=float(w) / total)
        out[name] = acc.to(ref.dtype)
    return out


def apply_delta(
    params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], scale: float = 1.0
) -> Tensors:
    """``params + scale * delta``, computed in float64 and cast back to each tensor's dtype."""
    if list(params) != list(delta):
        raise ValueError("params and delta name different tensors")
    return {
        name: (p.to(torch.float64) + scale * delta[name].to(torch.float64)).to(p.dtype)
        for name, p in params.items()
    }
