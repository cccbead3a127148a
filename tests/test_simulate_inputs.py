"""Bad data and options: one-line errors before anything starts, warnings in the report.

Every CSV here is generated in tmp_path; the real CLI runs through click's CliRunner.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from fedq.cli import main
from fedq.simulate import SimulationConfig, prepare
from tests.helpers import AMQP_URL

BANNER = "fedq simulate:"


def _credit(rows: int = 400, seed: int = 1, positives: float = 0.3) -> pd.DataFrame:
    """A credit-like table: numeric and categorical columns and a yes/no target."""
    rng = np.random.default_rng(seed)
    amount = rng.lognormal(8, 0.6, rows).round(2)
    age = rng.integers(18, 80, rows)
    region = rng.choice(["north", "south", "east"], rows)
    score = np.log(amount) - 8 + rng.normal(0, 1, rows)
    cut = np.quantile(score, 1 - positives)
    return pd.DataFrame(
        {
            "amount": amount,
            "age": age,
            "region": region,
            "defaulted": np.where(score > cut, "yes", "no"),
        }
    )


def _simulate(csv: Path, *args: str) -> Result:
    return CliRunner().invoke(
        main,
        ["simulate", "--data", str(csv), "--target", "defaulted", "--positive", "yes", *args],
    )


def _text(result: Result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def _assert_clear_error(result: Result, *parts: str) -> None:
    text = _text(result)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert BANNER not in text  # refused before anything started
    for part in parts:
        assert part in text, (part, text)


def test_huge_number_is_an_error_naming_column_and_row(tmp_path: Path) -> None:
    df = _credit()
    df["amount"] = df["amount"].astype(float)
    df.loc[16, "amount"] = 1e308
    csv = tmp_path / "big.csv"
    df.to_csv(csv, index=False)
    started = time.perf_counter()
    result = _simulate(csv)
    _assert_clear_error(result, "error:", "'amount'", "too large", "row 17 (CSV line 18)")
    assert time.perf_counter() - started < 20


def test_infinity_is_an_error_naming_column_and_row(tmp_path: Path) -> None:
    df = _credit()
    df["age"] = df["age"].astype(object)
    df.loc[41, "age"] = "-inf"
    csv = tmp_path / "inf.csv"
    df.to_csv(csv, index=False)
    _assert_clear_error(_simulate(csv), "'age'", "infinite", "row 42 (CSV line 43)")


def test_text_in_a_numeric_column_is_an_error_naming_the_cell(tmp_path: Path) -> None:
    df = _credit()
    df["amount"] = df["amount"].astype(object)
    df.loc[99, "amount"] = "1,234.50"
    csv = tmp_path / "text.csv"
    df.to_csv(csv, index=False)
    _assert_clear_error(
        _simulate(csv), "column 'amount' is numeric", "'1,234.50' in row 100 (CSV line 101)"
    )


def test_missing_label_is_an_error_naming_the_row(tmp_path: Path) -> None:
    df = _credit()
    df.loc[7, "defaulted"] = None
    csv = tmp_path / "gap.csv"
    df.to_csv(csv, index=False)
    _assert_clear_error(_simulate(csv), "target column 'defaulted'", "row 8 (CSV line 9)")


def test_too_few_rows_of_a_class_is_an_error(tmp_path: Path) -> None:
    df = _credit()
    df["defaulted"] = "no"
    df.loc[3, "defaulted"] = "yes"
    csv = tmp_path / "one.csv"
    df.to_csv(csv, index=False)
    _assert_clear_error(_simulate(csv), "1 row of class 1 ('yes')", "at least 2")


def test_too_many_participants_for_the_rows_is_an_error(tmp_path: Path) -> None:
    csv = tmp_path / "small.csv"
    _credit(rows=750).to_csv(csv, index=False)
    result = _simulate(csv, "--participants", "500")
    _assert_clear_error(
        result, "--participants 500 is too many for 750 rows", "use --participants 46 or fewer"
    )
    ok = prepare(SimulationConfig(data=csv, target="defaulted", positive="yes", participants=46))
    assert min(len(s) for s in ok.shards.values()) >= 12


def test_bad_speeds_name_the_option(tmp_path: Path) -> None:
    for speeds, why in (
        ("1,-1,1", "-1 is not a positive factor"),
        ("1,x", "not a comma-separated list"),
        ("1,1,1,1,1,1", "6 factors for 5 participants"),
        ("1,inf", "inf is not a positive factor"),
    ):
        result = CliRunner().invoke(main, ["simulate", "--speeds", speeds])
        assert result.exit_code == 2, result.output
        assert "Invalid value for '--speeds'" in result.output, result.output
        assert why in _text(result)
        assert BANNER not in result.output


def test_option_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    _credit().to_csv(csv, index=False)
    _assert_clear_error(
        _simulate(csv, "--partition-column", "region"),
        "--partition-column is used only with --partition column",
    )
    _assert_clear_error(
        _simulate(csv, "--partition", "column", "--partition-column", "region"),
        "column 'region' has 3 values",
        "use --participants 3, not 5",
    )
    _assert_clear_error(
        _simulate(csv, "--partition", "column", "--partition-column", "nope"),
        "--partition-column 'nope' is not a column",
    )
    _assert_clear_error(
        _simulate(csv, "--mode", "sync", "--quorum", "9"), "--quorum 9 is more than --participants"
    )
    _assert_clear_error(
        _simulate(csv, "--partition", "sizes", "--shares", "50,50"),
        "--partition sizes needs one share per bank: --shares gives 2 for --participants 5",
    )
    _assert_clear_error(
        _simulate(csv, "--shares", "1,1,1,1,1"), "--shares is used only with --partition sizes"
    )
    _assert_clear_error(
        _simulate(csv, "--partition", "sizes", "--shares", "96,1,1,1,1"),
        "--shares: bank-02's share 1 gives it 5 of 400 rows",
        "give it a larger share",
    )
    shares = CliRunner().invoke(main, ["simulate", "--partition", "sizes", "--shares", "6,x"])
    assert shares.exit_code == 2 and "Invalid value for '--shares'" in shares.output
    hidden = CliRunner().invoke(main, ["simulate", "--model", "mlp", "--hidden", "8,x"])
    assert hidden.exit_code == 2
    assert "Invalid value for '--hidden'" in hidden.output


@pytest.mark.slow
def test_dropped_and_constant_columns_are_warned_and_reported(tmp_path: Path) -> None:
    df = _credit(rows=300)
    df.insert(0, "customer", [f"c{i:04d}" for i in range(len(df))])  # id-like text
    df["branch"] = "main"
    csv, report = tmp_path / "ids.csv", tmp_path / "out" / "report.json"
    df.to_csv(csv, index=False)
    result = _simulate(csv, "--participants", "2", "--versions", "2", "--report", str(report))
    assert result.exit_code == 0, result.output
    text = _text(result)
    left_out = "column 'customer' left out: 224 distinct values, more than max_categories=64"
    constant = "column 'branch' has one value ('main')"
    assert f"warning: {left_out}" in text
    assert constant in text
    assert text.index(left_out) < text.index(BANNER)
    warnings = json.loads(report.read_text())["warnings"]
    assert warnings[0] == left_out
    assert any(w.startswith(constant) for w in warnings)


@pytest.mark.slow
def test_imbalanced_wide_uneven_data_runs_and_says_which_banks_lack_a_class(
    tmp_path: Path,
) -> None:
    """2% positives, 40 columns, a strongly skewed split: it runs, and says what it did."""
    rng = np.random.default_rng(5)
    rows, width = 900, 40
    x = rng.normal(size=(rows, width)).round(3)
    logit = -5.2 + 1.5 * x[:, 0] + x[:, 1]
    y = rng.uniform(size=rows) < 1 / (1 + np.exp(-logit))
    df = pd.DataFrame(x, columns=[f"f{i:02d}" for i in range(width)])
    df["segment"] = rng.choice(["a", "b", "c", "d"], rows)
    df["fraud"] = y.astype(int)
    assert 0.01 <= df["fraud"].mean() <= 0.03
    csv, report = tmp_path / "fraud.csv", tmp_path / "r.json"
    df.to_csv(csv, index=False)
    args = ["--participants", "5", "--partition", "dirichlet", "--alpha", "0.1"]
    args += ["--versions", "3", "--report", str(report)]
    result = CliRunner().invoke(main, ["simulate", "--data", str(csv), "--target", "fraud", *args])
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    rows_per_bank = [p["rows"] for p in doc["participants"].values()]
    assert max(rows_per_bank) > 3 * min(rows_per_bank)  # unevenly split
    assert min(rows_per_bank) >= 12
    assert doc["versions"] == 3
    assert 0.5 < doc["centralized_auc"] <= 1.0
    lacking = [w for w in doc["warnings"] if "have no training row of class 1" in w]
    assert lacking, doc["warnings"]
    assert lacking[0] in _text(result)
    # Rare positives: weighted in training by default, and scored by PR-AUC as well.
    rate = doc["centralized_metrics"]["positive_rate"]
    weight = doc["settings"]["spec"]["training"]["positive_weight"]
    assert weight > 10, weight  # about (1 - p) / p of the training rows
    assert 0 < doc["final_metrics"]["pr_auc"] <= 1 and 0 < rate < 0.05
    assert "PR-AUC" in _text(result)


def test_task_init_reports_bad_values_in_one_line(tmp_path: Path) -> None:
    df = _credit()
    df["amount"] = df["amount"].astype(object)
    df.loc[9, "amount"] = "??"
    csv = tmp_path / "ref.csv"
    df.to_csv(csv, index=False)
    result = CliRunner().invoke(
        main,
        [
            *("task", "init", "--data", str(csv), "--target", "defaulted"),
            *("--positive", "yes", "--task-id", "t1", "--participants", "bank-a"),
        ],
    )
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "column 'amount' is numeric" in _text(result)
    assert "'??' in row 10 (CSV line 11)" in _text(result)


@pytest.mark.real
def test_participant_run_refuses_a_bank_file_with_a_huge_value(tmp_path: Path) -> None:
    """The spec is fine; the bank's own file has 1e308: one line, exit 2, no traceback."""
    reference, bank, spec = tmp_path / "ref.csv", tmp_path / "bank.csv", tmp_path / "spec.json"
    _credit().to_csv(reference, index=False)
    init = CliRunner().invoke(
        main,
        [
            *("task", "init", "--data", str(reference), "--target", "defaulted"),
            *("--positive", "yes", "--task-id", "badbank", "--participants", "bank-a"),
            *("--out", str(spec)),
        ],
    )
    assert init.exit_code == 0, init.output
    df = _credit(seed=2)
    df["amount"] = df["amount"].astype(float)
    df.loc[4, "amount"] = 1e308
    df.to_csv(bank, index=False)
    result = CliRunner().invoke(
        main,
        [
            *("participant", "run", "--spec", str(spec), "--participant", "bank-a"),
            *("--data", str(bank), "--amqp-url", AMQP_URL, "--max-updates", "1"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "'amount' holds a value too large to use: 1e+308 in row 5 (CSV line 6)" in _text(result)


def test_task_init_weighs_rare_positives_in_the_spec(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"a": rng.normal(size=1000), "b": rng.normal(size=1000)})
    df["fraud"] = (rng.uniform(size=1000) < 0.02).astype(int)
    csv = tmp_path / "ref.csv"
    df.to_csv(csv, index=False)
    base = ["task", "init", "--data", str(csv), "--target", "fraud", "--task-id", "t1"]
    base += ["--participants", "bank-a"]
    rate = float(df["fraud"].mean())
    for extra, expected in ((), (1 - rate) / rate), (("--class-weight", "none"), 1.0):
        result = CliRunner().invoke(main, [*base, *extra])
        assert result.exit_code == 0, result.output
        spec = json.loads(result.stdout)
        assert spec["training"]["positive_weight"] == pytest.approx(expected)
    bad = CliRunner().invoke(main, [*base, "--class-weight", "lots"])
    assert bad.exit_code == 2 and "--class-weight" in _text(bad)
