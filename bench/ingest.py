"""Aggregator ingest against the broker's ceiling, side by side in one run.

For each model size (about 10 thousand and about 1 million float32 parameters):

1. **Ceiling**: raw aio-pika, the same message bodies. Publish N persistent
   messages with publisher confirms (8 in flight) to a fresh quorum queue, then
   consume them with manual acks (prefetch 64) and no processing.
2. **fedq**, per strategy (FedAsync; FedBuff with K = 10): declare the task's
   topology with ``AmqpTransport.declare_task`` (what the service itself calls),
   publish the same number of encoded updates with ``AmqpTransport.publish_update``
   (8 in flight), then start ``AggregatorService`` in a fresh subprocess and time
   the drain of that backlog: from the service being ready until the head reaches
   the last version (every update decoded, validated, aggregated, committed to
   Redis and acked). The subprocess reports its own peak RSS (VmHWM).

The ratio is aggregator updates/s over raw consume updates/s: both drain a
backlog of the same bodies from a quorum queue with manual acks.

    python bench/ingest.py [--quick] [--out bench/results/ingest.json] [--profile]

Everything created (queues, Redis keys under a private prefix) is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import torch
from _common import (
    DEFAULT_AMQP,
    DEFAULT_REDIS,
    RESULTS,
    delete_queues,
    delete_redis_prefix,
    envelope,
    peak_rss_mib,
    rss_mib,
    table,
    write_json,
)
from _profile import py_spy, render, summarize

from aggregator.stats import Stages
from common.models import build_task_model, model_tensors
from common.spec import AsyncSettings, ModelSpec, NumericFeature, TargetSpec, TaskSpec
from common.transport import TaskTopology
from common.transport.amqp import AmqpTransport
from common.transport.names import audit_stream, dead_queue, model_queue, work_queue
from common.wire import UpdateEnvelope, decode_update, encode_update

N_FEATURES = 20
#: Participants named in the task: the service declares one model queue each.
N_PARTICIPANTS = 5
#: Publishes awaiting their confirm at once (raw and fedq alike).
WINDOW = 8
PREFETCH = 64
FEDBUFF_K = 10


@dataclass(frozen=True, slots=True)
class Size:
    label: str
    hidden: tuple[int, ...]
    count: int
    quick_count: int


# 20 inputs: 20*455 + 455 + 455 + 1 = 10,011 parameters;
# 20*1000 + 1000 + 1000*977 + 977 + 977 + 1 = 999,955 parameters.
SIZES = (
    Size("10k", (455,), count=1000, quick_count=300),
    Size("1M", (1000, 977), count=200, quick_count=50),
)
STRATEGIES = ("fedasync", "fedbuff")


def make_spec(size: Size, strategy: str, tag: str) -> TaskSpec:
    return TaskSpec(
        task_id=f"bench-ingest-{size.label.lower()}-{strategy}-{tag}",
        model=ModelSpec(kind="mlp", hidden=size.hidden),
        features=tuple(NumericFeature(name=f"x{i:02d}") for i in range(N_FEATURES)),
        target=TargetSpec(name="y"),
        mode="async",
        async_=AsyncSettings(strategy=strategy, buffer_size=FEDBUFF_K),
        participants=tuple(f"bank-{i:02d}" for i in range(N_PARTICIPANTS)),
    )


def n_params(spec: TaskSpec) -> int:
    return sum(t.numel() for t in model_tensors(build_task_model(spec)).values())


def base_of(strategy: str) -> Callable[[int], int]:
    """The base version of the i-th update, so it is never ahead of the head.

    With ``WINDOW`` publishes in flight, update i lands at queue position
    ``>= i - WINDOW + 1``; the head when it is consumed is that position (FedAsync:
    one version per update) or that position // K (FedBuff). Staleness stays
    below 2 * WINDOW, inside the default maximum of 20.
    """
    if strategy == "fedasync":
        return lambda i: max(0, i - WINDOW)
    return lambda i: max(0, (i - WINDOW) // FEDBUFF_K)


def make_bodies(
    spec: TaskSpec, n: int, base: Callable[[int], int], codec: str = "zstd"
) -> list[tuple[str, str, bytes]]:
    """``n`` encoded updates ``(participant, update id, body)`` for ``spec``'s model.

    Four random deltas (N(0, 1e-3), float32, zstd) are encoded with
    ``encode_update``; each update re-packs one of them with its own id, participant
    and base version. The content hash covers the tensors only, so a re-packed body
    is byte for byte what ``encode_update`` would give for those fields.
    """
    shapes = {k: v.shape for k, v in model_tensors(build_task_model(spec)).items()}
    gen = torch.Generator().manual_seed(7)
    templates: list[dict[str, Any]] = []
    for j in range(4):
        delta = {k: torch.randn(s, generator=gen) * 1e-3 for k, s in shapes.items()}
        body, _ = encode_update(
            UpdateEnvelope(
                task=spec.task_id,
                participant=spec.participants[0],
                update_id=f"template-{j}",
                base_version=0,
                num_samples=100,
                tensors=delta,
                spec_hash=spec.spec_hash(),
                metrics={"train_loss": 0.5},
                codec=codec,
                created_at=time.time(),
            )
        )
        templates.append(msgpack.unpackb(body, raw=False))
    out = []
    for i in range(n):
        doc = dict(templates[i % len(templates)])
        participant = spec.participants[i % len(spec.participants)]
        update_id = uuid.uuid4().hex
        doc.update(p=participant, id=update_id, bv=base(i))
        out.append((participant, update_id, msgpack.packb(doc, use_bin_type=True)))
    decode_update(out[-1][2])  # the re-packed body is a valid update
    return out


# --------------------------------------------------------------------------- ceiling


async def raw_ceiling(amqp_url: str, bodies: list[bytes]) -> dict[str, float]:
    """Raw aio-pika publish (confirms, persistent, quorum queue) then consume (manual acks)."""
    name = f"bench.ceiling.{uuid.uuid4().hex[:8]}"
    conn = await aio_pika.connect_robust(amqp_url)
    try:
        pub = await conn.channel(publisher_confirms=True)
        await pub.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        sem = asyncio.Semaphore(WINDOW)

        async def publish(body: bytes) -> None:
            async with sem:
                await pub.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=name,
                    mandatory=True,
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(publish(b) for b in bodies))
        t_pub = time.perf_counter() - t0

        sub = await conn.channel()
        await sub.set_qos(prefetch_count=PREFETCH)
        q = await sub.declare_queue(name, passive=True)
        done = asyncio.Event()
        got = 0

        async def on_message(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal got
            await msg.ack()
            got += 1
            if got == len(bodies):
                done.set()

        t0 = time.perf_counter()
        tag = await q.consume(on_message)
        await asyncio.wait_for(done.wait(), timeout=600)
        t_con = time.perf_counter() - t0
        await q.cancel(tag)
        await pub.queue_delete(name)
    finally:
        await conn.close()
        await delete_queues(amqp_url, [name])
    total = sum(len(b) for b in bodies)
    return {
        "publish_s": t_pub,
        "publish_per_s": len(bodies) / t_pub,
        "publish_mb_s": total / t_pub / 1e6,
        "consume_s": t_con,
        "consume_per_s": len(bodies) / t_con,
        "consume_mb_s": total / t_con / 1e6,
    }


# --------------------------------------------------------------------------- fedq


def task_queues(spec: TaskSpec) -> list[str]:
    t = spec.task_id
    return [
        work_queue(t),
        audit_stream(t),
        dead_queue(t),
        *(model_queue(t, p) for p in spec.participants),
    ]


async def publish_backlog(
    amqp_url: str, spec: TaskSpec, updates: list[tuple[str, str, bytes]]
) -> float:
    """Declare the task's topology, then publish every update through fedq's transport."""
    transport = await AmqpTransport.connect(amqp_url, name="bench-ingest-publisher")
    try:
        await transport.declare_task(TaskTopology(spec.task_id, spec.participants))
        sem = asyncio.Semaphore(WINDOW)

        async def publish(participant: str, update_id: str, body: bytes) -> None:
            async with sem:
                await transport.publish_update(
                    spec.task_id, participant, body, message_id=update_id
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(publish(*u) for u in updates))
        return time.perf_counter() - t0
    finally:
        await transport.close()


def run_child(cfg: dict[str, Any], profile_to: Path | None) -> dict[str, Any]:
    """Run the aggregator in a fresh interpreter (its own RSS), optionally under py-spy."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child"]
    cfg = {**cfg, "profile_to": str(profile_to) if profile_to else None}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(  # noqa: S603 - our own interpreter and script
            cmd,
            env={**os.environ, **cfg.get("env", {})},
            input=json.dumps(cfg),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=cfg["timeout_s"] + 120,
            check=False,
        )
        err.seek(0)
        log_lines = err.read().splitlines()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(log_lines[-20:])
        raise RuntimeError(f"aggregator child failed (rc {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["log_lines"] = len(log_lines)
    return result


async def child_main(cfg: dict[str, Any]) -> dict[str, Any]:
    """The aggregator: drain the backlog until the head reaches ``target_version``."""
    from aggregator.service import AggregatorService, ServiceConfig
    from aggregator.store import RedisModelStore, StoreConfig, connect_redis
    from aggregator.store.records import VersionRecord
    from common.logging import configure_logging
    from common.wire import Tensors

    configure_logging("info", "json")  # what a deployed aggregator does (to stderr)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg["torch_threads"]))
    spec = TaskSpec.from_json(cfg["spec"])
    timers, stages = stage_timers()
    store = RedisModelStore(
        connect_redis(cfg["redis_url"]),
        StoreConfig(
            prefix=cfg["prefix"], keep_blobs=cfg["keep_blobs"], blob_codec=cfg["blob_codec"]
        ),
        stages=stages,
    )
    transport = await AmqpTransport.connect(cfg["amqp_url"], name="bench-ingest-aggregator")
    target = int(cfg["target_version"])
    stop = asyncio.Event()
    finished: list[float] = []

    async def on_version(record: VersionRecord, params: Tensors) -> None:
        if record.version >= target and not finished:
            finished.append(time.perf_counter())
            stop.set()

    service = AggregatorService(
        spec,
        store,
        transport,
        ServiceConfig(require_sender_match=False, prefetch=PREFETCH),
        on_version=on_version,
        stages=stages,
    )
    rss_before = rss_mib()
    runner = asyncio.create_task(service.run(stop))
    ready = asyncio.create_task(service.ready.wait())
    await asyncio.wait([runner, ready], return_when=asyncio.FIRST_COMPLETED)
    if runner.done():
        runner.result()
    spy = start_profiler(cfg.get("profile_to"))
    t0 = time.perf_counter()
    deadline = t0 + float(cfg["timeout_s"])
    while not stop.is_set() and time.perf_counter() < deadline:
        # Refusals would keep the head below the target: stop when all are handled.
        if service.stats.accepted + service.stats.refused_total >= int(cfg["updates"]):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await runner
    stop_profiler(spy)
    await transport.close()
    await store.close()
    end = finished[0] if finished else time.perf_counter()
    return {
        "breakdown_s": dict(timers),
        "seconds": end - t0,
        "reached_target": bool(finished),
        "head": service.head_version,
        "accepted": service.stats.accepted,
        "refused": dict(service.stats.refused),
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak_rss_mib(),
    }


def stage_timers() -> tuple[dict[str, float], Stages]:
    """Wall-clock timers for the service's and the store's named stages.

    The service and the store call the hook around each stage of the consumer loop
    (``handle``, ``admit``, ``offer``, ``applied_in``, ``commit``, the store's encode
    and transaction): one ``perf_counter`` pair per call, negligible next to the
    stages they time. Stages nest: ``handle`` contains the others.
    """
    timers: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            timers[name] = timers.get(name, 0.0) + time.perf_counter() - t

    return timers, stage


def start_profiler(path: str | None) -> subprocess.Popen[bytes] | None:
    """py-spy on this very process, from now on (so imports and set-up are left out)."""
    exe = py_spy()
    if path is None or exe is None:
        return None
    spy = subprocess.Popen(  # noqa: S603 - py-spy from our own environment
        [
            exe,
            "record",
            "--pid",
            str(os.getpid()),
            "--format",
            "raw",
            "--rate",
            "200",
            "--nonblocking",
            "-o",
            path,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)  # let it attach
    return spy


def stop_profiler(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


# --------------------------------------------------------------------------- driver


@dataclass(slots=True)
class Row:
    size: str
    params: int
    body_bytes: int
    updates: int
    strategy: str
    raw_publish_per_s: float
    fedq_publish_per_s: float
    raw_consume_per_s: float
    raw_consume_mb_s: float
    agg_per_s: float
    agg_mb_s: float
    ratio: float
    versions: int
    refused: int
    peak_rss_mib: float
    rss_before_mib: float


async def bench_size(
    size: Size, n: int, args: argparse.Namespace, profiles: dict[str, Any]
) -> tuple[list[Row], dict[str, Any]]:
    """The ceiling before and after (mean of the two), the aggregator per strategy between."""
    tag = uuid.uuid4().hex[:8]
    spec0 = make_spec(size, "fedasync", tag)
    params = n_params(spec0)
    print(f"\n== {size.label}: {params:,} parameters, {n} updates", flush=True)
    bodies = [
        b
        for _, _, b in await asyncio.to_thread(
            make_bodies, spec0, n, base_of("fedasync"), args.codec
        )
    ]
    body_bytes = len(bodies[0])
    before = await raw_ceiling(args.amqp_url, bodies)
    print(
        f"   ceiling (before): publish {before['publish_per_s']:.1f}/s, "
        f"consume {before['consume_per_s']:.1f}/s ({before['consume_mb_s']:.1f} MB/s)",
        flush=True,
    )
    results: dict[tuple[str, str], tuple[dict[str, Any], float, int]] = {}
    for threads in args.torch_threads:
        for strategy in STRATEGIES:
            results[strategy, threads] = await bench_strategy(
                size, n, strategy, threads, tag, args, profiles
            )
    after = await raw_ceiling(args.amqp_url, bodies)
    print(
        f"   ceiling (after):  publish {after['publish_per_s']:.1f}/s, "
        f"consume {after['consume_per_s']:.1f}/s ({after['consume_mb_s']:.1f} MB/s)",
        flush=True,
    )
    ceiling = {k: (before[k] + after[k]) / 2 for k in before}
    rows: list[Row] = []
    breakdowns: dict[str, Any] = {}
    for (strategy, threads), (res, pub_s, total_bytes) in results.items():
        agg_per_s = res["accepted"] / res["seconds"]
        label = strategy if strategy == "fedasync" else f"fedbuff K={FEDBUFF_K}"
        if threads != "default":
            label += f", torch threads={threads}"
        rows.append(
            Row(
                size=size.label,
                params=params,
                body_bytes=body_bytes,
                updates=n,
                strategy=label,
                raw_publish_per_s=ceiling["publish_per_s"],
                fedq_publish_per_s=n / pub_s,
                raw_consume_per_s=ceiling["consume_per_s"],
                raw_consume_mb_s=ceiling["consume_mb_s"],
                agg_per_s=agg_per_s,
                agg_mb_s=total_bytes / n * agg_per_s / 1e6,
                ratio=agg_per_s / ceiling["consume_per_s"],
                versions=res["head"],
                refused=sum(res["refused"].values()),
                peak_rss_mib=res["peak_rss_mib"],
                rss_before_mib=res["rss_before_mib"],
            )
        )
        per_update = {k: 1000 * v / max(res["accepted"], 1) for k, v in res["breakdown_s"].items()}
        per_update["drain wall (all)"] = 1000 * res["seconds"] / max(res["accepted"], 1)
        key = f"{size.label}/{strategy}" + ("" if threads == "default" else f"/t{threads}")
        breakdowns[key] = per_update
    return rows, {"ceiling": ceiling, "before": before, "after": after, "breakdowns": breakdowns}


async def bench_strategy(
    size: Size,
    n: int,
    strategy: str,
    threads: str,
    tag: str,
    args: argparse.Namespace,
    profiles: dict[str, Any],
) -> tuple[dict[str, Any], float, int]:
    """Publish a backlog of n updates through fedq, then drain it with the service."""
    tag = tag if threads == "default" else f"{tag}-t{threads}"
    spec = make_spec(size, strategy, tag)
    updates = await asyncio.to_thread(make_bodies, spec, n, base_of(strategy), args.codec)
    total_bytes = sum(len(b) for _, _, b in updates)
    prefix = f"fedqbench-{tag}-{strategy}"
    target = n if strategy == "fedasync" else n // FEDBUFF_K
    try:
        pub_s = await publish_backlog(args.amqp_url, spec, updates)
        del updates
        cfg = {
            "spec": spec.to_json(),
            "amqp_url": args.amqp_url,
            "redis_url": args.redis_url,
            "prefix": prefix,
            "keep_blobs": 4,
            "blob_codec": args.blob_codec,
            "target_version": target,
            "updates": n,
            "timeout_s": 600,
            "torch_threads": None if threads == "default" else int(threads),
            "env": dict(kv.split("=", 1) for kv in args.child_env),
        }
        prof = None
        if args.profile:
            prof = Path(tempfile.gettempdir()) / f"bench-ingest-{spec.task_id}.txt"
        res = await asyncio.to_thread(run_child, cfg, prof)
        if prof is not None and prof.exists():
            summary = summarize(prof)
            profiles[f"{size.label}/{strategy}/threads={threads}"] = summary
            print(f"   py-spy, aggregator {size.label} {strategy}:\n{render(summary)}")
    finally:
        await delete_queues(args.amqp_url, task_queues(spec))
        await delete_redis_prefix(args.redis_url, prefix)
    agg_per_s = res["accepted"] / res["seconds"]
    print(
        f"   {strategy} (torch threads: {threads}): fedq publish {n / pub_s:.1f}/s, "
        f"aggregator {agg_per_s:.1f}/s, "
        f"{res['head']} versions, peak RSS {res['peak_rss_mib']:.0f} MiB "
        f"(at start {res['rss_before_mib']:.0f}), refused {res['refused'] or 0}",
        flush=True,
    )
    return res, pub_s, total_bytes


async def main_async(args: argparse.Namespace) -> None:
    rows: list[Row] = []
    ceilings: dict[str, Any] = {}
    breakdowns: dict[str, Any] = {}
    profiles: dict[str, Any] = {}
    sizes = [s for s in SIZES if not args.size or s.label in args.size]
    for size in sizes:
        n = size.quick_count if args.quick else size.count
        if args.count:
            n = args.count
        size_rows, extra = await bench_size(size, n, args, profiles)
        rows += size_rows
        ceilings[size.label] = {k: extra[k] for k in ("ceiling", "before", "after")}
        breakdowns.update(extra["breakdowns"])
    headers = [
        "size",
        "msg KB",
        "N",
        "strategy",
        "raw consume upd/s",
        "raw MB/s",
        "aggregator upd/s",
        "agg MB/s",
        "ratio agg/raw",
        "raw publish upd/s",
        "fedq publish upd/s",
        "peak RSS MiB",
    ]
    print(
        table(
            headers,
            [
                [
                    r.size,
                    r.body_bytes / 1024,
                    r.updates,
                    r.strategy,
                    r.raw_consume_per_s,
                    r.raw_consume_mb_s,
                    r.agg_per_s,
                    r.agg_mb_s,
                    r.ratio,
                    r.raw_publish_per_s,
                    r.fedq_publish_per_s,
                    r.peak_rss_mib,
                ]
                for r in rows
            ],
            title="Ingest: aggregator full path vs raw aio-pika on the same broker, same run",
        )
    )
    steps = sorted({k for b in breakdowns.values() for k in b})
    print(
        table(
            ["step (ms per update, wall)", *breakdowns],
            [[k, *(b.get(k) for b in breakdowns.values())] for k in steps],
            title="Where the aggregator's time goes (timers around the consumer loop's steps)",
        )
    )
    doc = envelope(
        "ingest",
        args.quick,
        {
            "rows": [asdict(r) for r in rows],
            "ceilings": ceilings,
            "breakdown_ms_per_update": breakdowns,
            "profiles": profiles,
        },
        settings={
            "window": WINDOW,
            "prefetch": PREFETCH,
            "fedbuff_k": FEDBUFF_K,
            "participants": N_PARTICIPANTS,
            "features": N_FEATURES,
            "store_keep_blobs": 4,
            "torch_threads": args.torch_threads,
            "child_env": args.child_env,
            "update_codec": args.codec,
            "blob_codec": args.blob_codec,
            "torch_default_threads": torch.get_num_threads(),
            "amqp_url": args.amqp_url,
            "redis_url": args.redis_url,
        },
    )
    write_json(args.out, doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer updates (about 20 s)")
    p.add_argument("--out", type=Path, default=RESULTS / "ingest.json")
    p.add_argument("--amqp-url", default=os.environ.get("FEDQ_TEST_AMQP_URL", DEFAULT_AMQP))
    p.add_argument("--redis-url", default=os.environ.get("FEDQ_TEST_REDIS_URL", DEFAULT_REDIS))
    p.add_argument("--size", action="append", choices=[s.label for s in SIZES])
    p.add_argument("--count", type=int, help="updates per size (overrides the defaults)")
    p.add_argument(
        "--torch-threads",
        type=lambda v: v.split(","),
        default=["default"],
        help="comma-separated torch intra-op thread counts to run the aggregator with "
        "('default' = as fedq ships, torch's own choice); e.g. default,1",
    )
    p.add_argument(
        "--profile", action="store_true", help="run each aggregator under py-spy, print hot spots"
    )
    p.add_argument("--codec", default="zstd", help="codec of the updates (zstd, raw)")
    p.add_argument("--blob-codec", default="zstd", help="codec of stored versions (zstd, raw)")
    p.add_argument(
        "--child-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the aggregator process, e.g. MALLOC_MMAP_THRESHOLD_=131072",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = asyncio.run(child_main(json.loads(sys.stdin.read())))
        print(json.dumps(result), flush=True)
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
