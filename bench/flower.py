"""fedq sync and async beside Flower on the same task: wall-clock per round and AUC.

The same German credit split (``fedq.simulate.prepare``: stratified test set, IID
bank shards with the same seed), the same model (fedq's logistic regression from
``common.models.build_task_model``, the same initial weights), the same local
training (``participant.training.train_local``: 2 epochs, batch 32, SGD lr 0.1,
on the same 80% of each shard the fedq worker trains on, with the same per-round
seeds) and the same number of rounds, for each bank count of ``--banks`` (5 and 20
by default), side by side:

- **fedq sync, embedded**: ``run_simulation(mode="sync", base_delay_s=0)``, every
  bank, the aggregator, the broker and Redis in this one process (one event loop,
  one GIL): FedAvg rounds, quorum = every bank. The simulation scores the test AUC
  (and the validation AUC) of every version in its ``on_version`` hook, which the
  aggregator awaits after each commit: that evaluation is *inside* this variant's
  timed path (as in earlier runs of this benchmark).
- **fedq async, embedded**: the same with FedAsync, for rounds x banks updates; its
  "round" is one version per bank (banks x versions).
- **fedq sync, processes**: a deployment's shape on one machine: each bank is its
  own OS process (``multiprocessing``, forked from a fork server that imported torch
  and the worker once; ``--bank-start spawn``: fresh interpreters) running the
  project's ``participant.worker.ParticipantWorker`` over ``AmqpTransport`` to the real
  RabbitMQ, as its own broker user (created as tests/bank_users.py does; the
  aggregator's sender check stays on; ``--sender-check off`` uses guest for every
  bank and ``require_sender_match=False`` instead), with signed updates and models;
  the ``AggregatorService`` runs in this process over the real RabbitMQ and Redis
  (``RedisModelStore``, a private prefix). Sync FedAvg, quorum = every bank; the
  worker settings of the simulation (``delay_s=0``, the same seeds and validation
  split); each bank process uses one torch thread, as Ray gives each Flower client
  (``OMP_NUM_THREADS=1`` for ``num_cpus=1``). The aggregator's ``on_version`` only
  records the time and the parameters: the test AUC of each version is computed
  after the run, *off* the timed path. The task's queues, its Redis keys and the
  broker users the run created are deleted at the end.
- **Flower**: ``flwr.simulation.run_simulation`` (Ray backend, one CPU per client)
  with a ``ServerApp`` running ``flwr.serverapp.strategy.FedAvg`` (weighted by
  example count, every node every round) and a ``ClientApp`` whose ``train`` calls
  the very same ``train_local``. Its ``evaluate_fn`` (called after every round)
  only records the time and the global arrays: the test AUC is computed after the
  run, *off* the timed path, with the same ``common.evaluation.evaluate`` as the
  processes variant.

Wall-clock per round is taken in steady state, from the end of round 1 to the end
of the last round, divided by the rounds between (start-up is reported apart). Each
variant's test AUC after every round is compared with Flower's: ``max |dAUC|``.

In the first run (unless ``--no-profile``) the processes variant runs once more with a
timing hook (common/hooks.py) in every process and a timed transport in the banks:
each steady round is split along its critical path (the bank whose update came
last: the model's announcement and delivery, the worker's decode, validation
metrics, training and encoding, the update's way to the aggregator, admission, the
commit), and the CPU each party spent per round is counted (every bank's process by
stage, the aggregator's by stage, RabbitMQ's and Redis's from /proc) beside the
machine's cores. Each variant also notes the 1-minute load average as it starts: the
machine may be shared.

Flower is not a fedq dependency: ``pip install "flwr[simulation]==1.41.0"`` first.
The processes variant needs RabbitMQ and Redis, and ``rabbitmqctl`` for the bank
users (or ``--sender-check off``).

    python bench/flower.py [--quick] [--banks 5,20] [--rounds 20] [--runs N]
                           [--no-profile] [--no-flower] [--sender-check users|off]
                           [--out bench/results/flower.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import logging
import multiprocessing as mp
import os
import statistics
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from _common import (
    DEFAULT_AMQP,
    DEFAULT_REDIS,
    RESULTS,
    delete_broker_users,
    delete_queues,
    delete_redis_prefix,
    ensure_bank_users,
    envelope,
    table,
    write_json,
)

from common.evaluation import evaluate
from common.logging import configure_logging
from common.models import build_task_model, model_tensors
from common.spec import TaskSpec
from fedq.simulate import (
    VAL_FRACTION,
    SimulationConfig,
    SimulationResult,
    fit_baselines,
    prepare,
    run_simulation,
)
from participant.data import encode, train_val_split
from participant.training import train_local

EMBEDDED_SYNC = "fedq sync, embedded"
EMBEDDED_ASYNC = "fedq async, embedded"
PROCESSES = "fedq sync, processes"
FLOWER = "Flower"


def worker_seed(seed: int, participant: str, published: int) -> int:
    """The seed fedq's worker uses for its ``published``-th local round."""
    key = f"{seed}:{participant}:{published}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def steady_per_round(times: list[float]) -> float | None:
    """Seconds per round from round 1 to the last (``times[r]`` = end of round r, r >= 1)."""
    if len(times) < 3:
        return None
    return (times[-1] - times[1]) / (len(times) - 2)


def auc_of(spec: TaskSpec, params: dict[str, torch.Tensor], x: Any, y: Any) -> float:
    """Test AUC as Flower's side and the processes variant score it (after the run)."""
    return float(evaluate(spec, params, x, y).get("auc", 0.5))


# ------------------------------------------------------------------ fedq, embedded


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
        "evaluation": "in the timed path (run_simulation's on_version, awaited after commits)",
    }


async def run_fedq(config: SimulationConfig, rounds: int) -> dict[str, Any]:
    """Embedded sync and async on one split, with the baselines fitted once."""
    banks = config.participants
    prep = await asyncio.to_thread(prepare, config)
    base = await asyncio.to_thread(fit_baselines, prep, config)
    sync = await run_simulation(
        replace(config, mode="sync", versions=rounds, patience=0), prepared=prep, baselines=base
    )
    asyn = await run_simulation(
        replace(config, mode="async", versions=rounds * banks, patience=0),
        prepared=prep,
        baselines=base,
    )
    return {
        EMBEDDED_SYNC: fedq_figures(sync, banks, 1),
        EMBEDDED_ASYNC: fedq_figures(asyn, banks, banks),
    }


# ------------------------------------------------------ fedq, one process per bank


#: A stage's (name, start, end, process CPU at start, at end), in seconds.
Span = tuple[str, float, float, float, float]


class Timeline:
    """A :data:`common.hooks.Stages` hook that records every stage's :data:`Span`:
    wall-clock by ``time.perf_counter`` (CLOCK_MONOTONIC: comparable across processes)
    and the process's CPU time (all its threads) by ``time.process_time``."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.spans.append((name, t, time.perf_counter(), c, time.process_time()))


class TimedTransport:
    """A bank's transport with its update publish (to the broker's confirm) timed."""

    def __init__(self, inner: Any, timeline: Timeline) -> None:
        self._inner = inner
        self._timeline = timeline
        #: (perf_counter, this process's CPU seconds) after each publish.
        self.cpu: list[tuple[float, float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def publish_update(self, *args: Any, **kwargs: Any) -> Any:
        with self._timeline("worker: publish (to confirm)"):
            out = await self._inner.publish_update(*args, **kwargs)
        self.cpu.append((time.perf_counter(), time.process_time()))
        return out


#: What a bank process imports (the fork server imports them once, before any fork).
BANK_MODULES = (
    "torch",
    "pandas",
    "aio_pika",
    "common.transport.amqp",
    "participant.worker",
    "participant.training",
)


@dataclass(frozen=True, slots=True)
class BankJob:
    """What one bank process needs (pickled to it)."""

    spec_json: str
    name: str
    seed: int
    shard: Any  # pandas.DataFrame: the bank's training rows, as the simulation deals them
    key_seed: bytes
    amqp_url: str
    rounds: int
    profile: bool


def bank_process(job: BankJob, ready: Any, go: Any, out: Any) -> None:
    """Entry point of a bank's process: one ``ParticipantWorker`` over the real broker."""
    torch.set_num_threads(1)
    configure_logging("error", "console")
    said: list[bool] = []
    try:
        result = asyncio.run(_bank_main(job, ready, go, said))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        result = {"name": job.name, "error": f"{type(e).__name__}: {e}"}
        if not said:
            ready.put((job.name, result["error"]))
    out.put(result)


async def _bank_main(job: BankJob, ready: Any, go: Any, said: list[bool]) -> dict[str, Any]:
    from common.signing import SigningKey
    from common.transport.amqp import AmqpTransport
    from participant.worker import ParticipantWorker, WorkerConfig

    spec = TaskSpec.from_json(job.spec_json)
    timeline = Timeline()
    transport = await AmqpTransport.connect(job.amqp_url, name=f"bench-flower-{job.name}")
    timed = TimedTransport(transport, timeline)
    try:
        worker = ParticipantWorker(
            spec,
            WorkerConfig(
                participant=job.name,
                seed=job.seed,
                val_fraction=VAL_FRACTION,
                delay_s=0.0,
                wait_for_model_s=2.0,  # as the simulation; a sync worker never uses it
                signing_key=SigningKey.from_seed(job.key_seed),
                max_updates=job.rounds,
            ),
            timed if job.profile else transport,
            job.shard,
            stages=timeline if job.profile else _untimed,
        )
        # Warm torch up outside the timed rounds (its first call is slow); a private
        # generator: no seed of the run is touched.
        initial = model_tensors(build_task_model(spec))
        train_local(spec, initial, worker.x_train, worker.y_train, seed=1)
        ready.put((job.name, None))
        said.append(True)
        await asyncio.to_thread(go.wait)
        stats = await worker.run(asyncio.Event())  # ends after max_updates
    finally:
        await transport.close()
    return {
        "name": job.name,
        "published": stats.published,
        "accepted": stats.accepted,
        "refused": dict(stats.refused),
        "models_refused": dict(stats.models_refused),
        "train_rows": len(worker.x_train),
        "spans": timeline.spans,
        "cpu": timed.cpu,
    }


def _untimed(_: str) -> contextlib.AbstractContextManager[object]:
    return contextlib.nullcontext()


def _bank_keys(names: tuple[str, ...]) -> tuple[Any, dict[str, bytes], Any]:
    """Fresh Ed25519 keys for the banks and the aggregator, and the spec identity that
    requires them (as the simulation makes them)."""
    from common.agreement import AgreementKey
    from common.signing import SigningKey
    from common.spec import IdentitySpec

    seeds = {n: os.urandom(32) for n in names}
    keys = {n: SigningKey.from_seed(s) for n, s in seeds.items()}
    aggregator = SigningKey.generate()
    identity = IdentitySpec(
        require_signatures=True,
        aggregator_key=aggregator.public.text,
        participant_keys={n: k.public.text for n, k in keys.items()},
        agreement_keys={n: AgreementKey.from_signing_key(k).public.text for n, k in keys.items()},
    )
    return identity, seeds, aggregator


def task_queues(spec: TaskSpec) -> list[str]:
    """Every queue fedq may declare for the task (as bench/ingest.py lists them)."""
    from common.transport import names

    t = spec.task_id
    out = []
    for fn in ("work_queue", "audit_stream", "dead_queue", "head_queue", "model_stream"):
        if callable(name := getattr(names, fn, None)):
            out.append(name(t))
    for fn in ("model_queue", "receipt_queue"):
        if callable(name := getattr(names, fn, None)):
            out += [name(t, p) for p in spec.participants]
    return out


def server_pids() -> dict[str, list[int]]:
    """The broker's (``beam.smp``) and Redis's (``redis-server``) processes on this
    machine (none where they run elsewhere)."""
    out: dict[str, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        if comm in ("beam.smp", "redis-server"):
            name = "rabbitmq" if comm == "beam.smp" else "redis"
            out.setdefault(name, []).append(int(stat.parent.name))
    return out


def server_cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each of :func:`server_pids`' servers."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for name, ids in pids.items():
        for pid in ids:
            try:
                text = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


@dataclass(slots=True)
class _Banks:
    """The bank processes of one run and what they talk to the parent over."""

    procs: list[Any]
    ready: Any
    out: Any
    go: Any

    async def until_ready(self) -> None:
        """Every bank imported, built its worker, connected and warmed up."""
        for _ in self.procs:
            name, error = await asyncio.to_thread(self.ready.get, True, 300)
            if error is not None:
                raise RuntimeError(f"bank {name} failed to start: {error}")

    async def results(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for _ in self.procs:
            r = await asyncio.to_thread(self.out.get, True, 60)
            out[r["name"]] = r
        errors = {n: r["error"] for n, r in out.items() if "error" in r}
        if errors:
            raise RuntimeError(f"bank processes failed: {errors}")
        return out

    async def join(self) -> None:
        for proc in self.procs:
            await asyncio.to_thread(proc.join, 15)
            if proc.is_alive():
                proc.terminate()
                await asyncio.to_thread(proc.join, 5)


def _spawn_banks(jobs: list[BankJob], method: str = "forkserver") -> _Banks:
    # forkserver: a server process that has imported what a bank needs, once; each bank
    # is forked from it (no state of this process) in a fraction of a spawn's time.
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["__main__", *BANK_MODULES])
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(
            target=bank_process,
            args=(job, ready, go, out),
            name=f"bench-flower-{job.name}",
            daemon=True,
        )
        for job in jobs
    ]
    # One thread for torch's and BLAS's pools in every bank, as Ray sets it for a client
    # with num_cpus=1 (a spawned child reads it when it imports torch).
    one = dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), "1")
    before = {v: os.environ.get(v) for v in one}
    os.environ.update(one)
    try:
        for proc in procs:
            proc.start()
    finally:
        for v, value in before.items():
            if value is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = value
    return _Banks(procs, ready, out, go)


async def run_fedq_processes(
    config: SimulationConfig,
    rounds: int,
    *,
    amqp_url: str,
    redis_url: str,
    bank_urls: dict[str, str] | None,
    profile: bool = False,
    start_method: str = "forkserver",
) -> dict[str, Any]:
    """Sync FedAvg with every bank in its own process, the aggregator here, on the real
    RabbitMQ and Redis; ``bank_urls`` None: every bank as guest, the sender check off.
    ``start_method``: how the bank processes start (multiprocessing's forkserver or
    spawn; only the start-up differs)."""
    from aggregator.metrics import AggregatorMetrics
    from aggregator.service import AggregatorService, ServiceConfig
    from aggregator.store import RedisModelStore, StoreConfig, connect_redis
    from common.transport.amqp import AmqpTransport

    prep = await asyncio.to_thread(prepare, replace(config, mode="sync"))
    identity, seeds, aggregator_key = _bank_keys(prep.spec.participants)
    tag = uuid.uuid4().hex[:8]
    spec = prep.spec.model_copy(update={"task_id": f"fbench-{tag}", "identity": identity})
    spec = TaskSpec.from_json(spec.to_json())  # validated, as the banks will read it
    prefix = f"fedqbench-flower-{tag}"
    t_spawn = time.perf_counter()
    banks = _spawn_banks(
        [
            BankJob(
                spec_json=spec.to_json(),
                name=name,
                seed=config.seed + i,
                shard=prep.shards[name],
                key_seed=seeds[name],
                amqp_url=bank_urls[name] if bank_urls is not None else amqp_url,
                rounds=rounds,
                profile=profile,
            )
            for i, name in enumerate(spec.participants)
        ],
        start_method,
    )
    timeline = Timeline()
    stages = timeline if profile else _untimed
    ends: list[float] = []
    #: In profile runs, at each version: (perf_counter, this process's CPU, servers' CPU).
    cpu: list[tuple[float, float, dict[str, float]]] = []
    params_by_version: list[dict[str, torch.Tensor]] = [model_tensors(build_task_model(spec))]
    finished = asyncio.Event()
    servers = server_pids() if profile else {}

    async def on_version(record: Any, params: dict[str, torch.Tensor]) -> None:
        ends.append(time.perf_counter())
        params_by_version.append({k: v.detach().clone() for k, v in params.items()})
        if profile:
            cpu.append((ends[-1], time.process_time(), server_cpu(servers)))
        if record.version >= rounds:
            finished.set()

    transport = await AmqpTransport.connect(amqp_url, name="bench-flower-aggregator")
    store = RedisModelStore(connect_redis(redis_url), StoreConfig(prefix=prefix), stages=stages)
    service = AggregatorService(
        spec,
        store,
        transport,
        ServiceConfig(
            depth_poll_s=1.0,
            signing_key=aggregator_key,
            require_sender_match=bank_urls is not None,
        ),
        AggregatorMetrics(),
        on_version,
        stages=stages,
    )
    agg_stop = asyncio.Event()
    agg_task = asyncio.create_task(service.run(agg_stop), name="aggregator")
    try:
        await _first(service.ready.wait(), agg_task)
        await banks.until_ready()
        startup = time.perf_counter() - t_spawn
        t_go = time.perf_counter()
        banks.go.set()
        await _first(finished.wait(), agg_task, within=60 + 5 * rounds)
        if not finished.is_set():
            raise RuntimeError(f"only {len(ends)} of {rounds} rounds in time")
        wall = time.perf_counter() - t_go
        results = await banks.results()
    finally:
        agg_stop.set()
        await asyncio.gather(agg_task, return_exceptions=True)
        await transport.close()
        await store.close()
        await banks.join()
        await delete_queues(amqp_url, task_queues(spec))
        await delete_redis_prefix(redis_url, prefix)
    rel = [0.0] + [t - t_go for t in ends]
    aucs = [auc_of(spec, p, prep.x_test, prep.y_test) for p in params_by_version]
    out: dict[str, Any] = {
        "rounds": len(ends),
        "final_auc": aucs[-1],
        "seconds_per_round": steady_per_round(rel),
        "first_round_s": rel[1] if len(rel) > 1 else None,
        "wall_s": wall,
        "startup_s": startup,
        "auc_by_round": aucs,
        "updates_accepted": service.stats.accepted,
        "updates_refused": service.stats.refused_total,
        "sender_check": bank_urls is not None,
        "task": spec.task_id,
        "redis_prefix": prefix,
        "train_local_alone_ms": await asyncio.to_thread(train_alone_ms, spec, prep, config.seed),
        "evaluation": "after the run (on_version records time and parameters only)",
    }
    if profile:
        out["profile"] = critical_path(ends, timeline.spans, results)
        out["profile"]["cpu_ms_per_round"] = cpu_per_round(cpu, results)
        out["profile"]["train_local_alone_ms"] = out["train_local_alone_ms"]
    return out


def train_alone_ms(spec: TaskSpec, prep: Any, seed: int, calls: int = 15) -> float:
    """Milliseconds of one ``train_local`` on bank-01's training rows in this process,
    one torch thread, after the run (nothing else of the benchmark running): median."""
    name = spec.participants[0]
    x, y = encode(prep.shards[name], spec)
    idx, _ = train_val_split(len(x), VAL_FRACTION, seed)
    params = model_tensors(build_task_model(spec))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_local(spec, params, x[idx], y[idx], seed=1)
        times = []
        for k in range(calls):
            t = time.perf_counter()
            train_local(spec, params, x[idx], y[idx], seed=2 + k)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return 1000 * statistics.median(times)


async def _first(what: Any, agg_task: asyncio.Task[None], within: float | None = None) -> None:
    """Wait for ``what`` (a coroutine) or the aggregator's end (its error raised)."""
    waiter = asyncio.ensure_future(what)
    await asyncio.wait([waiter, agg_task], timeout=within, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if agg_task.done():
        agg_task.result()
        raise RuntimeError("the aggregator stopped by itself")


def cpu_per_round(
    agg: list[tuple[float, float, dict[str, float]]], banks: dict[str, dict[str, Any]]
) -> dict[str, float]:
    """CPU milliseconds per steady round (version 1 to the last) of each party: the
    banks (summed; each from its first publish to its last), the aggregator's process,
    RabbitMQ and Redis; and the machine's cores."""
    if len(agg) < 2:
        return {}
    rounds = len(agg) - 1
    out = {"aggregator (this process)": 1000 * (agg[-1][1] - agg[0][1]) / rounds}
    for name in agg[0][2]:
        out[name] = 1000 * (agg[-1][2][name] - agg[0][2][name]) / rounds
    bank_ms = [
        1000 * (b["cpu"][-1][1] - b["cpu"][0][1]) / (len(b["cpu"]) - 1)
        for b in banks.values()
        if len(b["cpu"]) > 1
    ]
    out["banks (sum)"] = sum(bank_ms)
    out["one bank (mean)"] = statistics.mean(bank_ms) if bank_ms else 0.0
    out["all of the above"] = sum(v for k, v in out.items() if k != "one bank (mean)")
    out["wall ms per round"] = 1000 * (agg[-1][0] - agg[0][0]) / rounds
    out["cores"] = float(os.cpu_count() or 1)
    return out


# ------------------------------------------------------------ where a round goes

#: The segments of a round's critical path, in order (they add up to the round).
SEGMENTS = (
    ("announce + delivery", "commit of round r-1 -> the last bank's model arrives"),
    ("worker: decode", "the model's decode and checks (thread)"),
    ("worker: val eval", "validation metrics of the new model (thread), before training"),
    ("worker: train + encode", "train_local, finite check, encode + sign (threads)"),
    ("update to aggregator", "publish start -> the aggregator admits the last update"),
    ("aggregator: admit + offer", "last update's admission and offer, up to the commit"),
    ("aggregator: commit", "the Redis transaction with encode and hash"),
    ("aggregator: after commit", "acks, receipts, announce queued, on_version"),
)


def _last_before(spans: list[Span], name: str, t: float) -> Any:
    found = [s for s in spans if s[0] == name and s[2] <= t + 1e-9]
    return max(found, key=lambda s: s[2]) if found else None


def critical_path(
    ends: list[float],
    agg_spans: list[Span],
    banks: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Split each steady round (2..R) along its critical path: the bank whose update
    was published last. Milliseconds, median over the rounds. And where each bank's
    CPU goes in a round (:func:`bank_cpu`)."""
    trains = {
        n: sorted(
            (s for s in r["spans"] if s[0] == "worker: train, encode, publish"), key=lambda s: s[1]
        )
        for n, r in banks.items()
    }
    rows: list[dict[str, float]] = []
    extra: dict[str, list[float]] = {
        k: []
        for k in (
            "model arrival spread (first -> last bank)",
            "publish start spread (first -> last bank)",
            "worker: publish to confirm (mean over banks)",
            "aggregator: announce (send to confirm)",
            "aggregator: handle per update",
            "aggregator: admit per update",
            "aggregator: offer per update",
            "store: transaction (Redis)",
        )
    }
    for r in range(2, len(ends) + 1):  # round r ends at ends[r-1] (version r)
        t0, t1 = ends[r - 2], ends[r - 1]
        arrivals, pubs, confirms = {}, {}, []
        chain: dict[str, tuple[float, ...]] = {}
        for n, r_banks in banks.items():
            spans = r_banks["spans"]
            if len(trains[n]) < r:
                continue
            train = trains[n][r - 1]
            wait = _last_before(spans, "worker: wait for the newest model", train[1])
            decode = _last_before(spans, "worker: decode the model", train[1])
            pub = next(
                (
                    s
                    for s in spans
                    if s[0] == "worker: publish (to confirm)" and train[1] <= s[1] <= train[2]
                ),
                None,
            )
            if wait is None or decode is None or pub is None:
                continue
            arrivals[n], pubs[n] = wait[2], pub[1]
            confirms.append(pub[2] - pub[1])
            chain[n] = (wait[2], decode[2], train[1], pub[1])
        if not chain:
            continue
        last = max(pubs, key=pubs.__getitem__)
        arrival, decoded, trained_from, published = chain[last]
        admits = [s for s in agg_spans if s[0] == "admit" and t0 < s[1] <= t1]
        commits = [s for s in agg_spans if s[0] == "commit" and t0 < s[1] <= t1]
        if not admits or not commits:
            continue
        admit, commit = max(admits, key=lambda s: s[1]), commits[-1]
        rows.append(
            {
                "announce + delivery": arrival - t0,
                "worker: decode": decoded - arrival,
                "worker: val eval": trained_from - decoded,
                "worker: train + encode": published - trained_from,
                "update to aggregator": admit[1] - published,
                "aggregator: admit + offer": commit[1] - admit[1],
                "aggregator: commit": commit[2] - commit[1],
                "aggregator: after commit": t1 - commit[2],
                "round": t1 - t0,
            }
        )
        extra["model arrival spread (first -> last bank)"].append(
            max(arrivals.values()) - min(arrivals.values())
        )
        extra["publish start spread (first -> last bank)"].append(
            max(pubs.values()) - min(pubs.values())
        )
        extra["worker: publish to confirm (mean over banks)"].append(statistics.mean(confirms))
        in_round = [s for s in agg_spans if t0 < s[1] <= t1]
        for key, name in (
            ("aggregator: announce (send to confirm)", "announce"),
            ("aggregator: handle per update", "handle"),
            ("aggregator: admit per update", "admit"),
            ("aggregator: offer per update", "offer"),
            ("store: transaction (Redis)", "store: transaction (Redis)"),
        ):
            ds = [s[2] - s[1] for s in in_round if s[0] == name]
            if ds:
                extra[key].append(statistics.mean(ds))
    med = {k: 1000 * statistics.median(row[k] for row in rows) for k in (rows[0] if rows else {})}
    return {
        "rounds_profiled": len(rows),
        "critical_path_ms_median": med,
        "other_ms_median": {k: 1000 * statistics.median(v) for k, v in extra.items() if v},
        "segments": dict(SEGMENTS),
        "bank_cpu_ms_per_round": bank_cpu(banks, len(ends)),
        "aggregator_cpu_ms_per_round": aggregator_cpu(ends, agg_spans),
    }


def bank_cpu(banks: dict[str, dict[str, Any]], rounds: int) -> dict[str, float]:
    """One bank's CPU milliseconds per steady round (rounds 2..R, mean over banks and
    rounds), by stage: the process's CPU (every thread) over each span, so work of
    another task of the process that ran meanwhile (the receipt consumer, the broker
    client's reader) counts in the span it ran in."""
    parts: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        parts.setdefault(key, []).append(1000 * value)

    for b in banks.values():
        spans = b["spans"]
        trains = sorted(
            (s for s in spans if s[0] == "worker: train, encode, publish"), key=lambda s: s[1]
        )
        for train in trains[1:rounds]:
            wait = _last_before(spans, "worker: wait for the newest model", train[1])
            decode = _last_before(spans, "worker: decode the model", train[1])
            pub = next(
                (
                    s
                    for s in spans
                    if s[0] == "worker: publish (to confirm)" and train[1] <= s[1] <= train[2]
                ),
                None,
            )
            if wait is None or decode is None or pub is None:
                continue
            add("waiting for the model (receipts, deliveries, acks)", wait[4] - wait[3])
            add("decode + checks (thread)", decode[4] - decode[3])
            add("validation metrics + ack (decode end -> train start)", train[3] - decode[4])
            add("train_local + finite check + encode/sign (threads)", pub[3] - train[3])
            add("publish to confirm", pub[4] - pub[3])
            add("after the publish (stage end)", train[4] - pub[4])
        cpu = b.get("cpu") or []
        for (_, c0), (_, c1) in itertools.pairwise(cpu):  # publish r-1 -> publish r
            add("total (publish to publish)", c1 - c0)
    out = {k: statistics.mean(v) for k, v in parts.items()}
    if "total (publish to publish)" in out:
        staged = sum(v for k, v in out.items() if k != "total (publish to publish)")
        out["outside the stages"] = out["total (publish to publish)"] - staged
    return out


def aggregator_cpu(ends: list[float], spans: list[Span]) -> dict[str, float]:
    """The aggregator process's CPU milliseconds per steady round, by stage (spans that
    started in rounds 2..R; stages nest: ``handle`` holds admit, offer and commit)."""
    if len(ends) < 3:
        return {}
    t0, t1 = ends[0], ends[-1]
    rounds = len(ends) - 1
    out: dict[str, float] = {}
    for name in (
        "handle",
        "admit",
        "offer",
        "commit",
        "store: encode and hash (inline)",
        "store: encode and hash (thread)",
        "store: transaction (Redis)",
        "announce",
    ):
        cpu = sum(s[4] - s[3] for s in spans if s[0] == name and t0 < s[1] <= t1)
        if cpu:
            out[name] = 1000 * cpu / rounds
    return out


# ------------------------------------------------------------------------- Flower


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
        train_idx, _ = train_val_split(len(x), VAL_FRACTION, config.seed + i)
        shards.append((name, x[train_idx], y[train_idx]))
    initial = model_tensors(build_task_model(spec))
    ends: list[float] = []
    models: list[dict[str, torch.Tensor]] = []

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

        def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            # Record only: the AUC is computed after the run, off the timed path.
            ends.append(time.perf_counter())
            models.append(arrays.to_torch_state_dict())
            return None

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
    aucs = [auc_of(spec, m, prep.x_test, prep.y_test) for m in models]
    return {
        "rounds": len(ends) - 1,
        "final_auc": aucs[-1] if aucs else None,
        "seconds_per_round": steady_per_round(rel),
        "first_round_s": rel[1] if len(rel) > 1 else None,
        "wall_s": wall,
        "startup_s": (ends[0] - t0) if ends else None,
        "auc_by_round": aucs,
        "evaluation": "after the run (evaluate_fn records time and arrays only)",
    }


# --------------------------------------------------------------------------- main


def compare(figures: dict[str, dict[str, Any]]) -> None:
    """Add each variant's ratio to Flower's seconds per round and max |dAUC| per round."""
    ref = figures.get(FLOWER)
    for f in figures.values():
        f["vs_flower"] = None
        f["max_auc_diff_vs_flower"] = None
        if ref is None:
            continue
        spr, rspr = f.get("seconds_per_round"), ref.get("seconds_per_round")
        if spr and rspr:
            f["vs_flower"] = spr / rspr
        a, b = f.get("auc_by_round") or [], ref.get("auc_by_round") or []
        if a and len(a) == len(b):
            f["max_auc_diff_vs_flower"] = max(abs(x - y) for x, y in zip(a, b, strict=True))


def run_once(
    args: argparse.Namespace,
    banks: int,
    rounds: int,
    bank_urls: dict[str, str] | None,
    profile: bool,
) -> dict[str, Any]:
    """One bank count: fedq embedded, fedq processes, Flower (back to back), then the
    profiled processes run. Each variant notes the machine's 1-minute load average as
    it starts (the machine is shared: a load above its cores slows whoever runs)."""
    config = SimulationConfig(participants=banks, base_delay_s=0.0, seconds=300.0, seed=args.seed)
    figures: dict[str, Any] = {}
    print(f"  {banks} banks: fedq embedded (sync, async) ...", flush=True)
    load = os.getloadavg()[0]
    figures.update(asyncio.run(run_fedq(config, rounds)))
    figures[EMBEDDED_SYNC]["load_1m"] = figures[EMBEDDED_ASYNC]["load_1m"] = load
    urls = None if bank_urls is None else {n: bank_urls[n] for n in _names(banks)}
    kw = {
        "amqp_url": args.amqp_url,
        "redis_url": args.redis_url,
        "bank_urls": urls,
        "start_method": args.bank_start,
    }
    print(f"  {banks} banks: fedq sync, one process per bank ...", flush=True)
    load = os.getloadavg()[0]
    figures[PROCESSES] = asyncio.run(run_fedq_processes(config, rounds, **kw))
    figures[PROCESSES]["load_1m"] = load
    if not args.no_flower:
        try:
            import flwr  # noqa: F401

            print(f"  {banks} banks: Flower ...", flush=True)
            os.environ.setdefault("RAY_DEDUP_LOGS", "0")
            logging.getLogger("flwr").setLevel(logging.ERROR)
            load = os.getloadavg()[0]
            figures[FLOWER] = run_flower(config, rounds)
            figures[FLOWER]["load_1m"] = load
        except ImportError as e:
            print(f"Flower not installed ({e}): pip install 'flwr[simulation]==1.41.0'")
    if profile:
        print(f"  {banks} banks: fedq sync, processes, profiled ...", flush=True)
        prof = asyncio.run(run_fedq_processes(config, rounds, profile=True, **kw))
        figures[PROCESSES]["profile"] = prof["profile"]
        figures[PROCESSES]["profile"]["seconds_per_round_profiled"] = prof["seconds_per_round"]
    compare(figures)
    return figures


def _names(banks: int) -> list[str]:
    return [f"bank-{i + 1:02d}" for i in range(banks)]


def print_run(figures: dict[int, dict[str, Any]], rounds: int, title: str) -> None:
    rows = []
    for banks, fig in figures.items():
        for name, f in fig.items():
            rows.append(
                [
                    banks,
                    name,
                    f["seconds_per_round"],
                    f.get("vs_flower"),
                    f["first_round_s"],
                    f["wall_s"],
                    f["final_auc"],
                    f.get("max_auc_diff_vs_flower"),
                    f.get("load_1m"),
                ]
            )
    print(
        table(
            [
                "banks",
                "variant",
                "s/round",
                "vs Flower",
                "round 1 (s)",
                "wall (s)",
                "final AUC",
                "max |dAUC| vs Flower",
                "load 1m",
            ],
            rows,
            title=title,
        ),
        flush=True,
    )


def print_profile(banks: int, prof: dict[str, Any]) -> None:
    cp = prof["critical_path_ms_median"]
    rows = [[name, cp.get(name), what] for name, what in SEGMENTS]
    rows.append(["round (median)", cp.get("round"), "sum of the above, per round"])
    print(
        table(
            ["segment", "ms (median)", "what"],
            rows,
            title=f"{banks} banks, processes: a steady round's critical path "
            f"({prof['rounds_profiled']} rounds, timed hooks on: "
            f"{1000 * prof['seconds_per_round_profiled']:.1f} ms per round)",
        )
    )
    other = [[k, v] for k, v in prof["other_ms_median"].items()]
    other.append(
        ["train_local alone, after the run (bank-01, 1 thread)", prof["train_local_alone_ms"]]
    )
    print(table(["also measured", "ms (median)"], other))
    cpu = prof.get("cpu_ms_per_round") or {}
    if cpu:
        print(table(["CPU per steady round (process)", "ms"], [[k, v] for k, v in cpu.items()]))
    for title, key in (
        ("one bank's CPU per round, by stage", "bank_cpu_ms_per_round"),
        ("the aggregator's CPU per round, by stage", "aggregator_cpu_ms_per_round"),
    ):
        part = prof.get(key) or {}
        if part:
            print(table([title, "ms"], [[k, v] for k, v in part.items()]))


def summary(runs: list[dict[int, dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    """Per bank count and variant: the median over runs of s/round and its ratio."""
    out: dict[int, dict[str, Any]] = {}
    for banks in runs[0]:
        out[banks] = {}
        for name in runs[0][banks]:
            spr = [r[banks][name]["seconds_per_round"] for r in runs if name in r[banks]]
            ratio = [r[banks][name].get("vs_flower") for r in runs if name in r[banks]]
            diff = [r[banks][name].get("max_auc_diff_vs_flower") for r in runs if name in r[banks]]
            ratio_ok = [x for x in ratio if x is not None]
            diff_ok = [x for x in diff if x is not None]
            out[banks][name] = {
                "seconds_per_round": [x for x in spr if x is not None],
                "seconds_per_round_median": statistics.median(x for x in spr if x is not None),
                "vs_flower": ratio_ok,
                "vs_flower_median": statistics.median(ratio_ok) if ratio_ok else None,
                "final_auc": runs[-1][banks][name]["final_auc"],
                "max_auc_diff_vs_flower": max(diff_ok) if diff_ok else None,
            }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 rounds instead of 20")
    p.add_argument("--out", type=Path, default=RESULTS / "flower.json")
    p.add_argument("--banks", default="5,20", help="bank counts, comma-separated (5,20)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--runs", type=int, default=1, help="repeat everything N times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amqp-url", default=os.environ.get("FEDQ_TEST_AMQP_URL", DEFAULT_AMQP))
    p.add_argument("--redis-url", default=os.environ.get("FEDQ_TEST_REDIS_URL", DEFAULT_REDIS))
    p.add_argument(
        "--sender-check",
        choices=("users", "off"),
        default="users",
        help="users: one broker user per bank (rabbitmqctl), the aggregator's sender "
        "check on; off: every bank as the --amqp-url user, require_sender_match=False",
    )
    p.add_argument(
        "--no-profile", action="store_true", help="skip the profiled processes run (run 1)"
    )
    p.add_argument("--no-flower", action="store_true", help="fedq only (no ratio to Flower)")
    p.add_argument(
        "--bank-start",
        choices=("forkserver", "spawn"),
        default="forkserver",
        help="how the bank processes start (multiprocessing start method)",
    )
    args = p.parse_args()
    rounds = args.rounds or (5 if args.quick else 20)
    bank_counts = [int(b) for b in args.banks.split(",") if b.strip()]
    configure_logging("error", "console")
    bank_urls: dict[str, str] | None = None
    created: list[str] = []
    if args.sender_check == "users":
        try:
            bank_urls, created = ensure_bank_users(args.amqp_url, _names(max(bank_counts)))
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            print(f"no broker users for the banks ({e}): every bank as the --amqp-url user")
    check = "on (one broker user per bank)" if bank_urls else "OFF (require_sender_match=False)"
    print(
        f"banks {bank_counts}, {rounds} rounds, {args.runs} run(s); per bank count: fedq "
        "embedded (sync, async), fedq sync with one process per bank, then Flower; sender "
        f"check {check}",
        flush=True,
    )
    runs: list[dict[int, dict[str, Any]]] = []
    try:
        for k in range(args.runs):
            print(f"\nrun {k + 1} of {args.runs}", flush=True)
            figures = {
                b: run_once(args, b, rounds, bank_urls, profile=(k == 0 and not args.no_profile))
                for b in bank_counts
            }
            runs.append(figures)
            print_run(figures, rounds, f"run {k + 1}: German credit, logreg, {rounds} rounds")
            for b, fig in figures.items():
                prof = fig.get(PROCESSES, {}).get("profile")
                if prof and prof.get("rounds_profiled"):
                    print_profile(b, prof)
    finally:
        if created:
            delete_broker_users(created)
    summ = summary(runs)
    rows = [
        [
            b,
            name,
            s["seconds_per_round_median"],
            s["vs_flower_median"],
            ", ".join(f"{x:.3f}" for x in s["vs_flower"]),
            s["final_auc"],
            s["max_auc_diff_vs_flower"],
        ]
        for b, by in summ.items()
        for name, s in by.items()
    ]
    print(
        table(
            [
                "banks",
                "variant",
                "s/round (median)",
                "vs Flower (median)",
                "vs Flower (runs)",
                "final AUC",
                "max |dAUC| vs Flower",
            ],
            rows,
            title=f"summary over {len(runs)} run(s)",
        )
    )
    write_json(
        args.out,
        envelope(
            "flower",
            args.quick,
            {str(b): s for b, s in summ.items()},
            runs=[{str(b): f for b, f in r.items()} for r in runs],
            settings={
                "banks": bank_counts,
                "rounds": rounds,
                "runs": args.runs,
                "training": prepare(
                    SimulationConfig(participants=bank_counts[0])
                ).spec.training.model_dump(),
                "flower_backend": "ray, client_resources num_cpus=1",
                "fedq_embedded": "run_simulation: MemoryTransport + fakeredis, base_delay_s=0",
                "fedq_processes": "one spawned process per bank (ParticipantWorker, "
                "AmqpTransport, 1 torch thread), AggregatorService in the parent over the "
                "real RabbitMQ and Redis",
                "sender_check": bank_urls is not None,
                "evaluation": {
                    EMBEDDED_SYNC: "in the timed path (run_simulation on_version)",
                    PROCESSES: "after the run",
                    FLOWER: "after the run",
                },
            },
        ),
    )


if __name__ == "__main__":
    main()
