"""Where one sync round's wall-clock goes in the embedded simulation (diagnostic).

bench/flower.py measures fedq sync's seconds per round against Flower's; this
script explains fedq's figure. It runs ``run_simulation(mode="sync",
base_delay_s=0)`` with timers wrapped around the worker's and the aggregator's
steps (wrappers in this process only; fedq's code is not changed), and then an
A/B in the same run: the worker as shipped against the worker with its 10 ms
drain wait (``ParticipantWorker._newest_model`` waits up to 10 ms for a newer
model after each one it receives) replaced by a drain of what is already queued.
Runs alternate A, B, A, B so that drift on a shared machine hits both.

    python bench/sync_rounds.py [--quick] [--out bench/results/sync_rounds.json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import RESULTS, envelope, table, write_json

import aggregator.service as service_module
import aggregator.store.redis_store as store_module
import participant.worker as worker_module
from common.logging import configure_logging
from common.transport import ModelDelivery, Subscription, next_or_none
from fedq.simulate import SimulationConfig, run_simulation

SHIPPED_NEWEST = worker_module.ParticipantWorker._newest_model


async def newest_without_wait(
    self: Any, sub: Subscription[ModelDelivery], wait: float | None, stop: asyncio.Event
) -> ModelDelivery | None:
    """As shipped, but the drain takes only what is already queued (timeout 0)."""
    newest = await next_or_none(sub, stop, wait)
    if newest is None:
        return None
    while True:
        try:
            async with asyncio.timeout(0):
                nxt = await sub.get()
        except TimeoutError:
            return newest
        if nxt.version >= newest.version:
            await newest.ack()
            newest = nxt
        else:
            await nxt.ack()


def instrument() -> tuple[dict[str, float], Counter[str], Callable[[], None]]:
    totals: dict[str, float] = defaultdict(float)
    calls: Counter[str] = Counter()
    undo: list[Callable[[], None]] = []

    def wrap(cls: Any, name: str, label: str) -> None:
        original = getattr(cls, name)

        async def timed(self: Any, *a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return await original(self, *a, **kw)
            finally:
                totals[label] += time.perf_counter() - t
                calls[label] += 1

        setattr(cls, name, timed)
        undo.append(lambda: setattr(cls, name, original))

    w, s = worker_module.ParticipantWorker, service_module.AggregatorService
    r = store_module.RedisModelStore
    wrap(w, "_newest_model", "worker: wait for the model + 10 ms drain")
    wrap(w, "_decode", "worker: decode model (thread)")
    wrap(w, "_train_and_publish", "worker: train + encode + publish (threads)")
    wrap(s, "handle", "aggregator: handle one update")
    wrap(s, "_commit", "aggregator: commit + ack + on_version (test AUC)")
    wrap(r, "commit", "store: commit (prepare + Redis transaction)")

    def restore() -> None:
        for u in reversed(undo):
            u()

    return totals, calls, restore


def per_round(config: SimulationConfig) -> float:
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
    repeats = 2 if args.quick else 3
    config = SimulationConfig(
        participants=args.participants, mode="sync", base_delay_s=0.0, versions=rounds
    )

    totals, calls, restore = instrument()
    spr = per_round(config)
    restore()
    breakdown = {k: 1000 * v / rounds for k, v in totals.items()}
    print(
        table(
            ["step", "calls", "ms per round (summed over banks)", "ms per call"],
            [[k, calls[k], breakdown[k], 1000 * totals[k] / calls[k]] for k in totals],
            title=f"{args.participants} banks, {rounds} sync rounds: {1000 * spr:.1f} ms per round",
        )
    )

    ab: dict[str, list[float]] = {"as shipped": [], "drain without wait": []}
    for _ in range(repeats):
        worker_module.ParticipantWorker._newest_model = SHIPPED_NEWEST  # type: ignore[method-assign]
        ab["as shipped"].append(per_round(config))
        worker_module.ParticipantWorker._newest_model = newest_without_wait  # type: ignore[method-assign]
        ab["drain without wait"].append(per_round(config))
    worker_module.ParticipantWorker._newest_model = SHIPPED_NEWEST  # type: ignore[method-assign]
    med = {k: statistics.median(v) for k, v in ab.items()}
    print(
        table(
            ["worker", "ms per round (runs)", "median", "vs shipped"],
            [
                [k, ", ".join(f"{1000 * x:.1f}" for x in v), 1000 * m, m / med["as shipped"]]
                for (k, v), m in zip(ab.items(), med.values(), strict=True)
            ],
            title="A/B, alternating runs",
        )
    )
    write_json(
        args.out,
        envelope(
            "sync_rounds",
            args.quick,
            {
                "seconds_per_round": spr,
                "breakdown_ms_per_round": breakdown,
                "calls": dict(calls),
                "ab_seconds_per_round": ab,
                "ab_median": med,
            },
            settings={"participants": args.participants, "rounds": rounds, "repeats": repeats},
        ),
    )


if __name__ == "__main__":
    main()
