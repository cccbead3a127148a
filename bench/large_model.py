"""A 100M-parameter model (400 MB in float32) through the whole path, on the real
RabbitMQ and Redis, with every transport built with ``chunking_for(spec)``
(docs/chunking.md):

1. declare the task's topology (``AmqpTransport.declare_task``, as the service does)
   and publish N signed updates (random deltas N(0, 1e-3), ``encode_update``, each
   about 400 MB: ~49 chunks of 8 MiB) with ``AmqpTransport.publish_update``;
2. run ``AggregatorService`` (FedAsync) in a fresh interpreter until the head reaches
   version N; it reports its peak RSS (VmHWM), the drain's wall time and each
   version's time;
3. receive the last announced model as a participant does (``consume_models``),
   decode it (``decode_model``, the task's limits) and check its version hash and
   parameters against the store's head;
4. replay: ``fedq replay --task T --json`` (a fresh process: reads the audit stream,
   chunk sets reassembled, and verifies every version against the store), its exit
   status, report and peak RSS.

Model: MLP 20 -> 4096 x 7 -> 1 (100,777,985 parameters: six 4096 x 4096 matrices of
64 MiB, nothing larger). FedAsync, one version per update: FedBuff would hold K
decoded updates in its buffer as well (K x 400 MB), FedAsync holds only the update in
hand. The store keeps the head's parameters and version 0's only (``keep_blobs=1``,
pruned in the commit's own transaction), so Redis holds at most ~1.2 GB of blobs.

    python bench/large_model.py [--updates 3] [--hidden 4096x7] [--quick]

``--quick``: MLP 20-1000-977-1 (~1M parameters), 2 updates, a small
``chunk_size`` (256 KiB) so the updates still travel in chunks.

Everything created (queues, Redis keys under a private prefix) is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

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

from common.models import build_task_model, model_tensors
from common.signing import SigningKey
from common.spec import (
    AsyncSettings,
    IdentitySpec,
    ModelSpec,
    NumericFeature,
    TargetSpec,
    TaskSpec,
)
from common.transport import Chunking, TaskTopology, names
from common.transport.amqp import AmqpTransport

N_PARTICIPANTS = 3
KEEP_BLOBS = 1
FULL_HIDDEN = (4096,) * 7
QUICK_HIDDEN = (1000, 977)
QUICK_CHUNK = 256 * 1024
SEED = 11
AGGREGATOR = "aggregator"
#: How long the replay's audit reader waits for the next message before it takes the
#: stream as read (``read_audit``'s ``idle_s``; the CLI's is 1 s).
AUDIT_IDLE_S = 10.0


def key_of(participant: str) -> SigningKey:
    """A deterministic key per bank (the bench publishes every bank's updates)."""
    return SigningKey.from_seed(participant.encode().ljust(32, b"\0")[:32])


def make_spec(hidden: tuple[int, ...], tag: str) -> TaskSpec:
    participants = tuple(f"bank-{i:02d}" for i in range(N_PARTICIPANTS))
    return TaskSpec(
        task_id=f"bench-large-{tag}",
        model=ModelSpec(kind="mlp", hidden=hidden),
        features=tuple(NumericFeature(name=f"x{i:02d}") for i in range(20)),
        target=TargetSpec(name="y"),
        mode="async",
        async_=AsyncSettings(strategy="fedasync"),
        participants=participants,
        identity=IdentitySpec(
            require_signatures=True,
            aggregator_key=key_of(AGGREGATOR).public.text,
            participant_keys={p: key_of(p).public.text for p in participants},
        ),
    )


def chunking(spec: TaskSpec, chunk_size: int | None) -> Chunking:
    from fedq.services import chunking_for

    c = chunking_for(spec)
    return dataclasses.replace(c, chunk_size=chunk_size) if chunk_size else c


def task_queues(spec: TaskSpec) -> list[str]:
    t = spec.task_id
    out = []
    for fn in ("work_queue", "audit_stream", "dead_queue", "head_queue", "model_stream"):
        if callable(name := getattr(names, fn, None)):
            out.append(name(t))
    for fn in ("model_queue", "receipt_queue"):
        if callable(name := getattr(names, fn, None)):
            out += [name(t, p) for p in spec.participants]
    return out


# --------------------------------------------------------------------------- step 1


async def publish(
    amqp_url: str, spec: TaskSpec, n: int, chunk_size: int | None, staleness: int
) -> list[dict[str, Any]]:
    """Declare the topology, then encode and publish ``n`` signed updates one at a
    time (one 400 MB body in memory at once). Update i is based on version
    ``max(0, i - staleness)``: with 0, every update is based on the head it meets (a
    bank that trained on the newest model); with 1, from the second on the service
    reads a base other than the head."""
    from common.wire import UpdateEnvelope, encode_update

    shapes = {k: v.shape for k, v in model_tensors(build_task_model(spec)).items()}
    ch = chunking(spec, chunk_size)
    transport = await AmqpTransport.connect(amqp_url, name="bench-large-publisher", chunking=ch)
    out = []
    try:
        # As the service declares it (AggregatorService.prepare): the model stream's
        # retention grows with the model (4 models at least).
        from aggregator.service import MODELS_MAX_BYTES

        models_max_bytes = max(MODELS_MAX_BYTES, 4 * 4 * sum(s.numel() for s in shapes.values()))
        await transport.declare_task(
            TaskTopology(spec.task_id, spec.participants, models_max_bytes=models_max_bytes)
        )
        gen = torch.Generator().manual_seed(SEED)
        for i in range(n):
            participant = spec.participants[i % len(spec.participants)]
            t0 = time.perf_counter()
            delta = {k: torch.randn(s, generator=gen) * 1e-3 for k, s in shapes.items()}
            update_id = uuid.uuid4().hex
            body, _ = encode_update(
                UpdateEnvelope(
                    task=spec.task_id,
                    participant=participant,
                    update_id=update_id,
                    base_version=max(0, i - staleness),
                    num_samples=100,
                    tensors=delta,
                    spec_hash=spec.spec_hash(),
                    metrics={"train_loss": 0.5},
                    codec="raw",
                    created_at=time.time(),
                ),
                key_of(participant),
            )
            del delta
            t_enc = time.perf_counter() - t0
            t0 = time.perf_counter()
            await transport.publish_update(spec.task_id, participant, body, message_id=update_id)
            t_pub = time.perf_counter() - t0
            from common.chunks import chunk_count

            out.append(
                {
                    "update_id": update_id,
                    "participant": participant,
                    "body_bytes": len(body),
                    "chunks": chunk_count(len(body), ch.chunk_size)
                    if len(body) > ch.chunk_size
                    else 1,
                    "encode_s": t_enc,
                    "publish_s": t_pub,
                }
            )
            print(
                f"   update {i + 1}/{n}: {len(body) / 1e6:,.0f} MB, {out[-1]['chunks']} chunks, "
                f"encode {t_enc:.1f} s, publish {t_pub:.1f} s",
                flush=True,
            )
            del body
    finally:
        await transport.close()
    return out


# --------------------------------------------------------------------------- step 2


def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """The aggregator in a fresh interpreter (its own peak RSS)."""
    proc = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, str(Path(__file__).resolve()), "--child"],
        input=json.dumps(cfg),
        capture_output=True,
        text=True,
        timeout=cfg["timeout_s"] + 120,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-30:])
        raise RuntimeError(f"aggregator child failed (rc {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


async def child_main(cfg: dict[str, Any]) -> dict[str, Any]:
    from aggregator.service import AggregatorService, ServiceConfig
    from aggregator.store import RedisModelStore, StoreConfig, connect_redis
    from aggregator.store.records import VersionRecord
    from common.logging import configure_logging
    from common.wire import Tensors

    configure_logging(os.environ.get("FEDQ_LOG_LEVEL", "warning"), "json")
    spec = TaskSpec.from_json(cfg["spec"])
    from fedq.services import tune_memory

    tuned = tune_memory(spec)  # as `fedq aggregator run` does
    rss_start = rss_mib()
    store = RedisModelStore(
        connect_redis(cfg["redis_url"]),
        StoreConfig(prefix=cfg["prefix"], keep_blobs=cfg["keep_blobs"]),
    )
    transport = await AmqpTransport.connect(
        cfg["amqp_url"],
        name="bench-large-aggregator",
        chunking=chunking(spec, cfg.get("chunk_size")),
    )
    target = int(cfg["target_version"])
    stop = asyncio.Event()
    times: list[dict[str, float]] = []

    async def on_version(record: VersionRecord, params: Tensors) -> None:
        times.append({"version": record.version, "t": time.perf_counter(), "rss_mib": rss_mib()})
        if record.version >= target:
            stop.set()

    service = AggregatorService(
        spec,
        store,
        transport,
        ServiceConfig(
            require_sender_match=False, reannounce_s=None, signing_key=key_of(AGGREGATOR)
        ),
        on_version=on_version,
    )
    t_start = time.perf_counter()
    samples: list[tuple[float, float]] = []
    sampling = threading.Event()

    def sample() -> None:  # the RSS over time: where the peak is
        while not sampling.is_set():
            samples.append((time.perf_counter() - t_start, rss_mib()))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    runner = asyncio.create_task(service.run(stop))
    ready = asyncio.create_task(service.ready.wait())
    await asyncio.wait([runner, ready], return_when=asyncio.FIRST_COMPLETED)
    if runner.done():
        runner.result()
    t0 = time.perf_counter()
    rss_ready = rss_mib()
    hwm_ready = peak_rss_mib()
    deadline = t0 + float(cfg["timeout_s"])
    while not stop.is_set() and time.perf_counter() < deadline:
        if service.stats.accepted + service.stats.refused_total >= int(cfg["updates"]):
            break
        await asyncio.sleep(0.05)
    t_end = time.perf_counter()
    stop.set()
    await runner
    sampling.set()
    sampler.join()
    top = max(samples, key=lambda x: x[1]) if samples else (0.0, 0.0)
    await transport.close()
    await store.close()
    per_version = []
    prev = t0
    for t in times:
        per_version.append({"version": t["version"], "s": t["t"] - prev, "rss_mib": t["rss_mib"]})
        prev = t["t"]
    return {
        "start_to_ready_s": t0 - t_start,
        "drain_s": t_end - t0,
        "per_version": per_version,
        "head": service.head_version,
        "accepted": service.stats.accepted,
        "refused": dict(service.stats.refused),
        "prefetch": service.prefetch,
        "base_budget": service._base_budget,
        "rss_start_mib": rss_start,
        "malloc_tuned": tuned,
        "rss_ready_mib": rss_ready,
        "peak_rss_ready_mib": hwm_ready,
        "peak_rss_mib": peak_rss_mib(),
        "sampled_peak": {"t_s": top[0], "rss_mib": top[1], "ready_at_s": t0 - t_start},
        "rss_timeline": [(round(t, 2), round(m)) for t, m in samples[::5]],
        "versions_at_s": [t["t"] - t_start for t in times],
    }


# --------------------------------------------------------------------------- step 3


async def receive_model(
    amqp_url: str, redis_url: str, prefix: str, spec: TaskSpec, chunk_size: int | None
) -> dict[str, Any]:
    """The last announcement, as a participant receives and decodes it, against the head."""
    from aggregator.store import RedisModelStore, StoreConfig, connect_redis
    from common.models import tensor_specs
    from common.wire import decode_model, limits_for

    expected = tensor_specs(model_tensors(build_task_model(spec)))
    transport = await AmqpTransport.connect(
        amqp_url, name="bench-large-participant", chunking=chunking(spec, chunk_size)
    )
    store = RedisModelStore(connect_redis(redis_url), StoreConfig(prefix=prefix))
    try:
        t0 = time.perf_counter()
        sub = await transport.consume_models(spec.task_id, spec.participants[0])
        delivery = await asyncio.wait_for(sub.get(), timeout=300)
        t_recv = time.perf_counter() - t0
        body_bytes = len(delivery.body)
        t0 = time.perf_counter()
        model = decode_model(delivery.body, limits_for(expected), expected)
        t_dec = time.perf_counter() - t0
        await delivery.ack()
        del delivery
        await sub.close()
        head = await store.head(spec.task_id)
        assert head is not None
        record = await store.get_version(spec.task_id, head)
        stored = await store.get_params(spec.task_id, head)
        same = model.tensors.keys() == stored.tensors.keys() and all(
            torch.equal(model.tensors[k], stored.tensors[k]) for k in model.tensors
        )
        return {
            "announced_version": model.version,
            "head": head,
            "body_bytes": body_bytes,
            "receive_s": t_recv,
            "decode_s": t_dec,
            "version_hash_matches": model.version_hash == record.version_hash,
            "param_hash_matches": model.content_hash == record.param_hash,
            "parameters_equal": same,
        }
    finally:
        await transport.close()
        await store.close()


# --------------------------------------------------------------------------- step 4


def replay(amqp_url: str, redis_url: str, prefix: str, task: str) -> dict[str, Any]:
    """Replay in a fresh process (its own peak RSS): what ``fedq replay --verify``
    does (fedq/cli_audit.py), on the bench's private store prefix."""
    t0 = time.perf_counter()
    result = run_child(
        {
            "mode": "replay",
            "amqp_url": amqp_url,
            "redis_url": redis_url,
            "prefix": prefix,
            "task": task,
            "timeout_s": 1200,
            "idle_s": AUDIT_IDLE_S,
        }
    )
    result["wall_s"] = time.perf_counter() - t0
    return result


async def replay_main(cfg: dict[str, Any]) -> dict[str, Any]:
    """``fedq replay``'s steps (fedq/cli_audit.py ``_replay``): the audit stream read by
    a transport with the task's chunking, indexed, every version replayed and checked."""
    from aggregator.audit.replay import index_answers, index_updates
    from aggregator.audit.replay import replay as run_replay
    from aggregator.store import RedisModelStore, StoreConfig, connect_redis
    from fedq.services import chunking_for

    task = cfg["task"]
    store = RedisModelStore(connect_redis(cfg["redis_url"]), StoreConfig(prefix=cfg["prefix"]))
    try:
        spec = await store.get_spec(task)
        transport = await AmqpTransport.connect(
            cfg["amqp_url"], name="bench-large-replay", chunking=chunking_for(spec)
        )
        t0 = time.perf_counter()
        try:
            # idle_s: the CLI's 1 s read nothing of a 1.2 GB stream (the broker took longer
            # than that to deliver its first message); see bench/results/large_model.md.
            bodies = [b async for b in transport.read_audit(task, idle_s=cfg["idle_s"])]
        finally:
            await transport.close()
        t_read = time.perf_counter() - t0
        updates, answers = index_updates(bodies), index_answers(bodies)
        n_bodies = len(bodies)
        del bodies
        t0 = time.perf_counter()
        report = await run_replay(store, updates, task, answers=answers)
        t_replay = time.perf_counter() - t0
    finally:
        await store.close()
    return {
        "audit_messages": n_bodies,
        "distinct_updates": len(updates),
        "read_audit_s": t_read,
        "replay_s": t_replay,
        "audit_idle_s": cfg["idle_s"],
        "ok": report.ok,
        "checked": report.checked,
        "signatures": report.signatures,
        "from_version": report.from_version,
        "to_version": report.to_version,
        "first_bad_version": report.first_bad_version,
        "reason": report.reason,
        "peak_rss_mib": peak_rss_mib(),
    }


# --------------------------------------------------------------------------- driver


def n_params(spec: TaskSpec) -> int:
    return sum(t.numel() for t in model_tensors(build_task_model(spec)).values())


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    hidden = QUICK_HIDDEN if args.quick else args.hidden
    n = args.updates or (2 if args.quick else 3)
    chunk_size = QUICK_CHUNK if args.quick else None
    tag = uuid.uuid4().hex[:8]
    spec = make_spec(hidden, tag)
    prefix = f"bench-large-{tag}"
    params = n_params(spec)
    model_bytes = 4 * params
    print(
        f"model MLP 20-{'-'.join(map(str, hidden))}-1: {params:,} parameters "
        f"({model_bytes / 1e6:,.0f} MB float32), {n} updates, FedAsync, "
        f"keep_blobs {KEEP_BLOBS}",
        flush=True,
    )
    try:
        t0 = time.perf_counter()
        published = await publish(args.amqp_url, spec, n, chunk_size, args.staleness)
        t_publish = time.perf_counter() - t0
        print(f"published in {t_publish:.1f} s; main process peak RSS {peak_rss_mib():,.0f} MiB")
        child = await asyncio.to_thread(
            run_child,
            {
                "spec": spec.to_json(),
                "amqp_url": args.amqp_url,
                "redis_url": args.redis_url,
                "prefix": prefix,
                "keep_blobs": KEEP_BLOBS,
                "target_version": n,
                "updates": n,
                "timeout_s": args.timeout,
                "chunk_size": chunk_size,
            },
        )
        print(
            f"aggregator: head {child['head']}, drain {child['drain_s']:.1f} s, peak RSS "
            f"{child['peak_rss_mib']:,.0f} MiB ({child['peak_rss_mib'] * 1024**2 / model_bytes:.2f}"
            f" x the model)",
            flush=True,
        )
        received = await receive_model(args.amqp_url, args.redis_url, prefix, spec, chunk_size)
        print(f"participant: {received}", flush=True)
        replayed = (
            {"skipped": True}
            if args.skip_replay
            else replay(args.amqp_url, args.redis_url, prefix, spec.task_id)
        )
        print(f"replay: {json.dumps(replayed)[:600]}", flush=True)
    finally:
        await delete_queues(args.amqp_url, task_queues(spec))
        await delete_redis_prefix(args.redis_url, prefix)
    return {
        "parameters": params,
        "hidden": list(hidden),
        "model_bytes": model_bytes,
        "updates": n,
        "strategy": "fedasync",
        "staleness": args.staleness,
        "keep_blobs": KEEP_BLOBS,
        "chunk_size": chunk_size or Chunking().chunk_size,
        "published": published,
        "publish_s": t_publish,
        "publisher_peak_rss_mib": peak_rss_mib(),
        "aggregator": child,
        "aggregator_peak_rss_over_model": child["peak_rss_mib"] * 1024**2 / model_bytes,
        "participant": received,
        "replay": replayed,
    }


def write_markdown(path: Path, doc: dict[str, Any]) -> None:
    f = doc["figures"]
    a = f["aggregator"]
    r = rep = f["replay"]
    lines = [
        "# A 100M-parameter model through the whole path (bench/large_model.py)",
        "",
        f"Run {doc['date']} on git {doc['git']}: `{doc['command']}`. Machine: "
        f"{doc['machine']['cpu']}, {doc['machine']['cores']} cores, "
        f"{doc['machine']['ram_gib']} GiB RAM, load average at start "
        f"{', '.join(f'{x:.2f}' for x in doc['machine']['load_avg_at_start'])} (shared).",
        "",
        table(
            ["figure", "value"],
            [
                ["parameters", f"{f['parameters']:,}"],
                ["model (float32)", f"{f['model_bytes'] / 1e6:,.1f} MB"],
                ["strategy / updates", f"{f['strategy']} / {f['updates']}"],
                ["staleness of each update", str(f.get("staleness", 1))],
                ["bytes per update", f"{f['published'][0]['body_bytes']:,}"],
                ["chunks per update", f"{f['published'][0]['chunks']} x {f['chunk_size']:,} B"],
                ["publish (encode + sign + publish), all", f"{f['publish_s']:.1f} s"],
                ["aggregator start to ready", f"{a['start_to_ready_s']:.1f} s"],
                ["aggregator drain", f"{a['drain_s']:.1f} s"],
                [
                    "per version",
                    ", ".join(f"v{p['version']} {p['s']:.1f} s" for p in a["per_version"]),
                ],
                ["aggregator peak RSS (VmHWM)", f"{a['peak_rss_mib']:,.0f} MiB"],
                ["... over the model's size", f"{f['aggregator_peak_rss_over_model']:.2f} x"],
                ["aggregator RSS when ready", f"{a['rss_ready_mib']:,.0f} MiB"],
                [
                    "... sampled peak (s from start; ready; versions)",
                    f"{a['sampled_peak']['rss_mib']:,.0f} MiB at {a['sampled_peak']['t_s']:.1f} s; "
                    f"{a['sampled_peak']['ready_at_s']:.1f} s; "
                    + ", ".join(f"{t:.1f}" for t in a["versions_at_s"]),
                ],
                ["base cache budget (versions)", str(a["base_budget"])],
                [
                    "participant receive / decode",
                    f"{f['participant'].get('receive_s', 0):.1f} s"
                    f" / {f['participant'].get('decode_s', 0):.1f} s",
                ],
                [
                    "model matches head (version hash, params)",
                    f"{f['participant'].get('version_hash_matches')}, "
                    f"{f['participant'].get('parameters_equal')}",
                ],
                [
                    "replay ok (first bad version, reason)",
                    f"{rep.get('ok')} ({rep.get('first_bad_version')}, {rep.get('reason')})",
                ],
                ["replay signatures verified", str(rep.get("signatures"))],
                ["replay checked versions", str(rep.get("checked"))],
                [
                    "replay wall / peak RSS",
                    f"{r.get('wall_s', 0):.1f} s / {r.get('peak_rss_mib') or 0:,.0f} MiB",
                ],
                ["publisher peak RSS", f"{f['publisher_peak_rss_mib']:,.0f} MiB"],
            ],
        ),
        "",
    ]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def parse_hidden(value: str) -> tuple[int, ...]:
    if "x" in value:
        width, layers = value.split("x")
        return (int(width),) * int(layers)
    return tuple(int(x) for x in value.split(","))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~1M parameters, 2 updates")
    p.add_argument("--updates", type=int, default=None)
    p.add_argument(
        "--hidden",
        type=parse_hidden,
        default=FULL_HIDDEN,
        help="hidden sizes: comma-separated, or WIDTHxLAYERS (default 4096x7)",
    )
    p.add_argument(
        "--staleness",
        type=int,
        default=0,
        help="update i is based on version i - STALENESS (0: on the head it meets)",
    )
    p.add_argument(
        "--skip-replay", action="store_true", help="no replay step (a run to look at memory)"
    )
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--amqp-url", default=os.environ.get("FEDQ_TEST_AMQP_URL", DEFAULT_AMQP))
    p.add_argument("--redis-url", default=os.environ.get("FEDQ_TEST_REDIS_URL", DEFAULT_REDIS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        cfg = json.loads(sys.stdin.read())
        main_of = replay_main if cfg.get("mode") == "replay" else child_main
        print(json.dumps(asyncio.run(main_of(cfg))), flush=True)
        return
    figures = asyncio.run(main_async(args))
    doc = envelope("large_model", args.quick, figures)
    out = args.out or RESULTS / ("large_model_quick.json" if args.quick else "large_model.json")
    write_json(out, doc)
    if not args.quick or args.out is None:
        write_markdown(out.with_suffix(".md"), doc)


if __name__ == "__main__":
    main()
