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

from collections.abc import Iterator, Sequence

import torch

from common.wire import Tensors

__all__ = [
    "buffer_weights",
    "mix",
    "mix_into",
    "mixing_weight",
    "normalised",
    "rescaled",
    "round_weights",
    "weighted_delta",
    "weighted_sum",
]


#: Elements per block of a large tensor's float64 arithmetic: the temporaries stay at
#: 2 MB each whatever the tensor's size. Every element's arithmetic is the same in a
#: block as in the whole (elementwise operations), so blocks change no bit.
BLOCK = 1 << 18


def mix(head: Tensors, base: Tensors, delta: Tensors, a_t: float) -> Tensors:
    """``(1 - a_t) * head + a_t * (base + delta)`` per tensor, float64, cast back once."""
    params: Tensors = {}
    for name, h in head.items():
        if h.numel() <= BLOCK:
            params[name] = _mixed(h, base[name], delta[name], a_t).to(h.dtype)
            continue
        out = torch.empty(h.shape, dtype=h.dtype)
        flat = out.view(-1)
        for s, m in _mixed_blocks(h, base[name], delta[name], a_t):
            flat[s].copy_(m)
        params[name] = out
    return params


def mix_into(head: Tensors, base: Tensors, delta: Tensors, a_t: float) -> Tensors | None:
    """:func:`mix`, bit for bit, written over ``delta``'s tensors (contiguous, the
    head's dtypes), which the caller gives up: no second model in memory. Two passes:
    the first only checks that every result is finite; if one is not, nothing is
    written and None is returned (``delta`` unchanged, for :func:`mix` and the caller's
    refusal)."""
    for name, h in head.items():
        for _, m in _mixed_blocks(h, base[name], delta[name], a_t):
            if not bool(torch.isfinite(m.to(h.dtype)).all()):
                return None
    for name, h in head.items():
        flat = delta[name].view(-1)
        for s, m in _mixed_blocks(h, base[name], delta[name], a_t):
            flat[s].copy_(m)
    return delta


def _mixed(h: torch.Tensor, b: torch.Tensor, d: torch.Tensor, a_t: float) -> torch.Tensor:
    """The float64 result for one tensor (or one block of it)."""
    # In place, one float64 buffer per operand; each operation is rounded alone
    # (no fused multiply-add), so the result is the same bit for bit as
    # keep * head + a_t * (base + delta) computed out of place.
    w_new = b.to(torch.float64, copy=True)
    w_new.add_(d.to(torch.float64))
    w_new.mul_(a_t)
    mixed = h.to(torch.float64, copy=True)
    mixed.mul_(1.0 - a_t)
    mixed.add_(w_new)
    return mixed


def _mixed_blocks(
    h: torch.Tensor, b: torch.Tensor, d: torch.Tensor, a_t: float
) -> Iterator[tuple[slice, torch.Tensor]]:
    """The flat tensor's float64 results, BLOCK elements at a time."""
    hf, bf, df = h.reshape(-1), b.reshape(-1), d.reshape(-1)
    for i in range(0, hf.numel(), BLOCK):
        s = slice(i, i + BLOCK)
        yield s, _mixed(hf[s], bf[s], df[s], a_t)


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
