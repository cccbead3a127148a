"""Robust aggregation: coordinate-wise median, trimmed mean, multi-Krum, norm bounds.

Small pure functions on deltas (``name -> tensor``), as in :mod:`aggregator.aggregate`:
no state, no I/O. The strategies compute their robust steps with these functions and
replay recomputes them with the same ones, so they are the single definition of each
formula.

Definitions
-----------
For ``n`` deltas ``d_1 .. d_n`` with the same tensor names and shapes, and one
coordinate ``c`` (an element of one tensor), let ``x_(1) <= .. <= x_(n)`` be the
values ``d_i[c]`` sorted ascending:

* coordinate-wise median (:func:`coordinate_median`)::

      med[c] = x_((n+1)/2)                        n odd
      med[c] = (x_(n/2) + x_(n/2+1)) / 2          n even

  (the mean of the two middle values, not ``torch.median``'s lower one);
* trimmed mean (:func:`trimmed_mean`), with ``k = floor(trim * n)``, ``0 <= trim < 1/2``
  and ``n - 2k >= 1``::

      tm[c] = (x_(k+1) + x_(k+2) + .. + x_(n-k)) / (n - 2k)

* the L2 norm of a delta over all its tensors (:func:`delta_norm`)::

      |d| = sqrt( sum over names, sum over elements  d[name][e]^2 )

  and the cosine similarity of two deltas (:func:`cosine`)
  ``cos(a, b) = <a, b> / (|a| |b|)`` (``None`` when a norm is 0);
* Krum (Blanchard et al. 2017, "Machine learning with adversaries: Byzantine tolerant
  gradient descent") with ``f`` assumed Byzantine updates (:func:`krum_scores`)::

      score_i = sum over the n - f - 2 indices j != i closest to d_i of |d_i - d_j|^2

  (requires ``n - f - 2 >= 1``; the paper's guarantee needs ``n > 2f + 2``, which is
  the caller's choice of ``f``). Multi-Krum (:func:`multi_krum`) keeps the ``m``
  updates with the lowest scores (computed once, over all ``n``); its step is the
  mean of the kept updates, ``head + server_lr * (1/m) * sum_{i kept} d_i``: a weighted
  sum with weight ``server_lr / m`` on each kept update and ``0`` on the others
  (:func:`multi_krum_weights`), so it is computed by
  :func:`aggregator.aggregate.weighted_sum` and recorded in a lineage as weights;
* the adaptive norm bound (:func:`norm_bound_from`)
  ``bound = multiplier * median(recent accepted norms)`` (the median as above) and the
  clipping factor (:func:`clip_factor`) ``min(1, bound / norm)`` (1 for a zero norm);
* the robust step (:func:`robust_step`)
  ``head + server_lr * agg(d_1 .. d_n)`` with ``agg`` the median or the trimmed mean.

Arithmetic and determinism
--------------------------
Everything runs in float64; :func:`robust_step` casts back to each head tensor's dtype
exactly once. Identical inputs in identical order give bit-identical results on any
machine and with any number of threads, and the median and trimmed mean are also
bit-identical under any permutation of the deltas:

* each coordinate's values are stacked along a new last axis (in the order given),
  every zero is made ``+0.0`` (so ``-0.0`` and ``+0.0``, which compare equal, cannot
  end up in an order that depends on the input order) and sorted with a stable sort:
  the sorted values are then the same bits whatever the input order;
* the trimmed mean adds the kept sorted values one at a time, from the smallest up
  (each addition its own correctly rounded elementwise IEEE operation, no reduction
  kernel whose order could vary), then divides by their count; the even median adds
  the two middle values and divides by 2;
* norms, inner products and squared distances are summed exactly: the float64
  elementwise squares (or products, or squared differences) of all tensors, names
  sorted, are summed with :func:`math.fsum` (the correctly rounded exact sum, hence
  independent of any order), then one correctly rounded :func:`math.sqrt` where a norm
  is wanted. :func:`delta_norm` is the same number as
  :func:`aggregator.privacy.delta_norm`. Krum scores are ``math.fsum`` of the chosen
  squared distances;
* selections break ties by index: among equal distances (Krum) and equal scores
  (multi-Krum) the lower index comes first.

Tensor outputs are keyed by the sorted tensor names. Nothing here validates the
deltas: the service admits only finite updates with the head's names, shapes and
floating dtypes. Values above about ``8.9e307`` in magnitude (possible only in float64
tensors) may overflow to infinity in the even median's sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import torch

from common.wire import Tensors

__all__ = [
    "ROBUST_KINDS",
    "clip_factor",
    "coordinate_median",
    "cosine",
    "delta_norm",
    "krum_scores",
    "multi_krum",
    "multi_krum_weights",
    "norm_bound_from",
    "robust_step",
    "trimmed_mean",
]

_F64: Final = torch.float64

#: The ``kind`` values :func:`robust_step` accepts.
ROBUST_KINDS: Final = ("median", "trimmed_mean")

Delta = Mapping[str, torch.Tensor]


def delta_norm(delta: Delta) -> float:
    """``sqrt(sum of squares)`` over all tensors of ``delta``: float64, names sorted, exact sum."""
    return math.sqrt(math.fsum(_squares(delta[name].to(_F64) for name in sorted(delta))))


def cosine(a: Delta, b: Delta) -> float | None:
    """``<a, b> / (|a| |b|)`` over all tensors (``a``'s names), clamped to ``[-1, 1]``.

    ``None`` when either norm is 0. The inner product is summed exactly, as the norms.
    """
    norm_a = delta_norm(a)
    norm_b = delta_norm(b)
    if norm_a == 0.0 or norm_b == 0.0:
        return None
    products: list[float] = []
    for name in sorted(a):
        products.extend(torch.mul(a[name].to(_F64), b[name].to(_F64)).reshape(-1).tolist())
    value = math.fsum(products) / (norm_a * norm_b)
    return min(1.0, max(-1.0, value))


def coordinate_median(deltas: Sequence[Delta]) -> Tensors:
    """Per coordinate the median of the deltas (the mean of the two middle values for
    an even count), float64, keyed by the sorted names. At least one delta.

    Bit-identical under any permutation of ``deltas``.
    """
    n = len(deltas)
    if n < 1:
        raise ValueError("the median of no deltas")
    mid = n // 2
    out: Tensors = {}
    for name in _names(deltas):
        ordered = _sorted_stack(deltas, name)
        if n % 2 == 1:
            out[name] = ordered[..., mid].clone()
        else:
            pair = torch.add(ordered[..., mid - 1], ordered[..., mid])
            pair.div_(2.0)
            out[name] = pair
    return out


def trimmed_mean(deltas: Sequence[Delta], trim: float) -> Tensors:
    """Per coordinate the mean of the values left once the ``k = floor(trim * n)``
    smallest and ``k`` largest are dropped, float64, keyed by the sorted names.

    The kept values are added in sorted order (smallest first), then divided by their
    count ``n - 2k``. ``k`` is computed as written, ``trim * n`` in float64 then floor.
    Bit-identical under any permutation of ``deltas``. ``ValueError`` unless
    ``0 <= trim < 0.5`` and ``n - 2k >= 1``.
    """
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim!r}")
    n = len(deltas)
    k = math.floor(trim * n)
    kept = n - 2 * k
    if kept < 1:
        raise ValueError(f"trimming {k} of each end leaves no value of {n} deltas")
    out: Tensors = {}
    for name in _names(deltas):
        ordered = _sorted_stack(deltas, name)
        acc = ordered[..., k].clone()
        for j in range(k + 1, n - k):
            acc.add_(ordered[..., j])
        acc.div_(float(kept))
        out[name] = acc
    return out


def krum_scores(deltas: Sequence[Delta], f: int) -> list[float]:
    """Krum's score of each delta: the sum of its squared L2 distances to its
    ``n - f - 2`` closest other deltas (ties by index), in the order of ``deltas``.

    Distances are float64 over all tensors (names sorted), summed exactly; each score
    is the exact sum of the chosen distances. ``ValueError`` unless ``f >= 0`` and
    ``n - f - 2 >= 1``.
    """
    n = len(deltas)
    closest = n - f - 2
    if f < 0 or closest < 1:
        raise ValueError(f"Krum needs f >= 0 and n - f - 2 >= 1, got n={n}, f={f}")
    dist = _squared_distances(deltas)
    scores: list[float] = []
    for i in range(n):
        others = sorted((dist[i][j], j) for j in range(n) if j != i)
        scores.append(math.fsum(d for d, _ in others[:closest]))
    return scores


def multi_krum(deltas: Sequence[Delta], f: int, m: int) -> list[int]:
    """The indices of the ``m`` deltas with the lowest Krum scores (ties by index), in
    ascending index order. ``ValueError`` unless ``1 <= m <= n`` (and as
    :func:`krum_scores`).

    The step is then the mean of the selected deltas: :func:`multi_krum_weights`.
    """
    n = len(deltas)
    if not 1 <= m <= n:
        raise ValueError(f"multi-Krum keeps 1 <= m <= n updates, got m={m}, n={n}")
    scores = krum_scores(deltas, f)
    ranked = sorted(range(n), key=lambda i: (scores[i], i))
    return sorted(ranked[:m])


def multi_krum_weights(n: int, selected: Sequence[int], server_lr: float) -> list[float]:
    """Lineage weights of a multi-Krum step over ``n`` updates: ``server_lr / m`` for each
    of the ``m`` selected indices, ``0.0`` for the others (in index order).

    ``aggregator.aggregate.weighted_sum(head, deltas, weights)`` is then the step
    ``head + server_lr * mean of the selected deltas``. ``ValueError`` for an empty,
    repeated or out-of-range selection.
    """
    chosen = set(selected)
    if not chosen or len(chosen) != len(selected) or not chosen <= set(range(n)):
        raise ValueError(f"bad selection {list(selected)!r} of {n} updates")
    w = float(server_lr) / float(len(chosen))
    return [w if i in chosen else 0.0 for i in range(n)]


def norm_bound_from(norms: Sequence[float], multiplier: float) -> float | None:
    """The adaptive norm bound ``multiplier * median(norms)`` (the mean of the two middle
    values for an even count); ``None`` when ``norms`` is empty.

    ``ValueError`` unless ``multiplier`` is finite and positive.
    """
    if not (math.isfinite(multiplier) and multiplier > 0.0):
        raise ValueError(f"multiplier must be finite and positive, got {multiplier!r}")
    if not norms:
        return None
    ordered = sorted(float(v) + 0.0 for v in norms)  # + 0.0: -0.0 becomes +0.0
    n = len(ordered)
    mid = n // 2
    median = ordered[mid] if n % 2 == 1 else (ordered[mid - 1] + ordered[mid]) / 2.0
    return float(multiplier) * median


def clip_factor(norm: float, bound: float) -> float:
    """``min(1, bound / norm)``; 1.0 for a zero norm."""
    if norm == 0.0:
        return 1.0
    return min(1.0, bound / norm)


def robust_step(
    head: Tensors,
    deltas: Sequence[Delta],
    *,
    kind: str,
    server_lr: float,
    trim: float = 0.2,
) -> Tensors:
    """``head + server_lr * agg(deltas)`` per tensor, float64, cast back once.

    ``agg`` is :func:`coordinate_median` (``kind="median"``) or :func:`trimmed_mean`
    with ``trim`` (``kind="trimmed_mean"``). With no deltas the head itself is
    returned (as :func:`aggregator.aggregate.weighted_sum`). ``ValueError`` for
    another kind.
    """
    if kind not in ROBUST_KINDS:
        raise ValueError(f"unknown robust aggregator {kind!r}; expected one of {ROBUST_KINDS}")
    if not deltas:
        return head
    agg = coordinate_median(deltas) if kind == "median" else trimmed_mean(deltas, trim)
    lr = float(server_lr)
    params: Tensors = {}
    for name, h in head.items():
        step = agg[name]  # ours: a fresh float64 tensor
        step.mul_(lr)
        out = h.to(_F64, copy=True)
        out.add_(step)
        params[name] = out.to(h.dtype)
    return params


def _names(deltas: Sequence[Delta]) -> list[str]:
    """The tensor names, sorted (those of the first delta; all have the same)."""
    return sorted(deltas[0])


def _sorted_stack(deltas: Sequence[Delta], name: str) -> torch.Tensor:
    """``deltas[i][name]`` in float64 stacked along a new last axis (zeros made ``+0.0``),
    sorted along it with a stable sort (the last axis: contiguous, the faster sort)."""
    stacked = torch.stack([d[name].to(_F64) for d in deltas], dim=-1)
    stacked.masked_fill_(stacked == 0.0, 0.0)
    return torch.sort(stacked, dim=-1, stable=True).values


def _squares(tensors: Iterable[torch.Tensor]) -> list[float]:
    """The elementwise squares of the float64 ``tensors``, flattened, in order."""
    out: list[float] = []
    for t in tensors:
        out.extend(torch.mul(t, t).reshape(-1).tolist())
    return out


def _squared_distances(deltas: Sequence[Delta]) -> list[list[float]]:
    """``|d_i - d_j|^2`` for every pair (float64, names sorted, exact sum); symmetric."""
    n = len(deltas)
    names = _names(deltas)
    flat = [[d[name].to(_F64) for name in names] for d in deltas]
    dist = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            diffs = (torch.sub(a, b) for a, b in zip(flat[i], flat[j], strict=True))
            dist[i][j] = dist[j][i] = math.fsum(_squares(diffs))
    return dist
