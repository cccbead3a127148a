"""Loading, shared-schema inference, encoding and partitioning of tabular bank data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.errors import ConfigError
from common.spec import CategoricalFeature, NumericFeature, TargetSpec, TaskSpec
from fedq.simulate import bundled_data
from participant.data import (
    InferredSchema,
    binary_labels,
    canonical,
    encode,
    encode_features,
    encode_target,
    infer_features,
    load_table,
    resolve_positive,
    target_values,
    train_rows,
    train_val_split,
)
from participant.partition import (
    by_column,
    by_column_labeled,
    by_shares,
    dirichlet_label_skew,
    iid,
)

#: The copy shipped in the package (fedq/data/README.md), so a fresh clone has it.
GERMAN = bundled_data()
TARGET = "creditability"

GERMAN_NUMERIC = [
    "duration_in_month",
    "credit_amount",
    "installment_rate_in_percentage_of_disposable_income",
    "present_residence_since",
    "age_in_years",
    "number_of_existing_credits_at_this_bank",
    "number_of_people_being_liable_to_provide_maintenance_for",
]
GERMAN_CATEGORICAL_SIZES = {
    "status_of_existing_checking_account": 4,
    "credit_history": 5,
    "purpose": 10,
    "savings_account_and_bonds": 5,
    "present_employment_since": 5,
    "personal_status_and_sex": 4,
    "other_debtors_or_guarantors": 3,
    "property": 4,
    "other_installment_plans": 3,
    "housing": 3,
    "job": 4,
    "telephone": 2,
    "foreign_worker": 2,
}


def _spec(
    features: tuple[NumericFeature | CategoricalFeature, ...],
    target: str = "y",
    positive: str | None = None,
) -> TaskSpec:
    return TaskSpec(
        task_id="t", features=features, target=TargetSpec(name=target, positive=positive)
    )


@pytest.fixture(scope="module")
def german() -> pd.DataFrame:
    return load_table(GERMAN)


@pytest.fixture(scope="module")
def german_schema(german: pd.DataFrame) -> InferredSchema:
    return infer_features(german, TARGET)


@pytest.fixture(scope="module")
def german_spec(german: pd.DataFrame, german_schema: InferredSchema) -> TaskSpec:
    positive = resolve_positive(german, TARGET, "good")
    return _spec(german_schema.features, TARGET, positive)


# --------------------------------------------------------------------------- German credit


def test_german_credit_loads_whole(german: pd.DataFrame) -> None:
    assert german.shape == (1000, 21)
    assert TARGET in german.columns
    assert int(german.isna().sum().sum()) == 0
    assert target_values(german, TARGET) == ["bad", "good"]


def test_german_schema_numeric_vs_categorical(
    german: pd.DataFrame, german_schema: InferredSchema
) -> None:
    features = german_schema.features
    assert german_schema.skipped == {}
    # Every column but the target, in column order.
    assert [f.name for f in features] == [c for c in german.columns if c != TARGET]
    assert [f.name for f in features if isinstance(f, NumericFeature)] == GERMAN_NUMERIC
    sizes = {f.name: len(f.vocabulary) for f in features if isinstance(f, CategoricalFeature)}
    assert sizes == GERMAN_CATEGORICAL_SIZES
    purpose = next(f for f in features if f.name == "purpose")
    assert isinstance(purpose, CategoricalFeature)
    assert list(purpose.vocabulary) == sorted(purpose.vocabulary)
    assert "radio/television" in purpose.vocabulary
    duration = next(f for f in features if f.name == "duration_in_month")
    assert isinstance(duration, NumericFeature)
    col = german["duration_in_month"].to_numpy(dtype=np.float64)
    assert duration.mean == pytest.approx(col.mean())
    assert duration.std == pytest.approx(col.std(ddof=0))
    assert duration.fill is None


def test_german_input_dim_and_encoding(german: pd.DataFrame, german_spec: TaskSpec) -> None:
    expected_dim = len(GERMAN_NUMERIC) + sum(k + 1 for k in GERMAN_CATEGORICAL_SIZES.values())
    assert german_spec.input_dim == expected_dim == 74
    x, y = encode(german, german_spec)
    assert x.shape == (1000, 74)
    assert y.shape == (1000,)
    assert x.dtype == torch.float32
    assert y.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert set(torch.unique(y).tolist()) == {0.0, 1.0}
    assert float(y.sum()) == 700.0  # 700 good, 300 bad
    # The reference sample is standardised by its own statistics: mean 0, std 1.
    offset = 0
    for f in german_spec.features:
        if isinstance(f, NumericFeature):
            column = x[:, offset].double()
            assert float(column.mean()) == pytest.approx(0.0, abs=1e-6)
            assert float(column.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
            offset += 1
        else:
            block = x[:, offset : offset + len(f.vocabulary) + 1]
            assert torch.equal(block.sum(dim=1), torch.ones(1000))  # exactly one hot
            assert float(block[:, -1].sum()) == 0.0  # no unknowns in the reference
            offset += len(f.vocabulary) + 1
    assert offset == 74


def test_german_first_row_encodes_as_expected(german: pd.DataFrame, german_spec: TaskSpec) -> None:
    x, y = encode(german.iloc[:1], german_spec)
    assert y.tolist() == [1.0]  # the first applicant is "good"
    # duration_in_month is the second feature, after the 4-word checking account (+unknown).
    duration = german_spec.features[1]
    assert isinstance(duration, NumericFeature)
    assert float(x[0, 5]) == pytest.approx((6 - duration.mean) / duration.std, rel=1e-6)
    # checking account "... < 0 DM" is the first word of its sorted vocabulary.
    assert x[0, :5].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_same_statistics_for_two_banks_no_refit(
    german: pd.DataFrame, german_spec: TaskSpec
) -> None:
    """Two banks with different rows encode each shared row identically."""
    young = german[german["age_in_years"] < 30]
    old = german[german["age_in_years"] >= 30]
    x_all, _ = encode(german, german_spec)
    x_young, _ = encode(young, german_spec)
    x_old, _ = encode(old, german_spec)
    positions = np.flatnonzero((german["age_in_years"] < 30).to_numpy())
    assert torch.equal(x_young, x_all[torch.from_numpy(positions)])
    assert torch.equal(x_old, x_all[torch.from_numpy(np.setdiff1d(np.arange(1000), positions))])
    # A refit would centre each bank's ages at 0; the shared stats do not.
    age_col = _columns(german_spec).index("age_in_years")
    assert float(x_young[:, age_col].mean()) < -0.5
    assert float(x_old[:, age_col].mean()) > 0.2


def _columns(spec: TaskSpec) -> list[str]:
    """The feature name behind each encoded column."""
    names: list[str] = []
    for f in spec.features:
        width = 1 if isinstance(f, NumericFeature) else len(f.vocabulary) + 1
        names.extend([f.name] * width)
    return names


def test_infer_excludes_columns(german: pd.DataFrame) -> None:
    schema = infer_features(german, TARGET, exclude=["purpose", "age_in_years"])
    names = [f.name for f in schema.features]
    assert "purpose" not in names
    assert "age_in_years" not in names
    assert len(names) == 18


def test_infer_skips_high_cardinality(german: pd.DataFrame) -> None:
    schema = infer_features(german, TARGET, max_categories=4)
    assert list(schema.skipped) == [
        "credit_history",
        "purpose",
        "savings_account_and_bonds",
        "present_employment_since",
    ]
    assert "10 distinct values" in schema.skipped["purpose"]
    assert "max_categories=4" in schema.skipped["purpose"]


# --------------------------------------------------------------------------- loading


def _small() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "income": [10.0, 20.0, 30.0, 40.0],
            "region": ["north", "south", "north", "east"],
            "label": ["yes", "no", "yes", "no"],
        }
    )


def test_load_csv_parquet_and_gzip_agree(tmp_path: Path) -> None:
    df = _small()
    csv = tmp_path / "bank.csv"
    df.to_csv(csv, index=False)
    parquet = tmp_path / "bank.parquet"
    df.to_parquet(parquet, index=False)
    pq = tmp_path / "BANK.PQ"
    df.to_parquet(pq, index=False)
    gz = tmp_path / "bank.csv.gz"
    gz.write_bytes(gzip.compress(csv.read_bytes()))
    spec = _spec(infer_features(df, "label").features, "label", "yes")
    expected = encode(df, spec)
    for path in (csv, parquet, pq, gz):
        loaded = load_table(path)
        assert list(loaded.columns) == ["income", "region", "label"]
        x, y = encode(loaded, spec)
        assert torch.equal(x, expected[0]), path
        assert torch.equal(y, expected[1]), path


def test_yes_no_csv_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "yn.csv"
    path.write_text("amount,kind,answer\n1,a,yes\n2,b,no\n3,a,yes\n,c,no\n")
    df = load_table(path)
    assert target_values(df, "answer") == ["no", "yes"]
    with pytest.raises(
        ConfigError, match=r"has values \['no', 'yes'\], not 0/1; pass the positive"
    ):
        resolve_positive(df, "answer", None)
    assert resolve_positive(df, "answer", "yes") == "yes"
    schema = infer_features(df, "answer")
    spec = _spec(schema.features, "answer", "yes")
    x, y = encode(df, spec)
    assert y.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert x.shape == (4, 1 + 3 + 1)
    assert float(x[3, 0]) == 0.0  # missing amount -> mean -> standardised 0


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_table(tmp_path / "nope.csv")


def test_load_directory(tmp_path: Path) -> None:
    folder = tmp_path / "data.csv"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is not a file"):
        load_table(folder)


def test_load_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "bank.xlsx"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match=r"unknown suffix; expected one of \.csv, \.csv\.gz"):
        load_table(path)


def test_load_empty_csv(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(ConfigError, match="is empty: no header and no rows"):
        load_table(path)


def test_load_header_only_csv(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("a,b,label\n")
    with pytest.raises(ConfigError, match="has a header but no rows"):
        load_table(path)


def test_load_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pd.DataFrame({"a": pd.Series([], dtype="float64")}).to_parquet(path)
    with pytest.raises(ConfigError, match="has a header but no rows"):
        load_table(path)


def test_load_ragged_csv(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("a,b\n1,2\n3,4,5,6\n")
    with pytest.raises(ConfigError, match="cannot be read: ParserError") as info:
        load_table(path)
    assert isinstance(info.value.__cause__, pd.errors.ParserError)


def test_load_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "fake.parquet"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="cannot be read") as info:
        load_table(path)
    assert info.value.__cause__ is not None


def test_load_binary_garbage_as_csv(tmp_path: Path) -> None:
    path = tmp_path / "garbage.csv"
    path.write_bytes(b"\xff\xfe\x00\x81\x92" * 50)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_table(path)


def test_load_broken_gzip(tmp_path: Path) -> None:
    path = tmp_path / "broken.csv.gz"
    path.write_bytes(gzip.compress(b"a,b\n1,2\n" * 100)[:20])
    with pytest.raises(ConfigError, match="cannot be read"):
        load_table(path)


# --------------------------------------------------------------------------- schema


def test_infer_numeric_stats_categories_and_skips() -> None:
    df = pd.DataFrame(
        {
            "x": [1.0, 2.0, None, 3.0],  # mean 2, population std sqrt(2/3)
            "const": [5, 5, 5, 5],
            "empty": [None, None, None, None],
            "color": ["red", None, "blue", "red"],
            "ident": ["a", "b", "c", "d"],
            "flag": [True, False, True, True],
            "y": [0, 1, 0, 1],
        }
    )
    schema = infer_features(df, "y", max_categories=3)
    by_name = {f.name: f for f in schema.features}
    assert list(by_name) == ["x", "const", "color", "flag"]
    x = by_name["x"]
    assert isinstance(x, NumericFeature)
    assert x.mean == pytest.approx(2.0)
    assert x.std == pytest.approx((2 / 3) ** 0.5)
    const = by_name["const"]
    assert isinstance(const, NumericFeature)
    assert (const.mean, const.std) == (5.0, 1.0)
    color = by_name["color"]
    assert isinstance(color, CategoricalFeature)
    assert color.vocabulary == ("blue", "red")
    flag = by_name["flag"]  # bool is nominal: categorical, not numeric
    assert isinstance(flag, CategoricalFeature)
    assert flag.vocabulary == ("False", "True")
    assert list(schema.skipped) == ["empty", "ident"]
    assert "every cell is missing" in schema.skipped["empty"]
    assert "4 distinct values, more than max_categories=3" in schema.skipped["ident"]
    # Every column left out, and the constant one kept, is a warning for the user.
    assert schema.warnings == (
        "column 'empty' left out: no values (every cell is missing)",
        "column 'ident' left out: 4 distinct values, more than max_categories=3",
        "column 'const' has one value (5) in every filled cell: it is kept but tells the "
        "model nothing",
    )


def test_infer_refuses_a_value_too_large_to_standardise() -> None:
    """1e308 is finite, but its square overflows: std would be inf, the column inf/NaN."""
    amounts = [1000.0 + i for i in range(20)]
    amounts[16] = 1e308
    df = pd.DataFrame({"amount": amounts, "y": [0, 1] * 10})
    with pytest.raises(ConfigError) as info:
        infer_features(df, "y")
    message = str(info.value)
    assert "numeric column 'amount' holds values too large to use" in message
    assert "1e+308 in row 17 (CSV line 18)" in message
    assert "\n" not in message


def test_encode_refuses_a_value_the_shared_statistics_cannot_scale() -> None:
    """A bank's cell of 1e308 scaled with the spec's statistics is no float32."""
    spec = _spec((NumericFeature(name="amount", mean=3000.0, std=1e-3),))
    df = pd.DataFrame({"amount": [2000.0, None, 1e308], "y": [0, 1, 0]})
    with pytest.raises(ConfigError) as info:
        encode(df, spec)
    message = str(info.value)
    assert "numeric column 'amount' holds a value too large to use: 1e+308 in row 3" in message
    assert "not a finite 32-bit number" in message
    ok = pd.DataFrame({"amount": [3000.0, 3000.002], "y": [0, 1]})
    assert torch.isfinite(encode_features(ok, spec)).all()


def test_mostly_numeric_column_with_text_is_refused_naming_the_row() -> None:
    """One typo in a numeric column must not make it a categorical (or skipped) column."""
    amounts: list[object] = [str(100 + i) for i in range(60)]
    amounts[16] = "12O0"  # letter O for a zero
    amounts[30] = "n/a?"
    amounts[5] = None  # missing: neither number nor text
    amounts[6] = "nan"  # read as missing too
    df = pd.DataFrame({"amount": amounts, "y": [0, 1] * 30})
    with pytest.raises(ConfigError) as info:
        infer_features(df, "y")
    message = str(info.value)
    assert "column 'amount' is numeric (56 of 58 filled cells are numbers)" in message
    assert "2 cells hold text, first '12O0' in row 17 (CSV line 18)" in message
    # Mostly text with a few numbers is an ordinary categorical column.
    codes = pd.DataFrame({"code": ["a", "b", "1", "2"] * 5, "y": [0, 1] * 10})
    (feature,) = infer_features(codes, "y").features
    assert isinstance(feature, CategoricalFeature)
    assert feature.vocabulary == ("1", "2", "a", "b")


def test_binary_labels_and_train_rows() -> None:
    df = pd.DataFrame({"t": ["yes", "no", "no", "yes"]})
    assert binary_labels(df, "t", "yes").tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(
        ConfigError, match=r"missing in 1 of 3 rows \(first: row 3 \(CSV line 4\)\)"
    ):
        binary_labels(pd.DataFrame({"t": [0, 1, None]}), "t", None)
    for n in (1, 2, 5, 12, 13, 100):
        train, val = train_val_split(n, 0.2, seed=0)
        assert train_rows(n, 0.2) == len(train) == n - len(val)


def test_infer_mixed_object_values_become_canonical_strings() -> None:
    df = pd.DataFrame({"code": pd.Series([1, "1", 2.0, "b"], dtype=object), "y": [0, 1, 0, 1]})
    (feature,) = infer_features(df, "y").features
    assert isinstance(feature, CategoricalFeature)
    assert feature.vocabulary == ("1", "2", "b")


def test_infer_errors() -> None:
    df = _small()
    with pytest.raises(ConfigError, match="target column 'nope' is not in the data"):
        infer_features(df, "nope")
    with pytest.raises(ConfigError, match=r"excluded columns not in the data: \['typo'\]"):
        infer_features(df, "label", exclude=["typo"])
    with pytest.raises(ConfigError, match="max_categories must be at least 1"):
        infer_features(df, "label", max_categories=0)
    with pytest.raises(ConfigError, match="no usable feature columns besides target 'label'"):
        infer_features(df, "label", exclude=["income", "region"])
    inf = pd.DataFrame({"a": [1.0, float("inf")], "label": [0, 1]})
    with pytest.raises(
        ConfigError, match=r"numeric column 'a' holds 1 infinite value \(first: inf in row 2 "
    ):
        infer_features(inf, "label")


def test_canonical_strings() -> None:
    assert canonical(1) == canonical(1.0) == canonical("1") == canonical(np.int64(1)) == "1"
    assert canonical(np.float32(2.5)) == "2.5"
    assert canonical(True) == canonical(np.bool_(True)) == "True"
    assert canonical("a b") == "a b"


# --------------------------------------------------------------------------- encoding


def test_standardisation_with_known_stats() -> None:
    spec = _spec((NumericFeature(name="a", mean=10.0, std=2.0),))
    df = pd.DataFrame({"a": [10, 12, 6, 11], "y": [0, 1, 1, 0]})
    x, y = encode(df, spec)
    assert x[:, 0].tolist() == [0.0, 1.0, -2.0, 0.5]
    assert y.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_numeric_missing_uses_fill_or_mean() -> None:
    spec = _spec(
        (
            NumericFeature(name="a", mean=10.0, std=2.0),
            NumericFeature(name="b", mean=10.0, std=2.0, fill=14.0),
        )
    )
    df = pd.DataFrame({"a": [None, 12.0], "b": [None, 12.0], "y": [0, 1]})
    x = encode_features(df, spec)
    assert x.tolist() == [[0.0, 2.0], [1.0, 1.0]]


def test_numeric_given_as_strings_and_nullable_ints() -> None:
    spec = _spec((NumericFeature(name="a", mean=1.0, std=1.0),))
    as_text = pd.DataFrame({"a": ["1", " 3", None, "nan"], "y": [0, 1, 0, 1]})
    assert encode_features(as_text, spec)[:, 0].tolist() == [0.0, 2.0, 0.0, 0.0]
    nullable = pd.DataFrame({"a": pd.array([1, 3, None, 2], dtype="Int64"), "y": [0, 1, 0, 1]})
    assert encode_features(nullable, spec)[:, 0].tolist() == [0.0, 2.0, 0.0, 1.0]
    as_bool = pd.DataFrame({"a": [True, False], "y": [0, 1]})
    assert encode_features(as_bool, spec)[:, 0].tolist() == [0.0, -1.0]


def test_numeric_column_with_text_is_refused() -> None:
    spec = _spec((NumericFeature(name="amount"),))
    df = pd.DataFrame({"amount": ["12", "n/a?", "abc", "abc", None], "y": [0, 1, 0, 1, 0]})
    with pytest.raises(ConfigError, match="numeric column 'amount' holds text") as info:
        encode(df, spec)
    assert "in 3 cells ('n/a?', 'abc'), first 'n/a?' in row 2 (CSV line 3)" in str(info.value)


def test_numeric_infinity_is_refused() -> None:
    spec = _spec((NumericFeature(name="a"),))
    df = pd.DataFrame({"a": [1.0, 2.0, float("-inf"), float("inf")], "y": [0, 1, 0, 1]})
    with pytest.raises(
        ConfigError, match=r"'a' holds 2 infinite values \(first: -inf in row 3 \(CSV line 4\)\)"
    ):
        encode(df, spec)


def test_categorical_unknown_and_missing_go_to_last_slot() -> None:
    spec = _spec((CategoricalFeature(name="c", vocabulary=("a", "b")),))
    df = pd.DataFrame({"c": ["b", "a", "zzz", None, "A", "b"], "y": [0, 1, 0, 1, 0, 1]})
    x = encode_features(df, spec)
    assert x.tolist() == [
        [0.0, 1.0, 0.0],
        [1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0],  # not in the vocabulary
        [0.0, 0.0, 1.0],  # missing
        [0.0, 0.0, 1.0],  # case matters
        [0.0, 1.0, 0.0],
    ]


def test_categorical_compares_as_strings() -> None:
    """Codes read as ints at one bank, floats (a gap) or text at another, match the same slot."""
    spec = _spec((CategoricalFeature(name="code", vocabulary=("1", "2", "7.5")),))
    expected = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    for values in ([1, 2], [1.0, 2.0], ["1", "2"], pd.Series([1, "2"], dtype=object)):
        df = pd.DataFrame({"code": values, "y": [0, 1]})
        assert encode_features(df, spec).tolist() == expected, values
    gap = pd.DataFrame({"code": [1.0, None, 7.5], "y": [0, 1, 0]})
    assert encode_features(gap, spec).tolist() == [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 1.0, 0.0],
    ]


def test_extra_columns_ignored_and_order_follows_spec() -> None:
    spec = _spec(
        (
            NumericFeature(name="b", mean=0.0, std=1.0),
            CategoricalFeature(name="a", vocabulary=("x",)),
        )
    )
    df = pd.DataFrame({"a": ["x", "q"], "junk": ["?", "?"], "y": [1, 0], "b": [3.0, 4.0]})
    x, _ = encode(df, spec)
    assert x.tolist() == [[3.0, 1.0, 0.0], [4.0, 0.0, 1.0]]


def test_missing_feature_columns_are_named() -> None:
    spec = _spec(
        (
            NumericFeature(name="a"),
            NumericFeature(name="b"),
            CategoricalFeature(name="c", vocabulary=("x",)),
        )
    )
    df = pd.DataFrame({"a": [1.0], "y": [1]})
    with pytest.raises(ConfigError, match=r"feature columns not in the data: \['b', 'c'\]"):
        encode(df, spec)


def test_target_positive_mapping() -> None:
    spec = _spec((NumericFeature(name="a"),), "label", "yes")
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0], "label": ["yes", "no", "yes"]})
    assert encode_target(df, spec).tolist() == [1.0, 0.0, 1.0]
    numeric_positive = _spec((NumericFeature(name="a"),), "label", "2")
    grades = pd.DataFrame({"a": [1.0, 2.0, 3.0], "label": [1, 2, 2]})
    assert encode_target(grades, numeric_positive).tolist() == [0.0, 1.0, 1.0]
    only_negatives = pd.DataFrame({"a": [1.0], "label": ["no"]})  # a bank with no positives
    assert encode_target(only_negatives, spec).tolist() == [0.0]


@pytest.mark.parametrize(
    "labels",
    [[0, 1, 1], [0.0, 1.0, 1.0], [False, True, True], ["0", "1", "1"]],
)
def test_target_zero_one_without_positive(labels: list[object]) -> None:
    spec = _spec((NumericFeature(name="a"),))
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0], "y": labels})
    assert encode_target(df, spec).tolist() == [0.0, 1.0, 1.0]
    assert resolve_positive(df, "y", None) is None


def test_target_errors() -> None:
    spec = _spec((NumericFeature(name="a"),))
    with pytest.raises(ConfigError, match="target column 'y' is not in the data"):
        encode(pd.DataFrame({"a": [1.0]}), spec)
    gaps = pd.DataFrame({"a": [1.0, 2.0, 3.0], "y": [1.0, None, None]})
    with pytest.raises(
        ConfigError, match=r"target column 'y' is missing in 2 of 3 rows \(first: row 2 "
    ):
        encode(gaps, spec)
    words = pd.DataFrame({"a": [1.0, 2.0], "y": ["good", "bad"]})
    with pytest.raises(ConfigError, match=r"values \['bad', 'good'\], not 0/1; set the positive"):
        encode(words, spec)
    twos = pd.DataFrame({"a": [1.0, 2.0], "y": [1, 2]})
    with pytest.raises(ConfigError, match="not 0/1"):
        encode(twos, spec)


def test_resolve_positive_errors() -> None:
    df = pd.DataFrame({"y": ["yes", "no", "yes"]})
    with pytest.raises(ConfigError, match=r"e\.g\. positive='yes'"):
        resolve_positive(df, "y", None)
    with pytest.raises(
        ConfigError, match=r"positive class 'Yes' is not a value of target column 'y'; its values"
    ):
        resolve_positive(df, "y", "Yes")
    three = pd.DataFrame({"y": ["a", "b", "c"]})
    with pytest.raises(ConfigError, match=r"is not binary: it has 3 values \['a', 'b', 'c'\]"):
        resolve_positive(three, "y", "a")
    empty = pd.DataFrame({"y": [None, None]})
    with pytest.raises(ConfigError, match="has no values"):
        resolve_positive(empty, "y", None)
    with pytest.raises(ConfigError, match="target column 'label' is not in the data"):
        resolve_positive(df, "label", "yes")
    assert resolve_positive(pd.DataFrame({"y": [0, 1]}), "y", "1") == "1"


def test_repeated_column_is_refused() -> None:
    df = pd.DataFrame([[1.0, 2.0, 1]], columns=["a", "a", "y"])
    spec = _spec((NumericFeature(name="a"),))
    with pytest.raises(ConfigError, match="feature column 'a' appears 2 times"):
        encode(df, spec)


def test_encode_does_not_mutate_frame() -> None:
    df = pd.DataFrame({"a": [None, 2.0], "c": ["x", None], "y": [0, 1]})
    before = df.copy()
    spec = _spec((NumericFeature(name="a"), CategoricalFeature(name="c", vocabulary=("x",))))
    encode(df, spec)
    pd.testing.assert_frame_equal(df, before)


# --------------------------------------------------------------------------- train/val split


def test_train_val_split_deterministic_and_disjoint() -> None:
    state = torch.random.get_rng_state()
    train, val = train_val_split(100, 0.2, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert train.dtype == val.dtype == torch.int64
    assert (len(train), len(val)) == (80, 20)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    again = train_val_split(100, 0.2, seed=7)
    assert torch.equal(again[0], train)
    assert torch.equal(again[1], val)
    other = train_val_split(100, 0.2, seed=8)
    assert not torch.equal(other[1], val)


def test_train_val_split_edges() -> None:
    train, val = train_val_split(10, 0.0, seed=0)
    assert (len(train), len(val)) == (10, 0)
    train, val = train_val_split(3, 0.01, seed=0)  # at least one validation row
    assert (len(train), len(val)) == (2, 1)
    train, val = train_val_split(1, 0.5, seed=0)
    assert (len(train), len(val)) == (1, 0)
    with pytest.raises(ConfigError, match="val_fraction must be in"):
        train_val_split(10, 1.0, seed=0)
    with pytest.raises(ConfigError, match="cannot split 0 rows"):
        train_val_split(0, 0.2, seed=0)
    with pytest.raises(ConfigError, match="seed must be non-negative"):
        train_val_split(10, 0.2, seed=-1)


# --------------------------------------------------------------------------- partitions


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    assert all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


def test_iid_properties() -> None:
    parts = iid(103, 5, seed=1)
    _assert_exact_cover(parts, 103)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] - sizes[0] <= 1
    again = iid(103, 5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = iid(103, 5, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    assert not np.array_equal(parts[0], np.arange(len(parts[0])))  # actually shuffled
    _assert_exact_cover(iid(5, 5, seed=0), 5)


def test_iid_errors() -> None:
    with pytest.raises(ConfigError, match="cannot split 3 rows into 4 non-empty parts"):
        iid(3, 4, seed=0)
    with pytest.raises(ConfigError, match="parts must be at least 1"):
        iid(3, 0, seed=0)


def _positive_shares(y: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    return np.array([y[p].mean() for p in parts])


def test_dirichlet_skew_depends_on_alpha(german: pd.DataFrame) -> None:
    y = (german[TARGET] == "good").to_numpy(dtype=np.int64)
    overall = y.mean()  # 0.7
    skewed = dirichlet_label_skew(y, 5, alpha=0.1, seed=0)
    balanced = dirichlet_label_skew(y, 5, alpha=100.0, seed=0)
    for parts in (skewed, balanced):
        _assert_exact_cover(parts, len(y))
        assert min(len(p) for p in parts) >= 10
    skewed_shares = _positive_shares(y, skewed)
    balanced_shares = _positive_shares(y, balanced)
    # alpha=100: every bank close to the 70/30 mix; alpha=0.1: far from it.
    assert np.abs(balanced_shares - overall).max() < 0.1
    assert np.abs(skewed_shares - overall).max() > 0.25
    assert skewed_shares.max() - skewed_shares.min() > 0.5
    assert np.abs(skewed_shares - overall).mean() > 3 * np.abs(balanced_shares - overall).mean()


def test_dirichlet_deterministic_and_multiclass() -> None:
    y = np.repeat(np.array(["a", "b", "c", "d"]), 50)
    first = dirichlet_label_skew(y, 4, alpha=0.5, seed=3, min_size=5)
    again = dirichlet_label_skew(y, 4, alpha=0.5, seed=3, min_size=5)
    other = dirichlet_label_skew(y, 4, alpha=0.5, seed=4, min_size=5)
    _assert_exact_cover(first, 200)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_errors() -> None:
    y = np.array([0, 1] * 20)
    with pytest.raises(ConfigError, match="40 rows cannot give 5 parts of at least 10 rows"):
        dirichlet_label_skew(y, 5, alpha=1.0, seed=0)
    with pytest.raises(ConfigError, match="alpha must be a positive finite number"):
        dirichlet_label_skew(y, 2, alpha=0.0, seed=0)
    with pytest.raises(ConfigError, match="labels must be one-dimensional"):
        dirichlet_label_skew(y.reshape(4, 10), 2, alpha=1.0, seed=0)
    with pytest.raises(ConfigError, match="labels are missing in 1 of 3 rows"):
        dirichlet_label_skew(np.array([0.0, np.nan, 1.0]), 1, alpha=1.0, seed=0, min_size=1)
    with pytest.raises(ConfigError, match="min_size must be non-negative"):
        dirichlet_label_skew(y, 2, alpha=1.0, seed=0, min_size=-1)
    with pytest.raises(ConfigError, match="in 1000 tries"):
        # 10 parts of at least 9 out of 100 rows with a very skewed draw: practically never.
        dirichlet_label_skew(np.arange(100) % 2, 10, alpha=0.01, seed=0, min_size=9)


def test_by_column_groups(german: pd.DataFrame) -> None:
    housing = german["housing"].to_numpy()
    parts = by_column(housing)
    _assert_exact_cover(parts, 1000)
    assert len(parts) == 3
    for value, part in zip(["for free", "own", "rent"], parts, strict=True):
        assert set(housing[part]) == {value}
        assert len(part) == int((housing == value).sum())
    assert len(by_column(housing, parts=3)) == 3
    with pytest.raises(ConfigError, match=r"asked for 5 parts but the column has 3 distinct"):
        by_column(housing, parts=5)


def test_by_column_labels_sorting_and_errors() -> None:
    labeled = by_column_labeled([3, 1, 2, 1, 3])
    assert [label for label, _ in labeled] == [1, 2, 3]
    assert [rows.tolist() for _, rows in labeled] == [[1, 3], [2], [0, 4]]
    mixed = by_column_labeled(["b", 1, "a", 1])  # not comparable: sorted by str
    assert [label for label, _ in mixed] == [1, "a", "b"]
    assert [p.tolist() for p in by_column(["x", "y", "x"])] == [[0, 2], [1]]
    with pytest.raises(ConfigError, match="cannot split an empty column"):
        by_column([])
    with pytest.raises(ConfigError, match="missing in 1 of 3 rows"):
        by_column(["a", None, "b"])


def test_by_shares_follows_the_shares_and_keeps_the_class_mix() -> None:
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=2000) < 0.1).astype(np.int64)
    parts = by_shares(y, [60, 10, 10, 10, 10], seed=1)
    _assert_exact_cover(parts, 2000)
    sizes = [len(p) for p in parts]
    assert abs(sizes[0] - 1200) <= 2 and all(abs(n - 200) <= 2 for n in sizes[1:]), sizes
    for part in parts:  # stratified: every bank close to the overall 10% positives
        assert abs(y[part].mean() - y.mean()) < 0.01
    again = by_shares(y, [0.6, 0.1, 0.1, 0.1, 0.1], seed=1)  # normalised: same split
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = by_shares(y, [60, 10, 10, 10, 10], seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    loose = by_shares(y, [3, 1], seed=0, stratify=False)
    _assert_exact_cover(loose, 2000)
    assert [len(p) for p in loose] == [1500, 500]


def test_by_shares_errors() -> None:
    y = np.array([0, 1] * 10)
    with pytest.raises(ConfigError, match="share -1 is not a positive finite number"):
        by_shares(y, [1, -1], seed=0)
    with pytest.raises(ConfigError, match="parts must be at least 1"):
        by_shares(y, [], seed=0)
    with pytest.raises(ConfigError, match="gives part 2 no row"):
        by_shares(y, [1000, 1], seed=0)
    with pytest.raises(ConfigError, match="labels are missing in 1 of 3 rows"):
        by_shares(np.array([0.0, np.nan, 1.0]), [1, 1], seed=0)
