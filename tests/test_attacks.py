"""Hostile banks in the simulation (fedq/simulate_attacks.py) and the robustness options.

Each attack runs at a real bank worker; short embedded runs check that it really
happens and what the robustness settings make of it. Sync rounds are deterministic
(FedAvg over every bank), so the sync assertions hold exactly; the async ones have
wide margins.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import click
import pytest
import torch
from click.testing import CliRunner

import fedq.simulate
from common.evaluation import evaluate
from common.models import build_task_model, model_tensors
from common.spec import RobustnessSpec
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import ModelEnvelope, Tensors
from fedq.cli import main
from fedq.simulate import (
    Baselines,
    SimulationConfig,
    SimulationResult,
    bundled_data,
    fit_baselines,
    prepare,
    run_simulation,
)
from fedq.simulate_attacks import (
    ATTACKS,
    COPIES,
    HUGE_VALUE,
    SCALE_FACTOR,
    SIGN_FLIP_FACTOR,
    HostileWorker,
    hostile_banks,
)
from participant.worker import ParticipantWorker, WorkerConfig

#: The split every run uses: 5 banks, the bundled data, seed 0.
SPLIT = SimulationConfig(participants=5, baseline_epochs=5)


@pytest.fixture(scope="module")
def baselines() -> Baselines:
    """The split's yardsticks, fitted once (every run below shares the split)."""
    return fit_baselines(prepare(SPLIT), SPLIT)


async def _run(
    baselines: Baselines,
    *,
    attack: str | None = None,
    attackers: int = 1,
    mode: Literal["async", "sync"] = "async",
    versions: int = 20,
    robustness: dict[str, Any] | None = None,
    fedbuff: bool = False,
) -> SimulationResult:
    """A short embedded run on the shared split (async: FedAsync, or FedBuff with a
    buffer of 5)."""
    spec: dict[str, Any] = {"robustness": robustness or {}}
    if fedbuff:
        spec["async"] = {"strategy": "fedbuff", "buffer_size": 5}
    config = SimulationConfig(
        participants=SPLIT.participants,
        baseline_epochs=SPLIT.baseline_epochs,
        mode=mode,
        versions=versions,
        seconds=30,
        patience=0,
        base_delay_s=0.0,
        attack=attack,
        attackers=attackers,
        spec_overrides=spec,
    )
    return await run_simulation(config, None, prepare(config), baselines)


@pytest.fixture
def largest(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The largest absolute parameter of each version the runs make, in order."""
    seen: list[float] = []
    record = fedq.simulate._Watch.record

    def spy(self: Any, rec: Any, params: Tensors, *args: Any) -> None:
        seen.append(max(float(t.abs().max()) for t in params.values()))
        record(self, rec, params, *args)

    monkeypatch.setattr(fedq.simulate._Watch, "record", spy)
    return seen


def _clipped(result: SimulationResult) -> dict[str, int]:
    out: dict[str, int] = {}
    for event in result.events:
        for bank, k in event["clipped"].items():
            out[bank] = out.get(bank, 0) + k
    return out


# --------------------------------------------------------------------------- at the bank


def _pair(attack: str) -> tuple[ParticipantWorker, HostileWorker, ModelEnvelope]:
    """An honest worker and a hostile one with the same rows and seed, and version 0."""
    prep = prepare(SPLIT)
    spec, name, broker = prep.spec, "bank-05", MemoryBroker()
    honest = ParticipantWorker(
        spec,
        WorkerConfig(participant=name, seed=3),
        MemoryTransport(broker, name),
        prep.shards[name],
    )
    hostile = HostileWorker(
        spec,
        WorkerConfig(participant=name, seed=3),
        MemoryTransport(broker, name),
        prep.shards[name],
        attack=attack,
    )
    model = ModelEnvelope(
        task=spec.task_id, version=0, tensors=model_tensors(build_task_model(spec))
    )
    return honest, hostile, model


@pytest.mark.parametrize(
    ("attack", "factor"), [("scale", SCALE_FACTOR), ("sign_flip", SIGN_FLIP_FACTOR)]
)
def test_the_bank_scales_its_delta_by_the_documented_factor(attack: str, factor: float) -> None:
    honest, hostile, model = _pair(attack)
    delta, _, _ = honest._train(model, 7)
    bad, _, _ = hostile._train(model, 7)
    assert (SCALE_FACTOR, SIGN_FLIP_FACTOR) == (100.0, -10.0)
    for name, d in delta.items():
        assert torch.equal(bad[name], d * factor), name


def test_the_huge_bank_sends_3e38_everywhere() -> None:
    _, hostile, model = _pair("huge")
    bad, _, _ = hostile._train(model, 7)
    for t in bad.values():
        assert torch.isfinite(t).all() and bool((t == HUGE_VALUE).all())
    assert HUGE_VALUE == 3e38


def test_the_label_flipping_bank_learns_the_opposite() -> None:
    """Its labels are flipped for training only; what it learns ranks customers backwards."""
    honest, hostile, model = _pair("label_flip")
    assert torch.equal(hostile.y_train, 1 - honest.y_train)
    assert torch.equal(hostile.y_val, honest.y_val)  # validation keeps the truth
    prep = prepare(SPLIT)
    good, bad = dict(model.tensors), dict(model.tensors)
    for k in range(5):  # a few local rounds from the same start
        d, _, _ = honest._train(ModelEnvelope(task=model.task, version=0, tensors=good), k)
        good = {n: good[n] + d[n] for n in good}
        d, _, _ = hostile._train(ModelEnvelope(task=model.task, version=0, tensors=bad), k)
        bad = {n: bad[n] + d[n] for n in bad}
    honest_auc = evaluate(prep.spec, good, prep.x_test, prep.y_test)["auc"]
    hostile_auc = evaluate(prep.spec, bad, prep.x_test, prep.y_test)["auc"]
    assert hostile_auc < 0.5 < honest_auc, (hostile_auc, honest_auc)


def test_the_last_banks_by_name_are_hostile() -> None:
    names = ("bank-03", "bank-01", "bank-02")
    assert hostile_banks(names, "scale", 2) == ("bank-02", "bank-03")
    assert hostile_banks(names, "scale", 0) == ()
    assert hostile_banks(names, None, 2) == ()
    assert set(ATTACKS) == {"scale", "sign_flip", "huge", "label_flip", "copies"}
    simulate = main.commands["simulate"]
    option = next(p for p in simulate.params if p.name == "attack")
    assert isinstance(option.type, click.Choice)
    assert {c.replace("-", "_") for c in option.type.choices} == set(ATTACKS)  # the CLI's


# --------------------------------------------------------------------------- in a run


async def test_an_honest_run_names_no_hostile_bank(baselines: Baselines) -> None:
    result = await _run(baselines, mode="sync", versions=5)
    assert result.settings["attack"] is None and result.settings["hostile_banks"] == []
    assert all(p["hostile"] is None for p in result.participants.values())
    assert all(e["clipped"] == {} for e in result.events)


async def test_scaled_updates_move_the_model_and_a_norm_bound_clips_them(
    baselines: Baselines, largest: list[float]
) -> None:
    await _run(baselines, mode="sync", versions=5)
    honest = max(largest)
    largest.clear()
    scaled = await _run(baselines, attack="scale", mode="sync", versions=5)
    assert max(largest) > 5 * honest, (max(largest), honest)
    assert scaled.settings["attack"] == "scale"
    assert scaled.settings["hostile_banks"] == ["bank-05"]
    assert scaled.participants["bank-05"]["hostile"] == "scale"
    assert scaled.participants["bank-01"]["hostile"] is None
    largest.clear()
    bounded = await _run(
        baselines, attack="scale", mode="sync", versions=5, robustness={"norm_bound": 1.0}
    )
    assert max(largest) < 2 * honest, (max(largest), honest)
    assert _clipped(bounded).get("bank-05") == 5  # every one of its updates, each round


async def test_sign_flipping_wrecks_the_mean_and_not_the_median(baselines: Baselines) -> None:
    """One bank in five with a -10x delta outweighs the others in FedAvg (sync, exact)."""
    honest = await _run(baselines, mode="sync", versions=8)
    flipped = await _run(baselines, attack="sign_flip", mode="sync", versions=8)
    median = await _run(
        baselines,
        attack="sign_flip",
        mode="sync",
        versions=8,
        robustness={"aggregator": "median"},
    )
    assert honest.final_auc > 0.7, honest.final_auc
    assert flipped.final_auc < 0.55, flipped.final_auc
    assert median.final_auc > honest.final_auc - 0.05, (median.final_auc, honest.final_auc)


async def test_huge_values_blow_up_the_model_unless_bounded(
    baselines: Baselines, largest: list[float]
) -> None:
    """3e38 is finite, so it passes the wire format; unbounded, FedBuff's mean takes it
    and the model's parameters reach ~1e37 (the honest banks' training then turns to
    NaN: they publish nothing for such a model, and keep running). A norm bound of 1
    clips it and the run ends with a finite, useful model."""
    blown = await _run(baselines, attack="huge", versions=5, fedbuff=True)
    refused = blown.refused_by_reason.get("non_finite_result", 0)
    assert refused > 0 or max(largest) > 1e30, largest
    assert blown.stopped_by != "other", blown.stopped_by  # no worker died
    largest.clear()
    bounded = await _run(
        baselines, attack="huge", versions=10, robustness={"norm_bound": 1.0}, fedbuff=True
    )
    assert _clipped(bounded).get("bank-05", 0) >= 5
    assert max(largest) < 10 and math.isfinite(bounded.final_auc)
    assert bounded.final_auc > 0.65, bounded.final_auc


async def test_copies_fill_a_fedbuff_buffer_unless_capped(baselines: Baselines) -> None:
    assert COPIES == 5
    flooded = await _run(baselines, attack="copies", versions=10, fedbuff=True)
    published = {n: p["updates_published"] for n, p in flooded.participants.items()}
    assert published["bank-05"] >= 2 * max(v for n, v in published.items() if n != "bank-05")
    share = sum(c.count("bank-05") for c in flooded.contributors) / sum(
        len(c) for c in flooded.contributors
    )
    assert share > 0.35, share  # a fair share is 0.2; five copies to four honest: 5/9
    capped = await _run(
        baselines, attack="copies", versions=10, robustness={"max_per_bank": 1}, fedbuff=True
    )
    hostile = capped.participants["bank-05"]["updates_refused"]
    assert hostile.get("over_cap", 0) >= 5, hostile
    for name, p in capped.participants.items():
        if name != "bank-05":
            assert "over_cap" not in p["updates_refused"], (name, p)
    assert all(c.count("bank-05") <= 1 for c in capped.contributors)


async def test_label_flipping_banks_turn_the_model_around(baselines: Baselines) -> None:
    """Three banks of five train on flipped labels: the federation learns the opposite."""
    honest = await _run(baselines, mode="sync", versions=8)
    flipped = await _run(baselines, attack="label_flip", attackers=3, mode="sync", versions=8)
    assert flipped.settings["hostile_banks"] == ["bank-03", "bank-04", "bank-05"]
    assert flipped.final_auc < 0.45 < 0.7 < honest.final_auc, (flipped.final_auc, honest.final_auc)


# --------------------------------------------------------------------------- the CLI


TASK_INIT = [
    *("task", "init", "--data", str(bundled_data()), "--target", "creditability"),
    *("--positive", "bad", "--task-id", "t1", "--participants", "a,b"),
]


def test_task_init_takes_the_robustness_options() -> None:
    default = CliRunner().invoke(main, TASK_INIT)
    assert default.exit_code == 0, default.output
    assert json.loads(default.stdout)["robustness"] == RobustnessSpec().model_dump(mode="json")
    args = [*TASK_INIT, "--strategy", "fedbuff", "--robust-aggregator", "trimmed-mean"]
    args += ["--trim-fraction", "0.1", "--norm-bound", "2", "--adaptive-norm"]
    args += ["--norm-multiplier", "4", "--norm-window", "10", "--outlier", "refuse"]
    args += ["--max-per-bank", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["robustness"] == {
        **RobustnessSpec().model_dump(mode="json"),
        "aggregator": "trimmed_mean",
        "trim_fraction": 0.1,
        "norm_bound": 2.0,
        "adaptive_norm": True,
        "norm_multiplier": 4.0,
        "norm_window": 10,
        "outlier": "refuse",
        "max_per_bank": 2,
    }
    krum = [*TASK_INIT, "--strategy", "fedbuff", "--buffer-size", "5"]
    krum += ["--robust-aggregator", "multi-krum"]
    result = CliRunner().invoke(main, [*krum, "--krum-byzantine", "1", "--krum-select", "3"])
    assert result.exit_code == 0, result.output
    robust = json.loads(result.stdout)["robustness"]
    assert (robust["aggregator"], robust["krum_byzantine"], robust["krum_select"]) == (
        "multi_krum",
        1,
        3,
    )
    result = CliRunner().invoke(main, [*TASK_INIT, "--min-cosine", "0.2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["robustness"]["min_cosine"] == 0.2


@pytest.mark.parametrize(
    ("command", "args", "says"),
    [
        ("simulate", ["--robust-aggregator", "median"], "robustness.aggregator 'median' needs"),
        ("init", ["--strategy", "fedbuff", "--min-cosine", "0.5"], "min_cosine is FedAsync"),
        ("init", ["--krum-select", "2"], "krum_select is multi_krum's"),
        (
            "simulate",
            ["--strategy", "fedbuff", "--robust-aggregator", "median", "--server-opt", "adam"],
            "needs server.kind 'sgd'",
        ),
        ("simulate", ["--secure-aggregation", "--norm-bound", "1"], "robustness must be"),
    ],
)
def test_a_combination_the_spec_refuses_is_one_line(
    command: str, args: list[str], says: str
) -> None:
    base = ["simulate"] if command == "simulate" else TASK_INIT
    result = CliRunner().invoke(main, [*base, *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert says in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_simulate_takes_the_attack_and_robustness_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedq.simulate_cli

    seen: dict[str, Any] = {}

    def capture(config: Any, _console: Any, **kw: Any) -> bool:
        seen["config"], seen["spec"] = config, kw["prepared"].spec
        return True

    monkeypatch.setattr(fedq.simulate_cli, "run_with_progress", capture)
    args = ["simulate", "--attack", "sign-flip", "--attackers", "2", "--strategy", "fedbuff"]
    args += [
        "--buffer-size",
        "5",
        "--robust-aggregator",
        "multi-krum",
        "--krum-byzantine",
        "2",
        "--norm-bound",
        "3",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (seen["config"].attack, seen["config"].attackers) == ("sign_flip", 2)
    robust = seen["spec"].robustness
    assert (robust.aggregator, robust.krum_byzantine, robust.norm_bound) == ("multi_krum", 2, 3.0)
    result = CliRunner().invoke(main, ["simulate"])
    assert result.exit_code == 0, result.output
    assert seen["config"].attack is None  # honest by default
    assert seen["spec"].robustness == RobustnessSpec()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--attackers", "2"], "needs --attack"),
        (["--attack", "scale", "--attackers", "6"], "--attackers 6 must be between 0 and"),
        (["--attack", "copies", "--secure-aggregation"], "--attack copies cannot run with"),
        (["--attack", "flood"], "Invalid value for '--attack'"),
    ],
)
def test_bad_attack_options_are_one_line(args: list[str], says: str) -> None:
    result = CliRunner().invoke(main, ["simulate", *args])
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_the_summary_and_the_report_name_the_hostile_banks(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    args = ["simulate", "-n", "3", "--versions", "4", "--patience", "0", "--base-delay", "0"]
    args += ["--baseline-epochs", "3", "--attack", "scale", "--norm-bound", "1"]
    result = CliRunner().invoke(main, [*args, "--report", str(report)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1 hostile (scale)" in text
    assert "hostile: bank-03 ran the scale attack" in text
    assert "(hostile)" in text  # beside bank-03 in the per-bank table
    doc = json.loads(report.read_text())
    assert doc["settings"]["attack"] == "scale" and doc["settings"]["hostile_banks"] == ["bank-03"]
    assert doc["participants"]["bank-03"]["hostile"] == "scale"
    assert sum(e["clipped"].get("bank-03", 0) for e in doc["events"]) >= 1
