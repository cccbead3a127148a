"""Local data: load a bank's table, derive the shared schema, encode rows to tensors.

The feature schema (which columns, numeric statistics, categorical vocabularies) is
part of the :class:`~common.spec.TaskSpec` that every party agrees on. It is derived
once, by :func:`infer_features`, from a reference sample the consortium agrees on,
and then fixed: :func:`encode` only *applies* it, so every bank maps the same raw
value to the same encoded value. Nothing here refits statistics on one bank's rows.

Values are compared as canonical strings (:func:`canonical`): ``1``, ``1.0`` and
``"1"`` are the same category, and ``True`` is ``"True"``, so a column read as
integers at one bank and as floats (because of a missing cell) or strings at another
still encodes the same way.

Every error a bad file or frame can cause comes out as
:class:`~common.errors.ConfigError`, with the pandas or pyarrow exception kept as
``__cause__``. Messages name the column and, where one cell is at fault, its row:
``row N (CSV line N + 1)`` counts the data rows of the frame from 1, so for a whole
CSV file, whose first line is the header, the cell is on line N + 1.

torch is imported only by the functions that build tensors, so reading and checking
a table (:func:`load_table`, :func:`infer_features`, :func:`resolve_positive`,
:func:`binary_labels`) stays quick.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa

from common.errors import ConfigError
from common.spec import CategoricalFeature, NumericFeature, TaskSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "CSV_SUFFIXES",
    "PARQUET_SUFFIXES",
    "InferredSchema",
    "binary_labels",
    "canonical",
    "encode",
    "encode_features",
    "encode_target",
    "infer_features",
    "load_table",
    "resolve_positive",
    "target_values",
    "train_rows",
    "train_val_split",
]

CSV_SUFFIXES: tuple[str, ...] = (".csv", ".csv.gz")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet", ".pq")

#: Errors pandas and pyarrow raise for content they cannot read (parser errors,
#: bad encodings and bad Parquet footers are ValueErrors; truncated gzip is EOFError).
_READ_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, EOFError, pa.ArrowException)

_SHOW = 5  # how many offending values an error message quotes

#: A text column is taken for a numeric column with typos when at least this share of
#: its filled cells are numbers: it is refused, naming the first text cell, instead of
#: silently becoming a categorical column (or being left out for too many values).
NUMERIC_SHARE = 0.95

_F32_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------- loading


def load_table(path: Path) -> pd.DataFrame:
    """Read a CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, ``.pq``) table.

    The format is chosen by suffix (case-insensitive). CSV cells pandas reads as
    missing by default (empty, ``NA``, ``NaN``, ``null``, ``None``, ...) become
    missing values.

    Raises:
        ConfigError: the file does not exist or is not a file, the suffix is not one
            of the above, the content cannot be parsed, or the table has no columns
            or no rows.
    """
    path = Path(path)
    name = path.name.lower()
    if not path.exists():
        raise ConfigError(f"data file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"data path {str(path)!r} is not a file")
    try:
        if name.endswith(CSV_SUFFIXES):
            df = pd.read_csv(path, low_memory=False)
        elif name.endswith(PARQUET_SUFFIXES):
            df = pd.read_parquet(path, engine="pyarrow")
        else:
            known = ", ".join(CSV_SUFFIXES + PARQUET_SUFFIXES)
            raise ConfigError(
                f"data file {str(path)!r} has an unknown suffix; expected one of {known}"
            )
    except pd.errors.EmptyDataError as e:
        raise ConfigError(f"data file {str(path)!r} is empty: no header and no rows") from e
    except _READ_ERRORS as e:
        raise ConfigError(f"data file {str(path)!r} cannot be read: {type(e).__name__}: {e}") from e
    if df.shape[1] == 0:
        raise ConfigError(f"data file {str(path)!r} is empty: it has no columns")
    if len(df) == 0:
        raise ConfigError(f"data file {str(path)!r} is empty: it has a header but no rows")
    return df


# --------------------------------------------------------------------------- values


def canonical(value: object) -> str:
    """The string a cell is compared as: integral numbers without ``.0``, else ``str``.

    ``canonical(1) == canonical(1.0) == canonical("1") == "1"``;
    ``canonical(True) == "True"``; ``canonical(2.5) == "2.5"``.
    """
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        f = float(value)
        if f.is_integer():
            return str(int(f))
        return str(f)
    return str(value)


def _column(df: pd.DataFrame, name: str, what: str) -> pd.Series[Any]:
    """The column called ``name`` (matched as a string); ConfigError if absent or repeated."""
    matches = [c for c in df.columns if str(c) == name]
    if not matches:
        raise ConfigError(f"{what} column {name!r} is not in the data")
    if len(matches) > 1:
        raise ConfigError(f"{what} column {name!r} appears {len(matches)} times in the data")
    return df[matches[0]]


def _distinct(col: pd.Series[Any]) -> tuple[npt.NDArray[np.intp], list[str]]:
    """Codes of each row into the distinct canonical strings (-1 for missing), and those strings.

    Python touches each *distinct* value once, never each row.
    """
    codes, uniques = pd.factorize(col, use_na_sentinel=True)
    names = [canonical(u) for u in uniques]
    vocab = sorted(set(names))
    index = {v: i for i, v in enumerate(vocab)}
    remap = np.array([index[n] for n in names] + [-1], dtype=np.intp)
    return remap[codes], vocab  # code -1 picks the trailing -1


def _is_numeric(col: pd.Series[Any]) -> bool:
    return pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype)


def _row(position: int) -> str:
    """Where a cell is, for messages: ``position`` is 0-based within the frame."""
    return f"row {position + 1} (CSV line {position + 2})"


def _text_cells(col: pd.Series[Any]) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """For a column that is not numeric: which cells are numbers, which are text.

    Cells pandas reads as missing, and text such as ``"nan"`` that ``float`` reads as
    NaN, are neither.
    """
    coerced = pd.to_numeric(col, errors="coerce")
    number = coerced.notna().to_numpy()
    suspect = col.notna().to_numpy() & ~number
    bad: list[object] = []
    for v in pd.unique(col[suspect]):  # distinct offending values only
        try:
            float(str(v))  # "nan" and friends are missing, not wrong
        except ValueError:
            bad.append(v)
    text = suspect & col.isin(bad).to_numpy() if bad else np.zeros(len(col), dtype=np.bool_)
    return number, text


def _as_float(col: pd.Series[Any], name: str) -> npt.NDArray[np.float64]:
    """A numeric column as float64 with NaN for missing; ConfigError on text or infinities."""
    if pd.api.types.is_bool_dtype(col.dtype) or _is_numeric(col):
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        _, text = _text_cells(col)
        if text.any():
            where = np.flatnonzero(text)
            bad = list(pd.unique(col[text]))
            shown = ", ".join(repr(v) for v in bad[:_SHOW]) + (", ..." if len(bad) > _SHOW else "")
            cells = f"{len(where)} cell{'s' if len(where) > 1 else ''}"
            raise ConfigError(
                f"numeric column {name!r} holds text that is not a number in {cells} "
                f"({shown}), first {col.iloc[where[0]]!r} in {_row(int(where[0]))}; fix "
                "those cells, or leave them empty if they mean 'missing'"
            )
        values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    infinite = np.isinf(values)
    if infinite.any():
        first = int(np.flatnonzero(infinite)[0])
        n = int(infinite.sum())
        raise ConfigError(
            f"numeric column {name!r} holds {n} infinite value{'s' if n > 1 else ''} "
            f"(first: {values[first]} in {_row(first)}); numbers must be finite"
        )
    return values


def _scaled(
    values: npt.NDArray[np.float64], mean: float, std: float, name: str
) -> npt.NDArray[np.float64]:
    """``(values - mean) / std``; ConfigError naming the row if a result is not a finite float32.

    A finite but huge value (``1e308``) overflows here: the encoded column would hold
    infinities, training would produce NaN, and nothing downstream would say why.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        z = (values - mean) / std
    out = ~(np.abs(z) <= _F32_MAX) & ~np.isnan(values)
    if out.any():
        first = int(np.flatnonzero(out)[0])
        raise ConfigError(
            f"numeric column {name!r} holds a value too large to use: {values[first]:g} in "
            f"{_row(first)} (scaled with mean {mean:g} and std {std:g} it is not a finite "
            "32-bit number); fix or remove it"
        )
    return z


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class InferredSchema:
    """What :func:`infer_features` found.

    ``features`` is ready for ``TaskSpec(features=...)``; ``skipped`` maps each column
    left out to the reason (too many categories, or no values at all), in column order.
    ``warnings`` says, one sentence each, what a user should know: every column left
    out and why, and every column kept that holds a single value.
    """

    features: tuple[NumericFeature | CategoricalFeature, ...]
    skipped: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def infer_features(
    df: pd.DataFrame,
    target: str,
    *,
    max_categories: int = 64,
    exclude: Sequence[str] = (),
) -> InferredSchema:
    """Derive the shared feature schema from a reference sample.

    Every column but ``target`` and ``exclude``, in column order:

    - a numeric column (not bool) becomes a :class:`NumericFeature` with the mean and
      the population standard deviation (ddof=0) of its non-missing values; a std of
      0 (a constant column) becomes 1.0;
    - a text column whose filled cells are numbers but for a few (at least
      :data:`NUMERIC_SHARE` of them numbers) is refused: it is a numeric column with
      typos, and the error names the first text cell;
    - any other column (text, bool, category, dates) with at most ``max_categories``
      distinct non-missing values becomes a :class:`CategoricalFeature` whose
      vocabulary is those values as canonical strings, sorted;
    - a column with more distinct values, or with no values at all, is skipped and
      listed in :attr:`InferredSchema.skipped` with the reason.

    Skipped columns and single-valued columns are also described in
    :attr:`InferredSchema.warnings`, for the caller to show.

    This is how a consortium derives the SHARED schema, once, from a reference sample
    all parties agree on. The statistics and vocabularies are then fixed in the task
    spec and never refitted on one bank's rows: every participant standardises and
    one-hot encodes with the same numbers, or their models would not mean the same
    thing. Values a bank has that the vocabulary lacks go to the 'unknown' slot.

    Raises:
        ConfigError: the target or an excluded column is missing, a numeric column
            holds infinities or values too large to standardise, a mostly numeric
            column holds text, ``max_categories`` < 1, or no usable feature is left.
    """
    if max_categories < 1:
        raise ConfigError(f"max_categories must be at least 1, not {max_categories}")
    names = [str(c) for c in df.columns]
    _column(df, target, "target")
    absent = [e for e in exclude if e not in names]
    if absent:
        raise ConfigError(f"excluded columns not in the data: {absent}")
    leave_out = {target, *exclude}
    features: list[NumericFeature | CategoricalFeature] = []
    skipped: dict[str, str] = {}
    warnings: list[str] = []
    for name in names:
        if name in leave_out:
            continue
        col = _column(df, name, "feature")
        infer = _infer_numeric if _is_numeric(col) else _infer_categorical
        feature, why = infer(col, name, max_categories, warnings)
        if feature is None:
            skipped[name] = why
        else:
            features.append(feature)
    if not features:
        raise ConfigError(
            f"no usable feature columns besides target {target!r} (skipped: {skipped or 'none'})"
        )
    left_out = [f"column {name!r} left out: {why}" for name, why in skipped.items()]
    return InferredSchema(
        features=tuple(features), skipped=skipped, warnings=(*left_out, *warnings)
    )


def _infer_numeric(
    col: pd.Series[Any], name: str, _: int, warnings: list[str]
) -> tuple[NumericFeature | None, str]:
    """A numeric column's shared statistics, or None and why it is left out."""
    values = _as_float(col, name)
    filled = values[~np.isnan(values)]
    if filled.size == 0:
        return None, "no values (every cell is missing)"
    with np.errstate(over="ignore", invalid="ignore"):
        mean = float(filled.mean())
        std = float(filled.std())
    if not (math.isfinite(mean) and math.isfinite(std)):
        big = int(np.nanargmax(np.abs(values)))
        raise ConfigError(
            f"numeric column {name!r} holds values too large to use: their mean or "
            f"standard deviation overflows (largest: {values[big]:g} in {_row(big)}); "
            "fix or remove them"
        )
    if std == 0.0:
        std = 1.0
        warnings.append(
            f"column {name!r} has one value ({canonical(filled[0])}) in every "
            "filled cell: it is kept but tells the model nothing"
        )
    _scaled(values, mean, std, name)
    return NumericFeature(name=name, mean=mean, std=std), ""


def _infer_categorical(
    col: pd.Series[Any], name: str, max_categories: int, warnings: list[str]
) -> tuple[CategoricalFeature | None, str]:
    """A text-like column's vocabulary, or None and why it is left out."""
    _check_not_numeric_with_typos(col, name)
    _, vocab = _distinct(col)
    if not vocab:
        return None, "no values (every cell is missing)"
    if len(vocab) > max_categories:
        return None, f"{len(vocab)} distinct values, more than max_categories={max_categories}"
    if len(vocab) == 1:
        warnings.append(
            f"column {name!r} has one value ({vocab[0]!r}) in every filled cell: "
            "it is kept but tells the model nothing"
        )
    return CategoricalFeature(name=name, vocabulary=tuple(vocab)), ""


def _check_not_numeric_with_typos(col: pd.Series[Any], name: str) -> None:
    """ConfigError if a text column is numbers but for a few text cells (see NUMERIC_SHARE)."""
    if not (pd.api.types.is_object_dtype(col.dtype) or pd.api.types.is_string_dtype(col.dtype)):
        return
    number, text = _text_cells(col)
    n_number, n_text = int(number.sum()), int(text.sum())
    if n_text == 0 or n_number < NUMERIC_SHARE * (n_number + n_text):
        return
    first = int(np.flatnonzero(text)[0])
    raise ConfigError(
        f"column {name!r} is numeric ({n_number} of {n_number + n_text} filled cells are "
        f"numbers) but {n_text} cell{'s hold' if n_text > 1 else ' holds'} text, first "
        f"{col.iloc[first]!r} in {_row(first)}; fix those cells, or leave them empty if "
        "they mean 'missing'"
    )


# --------------------------------------------------------------------------- target

_ZERO_ONE = {"0": 0.0, "1": 1.0, "False": 0.0, "True": 1.0}


def target_values(df: pd.DataFrame, target: str) -> list[str]:
    """The distinct non-missing values of the target column, as canonical strings, sorted."""
    return _distinct(_column(df, target, "target"))[1]


def resolve_positive(df: pd.DataFrame, target: str, positive: str | None) -> str | None:
    """Check the target is binary and settle which value is class 1.

    With ``positive=None`` the column must already be 0/1 (numbers, bools, or the
    strings ``"0"``/``"1"``) and None is returned. Otherwise ``positive`` must be one
    of the column's values (compared as canonical strings) and is returned.

    Raises:
        ConfigError: the column is missing, empty, has more than two values, is not
            0/1 while no positive class was given, or lacks the positive class.
    """
    values = target_values(df, target)
    if not values:
        raise ConfigError(f"target column {target!r} has no values (every cell is missing)")
    if len(values) > 2:
        raise ConfigError(
            f"target column {target!r} is not binary: it has {len(values)} values {_quote(values)}"
        )
    if positive is None:
        if not set(values) <= _ZERO_ONE.keys():
            raise ConfigError(
                f"target column {target!r} has values {_quote(values)}, not 0/1; "
                f"pass the positive class (the value that means 1), e.g. positive={values[-1]!r}"
            )
        return None
    if positive not in values:
        raise ConfigError(
            f"positive class {positive!r} is not a value of target column {target!r}; "
            f"its values are {_quote(values)}"
        )
    return positive


def _quote(values: Sequence[str]) -> str:
    shown = ", ".join(repr(v) for v in values[:_SHOW])
    return f"[{shown}{', ...' if len(values) > _SHOW else ''}]"


# --------------------------------------------------------------------------- encoding


def encode_features(df: pd.DataFrame, spec: TaskSpec) -> torch.Tensor:
    """The float32 feature matrix ``(len(df), spec.input_dim)``, in ``spec.features`` order.

    Numeric: a missing cell takes ``fill`` (the mean when unset), then
    ``(x - mean) / std`` with the spec's statistics. Categorical: one-hot over the
    vocabulary plus a last 'unknown' slot, which takes values outside the vocabulary
    and missing cells. Columns the spec does not name are ignored.

    Raises:
        ConfigError: a feature column is missing or repeated, or a numeric column
            holds text that is not a number, infinities, or a value whose scaled
            result is not a finite float32 (``1e308``).
    """
    import torch

    names = {str(c) for c in df.columns}
    missing = [f.name for f in spec.features if f.name not in names]
    if missing:
        raise ConfigError(f"feature columns not in the data: {missing}")
    n = len(df)
    x = np.zeros((n, spec.input_dim), dtype=np.float32)
    rows = np.arange(n)
    offset = 0
    for feature in spec.features:
        col = _column(df, feature.name, "feature")
        if isinstance(feature, NumericFeature):
            values = _as_float(col, feature.name)
            fill = feature.mean if feature.fill is None else feature.fill
            values = np.where(np.isnan(values), fill, values)
            x[:, offset] = _scaled(values, feature.mean, feature.std, feature.name)
            offset += 1
        else:
            codes, uniques = pd.factorize(col, use_na_sentinel=True)
            unknown = len(feature.vocabulary)
            index = {v: i for i, v in enumerate(feature.vocabulary)}
            slot_of = np.array(
                [index.get(canonical(u), unknown) for u in uniques] + [unknown], dtype=np.intp
            )
            x[rows, offset + slot_of[codes]] = 1.0  # code -1 (missing) picks 'unknown'
            offset += unknown + 1
    return torch.from_numpy(x)


def binary_labels(df: pd.DataFrame, target: str, positive: str | None) -> npt.NDArray[np.float32]:
    """The 0/1 labels of ``df[target]`` as float32.

    With ``positive`` set, a row is 1 where its value (as a canonical string) equals
    it and 0 otherwise; else the values must be 0/1 (numbers, bools, or ``"0"``/``"1"``).

    Raises:
        ConfigError: the column is missing or repeated, has missing cells (the first
            is named), or is not 0/1 while no positive class is given.
    """
    col = _column(df, target, "target")
    missing = col.isna().to_numpy()
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise ConfigError(
            f"target column {target!r} is missing in {int(missing.sum())} of {len(col)} rows "
            f"(first: {_row(first)}); every row needs a label"
        )
    codes, vocab = _distinct(col)
    if positive is not None:
        per_value = np.array([v == positive for v in vocab], dtype=np.float32)
    else:
        bad = [v for v in vocab if v not in _ZERO_ONE]
        if bad:
            raise ConfigError(
                f"target column {target!r} has values {_quote(vocab)}, not 0/1; "
                "set the positive class (target.positive) in the task spec"
            )
        per_value = np.array([_ZERO_ONE[v] for v in vocab], dtype=np.float32)
    if per_value.size == 0:
        return np.zeros(0, dtype=np.float32)
    return np.ascontiguousarray(per_value[codes])


def encode_target(df: pd.DataFrame, spec: TaskSpec) -> torch.Tensor:
    """The float32 0/1 labels ``(len(df),)``: :func:`binary_labels` as a tensor.

    With ``spec.target.positive`` set, a row is 1 where its value (as a canonical
    string) equals it and 0 otherwise; else the values must be 0/1 (numbers, bools,
    or ``"0"``/``"1"``).

    Raises:
        ConfigError: the column is missing or repeated, has missing cells, or is not
            0/1 while no positive class is set.
    """
    import torch

    return torch.from_numpy(binary_labels(df, spec.target.name, spec.target.positive))


def encode(df: pd.DataFrame, spec: TaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)``: :func:`encode_features` and :func:`encode_target` of the same rows."""
    return encode_features(df, spec), encode_target(df, spec)


# --------------------------------------------------------------------------- splitting


def train_rows(n: int, val_fraction: float) -> int:
    """How many of ``n`` rows :func:`train_val_split` leaves for training."""
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return n - n_val


def train_val_split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint sorted int64 index tensors ``(train, val)`` covering ``range(n)``.

    ``round(n * val_fraction)`` rows go to validation, at least one (and at least one
    left for training) when ``val_fraction > 0`` and ``n >= 2``. The permutation comes
    from a private ``torch.Generator`` seeded with ``seed``; the global RNG is untouched.

    Raises:
        ConfigError: ``n < 1``, ``val_fraction`` outside [0, 1), or a negative seed.
    """
    import torch

    if n < 1:
        raise ConfigError(f"cannot split {n} rows; need at least 1")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), not {val_fraction}")
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, not {seed}")
    n_val = n - train_rows(n, val_fraction)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    val = perm[:n_val].sort().values
    train = perm[n_val:].sort().values
    return train, val
