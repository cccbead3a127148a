"""Aggregator ingest against the broker's ceiling, side by side in one run, and what
each update costs inside the aggregator (Redis round trips, thread hops, log lines).

Model sizes, by name (``--sizes``), built by the task spec's own model builder
(``common.models.build_task_model``):

* ``lr``: logistic regression on 74 inputs (75 parameters), German credit's model;
* ``mlp``: MLP 74-32-1 (2,433 parameters, about 9 KB per update);
* ``10k``: MLP 20-455-1 (10,011 parameters);
* ``1m``: MLP 20-1000-977-1 (999,955 parameters): only when named, or with ``--full``.

For each size, in each run (``--runs N`` repeats all of it):

1. **Ceiling**: raw aio-pika, the same message bodies. Publish N persistent
   messages with publisher confirms (8 in flight) to a fresh quorum queue, then
   consume them with manual acks (prefetch 64) and no processing. Measured before
   and after the aggregators; the mean of the two is the ceiling.
2. **fedq**, per strategy (FedAsync; FedBuff with K = 10): declare the task's
   topology with ``AmqpTransport.declare_task`` (what the service itself calls),
   publish the same number of encoded updates with ``AmqpTransport.publish_update``
   (8 in flight), then start ``AggregatorService`` in a fresh subprocess and time
   the drain of that backlog: from the service being ready until the head reaches
   the last version (every update decoded, validated, aggregated, committed to
   Redis and acked). The subprocess reports its own peak RSS (VmHWM).

The ratio is aggregator updates/s over raw consume updates/s: both drain a
backlog of the same bodies from a quorum queue with manual acks.

The aggregator runs as shipped: the updates' codec is the participant's default
(``WorkerConfig.codec``), the store's blob codec ``StoreConfig()``'s default, the
prefetch ``ServiceConfig()``'s default (``--codec``, ``--blob-codec``, ``--prefetch``
set others; a lossy ``--codec`` such as ``int8`` or ``topk8+zstd`` becomes the task's
``compression``, top-k keeping ``TOPK_FRACTION``, or the aggregator would refuse it),
logging configured as ``fedq`` does (``configure_logging``: info, JSON lines on a
non-terminal stderr; ``FEDQ_LOG_LEVEL`` / ``FEDQ_LOG_FORMAT`` as for the
CLI). On purpose, unlike ``fedq aggregator run``: the sender check is off (the bench
publishes every bank's updates as one broker user), ``keep_blobs`` is 4 (bounded
memory on a shared Redis; the pruning rides in the commit's own transaction) and no
/healthz server is started.

Counted inside the aggregator process during the drain only, reported per update
drained (accepted + refused):

* **Redis round trips**: calls of redis-py's ``AbstractConnection.send_packed_command``
  (patched in the subprocess before the service starts): a plain command is one, a
  pipeline or transaction flush one, a script call one; also by the first command
  of each request. Cross-check: the server's ``INFO commandstats`` deltas over the
  drain (commands by name and the server's microseconds), server-wide, so commands
  of other clients of the same Redis count too.
* **thread hops**: calls of ``loop.run_in_executor`` (``asyncio.to_thread`` goes
  through it), with the ``asyncio.to_thread`` calls by the function they run.
* **log lines**: lines the service's structlog / logging output writes to stderr,
  by event.

    python bench/ingest.py [--quick] [--sizes lr,mlp,10k] [--full] [--runs N]
                           [--out bench/results/ingest.json] [--profile]

Everything created (queues, Redis keys under a private prefix) is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
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
from common.codecs import lossy_codec
from common.models import build_task_model, model_tensors
from common.spec import (
    AsyncSettings,
    CompressionSpec,
    ModelSpec,
    NumericFeature,
    TargetSpec,
    TaskSpec,
)
from common.transport import TaskTopology, names
from common.transport.amqp import AmqpTransport
from common.wire import (
    TensorSpec,
    UpdateEnvelope,
    decode_update,
    encode_tensors,
    encode_update,
    limits_for,
)

#: Participants named in the task (receipt queues are declared for each).
N_PARTICIPANTS = 5
#: Publishes awaiting their confirm at once (raw and fedq alike).
WINDOW = 8
#: The raw consumer's prefetch (the ceiling, as it has always been measured).
CEILING_PREFETCH = 64
FEDBUFF_K = 10
#: Stored versions whose parameters are kept (the head and three before it).
KEEP_BLOBS = 4


@dataclass(frozen=True, slots=True)
class Size:
    label: str
    title: str
    features: int
    hidden: tuple[int, ...]
    count: int
    quick_count: int


# 74 inputs: 74 + 1 = 75 parameters; 74*32 + 32 + 32 + 1 = 2,433 parameters.
# 20 inputs: 20*455 + 455 + 455 + 1 = 10,011 parameters;
# 20*1000 + 1000 + 1000*977 + 977 + 977 + 1 = 999,955 parameters.
SIZES = (
    Size("lr", "logistic regression, 74 inputs", 74, (), count=2000, quick_count=400),
    Size("mlp", "MLP 74-32-1", 74, (32,), count=2000, quick_count=400),
    Size("10k", "MLP 20-455-1", 20, (455,), count=1000, quick_count=300),
    Size("1m", "MLP 20-1000-977-1", 20, (1000, 977), count=200, quick_count=50),
)
DEFAULT_SIZES = ("lr", "mlp", "10k")
STRATEGIES = ("fedasync", "fedbuff")


def parse_sizes(value: str) -> list[str]:
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    known = {s.label for s in SIZES}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown size(s) {unknown or value!r}: choose from {', '.join(sorted(known))}"
        )
    return names


def shipped_defaults() -> dict[str, Any]:
    """What a deployment runs unless told otherwise: the participant's update codec,
    the store's blob codec and the service's prefetch (read, never restated here)."""
    from aggregator.service import ServiceConfig
    from aggregator.store import StoreConfig
    from participant.worker import WorkerConfig

    worker = {f.name: f.default for f in dataclasses.fields(WorkerConfig)}
    return {
        "update_codec": worker["codec"],
        "blob_codec": StoreConfig().blob_codec,
        "prefetch": ServiceConfig().prefetch,
    }


#: The share of entries ``topk`` and ``topk8`` keep when ``--codec`` names them.
TOPK_FRACTION = 0.05


def compression_of(codec: str) -> CompressionSpec | None:
    """The task's ``compression`` for an update codec: None for the lossless ones; a
    lossy one (``int8``, ``topk8+zstd``, ...) must be the task's choice or it is refused."""
    base, _, lossless = codec.partition("+")
    if base in ("raw", "zstd"):
        return None
    return CompressionSpec.model_validate(
        {
            "codec": base,
            "lossless": lossless or None,
            "topk_fraction": TOPK_FRACTION if base in ("topk", "topk8") else None,
        }
    )


def make_spec(size: Size, strategy: str, tag: str, codec: str = "raw") -> TaskSpec:
    model = ModelSpec(kind="mlp", hidden=size.hidden) if size.hidden else ModelSpec()
    return TaskSpec(
        task_id=f"bench-ingest-{size.label}-{strategy}-{tag}",
        model=model,
        features=tuple(NumericFeature(name=f"x{i:02d}") for i in range(size.features)),
        target=TargetSpec(name="y"),
        mode="async",
        async_=AsyncSettings(strategy=strategy, buffer_size=FEDBUFF_K),
        participants=tuple(f"bank-{i:02d}" for i in range(N_PARTICIPANTS)),
        compression=compression_of(codec),
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
    spec: TaskSpec, n: int, base: Callable[[int], int], codec: str
) -> list[tuple[str, str, bytes]]:
    """``n`` encoded updates ``(participant, update id, body)`` for ``spec``'s model.

    Four random deltas (N(0, 1e-3), float32, ``codec``) are encoded with
    ``encode_update``; each update re-packs one of them with its own id, participant
    and base version. The content hash covers the tensors only, so a re-packed body
    is byte for byte what ``encode_update`` would give for those fields.
    """
    shapes = {k: v.shape for k, v in model_tensors(build_task_model(spec)).items()}
    gen = torch.Generator().manual_seed(7)
    templates: list[dict[str, Any]] = []
    c = spec.compression
    encoder = (
        None
        if c is None
        else lossy_codec(c.codec, zstd=c.lossless == "zstd", topk_fraction=c.topk_fraction)
    )
    for j in range(4):
        delta = {k: torch.randn(s, generator=gen) * 1e-3 for k, s in shapes.items()}
        encoded = None if encoder is None else encode_tensors(delta, encoder, seed=j)
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
            ),
            encoded=encoded,
        )
        templates.append(msgpack.unpackb(body, raw=False))
    out = []
    for i in range(n):
        doc = dict(templates[i % len(templates)])
        participant = spec.participants[i % len(spec.participants)]
        update_id = uuid.uuid4().hex
        doc.update(p=participant, id=update_id, bv=base(i))
        out.append((participant, update_id, msgpack.packb(doc, use_bin_type=True)))
    codecs = None if c is None else frozenset({"raw", "zstd", c.wire_codec})
    specs = {k: TensorSpec(tuple(s), "f32") for k, s in shapes.items()}
    decode_update(out[-1][2], limits_for(specs), specs, codecs=codecs)  # a valid update
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
        await sub.set_qos(prefetch_count=CEILING_PREFETCH)
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
    """Every queue fedq may declare for the task (whichever of them ``names`` defines:
    the topology changes, the clean-up must not leave any behind)."""
    t = spec.task_id
    out = []
    for fn in ("work_queue", "audit_stream", "dead_queue", "head_queue", "model_stream"):
        if callable(name := getattr(names, fn, None)):
            out.append(name(t))
    for fn in ("model_queue", "receipt_queue"):
        if callable(name := getattr(names, fn, None)):
            out += [name(t, p) for p in spec.participants]
    return out


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
    result["log_lines_total"] = len(log_lines)
    return result


# ------------------------------------------------------------ counters (the child)


@dataclass(slots=True)
class Counts:
    """What the aggregator process did while ``on`` (the drain)."""

    on: bool = False
    round_trips: int = 0
    round_trips_by_command: Counter[str] = field(default_factory=Counter)
    executor_calls: int = 0
    to_thread_calls: int = 0
    to_thread_by_function: Counter[str] = field(default_factory=Counter)
    log_lines: int = 0
    log_events: Counter[str] = field(default_factory=Counter)

    def start(self) -> None:
        """Zero every count and count from now on."""
        self.round_trips = self.executor_calls = self.to_thread_calls = self.log_lines = 0
        self.round_trips_by_command = Counter()
        self.to_thread_by_function = Counter()
        self.log_events = Counter()
        self.on = True

    def stop(self) -> None:
        self.on = False

    def totals(self) -> dict[str, Any]:
        return {
            "redis_round_trips": self.round_trips,
            "redis_round_trips_by_command": dict(self.round_trips_by_command.most_common()),
            "thread_hops": self.executor_calls,
            "to_thread": self.to_thread_calls,
            "to_thread_by_function": dict(self.to_thread_by_function.most_common()),
            "log_lines": self.log_lines,
            "log_events": dict(self.log_events.most_common()),
        }


COUNTS = Counts()

_COMMAND = re.compile(rb"\*\d+\r\n\$\d+\r\n([^\r]{1,40})\r\n")


def _first_command(command: Any) -> str:
    """The name of the first command of a packed request (a transaction starts MULTI)."""
    head = command
    if isinstance(command, list | tuple):
        head = command[0] if command else b""
    if isinstance(head, str):
        head = head.encode()
    if isinstance(head, memoryview):
        head = head.tobytes()
    if not isinstance(head, bytes):
        return "?"
    m = _COMMAND.match(head[:64])
    if not m:
        return "?"
    name = m.group(1).decode(errors="replace").upper()
    return "MULTI ... EXEC" if name == "MULTI" else name


def _function_name(func: Any) -> str:
    inner = getattr(func, "func", func)  # functools.partial
    return str(getattr(inner, "__qualname__", type(inner).__name__))


class _CountingStream(io.TextIOBase):
    """stderr as the service's loggers see it: every line is counted while ``on``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._partial = ""

    def write(self, s: str) -> int:
        if COUNTS.on and s:
            *complete, self._partial = (self._partial + s).split("\n")
            for line in complete:
                COUNTS.log_lines += 1
                COUNTS.log_events[_event_of(line)] += 1
        elif not COUNTS.on:
            self._partial = ""
        self.inner.write(s)
        return len(s)

    def flush(self) -> None:
        self.inner.flush()

    def isatty(self) -> bool:
        return bool(self.inner.isatty())

    def fileno(self) -> int:
        return int(self.inner.fileno())

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self.inner, "encoding", "utf-8"))


def _event_of(line: str) -> str:
    try:
        doc = json.loads(line)
    except ValueError:
        return "(not JSON)"
    event = doc.get("event") if isinstance(doc, dict) else None
    if not isinstance(event, str):
        return "(no event)"
    return event if len(event) <= 60 else event[:57] + "..."


def install_counters() -> None:
    """Counting wrappers, installed before the service's modules are imported.

    ``asyncio.to_thread`` is replaced in ``asyncio`` (the code calls it as
    ``asyncio.to_thread``) and in any module already holding it under its own name
    (``from asyncio import to_thread``); ``run_in_executor`` is wrapped on the event
    loop class, redis-py's ``send_packed_command`` on its async connection class;
    stderr is wrapped before logging is configured.
    """
    import asyncio.base_events
    import asyncio.threads

    import redis.asyncio.connection as redis_connection

    original_to_thread = asyncio.to_thread

    async def to_thread(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if COUNTS.on:
            COUNTS.to_thread_calls += 1
            COUNTS.to_thread_by_function[_function_name(func)] += 1
        return await original_to_thread(func, *args, **kwargs)

    asyncio.to_thread = to_thread
    asyncio.threads.to_thread = to_thread
    for module in list(sys.modules.values()):
        if getattr(module, "to_thread", None) is original_to_thread:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(module, "to_thread", to_thread)  # noqa: B010

    loop_class = asyncio.base_events.BaseEventLoop
    original_executor = loop_class.run_in_executor

    def run_in_executor(self: Any, executor: Any, func: Any, *args: Any) -> Any:
        if COUNTS.on:
            COUNTS.executor_calls += 1
        return original_executor(self, executor, func, *args)

    loop_class.run_in_executor = run_in_executor  # type: ignore[assignment,method-assign]

    conn_class = redis_connection.AbstractConnection
    original_send = conn_class.send_packed_command

    async def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        if COUNTS.on:
            COUNTS.round_trips += 1
            COUNTS.round_trips_by_command[_first_command(command)] += 1
        await original_send(self, command, check_health)

    conn_class.send_packed_command = send_packed_command  # type: ignore[method-assign]

    sys.stderr = _CountingStream(sys.stderr)


def commandstats(client: Any) -> dict[str, tuple[int, int]]:
    """The server's ``INFO commandstats``: (calls, microseconds) by command."""
    stats = client.info("commandstats")
    return {
        str(k).removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()
    }


def commandstats_delta(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    """Commands the server ran between two snapshots, less the one INFO in between."""
    out = {}
    for name, (calls, usec) in after.items():
        c0, u0 = before.get(name, (0, 0))
        calls, usec = calls - c0 - (1 if name == "info" else 0), usec - u0
        if calls > 0:
            out[name] = (calls, usec)
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))


async def child_main(cfg: dict[str, Any]) -> dict[str, Any]:
    """The aggregator: drain the backlog until the head reaches ``target_version``."""
    import redis

    from aggregator.service import AggregatorService, ServiceConfig
    from aggregator.store import RedisModelStore, StoreConfig, connect_redis
    from aggregator.store.records import VersionRecord
    from common.logging import configure_logging
    from common.wire import Tensors

    # What `fedq aggregator run` does with its default options (and the same variables).
    configure_logging(
        os.environ.get("FEDQ_LOG_LEVEL", "info"),
        os.environ.get("FEDQ_LOG_FORMAT", "auto"),
    )
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg["torch_threads"]))
    spec = TaskSpec.from_json(cfg["spec"])
    timers, stages = stage_timers()
    store_options: dict[str, Any] = {"prefix": cfg["prefix"], "keep_blobs": cfg["keep_blobs"]}
    if cfg.get("blob_codec"):
        store_options["blob_codec"] = cfg["blob_codec"]
    store = RedisModelStore(
        connect_redis(cfg["redis_url"]), StoreConfig(**store_options), stages=stages
    )
    service_options: dict[str, Any] = {"require_sender_match": False}
    if cfg.get("prefetch"):
        service_options["prefetch"] = int(cfg["prefetch"])
    transport = await AmqpTransport.connect(cfg["amqp_url"], name="bench-ingest-aggregator")
    # A synchronous client (another connection class, not counted) for INFO.
    stats_client = redis.Redis.from_url(cfg["redis_url"])
    target = int(cfg["target_version"])
    stop = asyncio.Event()
    finished: list[float] = []
    snapshot: dict[str, Any] = {}

    def finish() -> None:
        if finished:
            return
        finished.append(time.perf_counter())
        COUNTS.stop()
        snapshot["commandstats_after"] = commandstats(stats_client)
        snapshot["drained"] = service.stats.accepted + service.stats.refused_total
        stop.set()

    async def on_version(record: VersionRecord, params: Tensors) -> None:
        if record.version >= target:
            finish()

    service = AggregatorService(
        spec,
        store,
        transport,
        ServiceConfig(**service_options),
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
    before = commandstats(stats_client)
    COUNTS.start()
    t0 = time.perf_counter()
    deadline = t0 + float(cfg["timeout_s"])
    while not stop.is_set() and time.perf_counter() < deadline:
        # Refusals would keep the head below the target: stop when all are handled.
        if service.stats.accepted + service.stats.refused_total >= int(cfg["updates"]):
            finish()
            break
        await asyncio.sleep(0.05)
    finish()
    await runner
    stop_profiler(spy)
    await transport.close()
    await store.close()
    stats_client.close()
    delta = commandstats_delta(before, snapshot["commandstats_after"])
    return {
        "breakdown_s": dict(timers),
        "seconds": finished[0] - t0,
        "reached_target": service.head_version >= target,
        "head": service.head_version,
        "accepted": service.stats.accepted,
        "drained": snapshot["drained"],
        "refused": dict(service.stats.refused),
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak_rss_mib(),
        "blob_codec": store.config.blob_codec,
        "prefetch": service.prefetch,
        "counts": COUNTS.totals(),
        "commandstats": {k: {"calls": c, "usec": u} for k, (c, u) in delta.items()},
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
    run: int
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
    drained: int
    peak_rss_mib: float
    rss_before_mib: float
    #: Per update drained, counted inside the aggregator process during the drain.
    redis_round_trips_per_update: float
    thread_hops_per_update: float
    to_thread_per_update: float
    log_lines_per_update: float
    #: Cross-check from the server (INFO commandstats), server-wide.
    redis_commands_per_update: float
    redis_server_us_per_update: float
    blob_codec: str
    prefetch: int


def per_update(counter: dict[str, float], n: int) -> dict[str, float]:
    return {k: v / max(n, 1) for k, v in counter.items()}


async def bench_size(
    size: Size, n: int, run: int, args: argparse.Namespace, profiles: dict[str, Any]
) -> tuple[list[Row], dict[str, Any]]:
    """The ceiling before and after (mean of the two), the aggregator per strategy between."""
    tag = uuid.uuid4().hex[:8]
    spec0 = make_spec(size, "fedasync", tag, args.codec)
    params = n_params(spec0)
    print(f"\n== {size.label} ({size.title}): {params:,} parameters, {n} updates", flush=True)
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
                size, n, strategy, threads, tag, run, args, profiles
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
    details: dict[str, Any] = {}
    for (strategy, threads), (res, pub_s, total_bytes) in results.items():
        agg_per_s = res["accepted"] / res["seconds"]
        drained = max(int(res["drained"]), 1)
        counts = res["counts"]
        stats = res["commandstats"]
        label = strategy if strategy == "fedasync" else f"fedbuff K={FEDBUFF_K}"
        if threads != "default":
            label += f", torch threads={threads}"
        rows.append(
            Row(
                run=run,
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
                drained=int(res["drained"]),
                peak_rss_mib=res["peak_rss_mib"],
                rss_before_mib=res["rss_before_mib"],
                redis_round_trips_per_update=counts["redis_round_trips"] / drained,
                thread_hops_per_update=counts["thread_hops"] / drained,
                to_thread_per_update=counts["to_thread"] / drained,
                log_lines_per_update=counts["log_lines"] / drained,
                redis_commands_per_update=sum(s["calls"] for s in stats.values()) / drained,
                redis_server_us_per_update=sum(s["usec"] for s in stats.values()) / drained,
                blob_codec=res["blob_codec"],
                prefetch=res["prefetch"],
            )
        )
        key = f"{size.label}/{strategy}" + ("" if threads == "default" else f"/t{threads}")
        if args.runs > 1:
            key += f"/run{run}"
        ms = {k: 1000 * v / max(res["accepted"], 1) for k, v in res["breakdown_s"].items()}
        ms["drain wall (all)"] = 1000 * res["seconds"] / max(res["accepted"], 1)
        breakdowns[key] = ms
        details[key] = {
            "drained": res["drained"],
            "totals": {
                k: counts[k] for k in ("redis_round_trips", "thread_hops", "to_thread", "log_lines")
            },
            "redis_round_trips_by_command": per_update(
                counts["redis_round_trips_by_command"], drained
            ),
            "to_thread_by_function": per_update(counts["to_thread_by_function"], drained),
            "log_events": per_update(counts["log_events"], drained),
            "commandstats_calls": per_update({k: s["calls"] for k, s in stats.items()}, drained),
            "commandstats_usec": per_update({k: s["usec"] for k, s in stats.items()}, drained),
            "log_lines_total": res["log_lines_total"],
        }
    return rows, {
        "ceiling": ceiling,
        "before": before,
        "after": after,
        "breakdowns": breakdowns,
        "details": details,
    }


async def bench_strategy(
    size: Size,
    n: int,
    strategy: str,
    threads: str,
    tag: str,
    run: int,
    args: argparse.Namespace,
    profiles: dict[str, Any],
) -> tuple[dict[str, Any], float, int]:
    """Publish a backlog of n updates through fedq, then drain it with the service."""
    tag = tag if threads == "default" else f"{tag}-t{threads}"
    spec = make_spec(size, strategy, tag, args.codec)
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
            "keep_blobs": KEEP_BLOBS,
            # None: the shipped defaults (StoreConfig(), ServiceConfig()).
            "blob_codec": args.blob_codec,
            "prefetch": args.prefetch,
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
            profiles[f"run{run}/{size.label}/{strategy}/threads={threads}"] = summary
            print(f"   py-spy, aggregator {size.label} {strategy}:\n{render(summary)}")
    finally:
        await delete_queues(args.amqp_url, task_queues(spec))
        await delete_redis_prefix(args.redis_url, prefix)
    agg_per_s = res["accepted"] / res["seconds"]
    drained = max(int(res["drained"]), 1)
    c = res["counts"]
    print(
        f"   {strategy} (torch threads: {threads}): fedq publish {n / pub_s:.1f}/s, "
        f"aggregator {agg_per_s:.1f}/s, "
        f"{res['head']} versions, peak RSS {res['peak_rss_mib']:.0f} MiB "
        f"(at start {res['rss_before_mib']:.0f}), refused {res['refused'] or 0}; per update: "
        f"{c['redis_round_trips'] / drained:.2f} Redis round trips, "
        f"{c['thread_hops'] / drained:.2f} thread hops, {c['log_lines'] / drained:.2f} log lines",
        flush=True,
    )
    if not res["reached_target"]:
        print(f"   !! {strategy}: the head stopped at {res['head']} (target {target})")
    return res, pub_s, total_bytes


def merged_details(details: dict[str, Any], section: str) -> dict[str, dict[str, float]]:
    """``section`` per update, averaged over runs, keyed by size/strategy."""
    out: dict[str, Counter[str]] = {}
    weights: dict[str, int] = {}
    for key, d in details.items():
        base = key.split("/run")[0]
        acc = out.setdefault(base, Counter())
        for k, v in d[section].items():
            acc[k] += v * d["drained"]
        weights[base] = weights.get(base, 0) + d["drained"]
    return {
        base: {k: v / max(weights[base], 1) for k, v in acc.most_common()}
        for base, acc in out.items()
    }


def print_tables(
    rows: list[Row], breakdowns: dict[str, Any], details: dict[str, Any], runs: int
) -> dict[str, Any]:
    """Print every table; returns the ranges over runs (for the JSON)."""
    print(
        table(
            [
                "run",
                "size",
                "params",
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
            ],
            [
                [
                    r.run,
                    r.size,
                    r.params,
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
    print(
        table(
            [
                "run",
                "size",
                "strategy",
                "Redis round trips",
                "Redis commands (server)",
                "Redis server us",
                "thread hops",
                "of which to_thread",
                "log lines",
                "drain ms",
            ],
            [
                [
                    r.run,
                    r.size,
                    r.strategy,
                    r.redis_round_trips_per_update,
                    r.redis_commands_per_update,
                    r.redis_server_us_per_update,
                    r.thread_hops_per_update,
                    r.to_thread_per_update,
                    r.log_lines_per_update,
                    1000 / r.agg_per_s if r.agg_per_s else None,
                ]
                for r in rows
            ],
            title="Per update, inside the aggregator during the drain (Redis commands and "
            "server us: INFO commandstats, server-wide)",
        )
    )
    ranges: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = ranges.setdefault(r.size, {}).setdefault(
            r.strategy, {"ratios": [], "agg_per_s": [], "raw_consume_per_s": []}
        )
        entry["ratios"].append(r.ratio)
        entry["agg_per_s"].append(r.agg_per_s)
        entry["raw_consume_per_s"].append(r.raw_consume_per_s)
    range_rows = []
    for size, by_strategy in ranges.items():
        for strategy, e in by_strategy.items():
            for k in ("ratios", "agg_per_s", "raw_consume_per_s"):
                e[f"{k}_min"], e[f"{k}_max"] = min(e[k]), max(e[k])
            range_rows.append(
                [
                    size,
                    strategy,
                    ", ".join(f"{x:.3g}" for x in e["ratios"]),
                    f"{e['ratios_min']:.3g} - {e['ratios_max']:.3g}",
                    f"{e['agg_per_s_min']:,.0f} - {e['agg_per_s_max']:,.0f}",
                    f"{e['raw_consume_per_s_min']:,.0f} - {e['raw_consume_per_s_max']:,.0f}",
                ]
            )
    print(
        table(
            [
                "size",
                "strategy",
                "ratio per run",
                "ratio min - max",
                "aggregator upd/s min - max",
                "raw consume upd/s min - max",
            ],
            range_rows,
            title=f"Over {runs} run(s)",
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
    for section, header, title in (
        (
            "redis_round_trips_by_command",
            "first command",
            "Redis round trips per update, by the request's first command",
        ),
        (
            "commandstats_calls",
            "command",
            "Redis commands per update (INFO commandstats, server-wide; a script's "
            "commands count too)",
        ),
        ("to_thread_by_function", "function", "asyncio.to_thread calls per update, by function"),
        ("log_events", "event", "Log lines per update, by event"),
    ):
        merged = merged_details(details, section)
        names = sorted({k for m in merged.values() for k in m}, key=lambda k: k.lower())
        if not names:
            continue
        print(
            table(
                [header, *merged],
                [[k, *(m.get(k) for m in merged.values())] for k in names],
                title=title + (f" (mean over {runs} runs)" if runs > 1 else ""),
            )
        )
    return ranges


async def main_async(args: argparse.Namespace) -> None:
    defaults = shipped_defaults()
    args.codec = args.codec or defaults["update_codec"]
    rows: list[Row] = []
    ceilings: dict[str, list[dict[str, Any]]] = {}
    breakdowns: dict[str, Any] = {}
    details: dict[str, Any] = {}
    profiles: dict[str, Any] = {}
    wanted = args.sizes or ([s.label for s in SIZES] if args.full else list(DEFAULT_SIZES))
    sizes = [s for s in SIZES if s.label in wanted]
    print(
        f"sizes {', '.join(s.label for s in sizes)}; {args.runs} run(s); update codec "
        f"{args.codec}; store blob codec {args.blob_codec or defaults['blob_codec']}"
        f"{'' if args.blob_codec else ' (StoreConfig default)'}; prefetch "
        f"{args.prefetch or defaults['prefetch']}"
        f"{'' if args.prefetch else ' (ServiceConfig default)'}",
        flush=True,
    )
    for run in range(1, args.runs + 1):
        if args.runs > 1:
            print(f"\n##### run {run} of {args.runs}", flush=True)
        for size in sizes:
            n = size.quick_count if args.quick else size.count
            if args.count:
                n = args.count
            size_rows, extra = await bench_size(size, n, run, args, profiles)
            rows += size_rows
            ceilings.setdefault(size.label, []).append(
                {"run": run, **{k: extra[k] for k in ("ceiling", "before", "after")}}
            )
            breakdowns.update(extra["breakdowns"])
            details.update(extra["details"])
    ranges = print_tables(rows, breakdowns, details, args.runs)
    for r in rows:
        for k, v in asdict(r).items():
            if isinstance(v, float) and not math.isfinite(v):
                print(f"   !! run {r.run} {r.size} {r.strategy}: {k} is {v}")
    doc = envelope(
        "ingest",
        args.quick,
        {
            "rows": [asdict(r) for r in rows],
            "ranges": ranges,
            "ceilings": ceilings,
            "breakdown_ms_per_update": breakdowns,
            "counters_per_update": details,
            "profiles": profiles,
        },
        settings={
            "sizes": [s.label for s in sizes],
            "runs": args.runs,
            "window": WINDOW,
            "ceiling_prefetch": CEILING_PREFETCH,
            "prefetch": args.prefetch or defaults["prefetch"],
            "prefetch_source": "--prefetch" if args.prefetch else "ServiceConfig() default",
            "fedbuff_k": FEDBUFF_K,
            "participants": N_PARTICIPANTS,
            "store_keep_blobs": KEEP_BLOBS,
            "sender_check": False,
            "torch_threads": args.torch_threads,
            "child_env": args.child_env,
            "update_codec": args.codec,
            "blob_codec": args.blob_codec or defaults["blob_codec"],
            "blob_codec_source": "--blob-codec" if args.blob_codec else "StoreConfig() default",
            "shipped_defaults": defaults,
            "torch_default_threads": torch.get_num_threads(),
            "amqp_url": args.amqp_url,
            "redis_url": args.redis_url,
        },
    )
    write_json(args.out, doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer updates per size")
    p.add_argument("--out", type=Path, default=RESULTS / "ingest.json")
    p.add_argument("--amqp-url", default=os.environ.get("FEDQ_TEST_AMQP_URL", DEFAULT_AMQP))
    p.add_argument("--redis-url", default=os.environ.get("FEDQ_TEST_REDIS_URL", DEFAULT_REDIS))
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        help=f"comma-separated, of {', '.join(s.label for s in SIZES)} "
        f"(default: {','.join(DEFAULT_SIZES)}; every size with --full)",
    )
    p.add_argument("--full", action="store_true", help="every size, 1m included")
    p.add_argument(
        "--runs", type=int, default=1, help="repeat the whole comparison N times (default 1)"
    )
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
    p.add_argument(
        "--codec", default=None, help="codec of the updates (default: the participant's)"
    )
    p.add_argument(
        "--blob-codec",
        default=None,
        help="codec of stored versions (default: StoreConfig()'s, what the service ships)",
    )
    p.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="the aggregator's prefetch (default: ServiceConfig()'s, what the service ships)",
    )
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
        cfg = json.loads(sys.stdin.read())
        install_counters()  # before the service's modules are imported (in child_main)
        result = asyncio.run(child_main(cfg))
        print(json.dumps(result), flush=True)
        return
    if args.runs < 1:
        p.error("--runs must be at least 1")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
