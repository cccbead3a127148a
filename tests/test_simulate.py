"""`fedq simulate` end to end: embedded, and the same against the real RabbitMQ and Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import fakeredis
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore
from common.transport.memory import MemoryBroker, MemoryTransport
from fedq.cli import main
from fedq.simulate import SimulationConfig, prepare, run_simulation
from participant.worker import ParticipantWorker, WorkerConfig
from tests.helpers import AMQP_URL, REDIS_URL, forget_task

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend", ["embedded", pytest.param("real", marks=pytest.mark.real)])
async def test_german_credit_async_reaches_the_centralized_auc(backend: str) -> None:
    real = backend == "real"
    result = await run_simulation(
        SimulationConfig(
            participants=5,
            versions=200,
            seconds=90,
            amqp_url=AMQP_URL if real else None,
            redis_url=REDIS_URL if real else None,
        )
    )
    if real:  # the run leaves its task on the servers, as a user's would: clean up ours
        await forget_task(result.task, tuple(result.participants))
    assert result.versions == 200
    assert result.final_auc >= result.centralized_auc - 0.02, result
    assert result.final_auc > result.local_only_auc_mean, result
    assert result.updates_accepted == 200  # FedAsync: one update per version
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
            data=data, target="defaulted", positive="yes", participants=5, versions=200, seconds=90
        )
    )
    assert result.final_auc >= result.centralized_auc - 0.02, result
    assert result.final_auc > result.local_only_auc_mean, result


async def test_a_ten_times_slower_bank_does_not_hold_versions_back() -> None:
    result = await run_simulation(
        SimulationConfig(
            participants=5, speeds=(1, 1, 1, 1, 10), base_delay_s=0.05, versions=80, seconds=60
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
            seconds=60,
            spec_overrides={"async": {"max_staleness": 3}},
        )
    )
    slow = result.participants["bank-05"]
    refused = sum(slow["updates_refused"].values())
    assert refused >= 5 and set(slow["updates_refused"]) == {"too_stale"}, slow
    assert slow["flagged"] is True
    assert [n for n, p in result.participants.items() if p["flagged"]] == ["bank-05"]
    for name, p in result.participants.items():  # every bank's updates are accounted for
        assert (
            p["updates_accepted"] + sum(p["updates_refused"].values()) <= p["updates_published"]
        ), name


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
    ):
        assert key in doc, key
    assert doc["versions"] == 20
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
    assert _stopped_by(50, config, 3.0) == "versions"
    assert _stopped_by(20, config, 10.5) == "seconds"
    assert _stopped_by(20, config, 3.0) == "other"


async def test_the_report_names_the_budget_that_ended_the_run() -> None:
    result = await run_simulation(SimulationConfig(participants=3, versions=12, seconds=60))
    assert result.stopped_by == "versions"
    assert result.to_json()["stopped_by"] == "versions"
