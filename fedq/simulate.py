"""``fedq simulate``: an aggregator and N bank workers on one machine, from one CSV.

Embedded by default (in-process broker and Redis); with an AMQP and a Redis URL the
very same services run against real servers. The CSV is split into a pooled test
set and N bank shards; the shared feature schema (vocabularies, scaling statistics)
is fixed once from the pooled training rows, as a consortium would agree it, and
never refitted at a bank. Reports global test AUC over wall-clock time beside the
centralized baseline (all training rows pooled) and each bank's local-only model.

Inputs are checked before anything starts: :func:`load_data` reads the table and
checks its values and the options that depend on it (a one-line
:class:`~common.errors.ConfigError` names the column, row or option at fault), and
:func:`prepare` splits it and checks every bank gets enough rows. Both import no
torch and no services until the data has passed its checks. What is worth knowing
but not wrong (a column left out, a bank with no row of one class) comes back as
warnings, which the CLI prints and the report keeps.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
import structlog

from common.errors import ConfigError
from common.hooks import Stages, untimed
from common.spec import NumericFeature, TargetSpec, TaskSpec, positive_weight_for
from participant import partition
from participant.data import (
    binary_labels,
    encode,
    infer_features,
    load_table,
    resolve_positive,
    train_rows,
    train_val_split,
)

if TYPE_CHECKING:
    import torch

    from aggregator.stats import ServiceStats
    from common.transport import Transport
    from common.wire import Tensors

log = structlog.get_logger("fedq.simulate")

Partition = Literal["iid", "dirichlet", "column"]

#: Each bank keeps this share of its rows for validation (the worker's split).
VAL_FRACTION = 0.2
#: The fewest training rows (after the validation split) a bank may have.
MIN_TRAIN_ROWS = 10


#: The simulation's task settings over a task spec's defaults: short local rounds on
#: small shards, and a mixing rate that suits them.
SIMULATION_SPEC: Mapping[str, Any] = {
    "async": {"mixing": 0.5},
    "training": {"epochs": 2, "batch_size": 32, "lr": 0.1},
}
#: The task spec fields the simulation sets from its data and options.
SIMULATION_SETS = frozenset(
    {"task_id", "features", "target", "mode", "participants", "seed", "declared_samples"}
)


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
    #: Which of the task's modes this run uses (``fedq simulate --mode both`` runs each).
    mode: Literal["async", "sync"] = "async"
    #: Task spec fields over :data:`SIMULATION_SPEC`, in the spec's JSON shape (nested
    #: mappings merge), e.g. ``{"async": {"strategy": "fedbuff"}, "sync": {"quorum": 3}}``.
    #: The simulation sets the fields in :data:`SIMULATION_SETS` itself.
    spec_overrides: Mapping[str, Any] = field(default_factory=dict)
    #: How class 1 is weighted in local training: "auto" (rare positives count more,
    #: see common.spec.positive_weight_for), "none", or a number.
    class_weight: str = "auto"
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
    #: A named hook around the stages of the service, the store and the workers
    #: (benchmarks time them; see common.hooks).
    stages: Stages = untimed

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
    #: Which budget ended the run: versions, seconds, or other.
    stopped_by: str
    participants: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    #: What the user should know about the data and the split (columns left out, ...).
    warnings: list[str] = field(default_factory=list)
    #: Test metrics of the final global model and of the centralized baseline
    #: (common.evaluation: auc, pr_auc, loss, brier, positive_rate, n).
    final_metrics: dict[str, float] = field(default_factory=dict)
    centralized_metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["curve"] = [{"seconds": s, "version": v, "auc": a} for s, v, a in self.curve]
        return out


@dataclass(frozen=True, slots=True)
class Dataset:
    """The whole table after :func:`load_data` checked it."""

    df: pd.DataFrame
    #: The target value of class 1 (None: the target is already 0/1).
    positive: str | None
    #: 0/1 label of every row.
    labels: npt.NDArray[np.int64]


@dataclass(slots=True)
class Prepared:
    """What :func:`prepare` made: the task spec, the bank shards, encoded test and training rows."""

    spec: TaskSpec
    shards: dict[str, pd.DataFrame]
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_train: torch.Tensor
    y_train: torch.Tensor
    #: What the user should know about the data and the split, one sentence each.
    warnings: tuple[str, ...] = ()


def check_options(config: SimulationConfig) -> None:
    """Check the options that need no data. ConfigError names the option at fault."""
    n = config.participants
    if n < 1:
        raise ConfigError(f"--participants must be at least 1, not {n}")
    if len(config.speeds) > n:
        raise ConfigError(f"--speeds gives {len(config.speeds)} factors for {n} participants")
    for s in config.speeds:
        if not (math.isfinite(s) and s > 0):
            raise ConfigError(f"--speeds: {s:g} is not a positive finite factor")
    if not 0.0 < config.test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), not {config.test_fraction}")
    if config.partition == "column" and not config.partition_column:
        raise ConfigError("--partition column needs --partition-column NAME")
    if config.partition != "column" and config.partition_column:
        raise ConfigError(
            f"--partition-column is used only with --partition column, not {config.partition}"
        )
    # The task settings, checked before the data is read (a placeholder feature).
    check = NumericFeature(name=f"{config.target}-feature")
    sync = _task_spec(config, (check,), config.positive, _names(config)).sync
    for option, value in (("--quorum", sync.quorum), ("--min-updates", sync.min_updates)):
        if value > n:
            raise ConfigError(
                f"{option} {value} is more than --participants {n}: no sync round could close"
            )


def load_data(config: SimulationConfig) -> Dataset:
    """Read the table and check it against the options, before anything starts.

    The whole table is checked, so an error names the row of the file: the target
    must be binary with at least 2 rows of each class and no missing cell; every
    feature value must be usable (see :func:`participant.data.infer_features`); the
    rows left for training must give every bank at least :data:`MIN_TRAIN_ROWS`.

    Raises:
        ConfigError: one line naming the option, column or row at fault.
    """
    check_options(config)
    df = load_table(config.data)
    target = config.target
    positive = resolve_positive(df, target, config.positive)
    labels = binary_labels(df, target, positive).astype(np.int64)
    for cls in (1, 0):
        count = int((labels == cls).sum())
        if count < 2:
            raise ConfigError(
                f"target column {target!r} has {count} row{'' if count == 1 else 's'} of "
                f"{_class_name(cls, positive)}; at least 2 are needed, one for the test set "
                "and one for training"
            )
    column = config.partition_column
    if column is not None and column not in {str(c) for c in df.columns}:
        raise ConfigError(f"--partition-column {column!r} is not a column of the data")
    if column is not None and column == target:
        raise ConfigError(f"--partition-column {column!r} is the target column")
    infer_features(df, target, exclude=[column] if column else [])  # value checks, named rows
    n_test = math.ceil(config.test_fraction * len(df))  # as train_test_split counts
    n_train = len(df) - n_test
    if config.partition != "column":
        smallest = n_train // config.participants
        if train_rows(smallest, VAL_FRACTION) < MIN_TRAIN_ROWS:
            most = n_train // _min_shard()
            fix = (
                f"use --participants {most} or fewer"
                if most >= 1
                else "the data has too few rows for even one bank"
            )
            raise ConfigError(
                f"--participants {config.participants} is too many for {len(df)} rows: "
                f"{n_train} training rows (after {n_test} held out for testing) leave a bank "
                f"{train_rows(smallest, VAL_FRACTION)} to train on after its validation "
                f"split, and each bank needs at least {MIN_TRAIN_ROWS}: {fix}"
            )
    return Dataset(df=df, positive=positive, labels=labels)


def _min_shard() -> int:
    """The fewest rows a bank can have and still train on MIN_TRAIN_ROWS."""
    n = MIN_TRAIN_ROWS
    while train_rows(n, VAL_FRACTION) < MIN_TRAIN_ROWS:
        n += 1
    return n


def _class_name(cls: int, positive: str | None) -> str:
    if positive is None:
        return f"class {cls}"
    return f"class 1 ({positive!r})" if cls else f"class 0 (not {positive!r})"


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on ``base``: nested mappings merge, other values replace."""
    out = dict(base)
    for key, value in over.items():
        below = out.get(key)
        if isinstance(below, Mapping) and isinstance(value, Mapping):
            out[key] = _merged(below, value)
        else:
            out[key] = value
    return out


def _task_spec(
    config: SimulationConfig,
    features: tuple[Any, ...],
    positive: str | None,
    names: tuple[str, ...],
) -> TaskSpec:
    """The task: :data:`SIMULATION_SPEC`, the config's overrides, the data's fields.

    Raises:
        ConfigError: the overrides name a field the simulation sets.
        SpecError: the settings make no valid task spec (pydantic's reasons).
    """
    settings = _merged(SIMULATION_SPEC, config.spec_overrides)
    taken = sorted(SIMULATION_SETS & set(settings))
    if taken:
        raise ConfigError(f"spec_overrides cannot set {', '.join(taken)}: the simulation sets them")
    return TaskSpec.parse(
        {
            **settings,
            "task_id": f"sim-{uuid.uuid4().hex[:8]}",
            "features": features,
            "target": TargetSpec(name=config.target, positive=positive),
            "mode": config.mode,
            "participants": names,
            "seed": config.seed,
        }
    )


def _names(config: SimulationConfig) -> tuple[str, ...]:
    return tuple(f"bank-{i + 1:02d}" for i in range(config.participants))


def prepare(config: SimulationConfig, data: Dataset | None = None) -> Prepared:
    """Split the data, fix the shared schema, build the task spec and the bank shards.

    ``data`` is what :func:`load_data` returned for ``config`` (read here if None).

    Raises:
        ConfigError: one line naming the option, column or row at fault.
    """
    if data is None:
        data = load_data(config)
    from sklearn.model_selection import train_test_split

    df, positive, target = data.df, data.positive, config.target
    try:
        train_df, test_df, y_train_np, y_test_np = train_test_split(
            df,
            data.labels,
            test_size=config.test_fraction,
            random_state=config.seed,
            stratify=data.labels,
        )
    except ValueError as e:  # checked above; kept one line should sklearn still object
        raise ConfigError(f"cannot split {len(df)} rows into test and training: {e}") from e
    for where, y in (("test set", y_test_np), ("training rows", y_train_np)):
        for cls in (1, 0):
            if not (y == cls).any():
                raise ConfigError(
                    f"the {where} have no row of {_class_name(cls, positive)}: target column "
                    f"{target!r} has too few of them to split ({int((data.labels == cls).sum())})"
                )
    train_df = train_df.reset_index(drop=True)
    exclude = [config.partition_column] if config.partition_column else []
    schema = infer_features(train_df, target, exclude=exclude)
    warnings = list(schema.warnings)
    names = _names(config)
    spec = _task_spec(config, schema.features, positive, names)
    y_np = np.asarray(y_train_np, dtype=np.int64)
    weight = positive_weight_for(float(y_np.mean()), config.class_weight)
    spec = spec.model_copy(
        update={"training": spec.training.model_copy(update={"positive_weight": weight})}
    )
    if config.partition == "iid":
        parts = partition.iid(len(train_df), config.participants, config.seed)
    elif config.partition == "dirichlet":
        try:
            parts = partition.dirichlet_label_skew(
                y_np, config.participants, config.alpha, config.seed, min_size=_min_shard()
            )
        except ConfigError as e:
            raise ConfigError(
                f"--partition dirichlet (--alpha {config.alpha:g}, --participants "
                f"{config.participants}, at least {_min_shard()} rows per bank): {e}"
            ) from e
    else:
        parts = _by_column(config, train_df)
    shards = {
        name: train_df.iloc[rows].reset_index(drop=True)
        for name, rows in zip(names, parts, strict=True)
    }
    warnings.extend(_one_class_banks(config, names, parts, y_np, positive))
    # Each bank declares the rows it holds: an update may claim no more (a bank that
    # claims 2**62 samples is refused, not weighted by it).
    spec = spec.model_copy(update={"declared_samples": {n: len(s) for n, s in shards.items()}})
    x_train, y_train = encode(train_df, spec)
    x_test, y_test = encode(test_df.reset_index(drop=True), spec)
    return Prepared(spec, shards, x_test, y_test, x_train, y_train, tuple(warnings))


def _by_column(config: SimulationConfig, train_df: pd.DataFrame) -> list[npt.NDArray[np.int64]]:
    """One part per value of the partition column; ConfigError naming the options."""
    column = str(config.partition_column)
    groups = partition.by_column_labeled(train_df[column].to_numpy())
    if len(groups) != config.participants:
        shown = [label for label, _ in groups[:10]]
        raise ConfigError(
            f"--partition column makes one bank per value, and column {column!r} has "
            f"{len(groups)} values in the training rows {shown}"
            f"{' ...' if len(groups) > 10 else ''}: use --participants {len(groups)}, "
            f"not {config.participants}"
        )
    for label, rows in groups:
        if train_rows(len(rows), VAL_FRACTION) < MIN_TRAIN_ROWS:
            raise ConfigError(
                f"--partition column: value {label!r} of column {column!r} has "
                f"{len(rows)} training rows, {train_rows(len(rows), VAL_FRACTION)} to train "
                f"on after the validation split; each bank needs at least {MIN_TRAIN_ROWS}"
            )
    return [rows for _, rows in groups]


def _one_class_banks(
    config: SimulationConfig,
    names: tuple[str, ...],
    parts: list[npt.NDArray[np.int64]],
    y: npt.NDArray[np.int64],
    positive: str | None,
) -> list[str]:
    """A warning for each class some banks have no training row of (heavy skew, rare class)."""
    lacking: dict[int, list[str]] = {1: [], 0: []}
    for i, (name, rows) in enumerate(zip(names, parts, strict=True)):
        train_idx, _ = train_val_split(len(rows), VAL_FRACTION, config.seed + i)
        mine = y[rows][train_idx.numpy()]
        for cls in (1, 0):
            if not (mine == cls).any():
                lacking[cls].append(name)
    return [
        f"{len(banks)} of {len(names)} banks have no training row of "
        f"{_class_name(cls, positive)} ({', '.join(banks[:10])}"
        f"{', ...' if len(banks) > 10 else ''}): they train on one class only"
        for cls, banks in lacking.items()
        if banks
    ]


def _for_mode(prep: Prepared, config: SimulationConfig) -> Prepared:
    """The same split and schema under ``config.mode``, as a task of its own."""
    if prep.spec.mode == config.mode:
        return prep
    spec = _task_spec(config, prep.spec.features, prep.spec.target.positive, prep.spec.participants)
    spec = spec.model_copy(
        update={"declared_samples": prep.spec.declared_samples, "training": prep.spec.training}
    )
    return replace(prep, spec=spec)


def _baseline(spec: TaskSpec, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> Tensors:
    """A model trained from version 0 on ``(x, y)`` alone for ``epochs`` epochs."""
    from common.models import build_task_model, model_tensors
    from participant.training import train_local

    params = model_tensors(build_task_model(spec))
    long = spec.model_copy(update={"training": spec.training.model_copy(update={"epochs": epochs})})
    delta, _ = train_local(long, params, x, y, seed=seed)
    return {k: params[k] + delta[k] for k in params}


def baselines(
    prep: Prepared, config: SimulationConfig
) -> tuple[dict[str, float], dict[str, float]]:
    """The centralized model's test metrics, and each bank's local-only test AUC."""
    from common.evaluation import evaluate

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
    return central, local


async def _transports(
    config: SimulationConfig, names: tuple[str, ...]
) -> tuple[Transport, dict[str, Transport]]:
    from common.transport.amqp import AmqpTransport
    from common.transport.memory import MemoryBroker, MemoryTransport

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


async def run_simulation(
    config: SimulationConfig, on_progress: Any = None, prepared: Prepared | None = None
) -> SimulationResult:
    """Run the whole simulation; ``on_progress(Progress)`` is called after each version.

    ``prepared`` is what :func:`prepare` returned for this data (prepared here if None).
    """
    from aggregator.metrics import AggregatorMetrics
    from aggregator.service import AggregatorService, ServiceConfig
    from aggregator.store import RedisModelStore, StoreConfig, VersionRecord, connect_redis
    from common.evaluation import evaluate
    from common.models import build_task_model, model_tensors
    from participant.worker import ParticipantWorker, WorkerConfig

    if prepared is None:
        prep = await asyncio.to_thread(prepare, config)
    else:
        prep = _for_mode(prepared, config)
    spec = prep.spec
    central, local_auc = await asyncio.to_thread(baselines, prep, config)
    central_auc = central.get("auc", 0.5)
    final: dict[str, float] = {}
    names = spec.participants
    agg_transport, bank_transports = await _transports(config, names)
    store = RedisModelStore(
        connect_redis(config.redis_url or "memory://"),
        StoreConfig(prefix="fedq"),
        stages=config.stages,
    )
    metrics = AggregatorMetrics()
    progress = Progress()
    curve: list[tuple[float, int, float]] = []
    contributors: list[list[str]] = []
    started = time.perf_counter()
    agg_stop, bank_stop = asyncio.Event(), asyncio.Event()

    async def on_version(record: VersionRecord, params: Tensors) -> None:
        result = await asyncio.to_thread(evaluate, spec, params, prep.x_test, prep.y_test)
        final.clear()
        final.update(result)
        auc = result.get("auc", 0.5)
        curve.append((time.perf_counter() - started, record.version, auc))
        contributors.append([e.participant for e in record.lineage])
        progress.version, progress.auc = record.version, auc
        progress.staleness = float(np.mean([e.staleness for e in record.lineage] or [0]))
        progress.accepted = service.stats.accepted
        progress.refused = service.stats.refused_total
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
        stages=config.stages,
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
                val_fraction=VAL_FRACTION,
                delay_s=config.base_delay_s * speeds[i],
                wait_for_model_s=2.0,
            ),
            bank_transports[name],
            prep.shards[name],
            stages=config.stages,
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
        final_metrics=dict(final),
        centralized_metrics=central,
        local_only_auc=local_auc,
        local_only_auc_mean=local_mean,
        versions=head,
        updates_accepted=service.stats.accepted,
        updates_refused=service.stats.refused_total,
        refused_by_reason=dict(service.stats.refused),
        wall_seconds=wall,
        target_auc=target,
        time_to_target_s=reached,
        curve=curve,
        contributors=contributors,
        stopped_by=_stopped_by(head, config, wall),
        participants={
            w.config.participant: {
                "rows": len(prep.shards[w.config.participant]),
                "speed": speeds[i],
                "updates_published": w.stats.published,
                "last_version_seen": w.stats.last_version,
                **_bank_decisions(service.stats, w.config.participant),
            }
            for i, w in enumerate(workers)
        },
        settings=_settings(config, spec),
        warnings=[*prep.warnings, *_still_rising(curve)],
    )


def _stopped_by(head: int, config: SimulationConfig, wall: float) -> str:
    """Which budget ended the run: ``versions``, ``seconds``, or ``other`` (an error)."""
    if head >= config.max_versions:
        return "versions"
    if config.seconds is not None and wall >= config.seconds:
        return "seconds"
    return "other"


#: The test AUC gain over the last fifth of a run above which it was still improving.
STILL_RISING = 0.005


def _still_rising(curve: list[tuple[float, int, float]]) -> list[str]:
    """A warning when the global model was still improving as the run ended.

    Compares the mean test AUC of the last fifth of the versions with the fifth
    before it: a gain above :data:`STILL_RISING` means more versions would help.
    """
    points = [a for _, v, a in curve if v > 0]
    fifth = len(points) // 5
    if fifth < 2:
        return []
    last = float(np.mean(points[-fifth:]))
    before = float(np.mean(points[-2 * fifth : -fifth]))
    if last - before <= STILL_RISING:
        return []
    return [
        f"the global model was still improving when the run ended (test AUC +{last - before:.3f} "
        f"over the last {fifth} versions): more versions (--versions) or time (--seconds) "
        "would help"
    ]


def _bank_decisions(stats: ServiceStats, name: str) -> dict[str, Any]:
    """What the aggregator decided about one bank's updates, and whether it is flagged."""
    bank = stats.banks.get(name)
    decided = bank.as_dict() if bank is not None else {"accepted": 0, "refused": {}}
    return {
        "updates_accepted": decided["accepted"],
        "updates_refused": decided["refused"],
        "flagged": name in stats.flagged,
    }


def _settings(config: SimulationConfig, spec: TaskSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in asdict(config).items():
        if k == "stages":
            continue  # a hook, not a setting
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
            "warnings": first.warnings,
            "target_auc": first.target_auc,
            "centralized_auc": first.centralized_auc,
            "time_to_target_s": {m: r.time_to_target_s for m, r in self.runs.items()},
            "speedup_async_vs_sync": self.speedup,
            "modes": {m: r.to_json() for m, r in self.runs.items()},
        }


async def run_comparison(config: SimulationConfig, on_progress: Any = None) -> Comparison:
    """Run async, then sync, with the same data split, seeds and speed profiles."""
    prep = await asyncio.to_thread(prepare, config)
    runs: dict[str, SimulationResult] = {}
    for mode in ("async", "sync"):
        runs[mode] = await run_simulation(replace(config, mode=mode), on_progress, prep)
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
