"""The aggregator's cost per update as participants grow: 10, 100, 1,000.

The task names its participants (``TaskSpec.participants``), so the aggregator
declares one model queue per participant and every announcement goes to each of
them. Simulated participants publish a backlog of precomputed updates (the
10k-parameter MLP of bench/ingest.py, round-robin over the participants); the
service then drains it. Per participant count and strategy:

- **startup**: from ``service.run`` to ready: registering, version 0, declaring
  the topology (P model queues, two bindings each), the first announcement;
- **cost per update** = drain wall-clock / updates, the drain timed from ready
  until the head reaches the last version. Flat is the goal;
- **announcements**: how many the announcer sent and their mean time (each goes
  to every model queue; superseded versions are skipped).

Embedded (MemoryTransport + fakeredis, one process) and real (RabbitMQ + Redis)
side by side in the same run.

    python bench/scale.py [--quick] [--out bench/results/scale.json] [--embedded-only]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import ingest
from _common import (
    DEFAULT_AMQP,
    DEFAULT_REDIS,
    RESULTS,
    delete_queues,
    delete_redis_prefix,
    envelope,
    table,
    write_json,
)

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, StoreConfig, VersionRecord, connect_redis
from common.logging import configure_logging
from common.spec import AsyncSettings, ModelSpec, NumericFeature, TargetSpec, TaskSpec
from common.transport import TaskTopology, Transport
from common.transport.amqp import AmqpTransport
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import Tensors

PARTICIPANTS = (10, 100, 1000)
STRATEGIES = ("fedasync", "fedbuff")


@dataclass(slots=True)
class Row:
    backend: str
    participants: int
    strategy: str
    updates: int
    declare_s: float
    startup_s: float
    drain_s: float
    ms_per_update: float
    announcements: int
    announce_ms: float
    refused: int


def make_spec(participants: int, strategy: str) -> TaskSpec:
    return TaskSpec(
        task_id=f"bench-scale-{participants}-{strategy}-{uuid.uuid4().hex[:8]}",
        model=ModelSpec(kind="mlp", hidden=(455,)),
        features=tuple(NumericFeature(name=f"x{i:02d}") for i in range(ingest.N_FEATURES)),
        target=TargetSpec(name="y"),
        mode="async",
        async_=AsyncSettings(strategy=strategy, buffer_size=ingest.FEDBUFF_K),  # type: ignore[arg-type]
        participants=tuple(f"bank-{i:04d}" for i in range(participants)),
    )


async def publish(
    transport: Transport, spec: TaskSpec, updates: list[tuple[str, str, bytes]]
) -> None:
    sem = asyncio.Semaphore(ingest.WINDOW)

    async def one(participant: str, update_id: str, body: bytes) -> None:
        async with sem:
            await transport.publish_update(spec.task_id, participant, body, message_id=update_id)

    await asyncio.gather(*(one(*u) for u in updates))


async def drain(
    spec: TaskSpec, store: RedisModelStore, transport: Transport, n: int, target: int
) -> tuple[float, float, AggregatorService, list[float]]:
    """Run the service until the head reaches ``target``.

    Returns startup seconds, drain seconds, the service, each announcement's seconds.
    """
    stop = asyncio.Event()
    finished: list[float] = []

    async def on_version(record: VersionRecord, params: Tensors) -> None:
        if record.version >= target and not finished:
            finished.append(time.perf_counter())
            stop.set()

    announce_times: list[float] = []

    @contextlib.contextmanager
    def stages(name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            if name == "announce":
                announce_times.append(time.perf_counter() - t)

    service = AggregatorService(
        spec,
        store,
        transport,
        ServiceConfig(require_sender_match=False),
        on_version=on_version,
        stages=stages,
    )
    t0 = time.perf_counter()
    runner = asyncio.create_task(service.run(stop))
    ready = asyncio.create_task(service.ready.wait())
    await asyncio.wait([runner, ready], return_when=asyncio.FIRST_COMPLETED)
    if runner.done():
        runner.result()
    t1 = time.perf_counter()
    deadline = t1 + 600
    while not stop.is_set() and time.perf_counter() < deadline:
        if service.stats.accepted + service.stats.refused_total >= n:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await runner
    end = finished[0] if finished else time.perf_counter()
    return t1 - t0, end - t1, service, announce_times


async def one_run(
    backend: str, participants: int, strategy: str, n: int, args: argparse.Namespace
) -> Row:
    spec = make_spec(participants, strategy)
    updates = await asyncio.to_thread(ingest.make_bodies, spec, n, ingest.base_of(strategy))
    target = n if strategy == "fedasync" else n // ingest.FEDBUFF_K
    topology = TaskTopology(spec.task_id, spec.participants)
    prefix = f"fedqbench-scale-{uuid.uuid4().hex[:8]}"
    if backend == "embedded":
        broker = MemoryBroker()
        agg: Transport = MemoryTransport(broker, "fedq-aggregator")
        pub: Transport = MemoryTransport(broker, "bench")
        store = RedisModelStore(connect_redis("memory://"), StoreConfig(prefix=prefix))
    else:
        agg = await AmqpTransport.connect(args.amqp_url, name="bench-scale-aggregator")
        pub = await AmqpTransport.connect(args.amqp_url, name="bench-scale-publisher")
        store = RedisModelStore(
            connect_redis(args.redis_url), StoreConfig(prefix=prefix, keep_blobs=4)
        )
    try:
        t = time.perf_counter()
        await pub.declare_task(topology)
        declare_s = time.perf_counter() - t
        await publish(pub, spec, updates)
        del updates
        startup, drain_s, service, announce = await drain(spec, store, agg, n, target)
    finally:
        await agg.close()
        await pub.close()
        await store.close()
        if backend == "real":
            await delete_queues(args.amqp_url, ingest.task_queues(spec))
            await delete_redis_prefix(args.redis_url, prefix)
    row = Row(
        backend=backend,
        participants=participants,
        strategy=strategy if strategy == "fedasync" else f"fedbuff K={ingest.FEDBUFF_K}",
        updates=service.stats.accepted,
        declare_s=declare_s,
        startup_s=startup,
        drain_s=drain_s,
        ms_per_update=1000 * drain_s / max(service.stats.accepted, 1),
        announcements=len(announce),
        announce_ms=1000 * sum(announce) / max(len(announce), 1),
        refused=service.stats.refused_total,
    )
    print(
        f"  {backend:<8} {participants:>5} participants, {row.strategy:<12}: declare "
        f"{declare_s:.2f} s, startup {startup:.2f} s, {row.ms_per_update:.2f} ms/update, "
        f"{row.announcements} "
        f"announcements of {row.announce_ms:.1f} ms, refused {row.refused}",
        flush=True,
    )
    return row


async def main_async(args: argparse.Namespace) -> list[Row]:
    n = args.count or (400 if args.quick else 1000)
    backends = ["embedded"] if args.embedded_only else ["embedded", "real"]
    rows = []
    for backend in backends:
        for participants in args.participants:
            for strategy in STRATEGIES:
                rows.append(await one_run(backend, participants, strategy, n, args))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="400 updates per run instead of 1,000")
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    p.add_argument("--count", type=int, help="updates per run")
    p.add_argument(
        "--participants",
        type=lambda v: [int(x) for x in v.split(",")],
        default=list(PARTICIPANTS),
    )
    p.add_argument("--embedded-only", action="store_true")
    p.add_argument("--amqp-url", default=os.environ.get("FEDQ_TEST_AMQP_URL", DEFAULT_AMQP))
    p.add_argument("--redis-url", default=os.environ.get("FEDQ_TEST_REDIS_URL", DEFAULT_REDIS))
    args = p.parse_args()
    configure_logging("warning", "json")
    rows = asyncio.run(main_async(args))
    base: dict[tuple[str, str], float] = {}
    out = []
    for r in rows:
        ref = base.setdefault((r.backend, r.strategy), r.ms_per_update)
        out.append(
            [
                r.backend,
                r.participants,
                r.strategy,
                r.updates,
                r.declare_s,
                r.startup_s,
                r.ms_per_update,
                r.ms_per_update / ref,
                r.announcements,
                r.announce_ms,
                r.refused,
            ]
        )
    print(
        table(
            [
                "backend",
                "participants",
                "strategy",
                "updates",
                "declare s",
                "startup s",
                "ms/update",
                f"vs {args.participants[0]}",
                "announcements",
                "ms/announce",
                "refused",
            ],
            out,
            title="Aggregator cost per update as participants grow (10k-parameter MLP)",
        )
    )
    write_json(
        args.out,
        envelope(
            "scale",
            args.quick,
            {"rows": [asdict(r) for r in rows]},
            settings={
                "model_params": 10_011,
                "window": ingest.WINDOW,
                "fedbuff_k": ingest.FEDBUFF_K,
                "amqp_url": args.amqp_url,
                "redis_url": args.redis_url,
                "log_level": "warning (per-commit info logs off, unlike bench/ingest.py)",
            },
        ),
    )


if __name__ == "__main__":
    main()
