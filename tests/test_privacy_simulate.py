"""``fedq simulate`` with differential privacy: calibration, budgets, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from common.privacy import dpsgd_epsilon, gaussian_epsilon
from common.spec import PrivacySpec, RecordPrivacy
from fedq.cli import main
from fedq.simulate import SimulationConfig, prepare, run_simulation
from fedq.simulate_privacy import PrivacyOptions, privacy_spec, sample_rate, steps_per_update

pytestmark = pytest.mark.slow


def test_the_noise_is_calibrated_to_the_target_for_the_smallest_bank() -> None:
    prep = prepare(SimulationConfig(participants=3))
    rows = {"a": 100, "b": 200, "c": 400}
    spec = privacy_spec(PrivacyOptions(record_epsilon=3.0, planned_updates=10), prep.spec, rows, 50)
    record = spec.record
    assert record is not None and record.epsilon_budget == 3.0
    q, steps = sample_rate(prep.spec, 100), 10 * steps_per_update(prep.spec, 100)
    assert dpsgd_epsilon(q, record.noise_multiplier, steps, record.delta) == pytest.approx(
        3.0, rel=1e-3
    )
    # A bank with more rows spends less over the same updates.
    q4, steps4 = sample_rate(prep.spec, 400), 10 * steps_per_update(prep.spec, 400)
    assert dpsgd_epsilon(q4, record.noise_multiplier, steps4, record.delta) < 3.0
    bank = privacy_spec(PrivacyOptions(bank_epsilon=8.0), prep.spec, rows, 50).bank
    assert bank is not None
    assert gaussian_epsilon(bank.noise_multiplier, 50, bank.delta) == pytest.approx(8.0, rel=1e-3)


async def test_a_record_level_run_ends_when_every_bank_spent_its_budget() -> None:
    result = await run_simulation(
        SimulationConfig(
            participants=3,
            versions=500,
            seconds=90,
            base_delay_s=0.0,
            privacy=PrivacyOptions(record_epsilon=2.0, planned_updates=4),
        )
    )
    assert result.stopped_by == "budget"
    record = result.privacy["record"]
    assert all(0 < e <= 2.0 + 1e-9 for e in record["epsilon_per_bank"].values())
    # Every bank published the updates its budget allows, then stopped: no version after.
    published = sum(p["updates_published"] for p in result.participants.values())
    assert result.updates_accepted + result.updates_refused == published
    assert all(p["updates_published"] >= 4 for p in result.participants.values())


async def test_a_sync_run_ends_when_a_round_can_no_longer_close() -> None:
    """Sync rounds wait for every bank: the bank with the fewest rows spends its budget
    first, and the run ends then, instead of waiting out its time budget."""
    result = await run_simulation(
        SimulationConfig(
            participants=3,
            mode="sync",
            partition="sizes",
            shares=(1.0, 2.0, 4.0),
            versions=200,
            seconds=90,
            base_delay_s=0.0,
            privacy=PrivacyOptions(record_epsilon=2.0, planned_updates=3),
        )
    )
    assert result.stopped_by == "budget"
    assert result.wall_seconds < 60


def test_the_command_reports_what_each_mechanism_spent(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        [
            *("simulate", "--participants", "3", "--versions", "12", "--seconds", "60"),
            *("--base-delay", "0", "--baseline-epochs", "5", "--patience", "0"),
            *("--bank-epsilon", "8", "--strategy", "fedbuff", "--buffer-size", "3"),
            *("--report", str(report)),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "bank-level DP at the aggregator" in result.output
    doc = json.loads(report.read_text())
    bank = doc["runs"][0]["privacy"]["bank"] if "runs" in doc else doc["privacy"]["bank"]
    assert bank["versions"] == 12
    assert bank["model_epsilon"] == pytest.approx(8.0, rel=1e-3)


def test_dp_options_that_cannot_work_are_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["simulate", "--record-epsilon", "1", "--laplace-epsilon", "1"]
    )
    assert result.exit_code == 2
    assert "alternatives" in result.output
    unreachable = CliRunner().invoke(
        main, ["simulate", "--bank-epsilon", "0.01", "--versions", "100"]
    )
    assert unreachable.exit_code == 2
    assert unreachable.output.startswith("error: the privacy targets cannot be met")
    assert len(unreachable.output.strip().splitlines()) == 1


def test_a_bank_under_dp_must_keep_its_privacy_ledger(tmp_path: Path) -> None:
    spec = prepare(SimulationConfig(participants=2)).spec
    private = spec.model_copy(
        update={"privacy": PrivacySpec(record=RecordPrivacy(noise_multiplier=1.0))}
    )
    path = tmp_path / "task.json"
    path.write_text(private.to_json() + "\n")
    data = tmp_path / "bank.csv"
    data.write_text("x\n1\n")
    result = CliRunner().invoke(
        main,
        [
            *("participant", "run", "--spec", str(path), "--participant", "bank-01"),
            *("--data", str(data), "--amqp-url", "amqp://bank-01:pw@127.0.0.1:5672/"),
        ],
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: task {spec.task_id!r} uses differential privacy at the bank: give "
        "--privacy-ledger FILE, so its privacy spending survives restarts"
    ]
