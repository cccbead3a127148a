"""Aggregation arithmetic: small pure functions on tensors and weights. No state, no I/O.

Every strategy computes its versions with these functions, and replay recomputes
them with the same ones, so they are the single definition of each formula.

Arithmetic and determinism
--------------------------
Every computation runs in float64, in a fixed order (tensors in the head's order,
updates in the order given) and is cast back to each head tensor's dtype exactly
once. Only elementwise multiplications and additions are used, each its own
correctly rounded IEEE operation: no fused ``alpha=`` forms, whose vectorised
kernels may use FMA on one CPU and not on another. So identical inputs in
identical order give bit-identical parameters, which is what replay relies on.
Weights are Python floats (IEEE binary64) computed in the order written here.

Nothing here validates its inputs: the service admits only updates whose
tensors have the head's names, shapes and floating dtypes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.wire import Tensors

__all__ = [
    "buffer_weights",
    "mix",
    "mixing_weight",
    "normalised",
    "rescaled",
    "round_weights",
    "weighted_delta",
    "weighted_sum",
]


def mix(head: Tensors, base: Tensors, delta: Tensors, a_t: float) -> Tensors:
    """``(1 - a_t) * head + a_t * (base + delta)`` per tensor, float64, cast back once."""
    keep = 1.0 - a_t
    params: Tensors = {}
    for name, h in head.items():
        # In place, one float64 buffer per operand; each operation is rounded alone
        # (no fused multiply-add), so the result is the same bit for bit as
        # keep * head + a_t * (base + delta) computed out of place.
        w_new = base[name].to(torch.float64, copy=True)
        w_new.add_(delta[name].to(torch.float64))
        w_new.mul_(a_t)
        mixed = h.to(torch.float64, copy=True)
        mixed.mul_(keep)
        mixed.add_(w_new)
        params[name] = mixed.to(h.dtype)
    return params


def weighted_sum(head: Tensors, deltas: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """``head + sum_i weight_i * delta_i`` per tensor, float64, in order, cast back once.

    With no deltas the head itself is returned.
    """
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    if not deltas:
        return head
    params: Tensors = {}
    for name, h in head.items():
        out = h.to(torch.float64, copy=True)
        out.add_(weighted_delta(name, deltas, weights))
        params[name] = out.to(h.dtype)
    return params


def weighted_delta(name: str, deltas: Sequence[Tensors], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i weight_i * delta_i[name]`` in float64, in order (at least one delta).

    In place, each operation rounded alone (no fused multiply-add): bit-identical to
    the out-of-place formula, without a temporary per update.
    """
    acc = deltas[0][name].to(torch.float64, copy=True)
    acc.mul_(weights[0])
    tmp = torch.empty_like(acc)
    for d, w in zip(deltas[1:], weights[1:], strict=True):
        tmp.copy_(d[name])
        tmp.mul_(w)
        acc.add_(tmp)
    return acc


def mixing_weight(mixing: float, s: float) -> float:
    """FedAsync's ``a_t = mixing * s(t - v)``."""
    return float(mixing) * s


def buffer_weights(server_lr: float, s: Sequence[float]) -> list[float]:
    """FedBuff's ``weight_i = server_lr * s_i / K`` with ``K = len(s)``, in that order."""
    k = float(len(s))
    lr = float(server_lr)
    return [lr * s_i / k for s_i in s]


def round_weights(raw: Sequence[float]) -> list[float]:
    """FedAvg's ``w_i = raw_i / sum_j raw_j`` (the sum taken left to right)."""
    return normalised(raw)


def normalised(weights: Sequence[float]) -> list[float]:
    """``w_i / sum_j w_j``, the sum taken left to right."""
    total = sum(weights)
    return [w / total for w in weights]


def rescaled(weights: Sequence[float], factor: float) -> list[float]:
    """``w_i * factor`` for each weight."""
    return [w * factor for w in weights]
