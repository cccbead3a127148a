"""The aggregator's cost per update as the participants named in the task grow:
10, 100, 1,000, 10,000.

The task names its participants (``TaskSpec.participants``). With the current
topology (common/transport/amqp.py) the aggregator declares, per task, the work
queue, the audit stream, the dead-letter queue, ONE model stream, the head queue, and
one receipt queue per participant (bounded by ``x-max-length``; declared over several
channels at once). Each version is announced once, into the model stream, whatever
the number of participants; each update gets one receipt, to its bank's queue.

Simulated participants publish a backlog of precomputed updates (round-robin over the
participants; the same number of updates at every participant count); the service
then drains it. Models (``--sizes``, built as bench/ingest.py builds them): ``mlp``
(MLP 74-32-1, 2,433 parameters) and ``10k`` (MLP 20-455-1, 10,011 parameters).
Strategies: FedAsync and FedBuff (K = 10). Per backend, size, strategy and
participant count:

- **first declare**: the first creation of the task's topology (by the benchmark,
  with the same ``AmqpTransport.declare_task`` the service calls);
- **startup**: the service's own start, from ``service.run`` to ready: the writer
  lease, ``prepare`` (``declare_task`` again on the existing topology, the broker's
  last announcement, registering, version 0, loading the head, announcing it). Its
  parts are timed too (``declare_task``, ``last_announcement``, the first announce);
- **cost per update** = drain wall-clock / updates, the drain timed from ready until
  the head reaches the last version; "incl. receipts" until the broker has also
  confirmed the receipt of every update (receipts are sent in the background, so
  the head can be reached first). Flat is the goal;
- **announcements**: how many the announcer sent during the drain and their mean
  time (signing the blob + one confirmed publish into the model stream; superseded
  versions are skipped);
- the service's and the store's **stage timings** (``stages=``, aggregator/stats.py
  ``Stages``), per update, in the JSON; ``--profile`` adds py-spy over each drain.

Embedded (MemoryTransport + fakeredis, one process: what the aggregator itself does,
without a broker) and real (RabbitMQ + Redis) side by side; ``--backends`` picks.
Nobody consumes the receipt queues (the bench has no banks); every queue the bench
creates (work, audit, dead-letter, model stream, head and every receipt queue) and
every Redis key under its prefix is deleted after each run, and again at the end by
a sweep of anything with this invocation's tag (``rabbitmqctl list_queues``), even
when a run fails or the bench is interrupted; the sweep's findings are reported.

    python bench/scale.py [--quick] [--runs N] [--participants 10,100,1000,10000]
                          [--sizes mlp,10k] [--backends embedded,real] [--count N]
                          [--profile] [--out bench/results/scale.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import ingest
from _common import (
    DEFAULT_AMQP,
    DEFAULT_REDIS,
    RESULTS,
    _rabbitmqctl,
    envelope,
    table,
    write_json,
)
from _profile import summarize

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, StoreConfig, VersionRecord, connect_redis
from common.logging import configure_logging
from common.segments import Segments
from common.spec import AsyncSettings, ModelSpec, NumericFeature, TargetSpec, TaskSpec
from common.transport import TaskTopology, Transport, names
from common.transport.amqp import AmqpTransport
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import Tensors

PARTICIPANTS = (10, 100, 1000, 10_000)
STRATEGIES = ("fedasync", "fedbuff")
DEFAULT_SIZES = ("mlp", "10k")
SIZES = {s.label: s for s in ingest.SIZES if s.label in ("mlp", "10k")}
#: Updates per run (the same at every participant count), per size.
COUNTS = {"mlp": 2000, "10k": 1000}
QUICK_COUNTS = {"mlp": 400, "10k": 300}
#: Channels the bench deletes its queues over (nowait, like the service's declaration).
DELETE_LANES = 8
#: Every name the bench gives a task or a Redis prefix starts with this and the tag.
TASK_PREFIX = "bench-scale"
REDIS_PREFIX = "fedqbench-scale"


@dataclass(slots=True)
class Row:
    run: int
    backend: str
    size: str
    params: int
    participants: int
    strategy: str
    updates: int
    refused: int
    declare_s: float
    startup_s: float
    #: Parts of the start-up: the service's declare_task, last_announcement, the first
    #: announcement; ``other`` = the lease, the store's reads and writes, loading the head.
    startup_parts_s: dict[str, float]
    drain_s: float
    ms_per_update: float
    #: From ready until every update's receipt was confirmed by the broker.
    receipts_s: float
    ms_per_update_with_receipts: float
    receipts_sent: int
    receipts_dropped: int
    announcements: int
    announce_ms: float
    #: Of it, the transport's announce_model (one confirmed publish into the stream).
    announce_publish_ms: float
    #: The service's and the store's named stages during the drain: ms per update.
    stages_ms_per_update: dict[str, float]
    stage_calls: dict[str, int]
    #: Deleting the run's queues and Redis keys afterwards.
    cleanup_s: float
    #: Cores busy on average per phase (first declare, startup, drain): this process,
    #: the broker, Redis, the rest of the machine.
    cpu: dict[str, dict[str, float]]
    profile: dict[str, Any] | None = field(default=None)


# --------------------------------------------------------------------------- set-up


def make_spec(tag: str, size: str, participants: int, strategy: str) -> TaskSpec:
    s = SIZES[size]
    return TaskSpec(
        task_id=f"{TASK_PREFIX}-{tag}-{size}-{participants}-{strategy}-{uuid.uuid4().hex[:6]}",
        model=ModelSpec(kind="mlp", hidden=s.hidden),
        features=tuple(NumericFeature(name=f"x{i:02d}") for i in range(s.features)),
        target=TargetSpec(name="y"),
        mode="async",
        async_=AsyncSettings(strategy=strategy, buffer_size=ingest.FEDBUFF_K),  # type: ignore[arg-type]
        participants=tuple(f"bank-{i:05d}" for i in range(participants)),
    )


def task_queues(spec: TaskSpec) -> list[str]:
    """Every queue the current topology declares for the task (names.py), receipt
    queues included; the legacy per-participant model queues are no longer declared
    (the final sweep would catch any)."""
    t = spec.task_id
    out = [
        names.work_queue(t),
        names.audit_stream(t),
        names.dead_queue(t),
        names.model_stream(t),
        names.head_queue(t),
    ]
    return out + [names.receipt_queue(t, p) for p in spec.participants]


class TimedTransport:
    """The service's transport, with the calls of its start-up and the receipts timed."""

    def __init__(self, inner: Transport, timers: dict[str, float]) -> None:
        self._inner = inner
        self._timers = timers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self._timers[name] = self._timers.get(name, 0.0) + time.perf_counter() - t

    async def declare_task(self, topology: TaskTopology) -> None:
        with self._timed("declare_task"):
            await self._inner.declare_task(topology)

    async def last_announcement(self, task: str) -> Any:
        with self._timed("last_announcement"):
            return await self._inner.last_announcement(task)

    async def announce_model(
        self, task: str, version: int, body: bytes | Segments, **kw: Any
    ) -> None:
        with self._timed("announce_model"):
            await self._inner.announce_model(task, version, body, **kw)
        self._timers["announce_model_calls"] = self._timers.get("announce_model_calls", 0) + 1


class StageTimers:
    """A ``Stages`` hook: seconds and calls per stage, restartable (drain only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        self.seconds, self.calls = {}, {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
            self.calls[name] = self.calls.get(name, 0) + 1


async def publish(
    transport: Transport, spec: TaskSpec, updates: list[tuple[str, str, bytes]]
) -> None:
    sem = asyncio.Semaphore(ingest.WINDOW)

    async def one(participant: str, update_id: str, body: bytes) -> None:
        async with sem:
            await transport.publish_update(spec.task_id, participant, body, message_id=update_id)

    await asyncio.gather(*(one(*u) for u in updates))


# --------------------------------------------------------------------------- CPU


def server_pid(port: int) -> int | None:
    """The process listening on ``port`` on this machine (``ss -ltnp``), if visible."""
    import re
    import subprocess

    try:
        out = subprocess.run(  # noqa: S603 - fixed arguments
            ["ss", "-ltnpH", f"sport = :{port}"],  # noqa: S607 - read-only query
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"pid=(\d+)", out)
    return int(m.group(1)) if m else None


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _system_busy() -> float:
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in cpu]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / _TICK


class CpuProbe:
    """CPU seconds over a phase: this process (the service and the bench's publisher
    share it), the broker, Redis, and everything else on the machine (other engineers'
    work included), as cores busy on average."""

    def __init__(self, amqp_url: str, redis_url: str, *, servers: bool) -> None:
        from urllib.parse import urlsplit

        self.broker = server_pid(urlsplit(amqp_url).port or 5672) if servers else None
        self.redis = server_pid(urlsplit(redis_url).port or 6379) if servers else None

    def snapshot(self) -> dict[str, float | None]:
        return {
            "wall": time.perf_counter(),
            "self": time.process_time(),
            "broker": _proc_cpu(self.broker),
            "redis": _proc_cpu(self.redis),
            "system": _system_busy(),
        }

    @staticmethod
    def delta(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, float]:
        """Cores busy on average between the snapshots ``a`` and ``b``, and the wall."""
        wall = max(float(b["wall"] or 0) - float(a["wall"] or 0), 1e-9)
        out: dict[str, float] = {"wall_s": wall}
        known = 0.0
        for k in ("self", "broker", "redis"):
            if a[k] is not None and b[k] is not None:
                used = float(b[k]) - float(a[k])  # type: ignore[arg-type]
                out[f"{k}_cores"] = used / wall
                known += used
        out["other_cores"] = (float(b["system"] or 0) - float(a["system"] or 0) - known) / wall
        return out


# --------------------------------------------------------------------------- clean-up


async def delete_queues_fast(amqp_url: str, queues: Sequence[str]) -> list[str]:
    """Delete ``queues`` over several channels, each sending its deletions without
    waiting for each reply (``nowait``), then one call with a reply, which confirms
    them all (the broker handles a channel's methods in order). Deleting a queue that
    does not exist succeeds in RabbitMQ. Returns the queues of the lanes that failed
    (the caller deletes those one by one)."""
    conn = await aio_pika.connect(amqp_url)
    lanes = max(1, min(DELETE_LANES, len(queues)))
    chunks = [list(queues[i::lanes]) for i in range(lanes)]

    async def lane(chunk: list[str]) -> None:
        ch = await conn.channel()
        try:
            raw = await ch.get_underlay_channel()
            for q in chunk:
                await raw.queue_delete(q, nowait=True)
            await raw.basic_qos(prefetch_count=0)
        finally:
            with contextlib.suppress(Exception):
                await ch.close()

    try:
        done = await asyncio.gather(*(lane(c) for c in chunks), return_exceptions=True)
    finally:
        await conn.close()
    return [q for c, d in zip(chunks, done, strict=True) if isinstance(d, BaseException) for q in c]


async def delete_queues_one_by_one(amqp_url: str, queues: Sequence[str]) -> list[str]:
    """Delete each queue with its own reply; returns those that could not be deleted."""
    failed: list[str] = []
    conn = await aio_pika.connect(amqp_url)
    try:
        ch = await conn.channel()
        for q in queues:
            try:
                await ch.queue_delete(q)
            except Exception as e:  # noqa: BLE001 - report, carry on with the others
                failed.append(f"{q} ({type(e).__name__})")
                ch = await conn.channel()  # an error closes the channel
    finally:
        await conn.close()
    return failed


async def delete_queues(amqp_url: str, queues: Sequence[str]) -> None:
    left = await delete_queues_fast(amqp_url, queues)
    if left:
        failed = await delete_queues_one_by_one(amqp_url, left)
        for f in failed:
            print(f"   (queue {f} not deleted)", flush=True)


async def delete_redis_keys(redis_url: str, pattern: str) -> int:
    """Delete every key matching ``pattern`` (SCAN + DEL in batches)."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    n = 0
    try:
        batch: list[bytes] = []
        async for key in r.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                n += await r.delete(*batch)
                batch.clear()
        if batch:
            n += await r.delete(*batch)
    finally:
        await r.aclose()
    return n


def broker_queues(marker: str) -> list[str] | None:
    """Queues on the broker whose name contains ``marker`` (``rabbitmqctl
    list_queues``); None when rabbitmqctl is not usable."""
    try:
        done = _rabbitmqctl("list_queues", "name", "--quiet", "--formatter", "json", timeout=300)
    except (OSError, TimeoutError, ValueError) as e:
        print(f"   (rabbitmqctl list_queues failed: {e!r})", flush=True)
        return None
    if done.returncode != 0:
        print(f"   (rabbitmqctl list_queues failed: {done.stderr.strip()[:300]})", flush=True)
        return None
    try:
        rows = json.loads(done.stdout or "[]")
    except json.JSONDecodeError:
        rows = [{"name": line.strip()} for line in done.stdout.splitlines() if line.strip()]
    return sorted(r["name"] for r in rows if marker in r.get("name", ""))


async def sweep(args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """Delete anything this invocation left (by its tag), then count what remains."""
    marker = f"{TASK_PREFIX}-{tag}-"
    out: dict[str, Any] = {"marker": marker}
    if "real" in args.backends:
        found = await asyncio.to_thread(broker_queues, marker)
        out["queues_found_by_sweep"] = None if found is None else len(found)
        if found:
            print(f"   sweep: deleting {len(found)} queue(s) left with {marker}", flush=True)
            await delete_queues(args.amqp_url, found)
            found = await asyncio.to_thread(broker_queues, marker)
        out["queues_left"] = None if found is None else len(found)
        out["queues_left_names"] = (found or [])[:20]
        out["redis_keys_found_by_sweep"] = await delete_redis_keys(
            args.redis_url, f"{REDIS_PREFIX}-{tag}-*"
        )
        out["redis_keys_left"] = await count_redis_keys(args.redis_url, f"{REDIS_PREFIX}-{tag}-*")
    return out


async def count_redis_keys(redis_url: str, pattern: str) -> int:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    try:
        return sum([1 async for _ in r.scan_iter(match=pattern, count=1000)])
    finally:
        await r.aclose()


# --------------------------------------------------------------------------- a run


async def drain(
    spec: TaskSpec,
    store: RedisModelStore,
    transport: Transport,
    n: int,
    target: int,
    timers: StageTimers,
    startup_timers: dict[str, float],
    profile_to: Path | None,
    probe: CpuProbe,
) -> dict[str, Any]:
    """Run the service until the head reaches ``target`` and every receipt is sent."""
    stop = asyncio.Event()
    finished: list[float] = []

    async def on_version(record: VersionRecord, params: Tensors) -> None:
        if record.version >= target and not finished:
            finished.append(time.perf_counter())

    service = AggregatorService(
        spec,
        store,
        TimedTransport(transport, startup_timers),  # type: ignore[arg-type]
        ServiceConfig(require_sender_match=False),
        on_version=on_version,
        stages=timers,
    )
    cpu0 = probe.snapshot()
    t0 = time.perf_counter()
    runner = asyncio.create_task(service.run(stop))
    ready = asyncio.create_task(service.ready.wait())
    await asyncio.wait([runner, ready], return_when=asyncio.FIRST_COMPLETED)
    if runner.done():
        runner.result()
        raise RuntimeError("the service stopped before it was ready")
    t1 = time.perf_counter()
    cpu1 = probe.snapshot()
    cpu2: dict[str, float | None] | None = None
    startup_announce = timers.seconds.get("announce", 0.0)
    startup_parts = dict(startup_timers)
    timers.reset()
    startup_timers.pop("announce_model", None)  # from now on: the drain's
    startup_timers.pop("announce_model_calls", None)
    spy = ingest.start_profiler(str(profile_to) if profile_to else None)
    receipts_done: float | None = None
    try:
        deadline = t1 + 600
        while time.perf_counter() < deadline and not runner.done():
            decided = service.stats.accepted + service.stats.refused_total
            if decided >= n and service.unacked == 0 and not finished:
                finished.append(time.perf_counter())  # refusals: the target is never reached
            if finished and cpu2 is None:
                cpu2 = probe.snapshot()
            if finished and decided >= n:
                rs = service.receipts
                if rs.sent + rs.dropped >= service.stats.accepted:
                    receipts_done = time.perf_counter()
                    break
            await asyncio.sleep(0.005)
    finally:
        ingest.stop_profiler(spy)
        stop.set()
        await runner
    end = finished[0] if finished else time.perf_counter()
    return {
        "service": service,
        "startup_s": t1 - t0,
        "startup_announce_s": startup_announce,
        "startup_parts": startup_parts,
        "cpu": {
            "startup": CpuProbe.delta(cpu0, cpu1),
            **({"drain": CpuProbe.delta(cpu1, cpu2)} if cpu2 is not None else {}),
        },
        "drain_s": end - t1,
        "receipts_s": (receipts_done or time.perf_counter()) - t1,
    }


async def one_run(
    run: int, backend: str, size: str, participants: int, strategy: str, n: int, tag: str, args
) -> Row:
    spec = make_spec(tag, size, participants, strategy)
    codec = ingest.shipped_defaults()["update_codec"]
    updates = await asyncio.to_thread(ingest.make_bodies, spec, n, ingest.base_of(strategy), codec)
    target = n if strategy == "fedasync" else n // ingest.FEDBUFF_K
    topology = TaskTopology(spec.task_id, spec.participants)
    prefix = f"{REDIS_PREFIX}-{tag}-{uuid.uuid4().hex[:8]}"
    timers = StageTimers()
    startup_timers: dict[str, float] = {}
    profile_to = None
    if args.profile:
        profile_to = Path(f"/tmp/scale-profile-{spec.task_id}.txt")  # noqa: S108 - scratch
    agg: Transport | None = None
    pub: Transport | None = None
    store: RedisModelStore | None = None
    cleanup_s = 0.0
    try:
        if backend == "embedded":
            broker = MemoryBroker()
            agg = MemoryTransport(broker, "fedq-aggregator")
            pub = MemoryTransport(broker, "bench")
            store = RedisModelStore(
                connect_redis("memory://"), StoreConfig(prefix=prefix), stages=timers
            )
        else:
            agg = await AmqpTransport.connect(args.amqp_url, name="bench-scale-aggregator")
            pub = await AmqpTransport.connect(args.amqp_url, name="bench-scale-publisher")
            store = RedisModelStore(
                connect_redis(args.redis_url),
                StoreConfig(prefix=prefix, keep_blobs=ingest.KEEP_BLOBS),
                stages=timers,
            )
        probe = CpuProbe(args.amqp_url, args.redis_url, servers=backend == "real")
        before = probe.snapshot()
        t = time.perf_counter()
        await pub.declare_task(topology)
        declare_s = time.perf_counter() - t
        cpu_declare = CpuProbe.delta(before, probe.snapshot())
        await publish(pub, spec, updates)
        del updates
        out = await drain(spec, store, agg, n, target, timers, startup_timers, profile_to, probe)
    finally:
        for closing in (agg, pub):
            if closing is not None:
                with contextlib.suppress(Exception):
                    await closing.close()
        if store is not None:
            with contextlib.suppress(Exception):
                await store.close()
        if backend == "real":
            t = time.perf_counter()
            await delete_queues(args.amqp_url, task_queues(spec))
            await delete_redis_keys(args.redis_url, f"{prefix}:*")
            cleanup_s = time.perf_counter() - t
    service: AggregatorService = out["service"]
    accepted = max(service.stats.accepted, 1)
    sp = out["startup_parts"]
    parts = {
        "declare_task": sp.get("declare_task", 0.0),
        "last_announcement": sp.get("last_announcement", 0.0),
        "first_announce": out["startup_announce_s"],
    }
    parts["other"] = out["startup_s"] - sum(parts.values())
    announce_n = timers.calls.get("announce", 0)
    profile = None
    if profile_to is not None and profile_to.exists():
        profile = summarize(profile_to, top=25)
        profile_to.unlink()
    row = Row(
        run=run,
        backend=backend,
        size=size,
        params=ingest.n_params(spec),
        participants=participants,
        strategy=strategy if strategy == "fedasync" else f"fedbuff K={ingest.FEDBUFF_K}",
        updates=service.stats.accepted,
        refused=service.stats.refused_total,
        declare_s=declare_s,
        startup_s=out["startup_s"],
        startup_parts_s=parts,
        drain_s=out["drain_s"],
        ms_per_update=1000 * out["drain_s"] / accepted,
        receipts_s=out["receipts_s"],
        ms_per_update_with_receipts=1000 * out["receipts_s"] / accepted,
        receipts_sent=service.receipts.sent,
        receipts_dropped=service.receipts.dropped,
        announcements=announce_n,
        announce_ms=1000 * timers.seconds.get("announce", 0.0) / max(announce_n, 1),
        announce_publish_ms=1000
        * startup_timers.get("announce_model", 0.0)
        / max(startup_timers.get("announce_model_calls", 0), 1),
        stages_ms_per_update={k: 1000 * v / accepted for k, v in sorted(timers.seconds.items())},
        stage_calls=dict(sorted(timers.calls.items())),
        cleanup_s=cleanup_s,
        cpu={"first_declare": cpu_declare, **out["cpu"]},
        profile=profile,
    )
    print(
        f"  run {run} {backend:<8} {size:>3} {participants:>5} participants, {row.strategy:<12}: "
        f"declare {declare_s:.2f} s, startup {row.startup_s:.2f} s "
        f"(declare_task {parts['declare_task']:.2f}), {row.ms_per_update:.2f} ms/update "
        f"({row.ms_per_update_with_receipts:.2f} incl. receipts), {row.announcements} "
        f"announcements of {row.announce_ms:.1f} ms, refused {row.refused}, "
        f"clean-up {cleanup_s:.1f} s",
        flush=True,
    )
    return row


async def main_async(args: argparse.Namespace, tag: str) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    failures: list[str] = []
    try:
        for run in range(1, args.runs + 1):
            for backend in args.backends:
                for size in args.sizes:
                    n = args.count or (QUICK_COUNTS if args.quick else COUNTS)[size]
                    for strategy in STRATEGIES:
                        for participants in args.participants:
                            try:
                                rows.append(
                                    await one_run(
                                        run, backend, size, participants, strategy, n, tag, args
                                    )
                                )
                            except Exception as e:  # noqa: BLE001 - report, go on
                                what = f"run {run} {backend} {size} {participants} {strategy}"
                                failures.append(f"{what}: {e!r}")
                                print(f"  FAILED {what}: {e!r}", flush=True)
    finally:
        swept = await sweep(args, tag)
        swept["failures"] = failures
    return rows, swept


# --------------------------------------------------------------------------- report


def ratios(rows: Sequence[Row]) -> dict[int, float]:
    """Each row's ms/update over the one with the fewest participants of its group."""
    base: dict[tuple[int, str, str, str], Row] = {}
    for r in rows:
        key = (r.run, r.backend, r.size, r.strategy)
        if key not in base or r.participants < base[key].participants:
            base[key] = r
    return {
        id(r): r.ms_per_update / base[(r.run, r.backend, r.size, r.strategy)].ms_per_update
        for r in rows
    }


def report(rows: Sequence[Row], args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    ratio = ratios(rows)
    first = min(args.participants)
    per_run = table(
        [
            "run",
            "backend",
            "participants",
            "strategy",
            "size",
            "first declare s",
            "startup s",
            "ms/update",
            f"vs {first}",
            "incl. receipts",
            "announcements",
            "ms/announcement",
            "refused",
        ],
        [
            [
                r.run,
                r.backend,
                r.participants,
                r.strategy,
                r.size,
                r.declare_s,
                r.startup_s,
                r.ms_per_update,
                ratio[id(r)],
                r.ms_per_update_with_receipts,
                r.announcements,
                r.announce_ms,
                r.refused,
            ]
            for r in rows
        ],
        title="Per run",
    )
    groups: dict[tuple[str, str, str, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.backend, r.size, r.strategy, r.participants), []).append(r)
    summary: list[dict[str, Any]] = []
    cells = []
    for (backend, size, strategy, participants), rs in groups.items():
        rr = [ratio[id(r)] for r in rs]
        s = {
            "backend": backend,
            "participants": participants,
            "strategy": strategy,
            "size": size,
            "runs": len(rs),
            "first_declare_s": statistics.median(r.declare_s for r in rs),
            "startup_s": statistics.median(r.startup_s for r in rs),
            "startup_max_s": max(r.startup_s for r in rs),
            "startup_declare_task_s": statistics.median(
                r.startup_parts_s["declare_task"] for r in rs
            ),
            "ms_per_update": statistics.median(r.ms_per_update for r in rs),
            "ratio": statistics.median(rr),
            "ratios": rr,
            "ms_per_update_with_receipts": statistics.median(
                r.ms_per_update_with_receipts for r in rs
            ),
            "announcements": statistics.median(r.announcements for r in rs),
            "announce_ms": statistics.median(r.announce_ms for r in rs),
        }
        summary.append(s)
        cells.append(
            [
                backend,
                participants,
                strategy,
                size,
                s["first_declare_s"],
                s["startup_s"],
                s["ms_per_update"],
                s["ratio"],
                " / ".join(f"{x:.2f}" for x in rr),
                s["ms_per_update_with_receipts"],
                s["announcements"],
                s["announce_ms"],
            ]
        )
    med = table(
        [
            "backend",
            "participants",
            "strategy",
            "size",
            "first declare s",
            "startup s",
            "ms/update",
            f"vs {first}",
            "per run",
            "incl. receipts",
            "announcements",
            "ms/announcement",
        ],
        cells,
        title=f"Median over runs (ratio: each run's ms/update over its {first}-participant row)",
    )
    return per_run + "\n" + med, summary


def parse_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer updates per run (see QUICK_COUNTS)")
    p.add_argument("--runs", type=int, default=1, help="repeat everything N times")
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    p.add_argument("--count", type=int, help="updates per run, every size")
    p.add_argument(
        "--participants",
        type=lambda v: sorted(int(x) for x in parse_list(v)),
        default=list(PARTICIPANTS),
    )
    p.add_argument("--sizes", type=parse_list, default=list(DEFAULT_SIZES), help="mlp,10k")
    p.add_argument("--backends", type=parse_list, default=["embedded", "real"])
    p.add_argument("--embedded-only", action="store_true", help="as --backends embedded")
    p.add_argument("--profile", action="store_true", help="py-spy over each drain")
    p.add_argument("--amqp-url", default=os.environ.get("FEDQ_TEST_AMQP_URL", DEFAULT_AMQP))
    p.add_argument("--redis-url", default=os.environ.get("FEDQ_TEST_REDIS_URL", DEFAULT_REDIS))
    args = p.parse_args()
    if args.embedded_only:
        args.backends = ["embedded"]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown size(s) {unknown}: choose from {', '.join(SIZES)}")
    configure_logging("warning", "json")
    tag = uuid.uuid4().hex[:8]
    print(
        f"scale: tag {tag}; participants {args.participants}; sizes {args.sizes}; "
        f"backends {args.backends}; {args.runs} run(s)",
        flush=True,
    )

    async def guarded() -> tuple[list[Row], dict[str, Any]]:
        # SIGTERM as Ctrl-C: cancel, so the runs' clean-up and the sweep still happen.
        main_task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert main_task is not None
        loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
        return await main_async(args, tag)

    rows, swept = asyncio.run(guarded())
    text, summary = report(rows, args)
    print(text)
    print(f"\nclean-up sweep: {json.dumps(swept)}")
    write_json(
        args.out,
        envelope(
            "scale",
            args.quick,
            {"summary": summary, "rows": [asdict(r) for r in rows], "cleanup": swept},
            settings={
                "sizes": {k: {"params_hidden": SIZES[k].hidden} for k in args.sizes},
                "counts": {
                    k: args.count or (QUICK_COUNTS if args.quick else COUNTS)[k] for k in args.sizes
                },
                "window": ingest.WINDOW,
                "fedbuff_k": ingest.FEDBUFF_K,
                "keep_blobs": ingest.KEEP_BLOBS,
                "update_codec": ingest.shipped_defaults()["update_codec"],
                "amqp_url": args.amqp_url,
                "redis_url": args.redis_url,
                "log_level": "warning (per-commit info logs off, unlike bench/ingest.py)",
            },
        ),
    )
    args.out.with_suffix(".txt").write_text(text + f"\n\nclean-up sweep: {json.dumps(swept)}\n")


if __name__ == "__main__":
    main()
