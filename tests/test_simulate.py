"""`fedq simulate` end to end: embedded, and the same against the real RabbitMQ and Redis."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore
from common.evaluation import predict_proba
from common.models import build_task_model, model_tensors
from common.spec import NumericFeature
from common.transport.memory import MemoryBroker, MemoryTransport
from fedq.cli import main
from fedq.simulate import Prepared, SimulationConfig, prepare, run_simulation
from participant import partition
from participant.data import encode
from participant.worker import ParticipantWorker, WorkerConfig
from tests.bank_users import shared_bank_urls
from tests.helpers import AMQP_URL, REDIS_URL, forget_task

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend", ["embedded", pytest.param("real", marks=pytest.mark.real)])
async def test_german_credit_async_reaches_the_centralized_auc(backend: str) -> None:
    real = backend == "real"
    result = await run_simulation(
        SimulationConfig(
            participants=5,
            versions=600,
            seconds=90,
            amqp_url=AMQP_URL if real else None,
            bank_urls=shared_bank_urls(5) if real else None,
            redis_url=REDIS_URL if real else None,
        )
    )
    if real:  # the run leaves its task on the servers, as a user's would: clean up ours
        await forget_task(result.task, tuple(result.participants))
    # It ran until done: the validation AUC stopped improving (or the version cap).
    assert result.stopped_by in ("plateau", "versions"), result.stopped_by
    assert result.final_auc >= result.centralized_auc - 0.02, result
    assert result.final_auc > result.local_only_auc_mean, result
    assert result.updates_accepted == result.versions  # FedAsync: one update per version
    assert len(result.local_only_auc) == 5


def _synthetic_csv(path: Path, rows: int = 1500, seed: int = 3) -> None:
    """A credit-like table with a yes/no target, numeric and categorical columns, gaps."""
    rng = np.random.default_rng(seed)
    income = rng.lognormal(10, 0.5, rows)
    debt = rng.uniform(0, 1, rows)
    age = rng.integers(18, 80, rows).astype(float)
    region = rng.choice(["north", "south", "east", "west"], rows)
    logit = (
        -2.0
        + 3.0 * debt
        - 0.8 * (np.log(income) - 10)
        + 0.6 * (region == "south")
        - 0.01 * (age - 45)
    )
    default = rng.uniform(size=rows) < 1 / (1 + np.exp(-logit))
    age[rng.uniform(size=rows) < 0.05] = np.nan  # missing cells
    pd.DataFrame(
        {
            "income": income.round(2),
            "debt_ratio": debt.round(4),
            "age": age,
            "region": region,
            "defaulted": np.where(default, "yes", "no"),
        }
    ).to_csv(path, index=False)


async def test_another_csv_with_a_named_positive_class(tmp_path: Path) -> None:
    data = tmp_path / "loans.csv"
    _synthetic_csv(data)
    result = await run_simulation(
        SimulationConfig(
            data=data,
            target="defaulted",
            positive="yes",
            participants=5,
            versions=600,
            seconds=90,
        )
    )
    assert result.final_auc >= result.centralized_auc - 0.02, result
    assert result.final_auc > result.local_only_auc_mean, result


async def test_a_ten_times_slower_bank_does_not_hold_versions_back() -> None:
    result = await run_simulation(
        SimulationConfig(
            participants=5,
            speeds=(1, 1, 1, 1, 10),
            base_delay_s=0.05,
            versions=80,
            patience=0,
            seconds=60,
        )
    )
    published = {name: p["updates_published"] for name, p in result.participants.items()}
    slow = published.pop("bank-05")
    # Versions came at the fast banks' pace: each fast bank contributed several times
    # as many updates as the straggler, and every accepted update made a version.
    assert result.versions == 80
    assert min(published.values()) >= 3 * max(slow, 1), published
    assert result.updates_accepted == result.versions


async def test_a_bank_whose_updates_are_all_refused_is_flagged_not_dropped() -> None:
    result = await run_simulation(
        SimulationConfig(
            participants=5,
            speeds=(1, 1, 1, 1, 10),
            base_delay_s=0.05,
            versions=100,
            patience=0,
            seconds=60,
            spec_overrides={"async": {"max_staleness": 3, "staleness_unit": "versions"}},
        )
    )
    slow = result.participants["bank-05"]
    refused = sum(slow["updates_refused"].values())
    assert refused >= 5 and set(slow["updates_refused"]) == {"too_stale"}, slow
    assert slow["flagged"] is True
    flagged = [n for n, p in result.participants.items() if p["flagged"]]
    assert "bank-05" in flagged
    for name in flagged:  # under load an ordinary bank may also go stale 5 times in a row
        assert result.participants[name]["updates_refused"].get("too_stale", 0) >= 5, name
    assert slow["flagged_why"] and "too_stale" in slow["flagged_why"]
    for name, p in result.participants.items():  # every bank's updates are accounted for
        assert (
            p["updates_accepted"] + sum(p["updates_refused"].values()) <= p["updates_published"]
        ), name
    # The refusals are in the report's events, version by version, for the bank refused.
    from_events = sum(e["refused"].get("bank-05", 0) for e in result.events)
    assert 0 < from_events <= refused
    assert [e["version"] for e in result.events] == list(range(1, result.versions + 1))
    # Its data reached the model far less than its share of the rows.
    assert slow["weight_share"] < slow["data_share"] / 2, slow
    shares = [p["weight_share"] for p in result.participants.values()]
    assert sum(shares) == pytest.approx(1.0)


async def test_late_and_restarted_participants_pick_up_the_head() -> None:
    prep = prepare(SimulationConfig(participants=3))
    spec = prep.spec
    broker = MemoryBroker()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    service = AggregatorService(
        spec, store, MemoryTransport(broker, "fedq-aggregator"), ServiceConfig()
    )
    agg_stop = asyncio.Event()
    agg = asyncio.create_task(service.run(agg_stop))

    def worker(name: str, seed: int = 0) -> ParticipantWorker:
        cfg = WorkerConfig(participant=name, seed=seed, delay_s=0.01, wait_for_model_s=0.5)
        return ParticipantWorker(spec, cfg, MemoryTransport(broker, name), prep.shards[name])

    async def until(version: int) -> None:
        async with asyncio.timeout(30):
            while service.head_version < version:
                await asyncio.sleep(0.01)

    stops = {n: asyncio.Event() for n in ("bank-01", "bank-02", "bank-03")}
    first = worker("bank-01")
    early = [
        asyncio.create_task(first.run(stops["bank-01"])),
        asyncio.create_task(worker("bank-02").run(stops["bank-02"])),
    ]
    await until(10)

    # A participant that starts late begins from the current head, not version 0.
    head_at_join = service.head_version
    late = worker("bank-03")
    late_task = asyncio.create_task(late.run(stops["bank-03"]))
    # bank-01 restarts: stop it, start a new worker for the same bank.
    stops["bank-01"].set()
    await early[0]
    head_at_restart = service.head_version
    stops["bank-01"] = asyncio.Event()
    restarted = worker("bank-01", seed=7)
    restarted_task = asyncio.create_task(restarted.run(stops["bank-01"]))
    await until(head_at_restart + 15)
    for ev in stops.values():
        ev.set()
    await asyncio.gather(early[1], late_task, restarted_task)
    agg_stop.set()
    await agg

    assert late.stats.first_version >= head_at_join >= 10
    assert restarted.stats.first_version >= head_at_restart
    assert late.stats.published > 0
    assert restarted.stats.published > 0
    # Their updates were accepted into versions, based on heads at least as recent as
    # the moment each joined (the old bank-01 worker's last updates may land later).
    mine = {"bank-01": set(restarted.stats.published_ids), "bank-03": set(late.stats.published_ids)}
    bases: dict[str, list[int]] = {"bank-01": [], "bank-03": []}
    for v in range(head_at_join + 1, service.head_version + 1):
        for e in (await store.get_version(spec.task_id, v)).lineage:
            if e.update_id in mine.get(e.participant, set()):
                bases[e.participant].append(e.base_version)
    assert bases["bank-03"]
    assert bases["bank-01"]
    assert min(bases["bank-01"]) >= head_at_restart
    assert min(bases["bank-03"]) >= head_at_join


def test_cli_writes_report_and_plot(tmp_path: Path) -> None:
    report, plot = tmp_path / "r.json", tmp_path / "p.png"
    result = CliRunner().invoke(
        main,
        [
            "--log-level",
            "warning",
            "simulate",
            "--participants",
            "3",
            "--versions",
            "20",
            "--patience",
            "0",
            "--report",
            str(report),
            "--plot",
            str(plot),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    for key in (
        "task",
        "mode",
        "final_auc",
        "centralized_auc",
        "local_only_auc",
        "local_only_auc_mean",
        "versions",
        "updates_accepted",
        "updates_refused",
        "wall_seconds",
        "settings",
        "initial_auc",
        "target_auc",
        "events",
        "final_risk",
        "centralized_risk",
        "centralized_how",
    ):
        assert key in doc, key
    assert doc["versions"] == 20
    assert doc["stopped_by"] == "versions"
    assert doc["centralized_how"]["method"] == "lbfgs"
    for risk in (doc["final_risk"], doc["centralized_risk"]):
        assert {"auc", "pr_auc", "log_loss", "brier", "ks", "calibration"} <= set(risk)
        assert risk["alert_rate"] == 0.05
    bank = doc["participants"]["bank-01"]
    for key in ("rows", "positive_rate", "speed", "updates_published", "updates_accepted"):
        assert key in bank, key
    for key in ("updates_refused", "flagged", "weight_share", "data_share", "own_customers"):
        assert key in bank, key
    assert "local_only_pooled_auc" in bank
    assert "own AUC" in " ".join(result.output.split())
    assert doc["settings"]["participants"] == 3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "centralized" in result.output


def test_cli_reports_bad_input_clearly(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("a,b,t\n1,2,x\n3,4,y\n5,6,z\n")
    result = CliRunner().invoke(main, ["simulate", "--data", str(data), "--target", "t"])
    assert result.exit_code == 2
    assert "error:" in result.output
    result = CliRunner().invoke(
        main, ["simulate", "--data", str(tmp_path / "missing.csv"), "--target", "t"]
    )
    assert result.exit_code == 2


def test_each_simulated_bank_declares_the_rows_it_holds() -> None:
    prep = prepare(SimulationConfig(participants=4))
    assert prep.spec.declared_samples == {n: len(s) for n, s in prep.shards.items()}
    assert all(prep.spec.sample_bound(n) == len(s) for n, s in prep.shards.items())


def test_a_run_says_which_budget_stopped_it_and_whether_auc_was_still_rising() -> None:
    from fedq.simulate import _still_rising, _stopped_by

    flat = [(float(v), v, 0.78) for v in range(1, 101)]
    rising = [(float(v), v, 0.6 + 0.002 * v) for v in range(1, 101)]
    assert _still_rising(flat) == []
    (warning,) = _still_rising(rising)
    assert "still improving" in warning and "+0.040 over the last 20 versions" in warning
    assert _still_rising(rising[:5]) == []  # too short to tell
    config = SimulationConfig(versions=50, seconds=10.0)
    spec = prepare(replace(config, participants=20)).spec
    # Patience counts rounds of the federation: 20 versions per round for FedAsync with
    # 20 banks, ceil(20 / 3) for FedBuff with buffers of 3, one per sync round.
    assert config.patience_versions(spec) == 10 * 20
    fedbuff = spec.model_copy(
        update={"async_": spec.async_.model_copy(update={"strategy": "fedbuff"})}
    )
    assert config.patience_versions(fedbuff) == 10 * 7
    assert config.patience_versions(spec.model_copy(update={"mode": "sync"})) == 10
    assert replace(config, patience=0).patience_versions(spec) == 0
    assert _stopped_by(50, config, 3.0) == "versions"
    assert _stopped_by(20, config, 10.5) == "seconds"
    assert _stopped_by(20, config, 3.0) == "other"


async def test_the_report_names_the_budget_that_ended_the_run() -> None:
    result = await run_simulation(
        SimulationConfig(participants=3, versions=12, patience=0, seconds=60)
    )
    assert result.stopped_by == "versions"
    assert result.to_json()["stopped_by"] == "versions"


async def test_a_plateau_of_the_validation_auc_stops_the_run_and_is_reported() -> None:
    # No gain can exceed min_delta 1.0: the run stops after exactly `patience` rounds,
    # 3 versions each (FedAsync, 3 banks).
    result = await run_simulation(
        SimulationConfig(participants=3, versions=500, patience=4, min_delta=1.0, seconds=60)
    )
    assert result.stopped_by == "plateau"
    assert result.versions == 4 * 3
    doc = result.to_json()
    assert doc["stopped_by"] == "plateau"
    # Measured on the validation rows, not the test set: both are in the curve.
    assert all(p["val_auc"] is not None for p in doc["curve"])
    assert [p["auc"] for p in doc["curve"]] != [p["val_auc"] for p in doc["curve"]]


def test_the_plateau_counts_versions_without_a_validation_gain() -> None:
    from fedq.simulate import _Watch

    config = SimulationConfig(participants=1, patience=3, min_delta=0.01, versions=100)
    watch = _Watch(config, 0.0, per_round=1)
    watch.best_val = 0.5
    for val, since in ((0.505, 1), (0.52, 0), (0.525, 1), (0.529, 2), (0.531, 0), (None, 0)):
        watch.val_curve.append(val)
        watch._plateau(val)
        assert watch.since_best == since, (val, watch.since_best)
    # Async with 2 banks: the mean of the last 2 versions, so one lucky version is no gain.
    watch = _Watch(replace(config, participants=2, min_delta=0.02), 0.0, per_round=2)
    watch.start({}, 0.7, 0.5)
    for val, since in ((0.535, 1), (0.49, 2), (0.56, 0), (0.57, 0)):
        watch.val_curve.append(val)
        watch._plateau(val)
        assert watch.since_best == since, (val, watch.since_best)


def test_time_to_target_is_measured_on_the_lift_over_the_initial_model() -> None:
    from fedq.simulate import _target

    config = SimulationConfig(target_fraction=0.9)
    target, note = _target(config, 0.6, 0.8)
    assert target == pytest.approx(0.78) and note is None
    target, note = _target(config, 0.7, 0.69)
    assert target is None
    assert note is not None and "does not beat the initial model" in note


def _bank_csv(path: Path, rows: int = 1200) -> pd.DataFrame:
    """A table whose `row_id` column says which file row an encoded row came from."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(rows, 3))
    y = (x[:, 0] + rng.normal(size=rows) > 0.8).astype(int)
    df = pd.DataFrame(x, columns=["a", "b", "c"])
    df["row_id"] = np.arange(rows, dtype=float)
    df["y"] = y
    df.to_csv(path, index=False)
    return df


def _row_ids(prep: Prepared, x: torch.Tensor) -> np.ndarray:
    feature = next(f for f in prep.spec.features if f.name == "row_id")
    assert isinstance(feature, NumericFeature)
    col = [f.name for f in prep.spec.features].index("row_id")
    return np.rint(x[:, col].numpy().astype(np.float64) * feature.std + feature.mean).astype(int)


def test_each_bank_is_scored_on_its_own_held_out_customers(tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    from fedq.simulate import _score_all, fit_baselines

    csv = tmp_path / "banks.csv"
    df = _bank_csv(csv)
    config = SimulationConfig(
        data=csv,
        target="y",
        positive=None,
        participants=3,
        partition="sizes",
        shares=(60, 30, 10),
    )
    prep = prepare(config)
    parts = partition.by_shares(df["y"].to_numpy(), (60, 30, 10), seed=0)
    test_ids = _row_ids(prep, prep.x_test)
    assert sorted(test_ids) == sorted(set(test_ids))  # no row twice
    for name, rows in zip(prep.spec.participants, parts, strict=True):
        held = set(test_ids[prep.bank_test[name]])
        trained = set(prep.shards[name]["row_id"].astype(int))
        assert held.isdisjoint(trained)
        assert held | trained == set(rows.tolist())  # exactly this bank's rows
        assert len(held) == pytest.approx(0.25 * len(rows), abs=1)
        assert df["y"].iloc[sorted(held)].mean() == pytest.approx(df["y"].mean(), abs=0.05)
    # The validation rows are the workers' own, never a test row.
    assert set(_row_ids(prep, prep.x_val)).isdisjoint(test_ids)

    base = fit_baselines(prep, config)
    model = build_task_model(prep.spec)
    params = model_tensors(model)
    params = {k: v + 0.3 for k, v in params.items()}  # some model, not a baseline
    scores = _score_all(prep.spec, prep, params, base, alert_rate=0.05)
    for name, rows in zip(prep.spec.participants, parts, strict=True):
        mine = df.iloc[sorted(set(rows.tolist()) - set(prep.shards[name]["row_id"].astype(int)))]
        x, y = encode(mine.reset_index(drop=True), prep.spec)
        expected_global = roc_auc_score(y.numpy(), predict_proba(prep.spec, params, x).numpy())
        expected_local = roc_auc_score(
            y.numpy(), predict_proba(prep.spec, base.local[name], x).numpy()
        )
        own = scores.own[name]
        assert own["n"] == len(mine) and own["skipped"] is None
        assert own["global_auc"] == pytest.approx(expected_global)
        assert own["local_only_auc"] == pytest.approx(expected_local)
    assert scores.final_risk["n"] == len(prep.y_test)


def test_a_bank_without_both_classes_in_its_held_out_customers_is_skipped(tmp_path: Path) -> None:
    from fedq.simulate import Baselines, _score_all

    csv = tmp_path / "banks.csv"
    _bank_csv(csv)
    prep = prepare(SimulationConfig(data=csv, target="y", positive=None, participants=3))
    rows = prep.bank_test["bank-02"]
    prep.y_test[rows] = 0.0  # bank-02's held-out customers: no positive left
    params = model_tensors(build_task_model(prep.spec))
    base = Baselines(params, dict.fromkeys(prep.shards, params), {}, 0.0)
    scores = _score_all(prep.spec, prep, params, base, alert_rate=0.05)
    assert scores.own["bank-02"]["skipped"] == (
        f"no positive customer among its {rows.stop - rows.start} held-out customers"
    )
    assert "global_auc" not in scores.own["bank-02"]
    assert scores.own["bank-01"]["skipped"] is None
    assert any(s.startswith("bank-02: own-customer AUC skipped") for s in scores.skipped)


async def test_seeds_repeat_the_whole_run_and_report_the_spread() -> None:
    from fedq.simulate import run_seeds

    runs = await run_seeds(
        SimulationConfig(participants=3, versions=4, patience=0, seconds=30, seeds=2, seed=5)
    )
    assert runs.seeds == [5, 6]
    doc = runs.to_json()
    assert len(doc["runs"]) == 2
    assert [r["seed"] for r in doc["runs"]] == [5, 6]
    finals = [r["final_auc"] for r in doc["runs"]]
    s = doc["spread"]["async"]["final_auc"]
    assert s["n"] == 2
    assert s["mean"] == pytest.approx(np.mean(finals))
    assert s["std"] == pytest.approx(np.std(finals, ddof=1))
    assert (s["min"], s["max"]) == (min(finals), max(finals))
    for key in ("final_pr_auc", "centralized_auc", "gap", "refused_fraction"):
        assert doc["spread"]["async"][key]["n"] == 2, key
    bank = doc["spread"]["async"]["participants"]["bank-01"]
    assert bank["own_global_auc"]["n"] == 2
    # Different split seeds: different held-out customers, different yardsticks.
    assert doc["runs"][0]["centralized_auc"] != doc["runs"][1]["centralized_auc"]


def test_mode_both_trains_the_baselines_once_per_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedq.baselines

    calls: list[int] = []
    real = fedq.baselines.fit_all

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(fedq.baselines, "fit_all", counting)
    report = tmp_path / "r.json"
    args = ["simulate", "--participants", "2", "--mode", "both", "--versions", "3"]
    args += ["--report", str(report)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert calls == [0]
    doc = json.loads(report.read_text())
    assert doc["modes"]["async"]["centralized_auc"] == doc["modes"]["sync"]["centralized_auc"]
    calls.clear()
    result = CliRunner().invoke(main, [*args, "--seeds", "2"])
    assert result.exit_code == 0, result.output
    assert calls == [0, 1]  # once per split seed, not per mode
    doc = json.loads(report.read_text())
    assert {"async", "sync"} == set(doc["spread"]) and len(doc["runs"]) == 2
