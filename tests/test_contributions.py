"""Contributions: leave-one-out and Shapley values of each bank over replayed coalitions.

The estimator is checked on games whose values are known; the value function on
real recorded chains (embedded sync FedAvg federations of the German credit data,
logistic regression, 8 rounds): a bank whose labels are shuffled is valued lowest,
a bank whose data is duplicated into two banks has its share split between them,
and the values sum to the full gain. Then ``fedq audit contributions``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pandas as pd
import pytest
import redis.asyncio as aioredis
import torch
from click.testing import CliRunner

import aggregator.store
from aggregator.audit.contributions import (
    CAVEAT,
    ContributionError,
    ContributionReport,
    Holdout,
    Metric,
    contributions,
    replay_contributions,
)
from aggregator.audit.replay import index_updates, replay
from aggregator.service import AggregatorService
from aggregator.store import RedisModelStore
from aggregator.store.keys import Keys
from common.evaluation import evaluate
from common.models import build_task_model, model_tensors
from common.spec import SyncSettings, TaskSpec
from common.transport.amqp import AmqpTransport
from common.transport.memory import MemoryBroker, MemoryTransport
from fedq.cli import main
from fedq.simulate import SimulationConfig, bundled_data, prepare, run_simulation
from participant.data import encode
from participant.worker import ParticipantWorker, WorkerConfig
from tests.bank_users import shared_bank_urls
from tests.helpers import AMQP_URL, REDIS_URL, forget_task

#: Rounds each federation runs (its head may pass them: contributions value version 8).
VERSIONS = 8
slow = pytest.mark.slow


# --------------------------------------------------------------------------- the estimator


def _counting(
    v: Callable[[frozenset[str]], float],
) -> tuple[Callable[[frozenset[str]], float], list[frozenset[str]]]:
    calls: list[frozenset[str]] = []

    def value_of(s: frozenset[str]) -> float:
        calls.append(s)
        return v(s)

    return value_of, calls


def test_an_additive_game_gives_each_bank_its_own_worth() -> None:
    worth = {"a": 0.3, "b": 0.1, "c": -0.05, "d": 0.0}
    value_of, calls = _counting(lambda s: sum(worth[b] for b in s))
    exact = contributions(value_of, list(worth), exact=True)
    assert exact.banks == ("a", "b", "c", "d") and exact.permutations == math.factorial(4)
    for b, w in worth.items():
        assert exact.shapley[b] == pytest.approx(w, abs=1e-12)
        assert exact.leave_one_out[b] == pytest.approx(w, abs=1e-12)
        assert exact.stderr[b] == 0.0
    # Memoised: every coalition valued once, all 2^4 of them.
    assert len(calls) == len(set(calls)) == exact.evaluations == 16
    # Sampled orders: every marginal gain is the bank's worth, so no spread at all.
    sampled = contributions(lambda s: sum(worth[b] for b in s), list(worth), truncation=0.0)
    assert sampled.permutations == 50 and sampled.truncated == 0
    for b, w in worth.items():
        assert sampled.shapley[b] == pytest.approx(w, abs=1e-12)
        assert sampled.stderr[b] == pytest.approx(0.0, abs=1e-12)


def test_shapley_splits_what_leave_one_out_misses() -> None:
    # Any two of three banks make the model; one alone does not. No bank is missed
    # when it leaves (leave-one-out 0), yet together they made all of it.
    exact = contributions(lambda s: float(len(s) >= 2), ["x", "y", "z"], exact=True)
    assert exact.leave_one_out == {"x": 0.0, "y": 0.0, "z": 0.0}
    assert all(exact.shapley[b] == pytest.approx(1 / 3) for b in "xyz")
    assert exact.efficiency_gap == pytest.approx(0.0, abs=1e-12)


def _random_game(n: int, seed: int) -> tuple[list[str], Callable[[frozenset[str]], float]]:
    """A monotone-ish game with interactions: the value of each coalition fixed at random."""
    banks = [f"bank-{i}" for i in range(n)]
    rng = np.random.default_rng(seed)
    table = {
        frozenset(c): float(len(c)) * 0.1 + float(rng.normal(0.0, 0.05))
        for k in range(n + 1)
        for c in itertools.combinations(banks, k)
    }
    table[frozenset()] = 0.0
    return banks, table.__getitem__


def test_sampled_values_are_reproducible_and_within_their_standard_error() -> None:
    banks, v = _random_game(5, seed=3)
    exact = contributions(v, banks, exact=True)
    sampled = contributions(v, banks, permutations=400, truncation=0.0, seed=11)
    again = contributions(v, list(reversed(banks)), permutations=400, truncation=0.0, seed=11)
    other = contributions(v, banks, permutations=400, truncation=0.0, seed=12)
    assert sampled.shapley == again.shapley and sampled.stderr == again.stderr
    assert sampled.shapley != other.shapley
    for b in banks:
        assert sampled.stderr[b] > 0.0
        assert abs(sampled.shapley[b] - exact.shapley[b]) <= 4 * sampled.stderr[b], b
    # Untruncated, each order's marginal gains telescope to the full gain.
    assert sampled.efficiency_gap == pytest.approx(0.0, abs=1e-12)
    assert exact.efficiency_gap == pytest.approx(0.0, abs=1e-12)


def test_truncation_bounds_the_gap_to_the_full_gain() -> None:
    banks, v = _random_game(6, seed=5)
    # Close to the full value early: v(S) rises by 0.1 per bank, the first 4 banks
    # are within 0.25 of v(N).
    report = contributions(v, banks, permutations=100, truncation=0.25, seed=0)
    assert report.truncated > 0
    assert report.efficiency_bound == 0.25
    assert 0.0 < abs(report.efficiency_gap) <= report.truncation


def test_the_estimator_refuses_what_it_cannot_do() -> None:
    def zero(s: frozenset[str]) -> float:
        return 0.0

    with pytest.raises(ValueError, match="at most 6 banks, not 7"):
        contributions(zero, [f"b{i}" for i in range(7)], exact=True)
    with pytest.raises(ValueError, match="no bank"):
        contributions(zero, [])
    with pytest.raises(ValueError, match="named twice"):
        contributions(zero, ["a", "a"])
    with pytest.raises(ValueError, match="at least 2 permutations"):
        contributions(zero, ["a", "b"], permutations=1)
    with pytest.raises(ValueError, match="truncation"):
        contributions(zero, ["a", "b"], truncation=-1.0)


# --------------------------------------------------------------------------- recorded chains


@dataclass(frozen=True)
class Chain:
    """A recorded federation: its store (on a fakeredis server) and its audit stream."""

    server: fakeredis.FakeServer
    spec: TaskSpec
    bodies: list[bytes]

    @property
    def task(self) -> str:
        return self.spec.task_id

    def values(
        self, holdout: pd.DataFrame, metric: Metric = "auc", **kw: Any
    ) -> ContributionReport:
        """Contributions to version :data:`VERSIONS`, ``metric`` on ``holdout``."""
        x, y = encode(holdout, self.spec)

        async def run() -> ContributionReport:
            store = RedisModelStore(fakeredis.FakeAsyncRedis(server=self.server))
            try:
                return await replay_contributions(
                    store,
                    index_updates(self.bodies),
                    self.task,
                    Holdout(self.spec, x, y, metric),
                    to_version=VERSIONS,
                    **kw,
                )
            finally:
                await store.close()

        return asyncio.run(run())


@dataclass(frozen=True)
class Recorded:
    holdout: pd.DataFrame
    #: bank-a and bank-b hold real rows, bank-n the same kind of rows with shuffled labels.
    noisy: Chain
    #: solo holds real rows, noise-1 and noise-2 60 rows each with shuffled labels.
    solo: Chain
    #: dup-1 and dup-2 both hold solo's rows; noise-1 and noise-2 as in ``solo``.
    dup: Chain


def _shuffled(df: pd.DataFrame, target: str, seed: int) -> pd.DataFrame:
    """The same rows, their labels permuted at random: pure label noise."""
    out = df.copy()
    out[target] = np.random.default_rng(seed).permutation(out[target].to_numpy())
    return out


async def _federation(base: TaskSpec, label: str, shards: Mapping[str, pd.DataFrame]) -> Chain:
    """Sync FedAvg rounds (every bank in every round) of ``shards`` to :data:`VERSIONS`."""
    doc = base.model_dump(mode="json", by_alias=True)
    doc.update(
        task_id=f"{base.task_id}-{label}",
        mode="sync",
        sync=SyncSettings().model_dump(mode="json"),
        participants=list(shards),
        declared_samples={n: len(s) for n, s in shards.items()},
    )
    spec = TaskSpec.parse(doc)
    server = fakeredis.FakeServer()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=server))
    broker = MemoryBroker()
    agg = MemoryTransport(broker, "fedq-aggregator")
    service = AggregatorService(spec, store, agg)
    stop, bank_stop = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    workers = [
        asyncio.create_task(
            ParticipantWorker(
                spec,
                WorkerConfig(participant=n, seed=i, wait_for_model_s=0.2),
                MemoryTransport(broker, n),
                shards[n],
            ).run(bank_stop)
        )
        for i, n in enumerate(spec.participants)
    ]
    async with asyncio.timeout(60):
        while service.head_version < VERSIONS:
            await asyncio.sleep(0.01)
    bank_stop.set()
    await asyncio.gather(*workers)
    stop.set()
    await running
    bodies = [b async for b in agg.read_audit(spec.task_id)]
    await store.close()
    return Chain(server, spec, bodies)


@pytest.fixture(scope="module")
def recorded() -> Recorded:
    """The three federations of :func:`record`, run once for the module."""
    return record()


def record() -> Recorded:
    """Three federations over one split of the German credit data: 250 holdout rows and
    three parts of 250 rows."""
    base = prepare(SimulationConfig(participants=3, seed=0)).spec  # schema and training
    target = base.target.name
    df = pd.read_csv(bundled_data())
    rows = np.random.default_rng(0).permutation(len(df))
    holdout, p1, p2, p3 = (
        df.iloc[rows[i : i + 250]].reset_index(drop=True) for i in range(0, 1000, 250)
    )
    # Small noise banks (60 rows) beside the duplicated one: see the duplication test.
    noise_1, noise_2 = _shuffled(p2.iloc[:60], target, 1), _shuffled(p3.iloc[:60], target, 2)

    async def build() -> Recorded:
        noisy = await _federation(
            base, "noisy", {"bank-a": p1, "bank-b": p2, "bank-n": _shuffled(p3, target, 3)}
        )
        solo = await _federation(base, "solo", {"solo": p1, "noise-1": noise_1, "noise-2": noise_2})
        dup = await _federation(
            base, "dup", {"dup-1": p1, "dup-2": p1, "noise-1": noise_1, "noise-2": noise_2}
        )
        return Recorded(holdout, noisy, solo, dup)

    return asyncio.run(build())


def _figures(report: ContributionReport) -> str:
    return ", ".join(
        f"{b}: loo {report.leave_one_out[b]:+.4f} shapley {report.shapley[b]:+.4f}"
        f"±{report.stderr[b]:.4f}"
        for b in report.banks
    )


@slow
def test_a_bank_of_pure_label_noise_is_valued_lowest(recorded: Recorded) -> None:
    report = recorded.noisy.values(recorded.holdout, exact=True)
    assert report.banks == ("bank-a", "bank-b", "bank-n")
    assert report.updates == {"bank-a": VERSIONS, "bank-b": VERSIONS, "bank-n": VERSIONS}
    assert report.gain > 0.2, _figures(report)  # the federation learned something
    assert min(report.shapley, key=report.shapley.__getitem__) == "bank-n", _figures(report)
    # Every coalition valued once: 2^3.
    assert report.evaluations == 8
    assert report.metric == ""  # the caller describes its metric


@slow
def test_duplicating_a_bank_splits_its_share_between_the_copies(recorded: Recorded) -> None:
    solo = recorded.solo.values(recorded.holdout, exact=True)
    dup = recorded.dup.values(recorded.holdout, exact=True)
    figures = (
        f"solo: {_figures(solo)} (gain {solo.gain:.4f}); dup: {_figures(dup)} (gain {dup.gain:.4f})"
    )
    assert solo.shapley["solo"] > 0.2, figures  # the real data made the model
    # Shapley's symmetry and efficiency split a value between exact copies when a copy
    # adds nothing to the other. Here each copy trained on its own batch orders, and
    # FedAvg weighs the copied rows twice (500 of 620 rows instead of 250 of 370), which
    # changes what the others add too: the split is about half, not exactly. (With the
    # noise banks as large as the copied one, each copy got about 0.64 of the solo
    # bank's value: duplicating then pays.) Exact values: no sampling error.
    half = solo.shapley["solo"] / 2
    for copy in ("dup-1", "dup-2"):
        assert dup.shapley[copy] == pytest.approx(half, rel=0.3), figures
    both = dup.shapley["dup-1"] + dup.shapley["dup-2"]
    assert both == pytest.approx(solo.shapley["solo"], rel=0.15), figures
    # Sampled orders say the same within their reported error.
    sampled = recorded.dup.values(recorded.holdout, permutations=200, seed=0)
    for b in dup.banks:
        assert abs(sampled.shapley[b] - dup.shapley[b]) <= 4 * sampled.stderr[b] + 1e-9, b


@slow
def test_values_sum_to_the_full_gain_and_value_the_replayed_models(
    recorded: Recorded,
) -> None:
    chain = recorded.noisy
    exact = chain.values(recorded.holdout, exact=True)
    assert exact.exact and exact.permutations == 6 and exact.truncated == 0
    assert exact.efficiency_bound == 0.0
    assert abs(exact.efficiency_gap) <= 1e-12, (exact.shapley_sum, exact.gain)
    # v(N) is the real model of version 8, v(empty) version 0, and each leave-one-out
    # the model of `fedq replay --exclude` (AUC on the holdout).
    x, y = encode(recorded.holdout, chain.spec)

    async def models() -> tuple[float, float, float, dict[str, float]]:
        store = RedisModelStore(fakeredis.FakeAsyncRedis(server=chain.server))
        try:
            real = (await store.get_params(chain.task, VERSIONS)).tensors
            start = (await store.get_params(chain.task, 0)).tensors
            updates = index_updates(chain.bodies)
            without = {}
            for b in exact.banks:
                r = await replay(store, updates, chain.task, to_version=VERSIONS, exclude=b)
                without[b] = evaluate(chain.spec, r.params, x, y)["auc"]
            scores = evaluate(chain.spec, real, x, y)
            return scores["auc"], scores["loss"], evaluate(chain.spec, start, x, y)["auc"], without
        finally:
            await store.close()

    real, real_loss, start, without = asyncio.run(models())
    assert exact.value_all == real and exact.value_empty == start
    for b in exact.banks:
        assert exact.leave_one_out[b] == pytest.approx(real - without[b], abs=1e-12)
    # TMC with a coarse truncation: some gains are truncated, the gap stays within it.
    sampled = chain.values(recorded.holdout, permutations=60, truncation=0.05, seed=1)
    assert not sampled.exact and sampled.permutations == 60 and sampled.truncated > 0
    assert abs(sampled.efficiency_gap) <= sampled.truncation
    # Without truncation the sampled values sum to the gain (every order telescopes).
    plain = chain.values(recorded.holdout, permutations=60, truncation=0.0, seed=1)
    assert plain.truncated == 0 and abs(plain.efficiency_gap) <= 1e-12
    # The loss metric: the negative log loss (higher is better), summing the same way.
    loss = chain.values(recorded.holdout, "loss", exact=True)
    assert loss.value_all == -real_loss and loss.value_all > loss.value_empty
    assert abs(loss.efficiency_gap) <= 1e-12


def test_holdout_states_its_metric_and_refuses_one_class() -> None:
    spec = prepare(SimulationConfig(participants=3, seed=0)).spec
    df = pd.read_csv(bundled_data()).iloc[:200]
    x, y = encode(df, spec)
    auc = Holdout(spec, x, y)
    assert auc.description == f"ROC AUC on 200 holdout rows ({int(y.sum())} positives)"
    loss = Holdout(spec, x, y, "loss")
    assert "negative log loss" in loss.description and "higher is better" in loss.description
    params = model_tensors(build_task_model(spec))
    assert loss(params) == -evaluate(spec, params, x, y)["loss"]
    assert auc(params) == evaluate(spec, params, x, y)["auc"]
    with pytest.raises(ContributionError, match=r"one class only .* AUC needs both"):
        Holdout(spec, x[y == 0], torch.zeros(int((y == 0).sum())))


# --------------------------------------------------------------------------- the command


class _Stream:
    """A stand-in for the broker: the command reads the audit stream from it."""

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies = bodies

    async def read_audit(self, task: str) -> AsyncIterator[bytes]:
        for body in self.bodies:
            yield body

    async def close(self) -> None: ...


URLS = ["--amqp-url", "amqp://x/", "--redis-url", "redis://x"]


def _serve(monkeypatch: pytest.MonkeyPatch, chain: Chain) -> None:
    async def connect(url: str, **kw: Any) -> _Stream:
        return _Stream(chain.bodies)

    monkeypatch.setattr(
        aggregator.store, "connect_redis", lambda _: fakeredis.FakeAsyncRedis(server=chain.server)
    )
    monkeypatch.setattr(AmqpTransport, "connect", connect)


def _contributions(*args: str) -> Any:
    return CliRunner().invoke(main, ["audit", "contributions", *args, *URLS])


@slow
def test_cli_gives_the_table_and_the_json(
    recorded: Recorded, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    chain = recorded.noisy
    _serve(monkeypatch, chain)
    holdout = tmp_path / "holdout.csv"
    recorded.holdout.to_csv(holdout, index=False)
    task = ["--task", chain.task, "--to-version", str(VERSIONS), "--data", str(holdout)]
    result = _contributions(*task, "--exact", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    exact = chain.values(recorded.holdout, exact=True)
    positives = int((recorded.holdout[chain.spec.target.name] == "bad").sum())
    assert doc["metric"] == f"ROC AUC on 250 holdout rows ({positives} positives)"
    assert doc["task"] == chain.task and doc["to_version"] == VERSIONS
    assert doc["estimator"] == {
        "method": "exact",
        "permutations": 6,
        "truncation": 0.0,
        "seed": 0,
        "truncated_marginals": 0,
        "coalitions_replayed": 8,
    }
    assert [b["bank"] for b in doc["banks"]] == ["bank-a", "bank-b", "bank-n"]
    for row in doc["banks"]:
        assert set(row) == {"bank", "updates", "leave_one_out", "shapley", "stderr"}
        assert row["shapley"] == exact.shapley[row["bank"]]
        assert row["leave_one_out"] == exact.leave_one_out[row["bank"]]
        assert row["stderr"] == 0.0 and row["updates"] == VERSIONS
    assert doc["value_all"] == exact.value_all and doc["gain"] == exact.gain
    assert set(doc["efficiency"]) == {"shapley_sum", "gain", "gap", "bound"}
    assert doc["caveat"] == CAVEAT and doc["notes"] == []

    # Sampled, as text: the table, the estimator, the sum check, the caveat.
    text = _contributions(*task, "--permutations", "20", "--seed", "4", "--metric", "loss")
    assert text.exit_code == 0, text.output
    out = " ".join(text.output.split())
    assert "negative log loss" in out and "bank-n" in out
    assert "truncated Monte Carlo Shapley: 20 permutations, seed 4, truncation 0.001" in out
    assert "sum check: Shapley values sum to" in out
    assert "caveat: each coalition's model is replayed from the recorded updates" in out


def test_cli_needs_a_holdout_set() -> None:
    result = CliRunner().invoke(main, ["audit", "contributions", "--task", "t", *URLS])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    line = " ".join(result.stderr.split())
    assert line.startswith("error: a holdout set is needed")
    assert "--data holdout.csv" in line and len(result.stderr.strip().splitlines()) == 1


@slow
def test_cli_refuses_a_chain_made_by_secure_aggregation_as_replay_does(
    recorded: Recorded, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    chain = recorded.noisy
    _serve(monkeypatch, chain)
    holdout = tmp_path / "holdout.csv"
    recorded.holdout.to_csv(holdout, index=False)
    client = fakeredis.FakeRedis(server=chain.server)
    key = Keys().meta(chain.task, 3)
    original = client.get(key)
    assert original is not None
    meta = json.loads(original)
    # Version 3 as if made by secure aggregation (its record names a cohort): no
    # coalition without one of its survivors can be replayed.
    meta["info"]["secagg"] = {"cohort": 2}
    client.set(key, json.dumps(meta))
    try:
        refused = _contributions("--task", chain.task, "--data", str(holdout))
        replayed = CliRunner().invoke(
            main, ["replay", "--task", chain.task, "--exclude", "bank-a", *URLS]
        )
    finally:
        client.set(key, original)
        client.close()
    assert refused.exit_code == replayed.exit_code == 2, refused.output
    assert "Traceback" not in refused.output
    line = " ".join(refused.stderr.split())
    assert line.startswith("error: version 3 was made by secure aggregation")
    assert "the model without bank-a cannot be computed from the masked updates" in line
    assert line == " ".join(replayed.stderr.split())


@pytest.mark.real
async def test_cli_on_the_real_servers() -> None:
    banks = shared_bank_urls(3)
    result = await run_simulation(
        SimulationConfig(
            mode="sync",
            participants=3,
            versions=4,
            amqp_url=AMQP_URL,
            bank_urls=banks,
            redis_url=REDIS_URL,
            seconds=60,
        )
    )
    task = result.task
    store = RedisModelStore(aioredis.Redis.from_url(REDIS_URL))
    try:
        spec = await store.get_spec(task)
        version = result.versions
        # The bundled table as the holdout (its rows include the banks' own: this checks
        # the machinery on the real servers, not the values).
        x, y = encode(pd.read_csv(bundled_data()), spec)
        real = evaluate(spec, (await store.get_params(task, version)).tensors, x, y)["auc"]
        args = ["audit", "contributions", "--task", task, "--to-version", str(version)]
        args += ["--data", str(bundled_data()), "--exact", "--json"]
        args += ["--amqp-url", AMQP_URL, "--redis-url", REDIS_URL]
        cli = await asyncio.to_thread(CliRunner().invoke, main, args)
        assert cli.exit_code == 0, cli.output
        doc = json.loads(cli.stdout)
        assert [b["bank"] for b in doc["banks"]] == sorted(banks)
        assert all(b["updates"] == version for b in doc["banks"])
        assert doc["value_all"] == real
        assert doc["estimator"]["coalitions_replayed"] == 8
        assert abs(doc["efficiency"]["gap"]) <= 1e-12
    finally:
        await store.close()
        await forget_task(task, tuple(banks))
