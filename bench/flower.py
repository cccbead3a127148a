"""fedq sync and async beside Flower on the same task: wall-clock per round and AUC.

The same German credit split (``fedq.simulate.prepare``: stratified test set, IID
bank shards with the same seed), the same model (fedq's logistic regression from
``common.models.build_task_model``, the same initial weights), the same local
training (``participant.training.train_local``: 2 epochs, batch 32, SGD lr 0.1,
on the same 80% of each shard the fedq worker trains on, with the same per-round
seeds) and the same number of rounds:

- **fedq sync**: ``run_simulation(mode="sync", base_delay_s=0)``, embedded
  (in-process broker and Redis): FedAvg rounds, quorum = every bank.
- **fedq async**: the same with FedAsync, for rounds x banks updates; its
  "round" is one version per bank (banks x versions).
- **Flower**: ``flwr.simulation.run_simulation`` (Ray backend) with a
  ``ServerApp`` running ``flwr.serverapp.strategy.FedAvg`` (weighted by example
  count, every node every round) and a ``ClientApp`` whose ``train`` calls the
  very same ``train_local``; server-side evaluation of the test AUC after every
  round, as fedq evaluates every version.

Wall-clock per round is taken in steady state, from round 1 to the last round,
divided by the rounds between (start-up is reported apart).

Flower is not a fedq dependency: ``pip install "flwr[simulation]==1.41.0"`` first.

    python bench/flower.py [--quick] [--out bench/results/flower.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, envelope, table, write_json

from common.evaluation import evaluate
from common.logging import configure_logging
from common.models import build_task_model, model_tensors
from fedq.simulate import SimulationConfig, SimulationResult, prepare, run_simulation
from participant.data import encode, train_val_split
from participant.training import train_local


def worker_seed(seed: int, participant: str, published: int) -> int:
    """The seed fedq's worker uses for its ``published``-th local round."""
    key = f"{seed}:{participant}:{published}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def steady_per_round(times: list[float]) -> float | None:
    """Seconds per round from round 1 to the last (``times[r]`` = end of round r, r >= 1)."""
    if len(times) < 3:
        return None
    return (times[-1] - times[1]) / (len(times) - 2)


def fedq_figures(result: SimulationResult, banks: int, per_round_versions: int) -> dict[str, Any]:
    ends = [0.0] + [s for s, v, _ in result.curve if v > 0 and v % per_round_versions == 0]
    return {
        "rounds": (len(ends) - 1),
        "versions": result.versions,
        "final_auc": result.final_auc,
        "centralized_auc": result.centralized_auc,
        "seconds_per_round": steady_per_round(ends),
        "first_round_s": ends[1] if len(ends) > 1 else None,
        "wall_s": result.wall_seconds,
        "updates_refused": result.updates_refused,
        "auc_by_round": [a for s, v, a in result.curve if v == 0 or v % per_round_versions == 0],
    }


async def run_fedq(config: SimulationConfig, rounds: int) -> dict[str, Any]:
    banks = config.participants
    sync = await run_simulation(replace(config, mode="sync", versions=rounds, patience=0))
    asyn = await run_simulation(replace(config, mode="async", versions=rounds * banks, patience=0))
    return {
        "fedq sync": fedq_figures(sync, banks, 1),
        "fedq async": fedq_figures(asyn, banks, banks),
    }


def run_flower(config: SimulationConfig, rounds: int) -> dict[str, Any]:
    """The same federation with Flower's simulation engine (Ray backend)."""
    warnings.filterwarnings("ignore")
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation as flwr_run_simulation

    prep = prepare(config)
    spec = prep.spec
    # What each fedq worker trains on: its shard, encoded, minus its validation rows.
    shards: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for i, (name, shard) in enumerate(prep.shards.items()):
        x, y = encode(shard, spec)
        train_idx, _ = train_val_split(len(x), 0.2, config.seed + i)
        shards.append((name, x[train_idx], y[train_idx]))
    initial = model_tensors(build_task_model(spec))
    x_test, y_test = prep.x_test, prep.y_test
    ends: list[float] = []
    aucs: list[float] = []

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        name, x, y = shards[pid]
        params = msg.content["arrays"].to_torch_state_dict()
        seed = worker_seed(config.seed + pid, name, server_round - 1)
        delta, metrics = train_local(spec, params, x, y, seed=seed)
        local = {k: params[k] + delta[k] for k in params}
        content = RecordDict(
            {
                "arrays": ArrayRecord(local),
                "metrics": MetricRecord({**metrics, "num-examples": len(x)}),
            }
        )
        return Message(content=content, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=config.participants,
            min_available_nodes=config.participants,
        )

        def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            ends.append(time.perf_counter())
            auc = evaluate(spec, arrays.to_torch_state_dict(), x_test, y_test).get("auc", 0.5)
            aucs.append(auc)
            return MetricRecord({"auc": auc})

        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=rounds,
            evaluate_fn=central_eval,
        )

    t0 = time.perf_counter()
    flwr_run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=config.participants,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "logging_level": "error"},
        },
    )
    wall = time.perf_counter() - t0
    rel = [t - ends[0] for t in ends] if ends else []
    return {
        "rounds": len(ends) - 1,
        "final_auc": aucs[-1] if aucs else None,
        "seconds_per_round": steady_per_round(rel),
        "first_round_s": rel[1] if len(rel) > 1 else None,
        "wall_s": wall,
        "startup_s": (ends[0] - t0) if ends else None,
        "auc_by_round": aucs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 rounds instead of 20")
    p.add_argument("--out", type=Path, default=RESULTS / "flower.json")
    p.add_argument("--participants", type=int, default=5)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rounds = args.rounds or (5 if args.quick else 20)
    configure_logging("error", "console")
    config = SimulationConfig(
        participants=args.participants, base_delay_s=0.0, seconds=300.0, seed=args.seed
    )
    print(f"{args.participants} banks, {rounds} rounds; fedq sync and async, then Flower")
    figures = asyncio.run(run_fedq(config, rounds))
    try:
        import flwr

        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        logging.getLogger("flwr").setLevel(logging.ERROR)
        figures["Flower"] = run_flower(config, rounds)
        flwr_version = flwr.__version__
    except ImportError as e:
        print(f"Flower not installed ({e}): pip install 'flwr[simulation]==1.41.0'")
        flwr_version = None
    ref = figures.get("Flower", {}).get("seconds_per_round")
    rows = []
    for name, f in figures.items():
        spr = f["seconds_per_round"]
        rows.append(
            [
                name,
                f["rounds"],
                spr,
                (spr / ref) if spr and ref else None,
                f["first_round_s"],
                f["wall_s"],
                f["final_auc"],
            ]
        )
    print(
        table(
            ["system", "rounds", "s/round", "vs Flower", "round 1 (s)", "wall (s)", "final AUC"],
            rows,
            title=f"{args.participants} banks, German credit, logreg, {rounds} rounds",
        )
    )
    write_json(
        args.out,
        envelope(
            "flower",
            args.quick,
            figures,
            settings={
                "participants": args.participants,
                "rounds": rounds,
                "training": prepare(config).spec.training.model_dump(),
                "flwr": flwr_version,
                "flower_backend": "ray, client_resources num_cpus=1",
                "fedq": "embedded (MemoryTransport + fakeredis), base_delay_s=0",
            },
        ),
    )


if __name__ == "__main__":
    main()
