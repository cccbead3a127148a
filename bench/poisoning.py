"""What hostile banks do to the model, and what the robustness options keep of it.

Quality under attack: embedded ``fedq simulate`` runs on German credit, 10 banks of
which the last 2 by name are hostile (20%), the logistic regression, over 5 split
seeds. Each condition (no attack, then each attack of fedq/simulate_attacks.py in
turn: scale x100, sign-flip x-10, huge finite values, label-flipped local training,
five copies of every update under fresh ids) runs twice on the same split and
baselines: with the plain aggregator (robustness off) and with the mode's one robust
configuration (:data:`ROBUST`), the same for every attack, as an operator who does not
know the attack would run it. Sync FedAvg rounds (every bank each round, 20 rounds)
and FedBuff (a buffer of 5, the same 200 updates: 40 versions); patience 0, so every
run stops at the same version cap. Sync runs every bank without a pause (a round
waits for every bank, so the pace changes nothing); FedBuff keeps ``fedq simulate``'s
pause of 0.1 s per local round (the pace decides which updates share a buffer).

A run whose model stops moving (with the plain aggregator, ``huge`` leaves a model
no honest bank can improve and, in sync rounds, a round that never closes) would run
to its time budget: every run of a seed gets :data:`STALL_FACTOR` times the wall time
of that seed's clean plain run (at least :data:`MIN_SECONDS`); ``stopped_by`` and the
versions reached say when a run ended early.

Scale: the same, sync rounds only, with 25 banks of which 5 are hostile.

Candidates (``--only candidates``, written to ``poisoning-candidates.json`` unless
``--out`` says otherwise, to keep the default run near 15 minutes): the other robust
configurations tried, on the first 2 seeds, beside the plain and the chosen runs of
the same seeds, for the record of why :data:`ROBUST` was chosen.

Contributions: ``fedq audit contributions``' core (aggregator/audit/contributions.py)
on recorded sync federations as tests/test_contributions.py builds them (German credit,
8 rounds, exact Shapley values): a bank of shuffled labels, one bank's rows held by two
banks, and a 5-bank federation whose last bank trains on flipped labels.

    .venv/bin/python bench/poisoning.py [--quick] [--seeds 5]
        [--only sync|fedbuff|scale|candidates|contributions]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _common import RESULTS, envelope, table, write_json

from aggregator.audit.contributions import ContributionReport, Holdout, replay_contributions
from aggregator.audit.replay import index_updates
from aggregator.service import AggregatorService
from aggregator.store import RedisModelStore, connect_redis
from common.logging import configure_logging
from common.spec import SyncSettings, TaskSpec
from common.transport.memory import MemoryBroker, MemoryTransport
from fedq.simulate import (
    Baselines,
    Prepared,
    SimulationConfig,
    SimulationResult,
    bundled_data,
    fit_baselines,
    prepare,
    run_simulation,
)
from fedq.simulate_attacks import ATTACKS, HostileWorker
from participant.data import encode
from participant.worker import ParticipantWorker, WorkerConfig

BANKS, ATTACKERS = 10, 2
#: The scale section: 25 banks, 5 hostile (20%), sync rounds.
SCALE_BANKS, SCALE_ATTACKERS = 25, 5
ROUNDS = 20
BUFFER = 5
#: The issue's bounds: under attack, with the robust options on, the mean final AUC
#: within 0.02 of the clean run; clean, the robust options lose at most 0.005.
ATTACK_TOLERANCE = 0.02
CLEAN_TOLERANCE = 0.005
#: Time budget of a run: this many times the seed's clean plain run, at least MIN_SECONDS.
STALL_FACTOR = 2.5
MIN_SECONDS = 6.0
#: The yardsticks run_simulation needs (centralized, local-only); not reported here.
BASELINE_EPOCHS = 20
#: ``fedq simulate``'s pause per local round (FedBuff runs).
PACE_S = 0.1

#: What every robust configuration shares: the update's L2 norm bounded by 3 times the
#: median recent norm (one vote per bank, the last 50 accepted updates), under a fixed
#: ceiling of 1.0 (the honest updates' norms are 0.06-0.3 on this task: the ceiling
#: matters only until the window is full), and one update per bank per buffer.
BOUND: dict[str, Any] = {
    "norm_bound": 1.0,
    "adaptive_norm": True,
    "norm_multiplier": 3.0,
    "norm_window": 50,
    "max_per_bank": 1,
}
#: The chosen configuration of each mode, used for every attack.
ROBUST: dict[str, dict[str, Any]] = {
    # multi-Krum over the 10 updates of a round (f = 2 assumed attackers, the 8 best kept);
    # clip (refusing would leave a round that waits for every bank open: see docs).
    "sync": {**BOUND, "aggregator": "multi_krum", "outlier": "clip"},
    # the trimmed mean of a buffer of 5 (per coordinate the lowest and the highest value
    # dropped); updates over the bound are refused, so they never take a buffer's place.
    "fedbuff": {**BOUND, "aggregator": "trimmed_mean", "trim_fraction": 0.2, "outlier": "refuse"},
}
#: The others tried (see docs/robustness.md for why each lost).
CANDIDATES: dict[str, dict[str, dict[str, Any]]] = {
    "sync": {
        "median, clip": {**BOUND, "aggregator": "median", "outlier": "clip"},
        "trimmed mean 0.2, clip": {**BOUND, "aggregator": "trimmed_mean", "outlier": "clip"},
    },
    "fedbuff": {
        # the first choice: it misses the clean bound (multi-Krum drops 1 update of 5)
        "multi-Krum, refuse": {**BOUND, "aggregator": "multi_krum", "outlier": "refuse"},
        "multi-Krum, clip": {**BOUND, "aggregator": "multi_krum", "outlier": "clip"},
        "median, refuse": {**BOUND, "aggregator": "median", "outlier": "refuse"},
        "mean, refuse": {**BOUND, "aggregator": "mean", "outlier": "refuse"},
    },
}
#: "clean" (no attack), then every attack.
CONDITIONS: tuple[str, ...] = ("clean", *ATTACKS)
MODE_NAMES = {"sync": "sync rounds (FedAvg)", "fedbuff": f"FedBuff K={BUFFER}"}


# --------------------------------------------------------------------------- runs


def _versions(mode: str, banks: int) -> int:
    """The version cap: 20 rounds, or in FedBuff the same number of updates."""
    return ROUNDS if mode == "sync" else ROUNDS * banks // BUFFER


def _config(
    mode: str,
    seed: int,
    banks: int,
    robust: Mapping[str, Any] | None,
    attack: str | None = None,
    attackers: int = 1,
    seconds: float = 120.0,
) -> SimulationConfig:
    overrides: dict[str, Any] = {"robustness": dict(robust or {})}
    if mode == "fedbuff":
        overrides["async"] = {"strategy": "fedbuff", "buffer_size": BUFFER}
    return SimulationConfig(
        participants=banks,
        mode="sync" if mode == "sync" else "async",
        versions=_versions(mode, banks),
        patience=0,
        seconds=seconds,
        seed=seed,
        base_delay_s=0.0 if mode == "sync" else PACE_S,
        baseline_epochs=BASELINE_EPOCHS,
        spec_overrides=overrides,
        attack=attack,
        attackers=attackers if attack is not None else 1,
    )


def _group() -> dict[str, Any]:
    return {
        "published": 0,
        "accepted": 0,
        "refused": {},
        "clipped": 0,
        "weight_share": 0.0,
    }


def _row(result: SimulationResult) -> dict[str, Any]:
    """One run's figures: AUC, how it ended, and per group of banks (hostile, honest)
    what they published and what the aggregator did with it."""
    hostile = set(result.settings["hostile_banks"])
    clipped: dict[str, int] = {}
    for event in result.events:
        for bank, k in event["clipped"].items():
            clipped[bank] = clipped.get(bank, 0) + k
    groups = {"hostile": _group(), "honest": _group()}
    for name, p in result.participants.items():
        g = groups["hostile" if name in hostile else "honest"]
        g["published"] += p["updates_published"]
        g["accepted"] += p["updates_accepted"]
        for reason, k in p["updates_refused"].items():
            g["refused"][reason] = g["refused"].get(reason, 0) + k
        g["clipped"] += clipped.get(name, 0)
        g["weight_share"] += p["weight_share"]
    return {
        "seed": result.seed,
        "auc": result.final_auc,
        "versions": result.versions,
        "stopped_by": result.stopped_by,
        "wall_seconds": result.wall_seconds,
        "refused_by_reason": result.refused_by_reason,
        "hostile_banks": sorted(hostile),
        **groups,
    }


def _run(config: SimulationConfig, prep: Prepared, base: Baselines) -> dict[str, Any]:
    return _row(asyncio.run(run_simulation(config, None, prep, base)))


class Split:
    """One seed's split and baselines for a number of banks, shared by every run; the
    prepared task of each (mode, robustness) made once (``prepare`` per setting: the
    robustness is part of the task spec it builds)."""

    def __init__(self, seed: int, banks: int) -> None:
        self.seed, self.banks = seed, banks
        first = _config("sync", seed, banks, None)
        self.base = fit_baselines(prepare(first), first)
        self._preps: dict[tuple[str, str], Prepared] = {}
        #: Per mode: the time budget of every run (from the clean plain run).
        self.seconds: dict[str, float] = {}

    def prep(self, mode: str, robust: Mapping[str, Any] | None) -> Prepared:
        key = (mode, repr(sorted((robust or {}).items())))
        if key not in self._preps:
            self._preps[key] = prepare(_config(mode, self.seed, self.banks, robust))
        return self._preps[key]

    def run(
        self, mode: str, robust: Mapping[str, Any] | None, condition: str, attackers: int
    ) -> dict[str, Any]:
        attack = None if condition == "clean" else condition
        seconds = self.seconds.get(mode, 120.0)
        config = _config(mode, self.seed, self.banks, robust, attack, attackers, seconds)
        row = _run(config, self.prep(mode, robust), self.base)
        if mode not in self.seconds:  # the first run of a mode is its clean plain run
            self.seconds[mode] = max(MIN_SECONDS, STALL_FACTOR * row["wall_seconds"])
        return row


def _runs(
    splits: list[Split], mode: str, configs: Mapping[str, Mapping[str, Any] | None], attackers: int
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``runs[config][condition]``: one row per seed. The plain clean run goes first."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {c: [] for c in CONDITIONS} for name in configs
    }
    for split in splits:
        started = time.perf_counter()
        for condition in CONDITIONS:
            for name, robust in configs.items():
                runs[name][condition].append(split.run(mode, robust, condition, attackers))
        for name in configs:
            aucs = ", ".join(f"{c} {runs[name][c][-1]['auc']:.4f}" for c in CONDITIONS)
            print(f"{MODE_NAMES[mode]}, {split.banks} banks, seed {split.seed}, {name}: {aucs}")
        print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    return runs


# --------------------------------------------------------------------------- summaries


def _mean_counts(rows: list[dict[str, Any]], group: str) -> dict[str, Any]:
    """A group's counts, averaged per run."""
    n = len(rows)
    refused: dict[str, float] = {}
    for r in rows:
        for reason, k in r[group]["refused"].items():
            refused[reason] = refused.get(reason, 0.0) + k / n
    return {
        "published": statistics.fmean(r[group]["published"] for r in rows),
        "accepted": statistics.fmean(r[group]["accepted"] for r in rows),
        "clipped": statistics.fmean(r[group]["clipped"] for r in rows),
        "refused": dict(sorted(refused.items())),
        "weight_share": statistics.fmean(r[group]["weight_share"] for r in rows),
    }


def _summary(
    plain: dict[str, list[dict[str, Any]]], robust: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Per condition: both aggregators' mean AUC, their differences to the clean runs,
    the worst seed, and what happened to the updates; then the two verdicts."""
    clean_p = [r["auc"] for r in plain["clean"]]
    clean_r = [r["auc"] for r in robust["clean"]]
    rows = []
    for c in CONDITIONS:
        p = [r["auc"] for r in plain[c]]
        q = [r["auc"] for r in robust[c]]
        drop_r = [b - a for a, b in zip(clean_r, q, strict=True)]
        drop_p = [b - a for a, b in zip(clean_p, p, strict=True)]
        vs_plain = [b - a for a, b in zip(clean_p, q, strict=True)]
        worst = min(range(len(q)), key=lambda i: drop_r[i])
        rows.append(
            {
                "condition": c,
                "plain_auc_mean": statistics.fmean(p),
                "robust_auc_mean": statistics.fmean(q),
                "plain_minus_clean": statistics.fmean(drop_p),
                "robust_minus_clean": statistics.fmean(drop_r),
                "robust_minus_plain_clean": statistics.fmean(vs_plain),
                "plain_worst_seed": {
                    "seed": plain[c][min(range(len(p)), key=lambda i: drop_p[i])]["seed"],
                    "minus_clean": min(drop_p),
                },
                "robust_worst_seed": {"seed": robust[c][worst]["seed"], "minus_clean": min(drop_r)},
                "plain_aucs": p,
                "robust_aucs": q,
                "plain_stopped_by": [r["stopped_by"] for r in plain[c]],
                "robust_stopped_by": [r["stopped_by"] for r in robust[c]],
                "plain_versions": [r["versions"] for r in plain[c]],
                "robust_versions": [r["versions"] for r in robust[c]],
                "plain_hostile": _mean_counts(plain[c], "hostile"),
                "plain_honest": _mean_counts(plain[c], "honest"),
                "robust_hostile": _mean_counts(robust[c], "hostile"),
                "robust_honest": _mean_counts(robust[c], "honest"),
                # the issue's bound, against the robust clean run and the plain one
                "within_tolerance": statistics.fmean(drop_r) >= -ATTACK_TOLERANCE,
                "within_tolerance_of_plain_clean": statistics.fmean(vs_plain) >= -ATTACK_TOLERANCE,
            }
        )
    clean_cost = statistics.fmean(b - a for a, b in zip(clean_p, clean_r, strict=True))
    attacked = [r for r in rows if r["condition"] != "clean"]
    return {
        "conditions": rows,
        "clean_robust_minus_plain": clean_cost,
        "clean_within_tolerance": clean_cost >= -CLEAN_TOLERANCE,
        "attacks_within_tolerance": all(r["within_tolerance"] for r in attacked),
        "attacks_within_tolerance_of_plain_clean": all(
            r["within_tolerance_of_plain_clean"] for r in attacked
        ),
    }


def _quality(
    splits: list[Split], mode: str, attackers: int
) -> tuple[dict[str, Any], dict[str, dict[str, list[dict[str, Any]]]]]:
    started = time.perf_counter()
    runs = _runs(splits, mode, {"plain": None, "robust": ROBUST[mode]}, attackers)
    out = {
        "mode": mode,
        "banks": splits[0].banks,
        "attackers": attackers,
        "versions": _versions(mode, splits[0].banks),
        "robust": ROBUST[mode],
        "seeds": [s.seed for s in splits],
        **_summary(runs["plain"], runs["robust"]),
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }
    return out, runs


def _candidates(
    splits: list[Split], mode: str, reference: dict[str, dict[str, list[dict[str, Any]]]]
) -> list[dict[str, Any]]:
    """The other configurations on the first seeds; the plain runs and the chosen
    configuration's of the same seeds (from the quality section) beside them."""
    started = time.perf_counter()
    runs = _runs(splits, mode, CANDIDATES[mode], ATTACKERS)
    k = len(splits)
    plain = {c: rows[:k] for c, rows in reference["plain"].items()}
    out = [
        {
            "name": "chosen",
            "robust": ROBUST[mode],
            **_summary(plain, {c: rows[:k] for c, rows in reference["robust"].items()}),
        }
    ]
    for name, robust in CANDIDATES[mode].items():
        out.append({"name": name, "robust": robust, **_summary(plain, runs[name])})
    for entry in out:
        entry["mode"] = mode
        entry["seeds"] = [s.seed for s in splits]
    out[-1]["seconds"] = time.perf_counter() - started
    return out


# --------------------------------------------------------------------------- contributions

#: Rounds each recorded federation runs (as tests/test_contributions.py).
CONTRIB_ROUNDS = 8


async def _federation(
    base: TaskSpec, label: str, shards: Mapping[str, pd.DataFrame], flipped: tuple[str, ...] = ()
) -> tuple[TaskSpec, RedisModelStore, dict[str, bytes]]:
    """Sync FedAvg rounds (every bank each round) of ``shards`` to CONTRIB_ROUNDS; the
    banks in ``flipped`` train on flipped labels (fedq/simulate_attacks.py). Returns
    the spec, the store (open) and the retained updates by id."""
    doc = base.model_dump(mode="json", by_alias=True)
    doc.update(
        task_id=f"{base.task_id}-{label}",
        mode="sync",
        sync=SyncSettings().model_dump(mode="json"),
        participants=list(shards),
        declared_samples={n: len(s) for n, s in shards.items()},
    )
    spec = TaskSpec.parse(doc)
    store = RedisModelStore(connect_redis("memory://"))
    broker = MemoryBroker()
    agg = MemoryTransport(broker, "fedq-aggregator")
    stop, bank_stop, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def on_version(record: Any, _params: Any) -> None:
        if record.version >= CONTRIB_ROUNDS:
            done.set()

    service = AggregatorService(spec, store, agg, on_version=on_version)
    running = asyncio.create_task(service.run(stop))

    def worker(i: int, name: str) -> ParticipantWorker:
        args = (
            spec,
            WorkerConfig(participant=name, seed=i, wait_for_model_s=0.2),
            MemoryTransport(broker, name),
            shards[name],
        )
        if name in flipped:
            return HostileWorker(*args, attack="label_flip")
        return ParticipantWorker(*args)

    workers = [
        asyncio.create_task(worker(i, n).run(bank_stop)) for i, n in enumerate(spec.participants)
    ]
    async with asyncio.timeout(120):
        await done.wait()
    bank_stop.set()
    await asyncio.gather(*workers)
    stop.set()
    await running
    bodies = [b async for b in agg.read_audit(spec.task_id)]
    return spec, store, index_updates(bodies)


def _shuffled(df: pd.DataFrame, target: str, seed: int) -> pd.DataFrame:
    """The same rows, their labels permuted at random: pure label noise."""
    out = df.copy()
    out[target] = np.random.default_rng(seed).permutation(out[target].to_numpy())
    return out


def _report_json(report: ContributionReport) -> dict[str, Any]:
    return {
        "banks": list(report.banks),
        "shapley": dict(report.shapley),
        "leave_one_out": dict(report.leave_one_out),
        "stderr": dict(report.stderr),
        "value_all": report.value_all,
        "value_empty": report.value_empty,
        "gain": report.gain,
        "shapley_sum": report.shapley_sum,
        "efficiency_gap": report.efficiency_gap,
        "efficiency_bound": report.efficiency_bound,
        "exact": report.exact,
        "permutations": report.permutations,
        "truncation": report.truncation,
        "truncated": report.truncated,
        "coalitions_replayed": report.evaluations,
    }


async def _valued(
    base: TaskSpec,
    label: str,
    shards: Mapping[str, pd.DataFrame],
    holdout: tuple[Any, Any] | pd.DataFrame,
    flipped: tuple[str, ...] = (),
    sampled: tuple[dict[str, Any], ...] = (),
) -> dict[str, Any]:
    """Exact values of one recorded federation, and the sampled estimates asked for."""
    spec, store, updates = await _federation(base, label, shards, flipped)
    try:
        x, y = encode(holdout, spec) if isinstance(holdout, pd.DataFrame) else holdout
        score = Holdout(spec, x, y, "auc")
        out: dict[str, Any] = {"federation": label, "holdout_rows": score.rows}
        kw: dict[str, Any] = {"to_version": CONTRIB_ROUNDS, "metric": score.description}
        exact = await replay_contributions(store, updates, spec.task_id, score, exact=True, **kw)
        out["exact"] = _report_json(exact)
        out["sampled"] = []
        for s in sampled:
            rep = await replay_contributions(store, updates, spec.task_id, score, **s, **kw)
            out["sampled"].append({"settings": s, **_report_json(rep)})
        return out
    finally:
        await store.close()


def _contributions() -> dict[str, Any]:
    """The figures of tests/test_contributions.py's recorded chains, and a label-flip chain."""
    started = time.perf_counter()
    base = prepare(SimulationConfig(participants=3, seed=0)).spec
    target = base.target.name
    df = pd.read_csv(bundled_data())
    rows = np.random.default_rng(0).permutation(len(df))
    holdout, p1, p2, p3 = (
        df.iloc[rows[i : i + 250]].reset_index(drop=True) for i in range(0, 1000, 250)
    )
    noise_1, noise_2 = _shuffled(p2.iloc[:60], target, 1), _shuffled(p3.iloc[:60], target, 2)
    five = prepare(SimulationConfig(participants=5, seed=0))

    async def build() -> dict[str, Any]:
        noisy = await _valued(
            base,
            "noisy",
            {"bank-a": p1, "bank-b": p2, "bank-n": _shuffled(p3, target, 3)},
            holdout,
            sampled=(
                {"permutations": 60, "truncation": 0.05, "seed": 1},
                {"permutations": 60, "truncation": 0.0, "seed": 1},
            ),
        )
        solo = await _valued(
            base, "solo", {"solo": p1, "noise-1": noise_1, "noise-2": noise_2}, holdout
        )
        dup = await _valued(
            base,
            "dup",
            {"dup-1": p1, "dup-2": p1, "noise-1": noise_1, "noise-2": noise_2},
            holdout,
            sampled=({"permutations": 200, "seed": 0},),
        )
        flip = await _valued(
            five.spec,
            "label-flip",
            five.shards,
            (five.x_test, five.y_test),
            flipped=(five.spec.participants[-1],),
        )
        return {"noisy": noisy, "solo": solo, "dup": dup, "label_flip": flip}

    chains = asyncio.run(build())
    n, s, d, f = (chains[k]["exact"] for k in ("noisy", "solo", "dup", "label_flip"))
    half = s["shapley"]["solo"] / 2
    both = d["shapley"]["dup-1"] + d["shapley"]["dup-2"]
    dup_sampled = chains["dup"]["sampled"][0]
    truncated, untruncated = chains["noisy"]["sampled"]
    flipped_bank = five.spec.participants[-1]
    checks = {
        "noise_bank_lowest": min(n["shapley"], key=n["shapley"].__getitem__) == "bank-n",
        "flipped_bank_lowest": min(f["shapley"], key=f["shapley"].__getitem__) == flipped_bank,
        "each_copy_about_half": all(
            abs(d["shapley"][c] - half) <= 0.3 * abs(half) for c in ("dup-1", "dup-2")
        ),
        "copies_sum_to_solo": abs(both - s["shapley"]["solo"]) <= 0.15 * abs(s["shapley"]["solo"]),
        "exact_gap_at_most_1e-12": all(abs(c["efficiency_gap"]) <= 1e-12 for c in (n, s, d, f)),
        "truncated_gap_within_truncation": abs(truncated["efficiency_gap"])
        <= truncated["truncation"],
        "untruncated_gap_at_most_1e-12": abs(untruncated["efficiency_gap"]) <= 1e-12,
        "sampled_within_4_stderr_of_exact": all(
            abs(dup_sampled["shapley"][b] - d["shapley"][b]) <= 4 * dup_sampled["stderr"][b] + 1e-9
            for b in d["banks"]
        ),
    }
    return {
        "rounds": CONTRIB_ROUNDS,
        "chains": chains,
        "solo_half": half,
        "copies_sum": both,
        "flipped_bank": flipped_bank,
        "checks": checks,
        "seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------- tables


def _auc(v: float) -> str:
    return f"{v:.4f}"


def _diff(v: float) -> str:
    return f"{v:+.4f}"


def _did(counts: dict[str, Any]) -> str:
    """What the aggregator did with a group's updates, per run."""
    parts = []
    if counts["clipped"]:
        parts.append(f"clipped {counts['clipped']:.1f}")
    for reason, k in counts["refused"].items():
        parts.append(f"{reason} {k:.1f}")
    return ", ".join(parts) if parts else "-"


def _quality_tables(q: dict[str, Any]) -> list[str]:
    mode, banks, attackers = q["mode"], q["banks"], q["attackers"]
    seeds = len(q["seeds"])
    title = (
        f"{MODE_NAMES[mode]}, German credit, {banks} banks of which the last {attackers} are "
        f"hostile, {q['versions']} versions, final test AUC, mean over {seeds} split seeds; "
        f"robust: {_describe(q['robust'])}; '- clean': the difference to the clean run of "
        "the same aggregator (per seed, averaged); worst: the seed with the largest drop"
    )
    rows = []
    for r in q["conditions"]:
        worst = r["robust_worst_seed"]
        ok = "-" if r["condition"] == "clean" else ("pass" if r["within_tolerance"] else "FAIL")
        rows.append(
            [
                r["condition"],
                _auc(r["plain_auc_mean"]),
                _diff(r["plain_minus_clean"]),
                _auc(r["robust_auc_mean"]),
                _diff(r["robust_minus_clean"]),
                _diff(r["robust_minus_plain_clean"]),
                f"{worst['minus_clean']:+.4f} (seed {worst['seed']})",
                ok,
            ]
        )
    out = [
        table(
            [
                "attack",
                "AUC plain",
                "plain - clean",
                "AUC robust",
                "robust - clean",
                "robust - plain clean",
                "robust worst seed",
                f"within {ATTACK_TOLERANCE}",
            ],
            rows,
            title=title,
        )
    ]
    did = []
    for r in q["conditions"]:
        did.append(
            [
                r["condition"],
                f"{r['plain_hostile']['weight_share']:.3f}",
                f"{r['robust_hostile']['weight_share']:.3f}",
                _did(r["plain_hostile"]) + " / " + _did(r["plain_honest"]),
                _did(r["robust_hostile"]) + " / " + _did(r["robust_honest"]),
                f"{r['robust_hostile']['published']:.1f}",
                _stops(r["plain_stopped_by"], r["plain_versions"], q["versions"]),
                _stops(r["robust_stopped_by"], r["robust_versions"], q["versions"]),
            ]
        )
    out.append(
        table(
            [
                "attack",
                "hostile weight plain",
                "hostile weight robust",
                "plain: hostile / honest updates",
                "robust: hostile / honest updates",
                "hostile published (robust)",
                "plain runs ended",
                "robust runs ended",
            ],
            did,
            title="what the aggregator did, per run (mean over the seeds): the hostile banks' "
            "share of the recorded weight; updates clipped and refused by reason, hostile "
            "banks / honest banks ('-': none)",
        )
    )
    cost = q["clean_robust_minus_plain"]
    out.append(
        f"\nclean runs: robust - plain = {cost:+.4f} AUC (bound -{CLEAN_TOLERANCE}): "
        f"{'pass' if q['clean_within_tolerance'] else 'FAIL'}; every attack within "
        f"{ATTACK_TOLERANCE} of the robust clean run: "
        f"{'pass' if q['attacks_within_tolerance'] else 'FAIL'}, of the plain clean run: "
        f"{'pass' if q['attacks_within_tolerance_of_plain_clean'] else 'FAIL'}"
    )
    per_seed = []
    for c in CONDITIONS:
        runs_p, runs_r = q["runs"]["plain"][c], q["runs"]["robust"][c]
        pairs = zip(runs_p, runs_r, strict=True)
        per_seed.append([c, *(f"{p['auc']:.4f} / {r['auc']:.4f}" for p, r in pairs)])
    out.append(
        table(
            ["attack", *(f"seed {s}" for s in q["seeds"])],
            per_seed,
            title="per seed: AUC plain / robust",
        )
    )
    return out


def _stops(stops: list[str], versions: list[int], cap: int) -> str:
    short = [
        f"{s} at {v}" for s, v in zip(stops, versions, strict=True) if s != "versions" or v != cap
    ]
    return "all at the cap" if not short else "; ".join(short)


def _describe(robust: Mapping[str, Any]) -> str:
    agg = {"multi_krum": "multi-Krum", "trimmed_mean": "trimmed mean"}.get(
        robust["aggregator"], robust["aggregator"]
    )
    if robust["aggregator"] == "trimmed_mean":
        agg += f" {robust.get('trim_fraction', 0.2):g}"
    return (
        f"{agg}, norm bound {robust['norm_multiplier']:g} x the median of the last "
        f"{robust['norm_window']} (ceiling {robust['norm_bound']:g}), {robust['outlier']}, "
        f"at most {robust['max_per_bank']} per bank per buffer"
    )


def _candidate_table(entries: list[dict[str, Any]]) -> str:
    mode = entries[0]["mode"]
    rows = []
    for e in entries:
        by = {r["condition"]: r for r in e["conditions"]}
        rows.append(
            [
                e["name"],
                _diff(e["clean_robust_minus_plain"]),
                *(_diff(by[c]["robust_minus_plain_clean"]) for c in ATTACKS),
                "pass"
                if e["clean_within_tolerance"] and e["attacks_within_tolerance_of_plain_clean"]
                else "no",
            ]
        )
    return table(
        ["configuration", "clean - plain clean", *ATTACKS, "both bounds"],
        rows,
        title=f"candidates, {MODE_NAMES[mode]}, {BANKS} banks ({ATTACKERS} hostile), seeds "
        f"{', '.join(map(str, entries[0]['seeds']))}: mean AUC minus the plain clean run's "
        "(each shares the norm bound and the cap of the chosen one)",
    )


def _contribution_tables(c: dict[str, Any]) -> list[str]:
    rows = []
    for key, chain in c["chains"].items():
        e = chain["exact"]
        for b in e["banks"]:
            rows.append(
                [
                    key,
                    b,
                    f"{e['shapley'][b]:+.4f}",
                    f"{e['leave_one_out'][b]:+.4f}",
                    f"{e['gain']:+.4f}",
                    f"{e['efficiency_gap']:.1e}",
                ]
            )
    out = [
        table(
            [
                "federation",
                "bank",
                "Shapley",
                "leave-one-out",
                "gain",
                "sum - gain",
            ],
            rows,
            title=f"contributions (exact Shapley, {c['rounds']} sync rounds, ROC AUC on the "
            "holdout rows): noisy: bank-n's labels shuffled; solo / dup: the same rows in one "
            f"bank / two banks, beside two small label-noise banks; label_flip: "
            f"{c['flipped_bank']} trains on flipped labels",
        )
    ]
    sampled = []
    for key, chain in c["chains"].items():
        for s in chain["sampled"]:
            sampled.append(
                [
                    key,
                    str(s["settings"]),
                    s["truncated"],
                    f"{s['efficiency_gap']:+.2e}",
                    f"{s['efficiency_bound']:g}",
                    ", ".join(
                        f"{b} {s['shapley'][b]:+.4f}±{s['stderr'][b]:.4f}" for b in s["banks"]
                    ),
                ]
            )
    out.append(
        table(
            ["federation", "TMC-Shapley", "truncated", "sum - gain", "bound", "values ± stderr"],
            sampled,
            title="sampled orders: the gap to the gain stays within the truncation",
        )
    )
    out.append(
        f"\nsolo bank's value / 2 = {c['solo_half']:+.4f}; the two copies' values sum to "
        f"{c['copies_sum']:+.4f}; checks: "
        + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in c["checks"].items())
    )
    return out


def _tables(figures: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in ("sync", "fedbuff", "scale"):
        if key in figures:
            out += _quality_tables(figures[key])
    for mode in ("sync", "fedbuff"):
        if mode in figures.get("candidates", {}):
            out.append(_candidate_table(figures["candidates"][mode]))
    if "contributions" in figures:
        out += _contribution_tables(figures["contributions"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 seeds; no scale section")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument(
        "--only",
        choices=["sync", "fedbuff", "scale", "candidates", "contributions"],
        action="append",
    )
    p.add_argument("--candidate-seeds", type=int, default=2)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: bench/results/poisoning.json (--only candidates alone: "
        "poisoning-candidates.json)",
    )
    args = p.parse_args()
    # Critical only: the attacks make the service log errors (refusals, overflowing sums).
    configure_logging("critical", "console")
    quick = args.quick
    seeds = 2 if quick else args.seeds
    default = ["sync", "fedbuff", "contributions"]
    if not quick:
        default.append("scale")
    only = set(args.only or default)
    if args.out is None:
        name = "poisoning-candidates.json" if only == {"candidates"} else "poisoning.json"
        args.out = RESULTS / name
    settings: dict[str, Any] = {
        "seeds": seeds,
        "candidate_seeds": min(args.candidate_seeds, seeds),
        "banks": BANKS,
        "attackers": ATTACKERS,
        "scale_banks": SCALE_BANKS,
        "scale_attackers": SCALE_ATTACKERS,
        "rounds": ROUNDS,
        "fedbuff_buffer": BUFFER,
        "fedbuff_pace_s": PACE_S,
        "sync_pace_s": 0.0,
        "patience": 0,
        "baseline_epochs": BASELINE_EPOCHS,
        "stall_factor": STALL_FACTOR,
        "min_seconds": MIN_SECONDS,
        "robust": ROBUST,
        "candidates": CANDIDATES,
        "attack_tolerance": ATTACK_TOLERANCE,
        "clean_tolerance": CLEAN_TOLERANCE,
    }
    started = time.perf_counter()
    # (the envelope's machine facts are taken when it is written, at the end)
    settings["load_avg_at_start"] = os.getloadavg()
    figures: dict[str, Any] = {}
    k = settings["candidate_seeds"]
    splits: list[Split] = []
    if only & {"sync", "fedbuff"}:
        splits = [Split(seed, BANKS) for seed in range(seeds)]
    elif "candidates" in only:
        splits = [Split(seed, BANKS) for seed in range(k)]
    reference: dict[str, Any] = {}
    for mode in ("sync", "fedbuff"):
        if mode in only:
            figures[mode], reference[mode] = _quality(splits, mode, ATTACKERS)
        elif "candidates" in only:  # the plain and chosen runs of the candidates' seeds
            reference[mode] = _quality(splits[:k], mode, ATTACKERS)[1]
    if "candidates" in only:
        figures["candidates"] = {
            mode: _candidates(splits[:k], mode, reference[mode]) for mode in ("sync", "fedbuff")
        }
    if "scale" in only:
        scale = [Split(seed, SCALE_BANKS) for seed in range(seeds)]
        figures["scale"] = _quality(scale, "sync", SCALE_ATTACKERS)[0]
    if "contributions" in only:
        figures["contributions"] = _contributions()
    settings["total_seconds"] = time.perf_counter() - started
    settings["load_avg_at_end"] = os.getloadavg()
    tables = _tables(figures)
    for t in tables:
        print(t)
    print(
        f"\ntotal {settings['total_seconds']:.0f} s; load average at the end "
        + ", ".join(f"{x:.2f}" for x in settings["load_avg_at_end"])
    )
    doc = envelope("poisoning", quick, figures, settings=settings)
    write_json(args.out, doc)
    md = args.out.with_suffix(".md")
    m = doc["machine"]
    header = (
        f"# Poisoning and robustness: `{doc['command']}`\n\n"
        f"{doc['date']}, commit {doc['git']}, {m['cpu']}, {m['cores']} cores, load average "
        f"at start {', '.join(f'{x:.2f}' for x in settings['load_avg_at_start'])}, "
        f"at the end {', '.join(f'{x:.2f}' for x in settings['load_avg_at_end'])}, "
        f"{settings['total_seconds']:.0f} s in all\n"
    )
    md.write_text(header + "\n".join(tables) + "\n")
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
