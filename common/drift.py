"""Drift statistics: pure functions over proportions and scores (docs/drift.md).

The population stability index (PSI) of a recent distribution ``a`` against a
reference ``e`` over the same bins is ``sum((a_i - e_i) * ln(a_i / e_i))``, each share
floored at :data:`FLOOR` first (an empty bin would make it infinite). Common reading:
below 0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a major one. The binned KS
statistic is the largest gap between the two cumulative shares over the bins in their
order; the two-sample KS statistic of two score samples is the largest gap between
their empirical distribution functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

#: Shares are floored here before the PSI's logarithm.
FLOOR: Final = 1e-4
#: Bins of the score distribution (quantiles of the reference scores).
SCORE_BINS: Final = 10
#: The name the score's drift goes by beside the features'.
SCORE: Final = "score"
#: The metrics a bank's evaluation may carry (docs/drift.md section 3.2).
EVALUATION_METRICS: Final = ("auc", "pr_auc", "ks", "log_loss", "brier", "positive_rate")
#: What a bank publishes is rounded: every figure to 2 decimals, the row count down to a
#: multiple of 10, so that two summaries of windows a few rows apart do not give those
#: rows away by subtraction (docs/drift.md section 2.1).
PUBLISHED_DECIMALS: Final = 2
ROWS_STEP: Final = 10

Floats = npt.NDArray[np.float64]


def psi(expected: Sequence[float] | Floats, actual: Sequence[float] | Floats) -> float:
    """The population stability index of ``actual`` against ``expected`` (same bins)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), FLOOR)
    if e.shape != a.shape or e.ndim != 1:
        raise ValueError(f"psi over {e.shape} and {a.shape} bins")
    return float(np.sum((a - e) * np.log(a / e)))


def binned_ks(expected: Sequence[float] | Floats, actual: Sequence[float] | Floats) -> float:
    """The largest gap between the cumulative shares of two binned distributions."""
    e = np.cumsum(np.asarray(expected, dtype=np.float64))
    a = np.cumsum(np.asarray(actual, dtype=np.float64))
    if e.shape != a.shape:
        raise ValueError(f"ks over {e.shape} and {a.shape} bins")
    return float(np.max(np.abs(e - a))) if len(e) else 0.0


def two_sample_ks(reference: Floats, recent: Floats) -> float:
    """The two-sample Kolmogorov-Smirnov statistic (0 when either sample is empty)."""
    r, s = np.sort(np.asarray(reference, np.float64)), np.sort(np.asarray(recent, np.float64))
    if len(r) == 0 or len(s) == 0:
        return 0.0
    points = np.concatenate([r, s])
    cdf_r = np.searchsorted(r, points, side="right") / len(r)
    cdf_s = np.searchsorted(s, points, side="right") / len(s)
    return float(np.max(np.abs(cdf_r - cdf_s)))


def quantile_edges(values: Floats, bins: int) -> tuple[float, ...]:
    """Inner bin edges at the ``bins``-quantiles of the finite ``values``, distinct and
    increasing (repeated values give fewer bins)."""
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    if len(finite) == 0 or bins < 2:
        return ()
    qs = np.quantile(finite, np.arange(1, bins) / bins, method="linear")
    edges = np.unique(qs)
    # An edge at the maximum leaves an empty last bin: drop it.
    return tuple(float(e) for e in edges if e < finite.max())


def shares(values: Floats, edges: Sequence[float]) -> Floats:
    """Shares of ``values`` in the bins cut by ``edges`` (a value equal to an edge falls
    in the bin below it); NaN values are missing and go to one more, last entry."""
    v = np.asarray(values, np.float64)
    missing = np.isnan(v)
    counts = np.bincount(
        np.searchsorted(np.asarray(edges, np.float64), v[~missing], side="left"),
        minlength=len(edges) + 1,
    ).astype(np.float64)
    out = np.append(counts, float(missing.sum()))
    return out / len(v) if len(v) else out


def score_drift(reference: Floats, recent: Floats) -> tuple[float, float]:
    """PSI (over deciles of ``reference``) and two-sample KS of two score samples."""
    edges = quantile_edges(reference, SCORE_BINS)
    return psi(shares(reference, edges)[:-1], shares(recent, edges)[:-1]), two_sample_ks(
        reference, recent
    )


def over_threshold(
    psis: Mapping[str, float], threshold: float, rows: int, min_rows: int
) -> list[str]:
    """The names whose PSI is above ``threshold``, sorted; none when the window holds
    fewer than ``min_rows`` rows (too few to tell)."""
    if rows < min_rows:
        return []
    return sorted(name for name, value in psis.items() if value > threshold)


def published(value: float) -> float:
    """A figure as a bank publishes it (:data:`PUBLISHED_DECIMALS` decimals)."""
    return round(float(value), PUBLISHED_DECIMALS) + 0.0  # no -0.0


def published_rows(rows: int) -> int:
    """A row count as a bank publishes it (down to a multiple of :data:`ROWS_STEP`)."""
    return rows - rows % ROWS_STEP
