"""``fedq simulate``: an aggregator and N bank workers on one machine, from one CSV.

Embedded by default (in-process broker and Redis); with an AMQP and a Redis URL the
very same services run against real servers. The CSV is split into a pooled test
set and N bank shards; the shared feature schema (vocabularies, scaling statistics)
is fixed once from the pooled training rows, as a consortium would agree it, and
never refitted at a bank. Reports global test AUC over wall-clock time beside the
centralized baseline (all training rows pooled) and each bank's local-only model.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import structlog
import torch
from sklearn.model_selection import train_test_split

from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, StoreConfig, VersionRecord, connect_redis
from common.errors import ConfigError
from common.evaluation import evaluate
from common.models import build_task_model, model_tensors
from common.spec import (
    AsyncSettings,
    ModelSpec,
    StalenessSpec,
    SyncSettings,
    TargetSpec,
    TaskSpec,
    TrainingSettings,
)
from common.transport import Transport
from common.transport.amqp import AmqpTransport
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import Tensors
from participant import partition
from participant.data import encode, infer_features, load_table, resolve_positive
from participant.training import train_local
from participant.worker import ParticipantWorker, WorkerConfig

log = structlog.get_logger("fedq.simulate")

Partition = Literal["iid", "dirichlet", "column"]


def bundled_data() -> Path:
    """The German credit CSV shipped with fedq (see fedq/data/README.md)."""
    return Path(str(files("fedq") / "data" / "german_credit.csv"))


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """Everything ``fedq simulate`` takes."""

    data: Path = field(default_factory=bundled_data)
    target: str = "creditability"
    positive: str | None = "bad"
    participants: int = 5
    partition: Partition = "iid"
    alpha: float = 0.5
    partition_column: str | None = None
    #: Per-participant slowness factors (1 = base pace); shorter lists pad with 1.
    speeds: tuple[float, ...] = ()
    #: Pause per local round at speed 1 (seconds); a bank with speed 10 pauses 10x.
    base_delay_s: float = 0.1
    mode: Literal["async", "sync"] = "async"
    strategy: Literal["fedasync", "fedbuff"] = "fedasync"
    mixing: float = 0.5
    staleness: StalenessSpec = field(default_factory=lambda: StalenessSpec(kind="polynomial"))
    max_staleness: int = 20
    buffer_size: int = 3
    server_lr: float = 1.0
    #: Sync rounds: quorum (0 = every bank), deadline with a minimum, late updates.
    quorum: int = 0
    deadline_s: float | None = None
    min_updates: int = 1
    late: Literal["refuse", "stale"] = "refuse"
    weighted: bool = True
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingSettings = field(
        default_factory=lambda: TrainingSettings(epochs=2, batch_size=32, lr=0.1)
    )
    baseline_epochs: int = 60
    #: Stop after this many versions (None: 200 async, 200 / participants rounds sync).
    versions: int | None = None
    #: Time to target is measured to this fraction of the centralized AUC.
    target_fraction: float = 0.95
    seconds: float | None = 120.0
    test_fraction: float = 0.25
    seed: int = 0
    amqp_url: str | None = None
    redis_url: str | None = None
    report: Path | None = None
    plot: Path | None = None

    @property
    def embedded(self) -> bool:
        return self.amqp_url is None and self.redis_url is None

    @property
    def max_versions(self) -> int:
        """The version to stop at: the same update budget in both modes by default."""
        if self.versions is not None:
            return self.versions
        return 200 if self.mode == "async" else max(10, 200 // self.participants)


@dataclass(slots=True)
class Progress:
    """Live state the CLI shows while the simulation runs."""

    version: int = 0
    auc: float | None = None
    staleness: float = 0.0
    accepted: int = 0
    refused: int = 0


@dataclass(slots=True)
class SimulationResult:
    """What the report holds."""

    task: str
    mode: str
    final_auc: float
    centralized_auc: float
    local_only_auc: dict[str, float]
    local_only_auc_mean: float
    versions: int
    updates_accepted: int
    updates_refused: int
    refused_by_reason: dict[str, int]
    wall_seconds: float
    target_auc: float
    #: Wall-clock seconds until the global model first reached target_auc (None: never).
    time_to_target_s: float | None
    curve: list[tuple[float, int, float]]
    #: For each version 1..n, the participants whose updates went into it.
    contributors: list[list[str]]
    participants: dict[str, dict[str, Any]]
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["curve"] = [{"seconds": s, "version": v, "auc": a} for s, v, a in self.curve]
        return out


@dataclass(slots=True)
class _Prepared:
    spec: TaskSpec
    shards: dict[str, pd.DataFrame]
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_train: torch.Tensor
    y_train: torch.Tensor


def prepare(config: SimulationConfig) -> _Prepared:
    """Split the data, fix the shared schema, build the task spec and the bank shards."""
    if config.participants < 1:
        raise ConfigError("--participants must be at least 1")
    df = load_table(config.data)
    positive = resolve_positive(df, config.target, config.positive)
    labels = (df[config.target].astype(str) == positive) if positive else df[config.target]
    train_df, test_df = train_test_split(
        df, test_size=config.test_fraction, random_state=config.seed, stratify=labels
    )
    train_df = train_df.reset_index(drop=True)
    exclude = [config.partition_column] if config.partition_column else []
    schema = infer_features(train_df, config.target, exclude=exclude)
    names = tuple(f"bank-{i + 1:02d}" for i in range(config.participants))
    spec = TaskSpec(
        task_id=f"sim-{uuid.uuid4().hex[:8]}",
        model=config.model,
        features=schema.features,
        target=TargetSpec(name=config.target, positive=positive),
        mode=config.mode,
        async_=AsyncSettings(
            strategy=config.strategy,
            mixing=config.mixing,
            staleness=config.staleness,
            max_staleness=config.max_staleness,
            buffer_size=config.buffer_size,
            server_lr=config.server_lr,
        ),
        sync=SyncSettings(
            quorum=config.quorum,
            deadline_s=config.deadline_s,
            min_updates=config.min_updates,
            late=config.late,
            weighted=config.weighted,
        ),
        training=config.training,
        participants=names,
        seed=config.seed,
    )
    x_train, y_train = encode(train_df, spec)
    y_np = y_train.numpy().astype(np.int64)
    if config.partition == "iid":
        parts = partition.iid(len(train_df), config.participants, config.seed)
    elif config.partition == "dirichlet":
        parts = partition.dirichlet_label_skew(y_np, config.participants, config.alpha, config.seed)
    else:
        if not config.partition_column:
            raise ConfigError("--partition column needs --partition-column NAME")
        if config.partition_column not in train_df.columns:
            raise ConfigError(f"partition column {config.partition_column!r} is not in the data")
        parts = partition.by_column(
            train_df[config.partition_column].to_numpy(), config.participants
        )
    shards = {
        name: train_df.iloc[rows].reset_index(drop=True)
        for name, rows in zip(names, parts, strict=True)
    }
    x_test, y_test = encode(test_df.reset_index(drop=True), spec)
    return _Prepared(spec, shards, x_test, y_test, x_train, y_train)


def _baseline(spec: TaskSpec, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> Tensors:
    """A model trained from version 0 on ``(x, y)`` alone for ``epochs`` epochs."""
    params = model_tensors(build_task_model(spec))
    long = spec.model_copy(update={"training": spec.training.model_copy(update={"epochs": epochs})})
    delta, _ = train_local(long, params, x, y, seed=seed)
    return {k: params[k] + delta[k] for k in params}


def baselines(prep: _Prepared, config: SimulationConfig) -> tuple[float, dict[str, float]]:
    """Centralized test AUC, and each bank's local-only test AUC."""
    spec = prep.spec
    central = evaluate(
        spec,
        _baseline(spec, prep.x_train, prep.y_train, config.baseline_epochs, config.seed),
        prep.x_test,
        prep.y_test,
    )
    local: dict[str, float] = {}
    for name, shard in prep.shards.items():
        x, y = encode(shard, spec)
        params = _baseline(spec, x, y, config.baseline_epochs, config.seed)
        local[name] = evaluate(spec, params, prep.x_test, prep.y_test).get("auc", 0.5)
    return central.get("auc", 0.5), local


async def _transports(
    config: SimulationConfig, names: tuple[str, ...]
) -> tuple[Transport, dict[str, Transport]]:
    if config.amqp_url is None:
        broker = MemoryBroker()
        return MemoryTransport(broker, "fedq-aggregator"), {
            n: MemoryTransport(broker, n) for n in names
        }
    agg = await AmqpTransport.connect(config.amqp_url, name="fedq-simulate-aggregator")
    banks: dict[str, Transport] = {}
    for n in names:
        banks[n] = await AmqpTransport.connect(config.amqp_url, name=f"fedq-simulate-{n}")
    return agg, banks


async def run_simulation(config: SimulationConfig, on_progress: Any = None) -> SimulationResult:
    """Run the whole simulation; ``on_progress(Progress)`` is called after each version."""
    prep = await asyncio.to_thread(prepare, config)
    spec = prep.spec
    central_auc, local_auc = await asyncio.to_thread(baselines, prep, config)
    names = spec.participants
    agg_transport, bank_transports = await _transports(config, names)
    store = RedisModelStore(
        connect_redis(config.redis_url or "memory://"), StoreConfig(prefix="fedq")
    )
    metrics = AggregatorMetrics()
    progress = Progress()
    curve: list[tuple[float, int, float]] = []
    contributors: list[list[str]] = []
    started = time.perf_counter()
    agg_stop, bank_stop = asyncio.Event(), asyncio.Event()

    async def on_version(record: VersionRecord, params: Tensors) -> None:
        result = await asyncio.to_thread(evaluate, spec, params, prep.x_test, prep.y_test)
        auc = result.get("auc", 0.5)
        curve.append((time.perf_counter() - started, record.version, auc))
        contributors.append([e.participant for e in record.lineage])
        progress.version, progress.auc = record.version, auc
        progress.staleness = float(np.mean([e.staleness for e in record.lineage] or [0]))
        progress.accepted = service.accepted
        progress.refused = sum(service.refused.values())
        if on_progress is not None:
            on_progress(progress)
        if record.version >= config.max_versions:
            bank_stop.set()
            agg_stop.set()  # stop at the version asked for; queued updates stay queued

    service = AggregatorService(
        spec,
        store,
        agg_transport,
        ServiceConfig(require_sender_match=config.amqp_url is None, depth_poll_s=1.0),
        metrics,
        on_version,
    )
    genesis = model_tensors(build_task_model(spec))
    g = evaluate(spec, genesis, prep.x_test, prep.y_test).get("auc", 0.5)
    curve.append((0.0, 0, g))
    agg_task = asyncio.create_task(service.run(agg_stop), name="aggregator")
    ready = asyncio.create_task(service.ready.wait())
    await asyncio.wait([ready, agg_task], return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if agg_task.done():
        agg_task.result()  # raise what stopped it
    speeds = list(config.speeds) + [1.0] * (len(names) - len(config.speeds))
    workers = [
        ParticipantWorker(
            spec,
            WorkerConfig(
                participant=name,
                seed=config.seed + i,
                delay_s=config.base_delay_s * speeds[i],
                wait_for_model_s=2.0,
            ),
            bank_transports[name],
            prep.shards[name],
        )
        for i, name in enumerate(names)
    ]
    worker_tasks = [
        asyncio.create_task(w.run(bank_stop), name=w.config.participant) for w in workers
    ]
    try:
        timeout = config.seconds
        waiter = asyncio.create_task(bank_stop.wait())
        done, _ = await asyncio.wait(
            [waiter, agg_task, *worker_tasks], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        for t in done:
            if t is not waiter and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        bank_stop.set()
        await asyncio.gather(*worker_tasks, return_exceptions=True)
        agg_stop.set()
        await asyncio.gather(agg_task, return_exceptions=True)
        for transport in (agg_transport, *bank_transports.values()):
            await transport.close()
        head = service.head_version
        await store.close()
    wall = time.perf_counter() - started
    final_auc = curve[-1][2]
    local_mean = float(np.mean(list(local_auc.values())))
    target = config.target_fraction * central_auc
    reached = next((t for t, _, a in curve if a >= target), None)
    return SimulationResult(
        task=spec.task_id,
        mode=config.mode,
        final_auc=final_auc,
        centralized_auc=central_auc,
        local_only_auc=local_auc,
        local_only_auc_mean=local_mean,
        versions=head,
        updates_accepted=service.accepted,
        updates_refused=sum(service.refused.values()),
        refused_by_reason=dict(service.refused),
        wall_seconds=wall,
        target_auc=target,
        time_to_target_s=reached,
        curve=curve,
        contributors=contributors,
        participants={
            w.config.participant: {
                "rows": len(prep.shards[w.config.participant]),
                "speed": speeds[i],
                "updates_published": w.stats.published,
                "last_version_seen": w.stats.last_version,
            }
            for i, w in enumerate(workers)
        },
        settings=_settings(config, spec),
    )


def _settings(config: SimulationConfig, spec: TaskSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in asdict(config).items():
        out[k] = str(v) if isinstance(v, Path) else v
    out["embedded"] = config.embedded
    out["amqp_url"] = "set" if config.amqp_url else None
    out["redis_url"] = "set" if config.redis_url else None
    out["input_dim"] = spec.input_dim
    out["spec"] = json.loads(spec.to_json())
    return out


@dataclass(slots=True)
class Comparison:
    """``--mode both``: the two modes on the same split and speed profiles."""

    runs: dict[str, SimulationResult]

    @property
    def speedup(self) -> float | None:
        """How many times sooner async reached the target than sync (None if one never did)."""
        a = self.runs["async"].time_to_target_s
        s = self.runs["sync"].time_to_target_s
        if a is None or s is None or a <= 0:
            return None
        return s / a

    def to_json(self) -> dict[str, Any]:
        first = next(iter(self.runs.values()))
        return {
            "mode": "both",
            "target_auc": first.target_auc,
            "centralized_auc": first.centralized_auc,
            "time_to_target_s": {m: r.time_to_target_s for m, r in self.runs.items()},
            "speedup_async_vs_sync": self.speedup,
            "modes": {m: r.to_json() for m, r in self.runs.items()},
        }


async def run_comparison(config: SimulationConfig, on_progress: Any = None) -> Comparison:
    """Run async, then sync, with the same data split, seeds and speed profiles."""
    runs: dict[str, SimulationResult] = {}
    for mode in ("async", "sync"):
        runs[mode] = await run_simulation(replace(config, mode=mode), on_progress)
    return Comparison(runs)


def write_plot(results: list[SimulationResult], path: Path) -> None:
    """Global test AUC over wall-clock time per mode, beside the baselines and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = results[0]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    colors = {"async": "tab:blue", "sync": "tab:orange"}
    for r in results:
        xs = [s for s, _, _ in r.curve]
        ys = [a for _, _, a in r.curve]
        label = f"fedq {r.mode} ({r.versions} versions)"
        if r.time_to_target_s is not None:
            label += f", target at {r.time_to_target_s:.1f} s"
        ax.plot(xs, ys, color=colors.get(r.mode, "tab:blue"), lw=1.8, label=label)
    ax.axhline(first.centralized_auc, color="tab:green", ls="--", label="centralized (pooled)")
    ax.axhline(first.local_only_auc_mean, color="tab:red", ls="--", label="local-only (mean)")
    ax.axhline(first.target_auc, color="gray", ls=":", lw=1, label="target")
    for auc in first.local_only_auc.values():
        ax.axhline(auc, color="tab:red", ls=":", lw=0.6, alpha=0.5)
    ax.set_xlabel("wall-clock seconds")
    ax.set_ylabel("test AUC")
    ax.set_title(
        f"fedq: {len(first.local_only_auc)} banks, " + " vs ".join(r.mode for r in results)
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
