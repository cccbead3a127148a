"""Async against sync with one straggler: wall-clock to the target AUC.

The German credit data (bundled), split IID among 5 and then 20 simulated banks;
the last bank is ten times slower than the others (its pause per local round is
ten times the base pause). Each mode runs in the embedded simulation
(``fedq.simulate.run_simulation``: in-process broker and Redis) on the same split,
seeds and speeds, one after the other in the same run. The figure is the time
from start until the global model's test AUC first reaches the target: the
initial model's AUC plus 95% of the centralized model's lift over it (all training
rows pooled; ``fedq simulate``'s definition), and the ratio sync / async.

    python bench/time_to_auc.py [--quick] [--out bench/results/time_to_auc.json]

Both modes use fedq's simulation defaults (FedAsync, mixing 0.5, polynomial
staleness counted in rounds, maximum staleness 20 rounds, balanced weighting; sync:
FedAvg, quorum = every bank), without the plateau stop. A mode is
stopped at its time budget or version budget, whichever comes first; a mode that
never reaches the target shows as ``-`` with its best AUC.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from _common import RESULTS, envelope, table, write_json

from common.logging import configure_logging
from fedq.simulate import SimulationConfig, SimulationResult, run_simulation


@dataclass(frozen=True, slots=True)
class Budget:
    """Per mode: stop at this many versions or seconds, whichever comes first."""

    versions: int
    seconds: float


#: participants -> mode -> budget. The sync budgets leave room for the rounds the
#: 20-bank federation needs (about 17 at this pace); async stops once far past it.
BUDGETS: dict[int, dict[str, Budget]] = {
    5: {"async": Budget(200, 15), "sync": Budget(40, 25)},
    20: {"async": Budget(1000, 20), "sync": Budget(60, 50)},
}
QUICK_BUDGETS: dict[int, dict[str, Budget]] = {
    5: {"async": Budget(100, 8), "sync": Budget(12, 12)},
    20: {"async": Budget(500, 10), "sync": Budget(25, 25)},
}


def summary(r: SimulationResult) -> dict[str, Any]:
    best = max(a for _, _, a in r.curve)
    return {
        "time_to_target_s": r.time_to_target_s,
        "target_auc": r.target_auc,
        "centralized_auc": r.centralized_auc,
        "final_auc": r.final_auc,
        "best_auc": best,
        "versions": r.versions,
        "updates_accepted": r.updates_accepted,
        "updates_refused": r.updates_refused,
        "refused_by_reason": r.refused_by_reason,
        "wall_seconds": r.wall_seconds,
        "seconds_per_version": r.wall_seconds / max(r.versions, 1),
        "curve": [{"seconds": s, "version": v, "auc": a} for s, v, a in r.curve],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    out: dict[str, Any] = {}
    for participants in args.participants:
        speeds = (1.0,) * (participants - 1) + (args.straggler,)
        base = SimulationConfig(
            participants=participants,
            speeds=speeds,
            base_delay_s=args.base_delay,
            seed=args.seed,
        )
        runs: dict[str, dict[str, Any]] = {}
        for mode in ("async", "sync"):
            b = budgets.get(participants, budgets[20])[mode]
            config = replace(base, mode=mode, versions=b.versions, seconds=b.seconds, patience=0)
            t0 = time.perf_counter()
            result = await run_simulation(config)
            runs[mode] = summary(result)
            tt = result.time_to_target_s
            print(
                f"  {participants:>2} banks, {mode:<5}: target {result.target_auc:.4f} "
                + (f"reached at {tt:.2f} s" if tt is not None else "not reached")
                + f"; {result.versions} versions in {time.perf_counter() - t0:.1f} s, "
                f"best AUC {runs[mode]['best_auc']:.4f}, refused {result.updates_refused}",
                flush=True,
            )
        a, s = runs["async"]["time_to_target_s"], runs["sync"]["time_to_target_s"]
        out[str(participants)] = {
            "speeds": speeds,
            "modes": runs,
            "speedup_sync_over_async": (s / a) if a and s else None,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller budgets (about 40 s)")
    p.add_argument("--out", type=Path, default=RESULTS / "time_to_auc.json")
    p.add_argument("--participants", type=lambda v: [int(x) for x in v.split(",")], default=[5, 20])
    p.add_argument("--straggler", type=float, default=10.0, help="slowness of the last bank")
    p.add_argument(
        "--base-delay", type=float, default=0.2, help="pause per local round at speed 1 (s)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    configure_logging("error", "console")
    figures = asyncio.run(run(args))
    rows = []
    for participants, f in figures.items():
        for mode, r in f["modes"].items():
            rows.append(
                [
                    participants,
                    mode,
                    r["centralized_auc"],
                    r["target_auc"],
                    r["time_to_target_s"],
                    r["best_auc"],
                    r["versions"],
                    r["seconds_per_version"],
                    r["updates_refused"],
                    f["speedup_sync_over_async"] if mode == "sync" else None,
                ]
            )
    print(
        table(
            [
                "banks",
                "mode",
                "central AUC",
                "target",
                "s to target",
                "best AUC",
                "versions",
                "s/version",
                "refused",
                "sync/async",
            ],
            rows,
            title=f"Time to the target AUC, one bank {args.straggler:g}x slower "
            f"(base pause {args.base_delay:g} s)",
        )
    )
    write_json(
        args.out,
        envelope(
            "time_to_auc",
            args.quick,
            figures,
            settings={
                "straggler": args.straggler,
                "base_delay_s": args.base_delay,
                "seed": args.seed,
                "budgets": {
                    str(k): {m: asdict(b) for m, b in v.items()}
                    for k, v in (QUICK_BUDGETS if args.quick else BUDGETS).items()
                },
                "embedded": True,
            },
        ),
    )


if __name__ == "__main__":
    main()
