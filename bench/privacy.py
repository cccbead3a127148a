"""What differential privacy costs: final AUC at epsilon 1, 3, 8 and without DP, and
the per-update cost of DP-SGD against plain local training.

Utility: embedded ``fedq simulate`` runs (5 banks, FedBuff with a buffer of 5, so a
version is one round) on German credit and on a generated imbalanced table, for
record-level DP-SGD at the banks (each bank's budget = the target epsilon, the noise
calibrated to reach it after ``--dp-updates`` updates) and bank-level DP at the
aggregator (the noise calibrated so that the model reaches the target after the
version cap), each over several split seeds; the no-DP run uses the same settings.

Cost: one bank's local update (its training rows of German credit and of the
generated table, the task's logistic regression and an MLP), plain ``train_local``
against ``train_dpsgd``, alternating, medians; the ratio is DP / plain.

    .venv/bin/python bench/privacy.py [--quick] [--seeds 5] [--only german|imbalanced|cost]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, envelope, table, write_json
from make_fraud_csv import make

from common.logging import configure_logging
from common.models import build_task_model, model_tensors
from fedq.simulate import SimulationConfig, bundled_data, prepare, run_simulation
from fedq.simulate_privacy import PrivacyOptions, privacy_spec
from participant.data import encode
from participant.privacy import train_dpsgd
from participant.training import train_local

EPSILONS = (1.0, 3.0, 8.0)
#: FedBuff, one round per version (5 banks, buffer 5).
OVERRIDES = {"async": {"strategy": "fedbuff", "buffer_size": 5}}


def _config(dataset: str, data: Path, seed: int, versions: int) -> SimulationConfig:
    base = SimulationConfig(
        participants=5,
        versions=versions,
        seconds=240,
        seed=seed,
        base_delay_s=0.0,
        spec_overrides=OVERRIDES,
        baseline_epochs=40,
    )
    if dataset == "german":
        return base
    return replace(base, data=data, target="fraud", positive="yes")


def _utility(
    dataset: str, data: Path, seeds: int, versions: int, clip: float, updates: int
) -> list[dict[str, Any]]:
    configure_logging("error", "console")
    rows: list[dict[str, Any]] = []
    settings: list[tuple[str, float | None]] = [("none", None)]
    settings += [("record", e) for e in EPSILONS] + [("bank", e) for e in EPSILONS]
    for mechanism, eps in settings:
        aucs, spent, stops = [], [], []
        started = time.perf_counter()
        for seed in range(seeds):
            config = _config(dataset, data, seed, versions)
            if mechanism == "record":
                privacy = PrivacyOptions(
                    record_epsilon=eps, record_clip=clip, planned_updates=updates
                )
            elif mechanism == "bank":
                privacy = PrivacyOptions(bank_epsilon=eps, bank_clip=clip, bank_adaptive=True)
            else:
                privacy = PrivacyOptions()
            result = asyncio.run(run_simulation(replace(config, privacy=privacy)))
            aucs.append(result.final_auc)
            stops.append(result.stopped_by)
            p = result.privacy
            if "record" in p:
                spent.append(max(p["record"]["epsilon_per_bank"].values()))
            elif "bank" in p:
                spent.append(p["bank"]["model_epsilon"])
        rows.append(
            {
                "dataset": dataset,
                "mechanism": mechanism,
                "target_epsilon": eps,
                "auc_mean": statistics.fmean(aucs),
                "auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                "aucs": aucs,
                "epsilon_spent_max": max(spent) if spent else None,
                "stopped_by": stops,
                "seconds": time.perf_counter() - started,
            }
        )
        print(f"{dataset} {mechanism} eps={eps}: AUC {rows[-1]['auc_mean']:.4f}", flush=True)
    return rows


def _cost(data: Path, repeats: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    out = []
    for dataset in ("german", "imbalanced"):
        config = _config(dataset, data, 0, 10)
        prep = prepare(config)
        shard = next(iter(prep.shards.values()))
        for model in ({"kind": "logreg"}, {"kind": "mlp", "hidden": [32]}):
            spec = prep.spec.model_copy(update={"model": prep.spec.model.model_validate(model)})
            options = PrivacyOptions(record_epsilon=3.0)
            privacy = privacy_spec(options, spec, {"b": len(shard)}, 10)
            dp_spec = spec.model_copy(update={"privacy": privacy})
            x, y = encode(shard, spec)
            params = model_tensors(build_task_model(spec))
            plain_t: list[float] = []
            dp_t: list[float] = []
            for i in range(repeats):
                t0 = time.perf_counter()
                train_local(spec, params, x, y, seed=i)
                t1 = time.perf_counter()
                train_dpsgd(dp_spec, params, x, y, seed=i)
                t2 = time.perf_counter()
                plain_t.append(t1 - t0)
                dp_t.append(t2 - t1)
            plain, dp = statistics.median(plain_t), statistics.median(dp_t)
            out.append(
                {
                    "dataset": dataset,
                    "model": "MLP 32" if model["kind"] == "mlp" else "logreg",
                    "rows": len(x),
                    "plain_ms": 1000 * plain,
                    "dpsgd_ms": 1000 * dp,
                    "ratio": dp / plain,
                }
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--only", choices=["german", "imbalanced", "cost"], action="append")
    p.add_argument("--versions", type=int, default=60, help="version cap (rounds) per run")
    p.add_argument("--clip", type=float, default=1.0, help="record and bank clip bound")
    p.add_argument("--dp-updates", type=int, default=30, help="updates per bank planned")
    p.add_argument("--rows", type=int, default=20_000, help="rows of the imbalanced table")
    p.add_argument("--out", type=Path, default=RESULTS / "privacy.json")
    args = p.parse_args()
    seeds = 2 if args.quick else args.seeds
    only = set(args.only or ["german", "imbalanced", "cost"])
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "imbalanced.csv"
        make(args.rows, 0.03, seed=0).to_csv(data, index=False)
        utility: list[dict[str, Any]] = []
        for dataset in ("german", "imbalanced"):
            if dataset in only:
                source = bundled_data() if dataset == "german" else data
                utility += _utility(
                    dataset, source, seeds, args.versions, args.clip, args.dp_updates
                )
        if utility:
            figures["utility"] = utility
            print(
                table(
                    ["dataset", "DP", "epsilon", "AUC mean", "AUC sd", "epsilon spent (max)"],
                    [
                        [
                            r["dataset"],
                            r["mechanism"],
                            r["target_epsilon"],
                            r["auc_mean"],
                            r["auc_sd"],
                            r["epsilon_spent_max"],
                        ]
                        for r in utility
                    ],
                    title=f"final test AUC over {seeds} split seeds (5 banks, FedBuff K=5)",
                )
            )
        if "cost" in only:
            cost = _cost(data, 5 if args.quick else 20)
            figures["cost"] = cost
            print(
                table(
                    ["dataset", "model", "rows", "plain ms", "DP-SGD ms", "DP / plain"],
                    [
                        [
                            c["dataset"],
                            c["model"],
                            c["rows"],
                            c["plain_ms"],
                            c["dpsgd_ms"],
                            c["ratio"],
                        ]
                        for c in cost
                    ],
                    title="one local update, plain against DP-SGD (medians, 1 torch thread)",
                )
            )
    write_json(
        args.out,
        envelope(
            "privacy",
            args.quick,
            figures,
            settings={
                "seeds": seeds,
                "versions": args.versions,
                "clip": args.clip,
                "dp_updates": args.dp_updates,
                "rows": args.rows,
            },
        ),
    )


if __name__ == "__main__":
    main()
