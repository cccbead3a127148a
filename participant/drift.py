"""A bank's drift summary: its recent rows against the task's reference (docs/drift.md).

Only summaries leave the bank: one PSI (and, for numeric features, one binned KS
statistic) per feature, the PSI and KS of its model's scores on its recent rows
against its own training rows, and the recent row count. :func:`reference_of` is what
``fedq task init --monitoring`` records from the consortium's reference sample.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.drift import Floats, binned_ks, psi, quantile_edges, shares
from common.errors import ConfigError
from common.spec import CategoricalFeature, Feature, FeatureReference, NumericFeature, TaskSpec
from participant.data import _as_float, _column, canonical

#: Bins of a numeric feature's reference (deciles of the reference sample).
REFERENCE_BINS = 10


def reference_of(
    df: pd.DataFrame, features: tuple[Feature, ...], bins: int = REFERENCE_BINS
) -> tuple[FeatureReference, ...]:
    """Each feature's distribution in ``df``: quantile bins for numeric features, the
    vocabulary's shares (and 'unknown') for categorical ones."""
    if len(df) == 0:
        raise ConfigError("the reference sample has no rows: nothing to monitor against")
    out = []
    for feature in features:
        if isinstance(feature, NumericFeature):
            values = _as_float(_column(df, feature.name, "feature"), feature.name)
            edges = quantile_edges(values, bins)
            proportions = shares(values, edges)
        else:
            edges = ()
            proportions = _category_shares(df, feature)
        out.append(
            FeatureReference(
                name=feature.name,
                edges=edges,
                proportions=tuple(_normalised(proportions)),
            )
        )
    return tuple(out)


def feature_drift(df: pd.DataFrame, spec: TaskSpec) -> dict[str, tuple[float, float | None]]:
    """Per feature: PSI of ``df``'s rows against the spec's reference, and the binned KS
    statistic for numeric features (None for categorical ones)."""
    monitoring = spec.monitoring
    if monitoring is None:
        raise ConfigError(f"task {spec.task_id!r} has no monitoring reference in its spec")
    out: dict[str, tuple[float, float | None]] = {}
    for feature, ref in zip(spec.features, monitoring.reference, strict=True):
        if isinstance(feature, NumericFeature):
            values = _as_float(_column(df, feature.name, "feature"), feature.name)
            recent = shares(values, ref.edges)
            out[feature.name] = (
                psi(ref.proportions, recent),
                binned_ks(ref.proportions, recent),
            )
        else:
            out[feature.name] = (psi(ref.proportions, _category_shares(df, feature)), None)
    return out


def _category_shares(df: pd.DataFrame, feature: CategoricalFeature) -> Floats:
    col = _column(df, feature.name, "feature")
    codes, uniques = pd.factorize(col, use_na_sentinel=True)
    unknown = len(feature.vocabulary)
    index = {v: i for i, v in enumerate(feature.vocabulary)}
    slot_of = np.array([index.get(canonical(u), unknown) for u in uniques] + [unknown])
    counts = np.bincount(slot_of[codes], minlength=unknown + 1).astype(np.float64)
    return counts / len(df) if len(df) else counts


def _normalised(proportions: Floats) -> list[float]:
    """Rounded to 6 digits (the spec stays short) and summing to 1 within 1e-6."""
    rounded = [round(float(p), 6) for p in proportions]
    rounded[int(np.argmax(rounded))] += 1.0 - sum(rounded)
    return [max(0.0, round(p, 9)) for p in rounded]
