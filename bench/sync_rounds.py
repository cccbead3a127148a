"""Where one sync round's wall-clock goes in the embedded simulation (diagnostic).

bench/flower.py measures fedq sync's seconds per round against Flower's; this
script explains fedq's figure. It runs ``run_simulation(mode="sync",
base_delay_s=0)`` with a timing hook (``SimulationConfig.stages``, see
common/hooks.py) that the service, the store and every worker call around each
stage of their loops: no code is patched. Stages nest (the service's ``handle``
holds ``admit``, ``offer`` and ``commit``), and the workers' stages overlap each
other and the service's: they are summed per round, not a partition of it.

    python bench/sync_rounds.py [--quick] [--out bench/results/sync_rounds.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from _common import RESULTS, envelope, table, write_json

from common.hooks import Stages
from common.logging import configure_logging
from fedq.simulate import SimulationConfig, run_simulation


def stage_timers() -> tuple[dict[str, float], Counter[str], Stages]:
    """Seconds and calls per named stage, and the hook that adds them up."""
    totals: dict[str, float] = defaultdict(float)
    calls: Counter[str] = Counter()

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            totals[name] += time.perf_counter() - t
            calls[name] += 1

    return totals, calls, stage


def per_round(config: SimulationConfig) -> float:
    """Seconds per round between the first and the last committed round."""
    result = asyncio.run(run_simulation(config))
    ends = [s for s, v, _ in result.curve if v > 0]
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "sync_rounds.json")
    p.add_argument("--participants", type=int, default=5)
    args = p.parse_args()
    configure_logging("error", "console")
    rounds = 20 if args.quick else 40
    config = SimulationConfig(
        participants=args.participants, mode="sync", base_delay_s=0.0, versions=rounds
    )
    plain = per_round(config)  # the same run without the hook, for its overhead
    totals, calls, stages = stage_timers()
    spr = per_round(replace(config, stages=stages))
    breakdown = {k: 1000 * v / rounds for k, v in totals.items()}
    print(
        table(
            ["stage", "calls", "ms per round (summed)", "ms per call"],
            [[k, calls[k], breakdown[k], 1000 * totals[k] / calls[k]] for k in sorted(totals)],
            title=f"{args.participants} banks, {rounds} sync rounds: {1000 * spr:.1f} ms per "
            f"round with the timing hook, {1000 * plain:.1f} ms without",
        )
    )
    write_json(
        args.out,
        envelope(
            "sync_rounds",
            args.quick,
            {
                "seconds_per_round": spr,
                "seconds_per_round_untimed": plain,
                "breakdown_ms_per_round": breakdown,
                "calls": dict(calls),
            },
            settings={"participants": args.participants, "rounds": rounds},
        ),
    )


if __name__ == "__main__":
    main()
