"""Split one table among simulated banks: IID, Dirichlet label skew, given shares, or by a column.

Every function returns one int64 array of row positions per part (use them with
``df.iloc[part]``); every row is in exactly one part, no part is empty, and the
positions inside a part are sorted, so a bank's rows keep their file order. The
splits are deterministic: the same arguments and seed give the same parts, drawn
from a private ``numpy.random.default_rng(seed)`` (the global RNG is untouched).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd

from common.errors import ConfigError

__all__ = ["by_column", "by_column_labeled", "by_shares", "dirichlet_label_skew", "iid"]

Parts = list[npt.NDArray[np.int64]]

#: Redraws :func:`dirichlet_label_skew` makes before it gives up.
MAX_TRIES = 1000


def _check_parts(parts: int, n_rows: int) -> None:
    if parts < 1:
        raise ConfigError(f"parts must be at least 1, not {parts}")
    if n_rows < parts:
        raise ConfigError(
            f"cannot split {n_rows} rows into {parts} non-empty parts; use at most {n_rows}"
        )


def iid(n_rows: int, parts: int, seed: int) -> Parts:
    """Shuffle ``range(n_rows)`` and deal it into ``parts`` parts whose sizes differ by at most 1.

    Raises:
        ConfigError: ``parts < 1`` or more parts than rows.
    """
    _check_parts(parts, n_rows)
    perm = np.random.default_rng(seed).permutation(n_rows)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, parts)]


def _cut(n: int, shares: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """``n`` items cut in proportion to ``shares`` (largest remainder): sizes summing to n."""
    exact = shares * n
    sizes = np.floor(exact).astype(np.int64)
    rest = n - int(sizes.sum())
    if rest > 0:  # ties go to the earlier part
        order = np.argsort(-(exact - sizes), kind="stable")
        sizes[order[:rest]] += 1
    return sizes


def by_shares(
    y: npt.NDArray[np.generic], shares: Sequence[float], seed: int, *, stratify: bool = True
) -> Parts:
    """Parts whose sizes follow ``shares`` (any positive numbers; they are normalised),
    e.g. ``[60, 10, 10, 10, 10]``: one part with 60% of the rows, four with 10%.

    Stratified (``stratify=True``, the default): the rows of each class of ``y`` are
    shuffled and cut in the same proportions, so every part has close to the overall
    class mix and the part sizes follow ``shares`` to within one row per class. Not
    stratified: all rows are shuffled and cut once (sizes within one row of
    ``shares * len(y)``, the class mix left to chance).

    Raises:
        ConfigError: ``y`` is not 1-D or has missing labels, no share is given, a
            share is not a positive finite number, or a part would get no row.
    """
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, not of shape {labels.shape}")
    weights = np.asarray([float(s) for s in shares], dtype=np.float64)
    _check_parts(len(weights), labels.shape[0])
    bad = [s for s in weights if not (np.isfinite(s) and s > 0)]
    if bad:
        raise ConfigError(f"share {bad[0]:g} is not a positive finite number")
    weights = weights / weights.sum()
    rng = np.random.default_rng(seed)
    if stratify:
        codes, _ = pd.factorize(labels, use_na_sentinel=True)
        n_missing = int((codes < 0).sum())
        if n_missing:
            raise ConfigError(f"labels are missing in {n_missing} of {len(codes)} rows")
        groups = [np.flatnonzero(codes == k) for k in range(int(codes.max()) + 1)]
    else:
        groups = [np.arange(labels.shape[0])]
    chunks: list[list[npt.NDArray[np.int64]]] = [[] for _ in weights]
    for rows in groups:
        shuffled = rng.permutation(rows).astype(np.int64)
        cuts = np.cumsum(_cut(len(shuffled), weights))[:-1]
        for i, piece in enumerate(np.split(shuffled, cuts)):
            chunks[i].append(piece)
    parts = [np.sort(np.concatenate(c)).astype(np.int64) for c in chunks]
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(
            f"share {float(weights[empty[0]]):.4g} of {labels.shape[0]} rows gives part "
            f"{empty[0] + 1} no row; give it a larger share"
        )
    return parts


def dirichlet_label_skew(
    y: npt.NDArray[np.generic], parts: int, alpha: float, seed: int, min_size: int = 10
) -> Parts:
    """The standard per-class Dirichlet label-skew split (Hsu et al. 2019; NIID-Bench).

    For each class, in order of first appearance in ``y``, its rows are shuffled and
    cut among the parts in proportions drawn from ``Dirichlet(alpha, ..., alpha)``;
    as in NIID-Bench, a part already holding ``len(y) / parts`` rows or more gets no
    share of later classes, which keeps part sizes within reason. Small ``alpha``
    (0.1) gives each part a few dominant classes; large ``alpha`` (100) gives every
    part close to the global class mix. The whole draw is repeated until every part
    has at least ``min_size`` rows (and at least one).

    Raises:
        ConfigError: ``y`` is not 1-D or has missing labels, ``parts < 1``,
            ``alpha`` is not a positive finite number, ``min_size < 0``, there are
            fewer than ``parts * min_size`` rows, or no draw in :data:`MAX_TRIES`
            satisfies ``min_size``.
    """
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, not of shape {labels.shape}")
    n = labels.shape[0]
    _check_parts(parts, n)
    if not (np.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha must be a positive finite number, not {alpha}")
    if min_size < 0:
        raise ConfigError(f"min_size must be non-negative, not {min_size}")
    need = max(min_size, 1)
    if n < parts * need:
        raise ConfigError(
            f"{n} rows cannot give {parts} parts of at least {need} rows each; "
            "lower min_size or parts"
        )
    codes, _ = pd.factorize(labels, use_na_sentinel=True)
    n_missing = int((codes < 0).sum())
    if n_missing:
        raise ConfigError(f"labels are missing in {n_missing} of {n} rows")
    by_class = [np.flatnonzero(codes == k) for k in range(int(codes.max()) + 1)]

    rng = np.random.default_rng(seed)
    sizes = np.zeros(parts, dtype=np.int64)
    for _ in range(MAX_TRIES):
        chunks: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(parts)]
        sizes[:] = 0
        for rows in by_class:
            shuffled = rng.permutation(rows)
            share = rng.dirichlet(np.full(parts, alpha))
            balanced = share * (sizes < n / parts)
            if balanced.sum() > 0:  # some part still below its fair size takes part
                share = balanced / balanced.sum()
            cuts = (np.cumsum(share)[:-1] * len(shuffled)).astype(np.int64)
            for i, piece in enumerate(np.split(shuffled, cuts)):
                chunks[i].append(piece.astype(np.int64))
                sizes[i] += len(piece)
        if sizes.min() >= need:
            return [np.sort(np.concatenate(c)) for c in chunks]
    raise ConfigError(
        f"no Dirichlet split with alpha={alpha} into {parts} parts gave every part "
        f"{need} rows or more in {MAX_TRIES} tries (smallest part: {int(sizes.min())}); "
        "raise alpha, or lower parts or min_size"
    )


def by_column_labeled(
    values: Sequence[object] | npt.NDArray[np.generic],
) -> list[tuple[object, npt.NDArray[np.int64]]]:
    """``(value, rows)`` for each distinct value of ``values``, sorted by value.

    Values that cannot be compared with each other (mixed types) are sorted by
    their string form.

    Raises:
        ConfigError: ``values`` is empty or has missing entries.
    """
    column = pd.Series(
        np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    )
    if len(column) == 0:
        raise ConfigError("cannot split an empty column")
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    n_missing = int((codes < 0).sum())
    if n_missing:
        raise ConfigError(
            f"the column to split by is missing in {n_missing} of {len(column)} rows; "
            "every row needs a value"
        )
    labels = list(uniques)
    try:
        order = sorted(range(len(labels)), key=lambda i: labels[i])
    except TypeError:
        order = sorted(range(len(labels)), key=lambda i: str(labels[i]))
    return [(labels[k], np.flatnonzero(codes == k).astype(np.int64)) for k in order]


def by_column(
    values: Sequence[object] | npt.NDArray[np.generic], parts: int | None = None
) -> Parts:
    """One part per distinct value of ``values`` (e.g. a region column), sorted by value.

    Raises:
        ConfigError: ``values`` is empty or has missing entries, or ``parts`` is given
            and differs from the number of distinct values.
    """
    groups = by_column_labeled(values)
    if parts is not None and parts != len(groups):
        shown = [label for label, _ in groups[:10]]
        raise ConfigError(
            f"asked for {parts} parts but the column has {len(groups)} distinct values "
            f"{shown}{' ...' if len(groups) > 10 else ''}; by_column makes one part per value"
        )
    return [rows for _, rows in groups]
