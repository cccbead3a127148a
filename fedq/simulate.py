"""``fedq simulate``: an aggregator and N bank workers on one machine, from one CSV.

Embedded by default (in-process broker and Redis); with an AMQP and a Redis URL the
very same services run against real servers.

The split (deterministic by seed): the rows are dealt to N banks (``--partition``);
each bank's rows are split, stratified by class where the bank has two rows of each,
into its training rows (what its worker gets) and its own held-out customers
(``test_fraction``). The **pooled test set is the union of the banks' held-out
customers**. Each worker keeps :data:`VAL_FRACTION` of its training rows for
validation; the union of those validation rows is the **validation set** the run
watches to stop on a plateau (never the test set). The shared feature schema
(vocabularies, scaling statistics) is fixed once from the pooled training rows, as a
consortium would agree it, and never refitted at a bank.

The yardsticks, trained once per split (also in ``--mode both``, see
:func:`fit_baselines`): the centralized model (all training rows pooled) and each
bank's local-only model (its training rows alone). The report scores the global
model, the centralized model and each local-only model on the pooled test set and
on each bank's own held-out customers.

A run stops at the first of: a plateau (the global model's validation AUC has not
improved by more than ``min_delta`` for ``patience`` versions), the version budget,
the time budget; ``stopped_by`` says which. Time to target is measured on the lift
over the initial model: ``target = initial_auc + target_fraction * (centralized_auc
- initial_auc)`` on the pooled test set.

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
import tomllib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
import structlog

from common.agreement import AgreementKey
from common.errors import ConfigError
from common.hooks import Stages, untimed
from common.ids import is_name
from common.signing import SigningKey
from common.spec import (
    IdentitySpec,
    NumericFeature,
    SecureAggregationSpec,
    TargetSpec,
    TaskSpec,
    positive_weight_for,
)
from common.tls import check_url
from fedq.simulate_privacy import PrivacyOptions, privacy_report, privacy_spec
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

    from aggregator.service import AggregatorService
    from aggregator.stats import ServiceStats
    from aggregator.store import VersionRecord
    from common.transport import Transport
    from common.wire import Tensors
    from participant.worker import ParticipantWorker

log = structlog.get_logger("fedq.simulate")

Partition = Literal["iid", "dirichlet", "column", "sizes"]

#: Each bank keeps this share of its rows for validation (the worker's split).
VAL_FRACTION = 0.2
#: The fewest training rows (after the validation split) a bank may have.
MIN_TRAIN_ROWS = 10
#: The default version budget (async; sync: the same number of updates in rounds).
DEFAULT_VERSIONS = 1000


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
    #: ``partition="sizes"``: each bank's share of the rows (any positive numbers,
    #: normalised), one per participant; stratified by class.
    shares: tuple[float, ...] = ()
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
    #: The most epochs a baseline (centralized, local-only) trains for (fedq.baselines
    #: stops sooner when its validation loss stops improving).
    baseline_epochs: int = 100
    #: Differential privacy at the banks and at the aggregator (off by default).
    privacy: PrivacyOptions = field(default_factory=PrivacyOptions)
    #: Secure aggregation: the spec's ``secure_aggregation`` fields (``{}`` for the
    #: defaults); None: off. In async mode the run uses FedBuff with staleness weights
    #: and a buffer of at least the minimum cohort, unless the overrides say otherwise.
    secure_aggregation: Mapping[str, Any] | None = None
    #: Threads the baselines train in (None: as many as the cores allow).
    baseline_workers: int | None = None
    #: Stop after this many versions (None: DEFAULT_VERSIONS async, DEFAULT_VERSIONS /
    #: participants rounds sync).
    versions: int | None = None
    #: Stop when the global model's validation AUC (averaged over the last round of
    #: the federation) has not improved by more than ``min_delta`` for this many
    #: rounds (one round: one update from each bank; :meth:`per_round` versions);
    #: 0: never stop on a plateau.
    patience: int = 10
    min_delta: float = 1e-3
    #: Time to target: ``initial + target_fraction * (centralized - initial)`` AUC.
    target_fraction: float = 0.95
    seconds: float | None = 120.0
    #: Each bank's share of rows held out as its own test customers.
    test_fraction: float = 0.25
    seed: int = 0
    #: Repeat the whole run over this many split seeds: seed, seed + 1, ...
    seeds: int = 1
    #: The share of customers flagged in the risk report's precision / recall at alert.
    alert_rate: float = 0.05
    amqp_url: str | None = None
    #: On a real broker: each bank's own AMQP URL (its broker user), by bank name; the
    #: banks are named after its keys and the aggregator checks every sender.
    bank_urls: Mapping[str, str] | None = None
    redis_url: str | None = None
    #: The store's checkpoints (``StoreConfig.checkpoint_every``): keep the parameters
    #: of every K-th version and of the head only; None: every version's.
    checkpoint_every: int | None = None
    report: Path | None = None
    plot: Path | None = None
    #: Hostile banks (fedq.simulate_attacks): the attack the last ``attackers`` banks
    #: (by name) run: scale, sign_flip, huge, label_flip or copies. None: every bank
    #: is honest.
    attack: str | None = None
    attackers: int = 1
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
        if self.mode == "async":
            return DEFAULT_VERSIONS
        return max(10, DEFAULT_VERSIONS // self.participants)

    @staticmethod
    def per_round(spec: TaskSpec) -> int:
        """Versions in one round of the federation (one update from each bank): 1 in
        sync; in async ``ceil(participants / updates per version)`` (FedAsync: one
        version per update; FedBuff: ``buffer_size`` updates per version)."""
        if spec.mode == "sync":
            return 1
        from aggregator.strategies import strategy_for

        capacity = max(1, strategy_for(spec).capacity)
        return max(1, math.ceil(len(spec.participants) / capacity))

    def patience_versions(self, spec: TaskSpec) -> int:
        """Versions without validation gain that end the run: ``patience`` rounds (0: never)."""
        return self.patience * self.per_round(spec)


@dataclass(slots=True)
class Progress:
    """Live state the CLI shows while the simulation runs."""

    version: int = 0
    auc: float | None = None
    val_auc: float | None = None
    #: Versions since the validation AUC last improved (the plateau count).
    since_best: int = 0
    staleness: float = 0.0
    accepted: int = 0
    refused: int = 0


@dataclass(slots=True)
class SimulationResult:
    """What the report holds (one run: one split seed, one mode)."""

    task: str
    mode: str
    #: The split seed of this run.
    seed: int
    #: Pooled test AUC of the final global model, the centralized model, version 0.
    final_auc: float
    centralized_auc: float
    initial_auc: float
    #: Each bank's local-only model on the pooled test set.
    local_only_auc: dict[str, float]
    local_only_auc_mean: float
    versions: int
    updates_accepted: int
    updates_refused: int
    refused_by_reason: dict[str, int]
    wall_seconds: float
    #: ``initial_auc + target_fraction * (centralized_auc - initial_auc)``; None when
    #: the centralized model does not beat the initial one (``target_note`` says so).
    target_auc: float | None
    #: Wall-clock seconds until the global model first reached target_auc (None: never).
    time_to_target_s: float | None
    #: (seconds, version, pooled test AUC) from version 0 on.
    curve: list[tuple[float, int, float]]
    #: For each version 1..n, the participants whose updates went into it.
    contributors: list[list[str]]
    #: What ended the run: plateau, versions, seconds, budget (every bank spent its
    #: privacy budget), or other (an error).
    stopped_by: str
    participants: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    #: What the user should know about the data and the split (columns left out, ...).
    warnings: list[str] = field(default_factory=list)
    #: Test metrics of the final global model and of the centralized baseline
    #: (common.evaluation: auc, pr_auc, loss, brier, positive_rate, n).
    final_metrics: dict[str, float] = field(default_factory=dict)
    centralized_metrics: dict[str, float] = field(default_factory=dict)
    #: common.evaluation.risk_metrics of the final global and centralized models on
    #: the pooled test set (AUC, PR-AUC, log loss, Brier, KS, calibration, alerts).
    final_risk: dict[str, Any] = field(default_factory=dict)
    centralized_risk: dict[str, Any] = field(default_factory=dict)
    #: Why there is no target (the centralized model does not beat the initial one).
    target_note: str | None = None
    #: Validation AUC (the banks' validation rows) for each point of ``curve``.
    val_curve: list[float | None] = field(default_factory=list)
    #: What differential privacy cost, when the run used it: the settings, each bank's
    #: epsilon (record level, Laplace) and the model's (bank level); empty without.
    privacy: dict[str, Any] = field(default_factory=dict)
    #: Per version: {"seconds", "version", "refused": {bank: refusals since the last
    #: version}, "clipped": {bank: its updates in the version its norm bound clipped}}.
    events: list[dict[str, Any]] = field(default_factory=list)
    #: How the centralized baseline was fitted (fedq.baselines: epochs, why it stopped).
    centralized_how: Any = None
    #: Seconds spent fitting the baselines of this split (shared by the modes of a split).
    baseline_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        vals = self.val_curve or [None] * len(self.curve)
        out["curve"] = [
            {"seconds": s, "version": v, "auc": a, "val_auc": va}
            for (s, v, a), va in zip(self.curve, vals, strict=False)
        ]
        out.pop("val_curve")
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
    """What :func:`prepare` made: the task spec, the bank shards, encoded rows.

    The pooled tensors are concatenated bank by bank, in ``spec.participants`` order;
    ``bank_test`` and ``bank_train`` are each bank's slice of them.
    """

    spec: TaskSpec
    #: Each bank's training rows (what its worker gets, validation rows included).
    shards: dict[str, pd.DataFrame]
    #: The pooled test set: the union of the banks' held-out customers.
    x_test: torch.Tensor
    y_test: torch.Tensor
    #: The pooled training rows (the centralized baseline's).
    x_train: torch.Tensor
    y_train: torch.Tensor
    #: The union of the workers' validation rows (the plateau is measured on it).
    x_val: torch.Tensor
    y_val: torch.Tensor
    bank_test: dict[str, slice]
    bank_train: dict[str, slice]
    #: The split seed.
    seed: int = 0
    #: What the user should know about the data and the split, one sentence each.
    warnings: tuple[str, ...] = ()
    #: Each bank's signing key and the aggregator's (fresh per run, set by
    #: :func:`run_simulation`, which puts their public keys in the spec and requires
    #: signatures; empty for a spec without an identity).
    keys: Mapping[str, SigningKey] = field(default_factory=dict)
    aggregator_key: SigningKey | None = None


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
    _check_bank_urls(config)
    _check_run_options(config)
    if config.attack is not None:
        from fedq.simulate_attacks import check_attack

        secure = config.secure_aggregation is not None
        check_attack(config.attack, config.attackers, n, secure_aggregation=secure)
    config.privacy.check()
    _check_shares(config)
    if config.partition == "column" and not config.partition_column:
        raise ConfigError("--partition column needs --partition-column NAME")
    if config.partition != "column" and config.partition_column:
        raise ConfigError(
            f"--partition-column is used only with --partition column, not {config.partition}"
        )
    # The task settings, checked before the data is read (a placeholder feature).
    check = NumericFeature(name=f"{config.target}-feature")
    spec = _task_spec(config, (check,), config.positive, _names(config))
    if config.secure_aggregation is not None:  # what it refuses (robustness, ...), now
        _secured(spec.model_copy(update={"identity": _identity(spec.participants)[0]}), config)
    sync = spec.sync
    for option, value in (("--quorum", sync.quorum), ("--min-updates", sync.min_updates)):
        if value > n:
            raise ConfigError(
                f"{option} {value} is more than --participants {n}: no sync round could close"
            )


def _check_bank_urls(config: SimulationConfig) -> None:
    urls = config.bank_urls
    if config.amqp_url is not None and urls is None:
        raise ConfigError(
            "on a real broker each bank runs as its own broker user: give --bank-urls, a "
            "JSON or TOML file mapping each bank's name to its AMQP URL"
        )
    if urls is None:
        return
    if config.amqp_url is None:
        raise ConfigError("--bank-urls needs --amqp-url (the aggregator's broker URL)")
    if len(urls) != config.participants:
        raise ConfigError(
            f"--bank-urls names {len(urls)} banks, --participants is {config.participants}"
        )


def _check_run_options(config: SimulationConfig) -> None:
    if config.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, not {config.seeds}")
    if config.patience < 0:
        raise ConfigError(f"--patience must be 0 (off) or more, not {config.patience}")
    if not (math.isfinite(config.min_delta) and config.min_delta >= 0):
        raise ConfigError(f"--min-delta must be a finite number >= 0, not {config.min_delta}")
    if not 0.0 < config.alert_rate < 1.0:
        raise ConfigError(f"--alert-rate must be in (0, 1), not {config.alert_rate}")
    if config.baseline_epochs < 1:
        raise ConfigError(f"--baseline-epochs must be at least 1, not {config.baseline_epochs}")


def _check_shares(config: SimulationConfig) -> None:
    if config.partition != "sizes":
        if config.shares:
            raise ConfigError(
                f"--shares is used only with --partition sizes, not {config.partition}"
            )
        return
    if len(config.shares) != config.participants:
        raise ConfigError(
            f"--partition sizes needs one share per bank: --shares gives "
            f"{len(config.shares)} for --participants {config.participants}"
        )
    for s in config.shares:
        if not (math.isfinite(s) and s > 0):
            raise ConfigError(f"--shares: {s:g} is not a positive finite share")


def load_data(config: SimulationConfig) -> Dataset:
    """Read the table and check it against the options, before anything starts.

    The whole table is checked, so an error names the row of the file: the target
    must be binary with at least 2 rows of each class and no missing cell; every
    feature value must be usable (see :func:`participant.data.infer_features`); an
    even split must leave every bank at least :data:`MIN_TRAIN_ROWS` to train on
    (after its held-out customers and its validation rows).

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
    if config.partition in ("iid", "dirichlet"):
        smallest = len(df) // config.participants
        if _trainable(smallest, config.test_fraction) < MIN_TRAIN_ROWS:
            most = len(df) // _min_bank_rows(config.test_fraction)
            fix = (
                f"use --participants {most} or fewer"
                if most >= 1
                else "the data has too few rows for even one bank"
            )
            raise ConfigError(
                f"--participants {config.participants} is too many for {len(df)} rows: "
                f"a bank's {smallest} rows leave {_trainable(smallest, config.test_fraction)} "
                "to train on after its held-out customers and its validation split, and "
                f"each bank needs at least {MIN_TRAIN_ROWS}: {fix}"
            )
    return Dataset(df=df, positive=positive, labels=labels)


def _held_out(n: int, test_fraction: float) -> int:
    """How many of a bank's ``n`` rows are held out (as train_test_split counts)."""
    return min(max(math.ceil(test_fraction * n), 1), n - 1) if n >= 2 else 0


def _trainable(n: int, test_fraction: float) -> int:
    """What a bank with ``n`` rows trains on after its held-out and validation rows."""
    return train_rows(n - _held_out(n, test_fraction), VAL_FRACTION) if n >= 2 else 0


def _min_bank_rows(test_fraction: float) -> int:
    """The fewest rows a bank can have and still train on MIN_TRAIN_ROWS."""
    n = MIN_TRAIN_ROWS
    while _trainable(n, test_fraction) < MIN_TRAIN_ROWS:
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
    if config.bank_urls is not None:
        return tuple(config.bank_urls)
    return tuple(f"bank-{i + 1:02d}" for i in range(config.participants))


def _identity(names: Sequence[str]) -> tuple[IdentitySpec, dict[str, SigningKey], SigningKey]:
    """Fresh keys for the banks and the aggregator, and the identity that requires them
    (with each bank's agreement key, derived from its signing key)."""
    keys = {n: SigningKey.generate() for n in names}
    aggregator = SigningKey.generate()
    identity = IdentitySpec(
        require_signatures=True,
        aggregator_key=aggregator.public.text,
        participant_keys={n: k.public.text for n, k in keys.items()},
        agreement_keys={n: AgreementKey.from_signing_key(k).public.text for n, k in keys.items()},
    )
    return identity, keys, aggregator


def _secured(spec: TaskSpec, config: SimulationConfig) -> TaskSpec:
    """``spec`` with ``config.secure_aggregation`` on (validated again: the spec
    refuses settings secure aggregation cannot serve). In async mode: FedBuff with
    staleness weights and a buffer of at least the minimum cohort, unless the
    overrides set them."""
    if config.secure_aggregation is None:
        return spec
    doc = spec.model_dump(mode="json", by_alias=True)
    doc["secure_aggregation"] = dict(config.secure_aggregation)
    if spec.mode == "async":
        chosen = config.spec_overrides.get("async", {})
        settings = doc["async"]
        if "strategy" not in chosen:
            settings["strategy"] = "fedbuff"
        if "weighting" not in chosen:
            settings["weighting"] = "staleness"
        if "buffer_size" not in chosen:
            sa = SecureAggregationSpec.model_validate(config.secure_aggregation)
            least = sa.resolved_min_cohort(len(spec.participants))
            settings["buffer_size"] = max(int(settings["buffer_size"]), least)
    return TaskSpec.parse(doc)


def load_bank_urls(path: Path) -> dict[str, str]:
    """``--bank-urls``: a JSON or TOML table of bank name -> AMQP URL; ConfigError if not."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read --bank-urls {path}: {e.strerror or e}") from None
    try:
        doc = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--bank-urls {path} is not valid JSON or TOML: {e}") from None
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"--bank-urls {path} must map bank names to AMQP URLs")
    for name, url in doc.items():
        if not is_name(name) or not isinstance(url, str) or not url:
            raise ConfigError(
                f"--bank-urls {path}: {name!r} must be a bank name (letters, digits, '_', '-') "
                "with an AMQP URL string"
            )
        check_url(url, f"--bank-urls {path}: {name}")  # placeholders, TLS settings
    return dict(doc)


def prepare(config: SimulationConfig, data: Dataset | None = None) -> Prepared:
    """Deal the rows to the banks, hold out each bank's test customers, fix the shared
    schema from the pooled training rows, build the task spec and encode.

    ``data`` is what :func:`load_data` returned for ``config`` (read here if None);
    a caller repeating the split over seeds reads it once.

    Raises:
        ConfigError: one line naming the option, column or row at fault.
    """
    if data is None:
        data = load_data(config)
    df, positive, target = data.df, data.positive, config.target
    names = _names(config)
    labels = data.labels
    parts = _partition(config, df, labels)
    train_parts, test_parts = _hold_out(config, names, parts, labels)
    train_idx, test_idx = np.concatenate(train_parts), np.concatenate(test_parts)
    for where, idx in (("test set", test_idx), ("training rows", train_idx)):
        for cls in (1, 0):
            if not (labels[idx] == cls).any():
                raise ConfigError(
                    f"the {where} have no row of {_class_name(cls, positive)}: target column "
                    f"{target!r} has too few of them to split ({int((labels == cls).sum())})"
                )
    exclude = [config.partition_column] if config.partition_column else []
    schema = infer_features(df.iloc[train_idx].reset_index(drop=True), target, exclude=exclude)
    warnings = list(schema.warnings)
    spec = _task_spec(config, schema.features, positive, names)
    weight = positive_weight_for(float(labels[train_idx].mean()), config.class_weight)
    shards = {
        name: df.iloc[rows].reset_index(drop=True)
        for name, rows in zip(names, train_parts, strict=True)
    }
    # Each bank declares the rows it holds: an update may claim no more (a bank that
    # claims 2**62 samples is refused, not weighted by it).
    spec = spec.model_copy(
        update={
            "training": spec.training.model_copy(update={"positive_weight": weight}),
            "declared_samples": {n: len(s) for n, s in shards.items()},
        }
    )
    warnings.extend(_one_class_banks(config, names, train_parts, labels, positive))
    x_all, y_all = encode(df, spec)  # one pass; every row with the pooled statistics
    val_idx = [
        rows[train_val_split(len(rows), VAL_FRACTION, config.seed + i)[1].numpy()]
        for i, rows in enumerate(train_parts)
    ]  # the rows each worker keeps for validation (its split, its seed)
    val = torch_index(np.concatenate(val_idx))
    return Prepared(
        spec=spec,
        shards=shards,
        x_test=x_all[torch_index(test_idx)],
        y_test=y_all[torch_index(test_idx)],
        x_train=x_all[torch_index(train_idx)],
        y_train=y_all[torch_index(train_idx)],
        x_val=x_all[val],
        y_val=y_all[val],
        bank_test=_slices(names, test_parts),
        bank_train=_slices(names, train_parts),
        seed=config.seed,
        warnings=tuple(warnings),
    )


def torch_index(rows: npt.NDArray[np.int64]) -> torch.Tensor:
    """Row positions as a tensor index."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))


def _slices(names: tuple[str, ...], parts: list[npt.NDArray[np.int64]]) -> dict[str, slice]:
    out: dict[str, slice] = {}
    at = 0
    for name, rows in zip(names, parts, strict=True):
        out[name] = slice(at, at + len(rows))
        at += len(rows)
    return out


def _partition(
    config: SimulationConfig, df: pd.DataFrame, labels: npt.NDArray[np.int64]
) -> list[npt.NDArray[np.int64]]:
    """Every row dealt to one bank, by ``config.partition``."""
    smallest = _min_bank_rows(config.test_fraction)
    if config.partition == "iid":
        return partition.iid(len(df), config.participants, config.seed)
    if config.partition == "dirichlet":
        try:
            return partition.dirichlet_label_skew(
                labels, config.participants, config.alpha, config.seed, min_size=smallest
            )
        except ConfigError as e:
            raise ConfigError(
                f"--partition dirichlet (--alpha {config.alpha:g}, --participants "
                f"{config.participants}, at least {smallest} rows per bank): {e}"
            ) from e
    if config.partition == "sizes":
        parts = partition.by_shares(labels, config.shares, config.seed)
        for i, rows in enumerate(parts):
            if _trainable(len(rows), config.test_fraction) < MIN_TRAIN_ROWS:
                raise ConfigError(
                    f"--shares: bank-{i + 1:02d}'s share {config.shares[i]:g} gives it "
                    f"{len(rows)} of {len(df)} rows, {_trainable(len(rows), config.test_fraction)}"
                    f" to train on; each bank needs at least {MIN_TRAIN_ROWS} to train on "
                    f"({smallest} rows in all): give it a larger share"
                )
        return parts
    return _by_column(config, df)


def _hold_out(
    config: SimulationConfig,
    names: tuple[str, ...],
    parts: list[npt.NDArray[np.int64]],
    labels: npt.NDArray[np.int64],
) -> tuple[list[npt.NDArray[np.int64]], list[npt.NDArray[np.int64]]]:
    """Each bank's rows as (training rows, held-out customers), sorted in file order.

    ``test_fraction`` of a bank's rows are held out, stratified by class when the bank
    has at least 2 rows of each class (else at random), with the seed ``seed + i``.
    """
    from sklearn.model_selection import train_test_split

    train: list[npt.NDArray[np.int64]] = []
    test: list[npt.NDArray[np.int64]] = []
    for i, rows in enumerate(parts):
        y = labels[rows]
        n_test = _held_out(len(rows), config.test_fraction)
        stratify = y if min(int(y.sum()), int(len(y) - y.sum())) >= 2 and n_test >= 2 else None
        try:
            tr, te = train_test_split(
                rows, test_size=n_test, random_state=config.seed + i, stratify=stratify
            )
        except ValueError:  # too few of a class to stratify this many: at random
            tr, te = train_test_split(rows, test_size=n_test, random_state=config.seed + i)
        train.append(np.sort(np.asarray(tr, dtype=np.int64)))
        test.append(np.sort(np.asarray(te, dtype=np.int64)))
    return train, test


def _by_column(config: SimulationConfig, df: pd.DataFrame) -> list[npt.NDArray[np.int64]]:
    """One part per value of the partition column; ConfigError naming the options."""
    column = str(config.partition_column)
    groups = partition.by_column_labeled(df[column].to_numpy())
    if len(groups) != config.participants:
        shown = [label for label, _ in groups[:10]]
        raise ConfigError(
            f"--partition column makes one bank per value, and column {column!r} has "
            f"{len(groups)} values {shown}"
            f"{' ...' if len(groups) > 10 else ''}: use --participants {len(groups)}, "
            f"not {config.participants}"
        )
    for label, rows in groups:
        left = _trainable(len(rows), config.test_fraction)
        if left < MIN_TRAIN_ROWS:
            raise ConfigError(
                f"--partition column: value {label!r} of column {column!r} has "
                f"{len(rows)} rows, {left} to train on after its held-out customers and "
                f"the validation split; each bank needs at least {MIN_TRAIN_ROWS}"
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


def _private(prep: Prepared, config: SimulationConfig) -> Prepared:
    """The run's task with the privacy settings the options ask for, calibrated."""
    # The declared row counts: what DP-SGD's sampling rate and steps come from (public).
    rows = dict(prep.spec.declared_samples)
    privacy = privacy_spec(config.privacy, prep.spec, rows, config.max_versions)
    # Validated again: some settings refuse each other (secure aggregation and an
    # adaptive clip, for one), which a copy would not notice.
    doc = prep.spec.model_dump(mode="json", by_alias=True)
    doc["privacy"] = privacy.model_dump(mode="json")
    return replace(prep, spec=TaskSpec.parse(doc))


def _signed(prep: Prepared, config: SimulationConfig) -> Prepared:
    """The run's task with fresh keys for every bank and the aggregator, required, and
    secure aggregation when the config asks for it."""
    identity, keys, aggregator_key = _identity(prep.spec.participants)
    spec = _secured(prep.spec.model_copy(update={"identity": identity}), config)
    return replace(prep, spec=spec, keys=keys, aggregator_key=aggregator_key)


@dataclass(slots=True)
class Baselines:
    """The yardsticks of one split: trained once, shared by the modes run on it."""

    #: The centralized model (all training rows pooled).
    central: Tensors
    #: Each bank's local-only model (its training rows alone).
    local: dict[str, Tensors]
    #: How each was fitted (fedq.baselines' account: epochs, why it stopped), by
    #: ``"centralized"`` and bank name.
    how: dict[str, Any]
    seconds: float


def fit_baselines(
    prep: Prepared, config: SimulationConfig, on_done: Callable[[str], None] | None = None
) -> Baselines:
    """Fit the centralized and local-only models of ``prep``'s split (fedq.baselines:
    to convergence, at most ``baseline_epochs``), in parallel threads.

    ``on_done(name)`` is called as each one is done (the CLI's progress), with
    ``"centralized"`` or the bank's name.
    """
    import os

    from fedq.baselines import fit_all

    workers = config.baseline_workers or min(os.cpu_count() or 1, len(prep.bank_train) + 1)

    started = time.perf_counter()
    banks = {n: (prep.x_train[s], prep.y_train[s]) for n, s in prep.bank_train.items()}
    central, local = fit_all(
        prep.spec,
        (prep.x_train, prep.y_train),
        banks,
        max_epochs=config.baseline_epochs,
        seed=config.seed,
        workers=workers,
        on_done=on_done,
    )
    how: dict[str, Any] = {"centralized": dict(central.how)}
    how.update({n: dict(f.how) for n, f in local.items()})
    return Baselines(
        central=central.params,
        local={n: f.params for n, f in local.items()},
        how=how,
        seconds=time.perf_counter() - started,
    )


def _proba(spec: TaskSpec, params: Tensors, x: torch.Tensor) -> npt.NDArray[np.float64]:
    from common.evaluation import predict_proba

    p = predict_proba(spec, params, x).numpy().astype(np.float64)
    # A model driven to ~1e38 by a hostile update scores NaN: uninformative, 0.5.
    return np.nan_to_num(p, nan=0.5)


def _auc(y: npt.NDArray[np.float64], p: npt.NDArray[np.float64]) -> float | None:
    """ROC AUC, None when ``y`` holds one class only."""
    if len(y) == 0 or y.min() == y.max():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def _score_version(spec: TaskSpec, params: Tensors, prep: Prepared) -> tuple[float, float | None]:
    """(pooled test AUC, validation AUC) of one version."""
    test = _auc(prep.y_test.numpy(), _proba(spec, params, prep.x_test))
    return (0.5 if test is None else test), _auc(
        prep.y_val.numpy(), _proba(spec, params, prep.x_val)
    )


def _risk(
    y: npt.NDArray[np.float64], p: npt.NDArray[np.float64], alert_rate: float
) -> dict[str, Any]:
    from common.evaluation import risk_metrics

    return dict(risk_metrics(y, p, alert_rate=alert_rate))


@dataclass(slots=True)
class _Scores:
    """The end-of-run scores: pooled test set and each bank's own held-out customers."""

    final_metrics: dict[str, float]
    centralized_metrics: dict[str, float]
    final_risk: dict[str, Any]
    centralized_risk: dict[str, Any]
    local_pooled: dict[str, float]
    own: dict[str, dict[str, Any]]
    skipped: list[str]


def _score_all(
    spec: TaskSpec, prep: Prepared, final: Tensors, base: Baselines, alert_rate: float
) -> _Scores:
    from common.evaluation import evaluate

    y = prep.y_test.numpy().astype(np.float64)
    p_final = _proba(spec, final, prep.x_test)
    p_central = _proba(spec, base.central, prep.x_test)
    local_p = {n: _proba(spec, params, prep.x_test) for n, params in base.local.items()}
    own: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for name, rows in prep.bank_test.items():
        yb = y[rows]
        positives = int(yb.sum())
        entry: dict[str, Any] = {"n": len(yb), "positives": positives}
        if 0 < positives < len(yb):
            entry["global_auc"] = _auc(yb, p_final[rows])
            entry["local_only_auc"] = _auc(yb, local_p[name][rows])
            entry["centralized_auc"] = _auc(yb, p_central[rows])
            entry["skipped"] = None
        else:
            cls = "positive" if positives == 0 else "negative"
            entry["skipped"] = f"no {cls} customer among its {len(yb)} held-out customers"
            skipped.append(f"{name}: own-customer AUC skipped: {entry['skipped']}")
        own[name] = entry
    return _Scores(
        final_metrics=evaluate(spec, final, prep.x_test, prep.y_test),
        centralized_metrics=evaluate(spec, base.central, prep.x_test, prep.y_test),
        final_risk=_risk(y, p_final, alert_rate),
        centralized_risk=_risk(y, p_central, alert_rate),
        local_pooled={n: _auc(y, p) or 0.5 for n, p in local_p.items()},
        own=own,
        skipped=skipped,
    )


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
    if config.bank_urls is None:
        raise ConfigError("a simulation on a real broker needs each bank's own URL (--bank-urls)")
    agg = await AmqpTransport.connect(config.amqp_url, name="fedq-simulate-aggregator")
    banks: dict[str, Transport] = {}
    try:
        for n in names:
            banks[n] = await AmqpTransport.connect(config.bank_urls[n], name=f"fedq-simulate-{n}")
    except BaseException:
        for t in (agg, *banks.values()):
            await t.close()
        raise
    return agg, banks


def _clipped(record: VersionRecord) -> dict[str, int]:
    """Per bank: its updates the version's norm bound clipped (``info["robust"]``)."""
    robust = record.info.get("robust")
    clipped = robust.get("clipped") if isinstance(robust, Mapping) else None
    if not isinstance(clipped, Mapping):
        return {}
    out: dict[str, int] = {}
    for e in record.lineage:
        if e.update_id in clipped:
            out[e.participant] = out.get(e.participant, 0) + 1
    return out


@dataclass(slots=True)
class _Watch:
    """What the run records at each version, and when it should stop."""

    config: SimulationConfig
    started: float
    #: Versions per round of the federation (SimulationConfig.per_round): the plateau
    #: averages the validation AUC over one round and counts patience in rounds.
    per_round: int = 1
    curve: list[tuple[float, int, float]] = field(default_factory=list)
    val_curve: list[float | None] = field(default_factory=list)
    contributors: list[list[str]] = field(default_factory=list)
    lineages: list[Any] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    refused_before: dict[str, int] = field(default_factory=dict)
    best_val: float | None = None
    since_best: int = 0
    stopped_by: str | None = None
    final: Tensors | None = None

    def start(self, params: Tensors, test_auc: float, val_auc: float | None) -> None:
        self.final = params
        self.curve.append((0.0, 0, test_auc))
        self.val_curve.append(val_auc)
        self.best_val = val_auc

    def record(
        self,
        record: VersionRecord,
        params: Tensors,
        scores: tuple[float, float | None],
        stats: ServiceStats,
    ) -> None:
        seconds = time.perf_counter() - self.started
        test_auc, val_auc = scores
        self.final = params
        self.curve.append((seconds, record.version, test_auc))
        self.val_curve.append(val_auc)
        self.contributors.append([e.participant for e in record.lineage])
        self.lineages.append(record.lineage)
        refused = {n: sum(b.refused.values()) for n, b in stats.banks.items()}
        since = {n: k - self.refused_before.get(n, 0) for n, k in refused.items()}
        self.refused_before = refused
        self.events.append(
            {
                "seconds": seconds,
                "version": record.version,
                "refused": {n: k for n, k in since.items() if k > 0},
                "clipped": _clipped(record),
            }
        )
        self._plateau(val_auc)
        if record.version >= self.config.max_versions:
            self.stopped_by = "versions"
        elif 0 < self.config.patience * self.per_round <= self.since_best:
            self.stopped_by = "plateau"

    def _plateau(self, val_auc: float | None) -> None:
        """Count versions since the smoothed validation AUC last rose by > min_delta."""
        if val_auc is None:
            return
        recent = [v for v in self.val_curve[-self.per_round :] if v is not None]
        smooth = float(np.mean(recent)) if recent else val_auc
        if self.best_val is None or smooth > self.best_val + self.config.min_delta:
            self.best_val, self.since_best = smooth, 0
        else:
            self.since_best += 1


async def run_simulation(
    config: SimulationConfig,
    on_progress: Any = None,
    prepared: Prepared | None = None,
    baselines: Baselines | None = None,
) -> SimulationResult:
    """Run the whole simulation; ``on_progress(Progress)`` is called after each version.

    ``prepared`` is what :func:`prepare` returned for this data and ``baselines`` what
    :func:`fit_baselines` returned for it (each made here if None).
    """
    from aggregator.metrics import AggregatorMetrics
    from aggregator.service import AggregatorService, ServiceConfig
    from aggregator.store import RedisModelStore, StoreConfig, connect_redis
    from common.models import build_task_model, model_tensors

    if prepared is None:
        prep = await asyncio.to_thread(prepare, config)
    else:
        prep = _for_mode(prepared, config)
    prep = _signed(prep, config)
    if config.privacy.any:
        prep = _private(prep, config)
    if baselines is None:
        baselines = await asyncio.to_thread(fit_baselines, prep, config)
    spec = prep.spec
    names = spec.participants
    agg_transport, bank_transports = await _transports(config, names)
    store = RedisModelStore(
        connect_redis(config.redis_url or "memory://"),
        StoreConfig(prefix="fedq", checkpoint_every=config.checkpoint_every),
        stages=config.stages,
    )
    progress = Progress()
    watch = _Watch(config, time.perf_counter(), per_round=config.per_round(spec))
    agg_stop, bank_stop = asyncio.Event(), asyncio.Event()

    async def on_version(record: VersionRecord, params: Tensors) -> None:
        scores = await asyncio.to_thread(_score_version, spec, params, prep)
        watch.record(record, params, scores, service.stats)
        progress.version, (progress.auc, progress.val_auc) = record.version, scores
        progress.since_best = watch.since_best
        progress.staleness = float(np.mean([e.staleness for e in record.lineage] or [0]))
        progress.accepted = service.stats.accepted
        progress.refused = service.stats.refused_total
        if on_progress is not None:
            on_progress(progress)
        if watch.stopped_by is not None:
            bank_stop.set()
            agg_stop.set()  # stop at the version asked for; queued updates stay queued

    service = AggregatorService(
        spec,
        store,
        agg_transport,
        # Every bank is its own broker user (or its own in-process sender): the sender
        # check is on, and the spec requires signatures (prepare made the keys).
        ServiceConfig(
            depth_poll_s=1.0, signing_key=prep.aggregator_key, last_version=config.max_versions
        ),
        AggregatorMetrics(),
        on_version,
        stages=config.stages,
    )
    genesis = model_tensors(build_task_model(spec))
    watch.start(genesis, *_score_version(spec, genesis, prep))
    watch.started = time.perf_counter()
    agg_task = asyncio.create_task(service.run(agg_stop), name="aggregator")
    workers = _workers(config, prep, bank_transports)
    try:
        await _until_ready(service, agg_task)
        worker_tasks = [
            asyncio.create_task(w.run(bank_stop), name=w.config.participant) for w in workers
        ]
        try:
            # Sync rounds close only with a quorum of banks; async progresses with one.
            needed = 1
            if spec.mode == "sync":  # a deadline closes a round with min_updates banks
                sync = spec.sync
                needed = sync.min_updates if sync.deadline_s else sync.quorum or len(names)
            if await _until_stopped(config, bank_stop, agg_task, worker_tasks, needed):
                watch.stopped_by = watch.stopped_by or "budget"
        finally:
            bank_stop.set()
            await asyncio.gather(*worker_tasks, return_exceptions=True)
    finally:
        agg_stop.set()
        await asyncio.gather(agg_task, return_exceptions=True)
        for transport in (agg_transport, *bank_transports.values()):
            await transport.close()
        await store.close()
    wall = time.perf_counter() - watch.started
    head = service.head_version
    if watch.stopped_by is None:
        watch.stopped_by = _stopped_by(head, config, wall)
    return _result(config, prep, baselines, watch, service.stats, workers, head, wall)


def _workers(
    config: SimulationConfig, prep: Prepared, transports: Mapping[str, Transport]
) -> list[ParticipantWorker]:
    from participant.worker import ParticipantWorker, WorkerConfig

    speeds = _speeds(config)
    hostile = _hostile(config, prep.spec.participants)

    def worker(name: str, *args: Any, **kwargs: Any) -> ParticipantWorker:
        if name not in hostile or config.attack is None:
            return ParticipantWorker(*args, **kwargs)
        from fedq.simulate_attacks import HostileWorker

        return HostileWorker(*args, attack=config.attack, **kwargs)

    return [
        worker(
            name,
            prep.spec,
            WorkerConfig(
                participant=name,
                seed=config.seed + i,
                val_fraction=VAL_FRACTION,
                delay_s=config.base_delay_s * speeds[i],
                wait_for_model_s=2.0,
                signing_key=prep.keys.get(name),
            ),
            transports[name],
            prep.shards[name],
            stages=config.stages,
        )
        for i, name in enumerate(prep.spec.participants)
    ]


def _hostile(config: SimulationConfig, names: Sequence[str]) -> tuple[str, ...]:
    """The banks that run ``config.attack`` (none without one)."""
    if config.attack is None:
        return ()
    from fedq.simulate_attacks import hostile_banks

    return hostile_banks(names, config.attack, config.attackers)


def _speeds(config: SimulationConfig) -> list[float]:
    return list(config.speeds) + [1.0] * (config.participants - len(config.speeds))


async def _until_ready(service: AggregatorService, agg_task: asyncio.Task[None]) -> None:
    ready = asyncio.create_task(service.ready.wait())
    await asyncio.wait([ready, agg_task], return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if agg_task.done():
        agg_task.result()  # raise what stopped it


async def _until_stopped(
    config: SimulationConfig,
    bank_stop: asyncio.Event,
    agg_task: asyncio.Task[None],
    worker_tasks: list[asyncio.Task[Any]],
    needed: int = 1,
) -> bool:
    """Wait for a stop, the time budget, fewer workers left than ``needed`` for progress
    (the others ended by themselves: their privacy budgets spent), or a task that failed
    (its error raised). True in the third case."""
    loop = asyncio.get_running_loop()
    deadline = None if config.seconds is None else loop.time() + config.seconds
    waiter = asyncio.create_task(bank_stop.wait())
    pending = set(worker_tasks)
    try:
        while True:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait(
                [waiter, agg_task, *pending], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for t in done:
                if t is not waiter and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if not done or waiter in done or agg_task in done:
                return False
            pending -= done
            if len(pending) < needed:
                return True
    finally:
        waiter.cancel()


def _target(
    config: SimulationConfig, initial: float, central: float
) -> tuple[float | None, str | None]:
    """The lift-based target AUC, or why there is none."""
    if central <= initial:
        return None, (
            f"the centralized model (test AUC {central:.4f}) does not beat the initial "
            f"model ({initial:.4f}): no time to target"
        )
    return initial + config.target_fraction * (central - initial), None


def _result(
    config: SimulationConfig,
    prep: Prepared,
    base: Baselines,
    watch: _Watch,
    stats: ServiceStats,
    workers: list[ParticipantWorker],
    head: int,
    wall: float,
) -> SimulationResult:
    spec = prep.spec
    assert watch.final is not None
    scores = _score_all(spec, prep, watch.final, base, config.alert_rate)
    central_auc = scores.centralized_metrics.get("auc", 0.5)
    initial = watch.curve[0][2]
    target, note = _target(config, initial, central_auc)
    reached = None if target is None else next((t for t, _, a in watch.curve if a >= target), None)
    warnings = [*prep.warnings, *_still_rising(watch.curve), *scores.skipped]
    if note is not None:
        warnings.append(note)
    if watch.val_curve and watch.val_curve[0] is None and config.patience:
        warnings.append("the validation rows hold one class only: no stop on a plateau")
    return SimulationResult(
        task=spec.task_id,
        mode=config.mode,
        seed=config.seed,
        final_auc=watch.curve[-1][2],
        centralized_auc=central_auc,
        initial_auc=initial,
        final_metrics=scores.final_metrics,
        centralized_metrics=scores.centralized_metrics,
        final_risk=scores.final_risk,
        centralized_risk=scores.centralized_risk,
        local_only_auc=scores.local_pooled,
        local_only_auc_mean=float(np.mean(list(scores.local_pooled.values()))),
        versions=head,
        updates_accepted=stats.accepted,
        updates_refused=stats.refused_total,
        refused_by_reason=dict(stats.refused),
        wall_seconds=wall,
        target_auc=target,
        target_note=note,
        time_to_target_s=reached,
        curve=watch.curve,
        val_curve=watch.val_curve,
        events=watch.events,
        contributors=watch.contributors,
        stopped_by=watch.stopped_by or "other",
        participants=_participants(config, prep, workers, stats, watch, scores),
        settings=_settings(config, spec),
        warnings=warnings,
        centralized_how=base.how.get("centralized"),
        baseline_seconds=base.seconds,
        privacy=privacy_report(
            spec,
            {w.config.participant: (w.public_rows, w.stats.published) for w in workers},
            head,
        ),
    )


def _participants(
    config: SimulationConfig,
    prep: Prepared,
    workers: list[ParticipantWorker],
    stats: ServiceStats,
    watch: _Watch,
    scores: _Scores,
) -> dict[str, dict[str, Any]]:
    """Per bank: its data, its pace, what was decided about its updates, its weight."""
    from aggregator.audit.influence import weight_shares

    shares = weight_shares(watch.lineages)
    total = sum(len(s) for s in prep.shards.values())
    speeds = _speeds(config)
    hostile = _hostile(config, prep.spec.participants)
    y = prep.y_train.numpy().astype(np.float64)
    out: dict[str, dict[str, Any]] = {}
    for i, w in enumerate(workers):
        name = w.config.participant
        rows = len(prep.shards[name])
        out[name] = {
            "rows": rows,
            "held_out": scores.own[name]["n"],
            "positive_rate": float(y[prep.bank_train[name]].mean()),
            "speed": speeds[i],
            "hostile": config.attack if name in hostile else None,
            "updates_published": w.stats.published,
            "last_version_seen": w.stats.last_version,
            **_bank_decisions(stats, name),
            "weight_share": shares.get(name, 0.0),
            "data_share": rows / total,
            "own_customers": scores.own[name],
            "local_only_pooled_auc": scores.local_pooled[name],
        }
    return out


def _stopped_by(head: int, config: SimulationConfig, wall: float) -> str:
    """Which budget ended the run: ``versions``, ``seconds``, or ``other`` (an error).

    A plateau is known when it happens (the run records it then).
    """
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
    """What the aggregator decided about one bank's updates, whether it is flagged and why."""
    bank = stats.banks.get(name)
    decided = bank.as_dict() if bank is not None else {"accepted": 0, "refused": {}}
    flagged = name in stats.flagged
    why = None
    if flagged and bank is not None:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(bank.refused.items()))
        why = f"its last {bank.refused_in_a_row} updates were refused ({reasons})"
    return {
        "updates_accepted": decided["accepted"],
        "updates_refused": decided["refused"],
        "flagged": flagged,
        "flagged_why": why,
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
    out["max_versions"] = config.max_versions
    out["patience_versions"] = config.patience_versions(spec)
    out["hostile_banks"] = list(_hostile(config, spec.participants))
    out["spec"] = json.loads(spec.to_json())
    return out


@dataclass(slots=True)
class Comparison:
    """``--mode both``: the two modes on the same split, speed profiles and baselines."""

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
            "seed": first.seed,
            "warnings": first.warnings,
            "initial_auc": {m: r.initial_auc for m, r in self.runs.items()},
            "target_auc": first.target_auc,
            "centralized_auc": first.centralized_auc,
            "time_to_target_s": {m: r.time_to_target_s for m, r in self.runs.items()},
            "speedup_async_vs_sync": self.speedup,
            "modes": {m: r.to_json() for m, r in self.runs.items()},
        }


async def run_comparison(config: SimulationConfig, on_progress: Any = None) -> Comparison:
    """Run async, then sync, with the same data split, baselines, seeds and speeds."""
    prep = await asyncio.to_thread(prepare, config)
    base = await asyncio.to_thread(fit_baselines, prep, config)
    runs: dict[str, SimulationResult] = {}
    for mode in ("async", "sync"):
        runs[mode] = await run_simulation(replace(config, mode=mode), on_progress, prep, base)
    return Comparison(runs)


Run = SimulationResult | Comparison


def _modes(run: Run) -> dict[str, SimulationResult]:
    return run.runs if isinstance(run, Comparison) else {run.mode: run}


def spread(values: list[float]) -> dict[str, float | int | None]:
    """mean, std (sample, ddof=1; 0 for one value), min, max and n of ``values``."""
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {
        "mean": float(arr.mean()),
        "std": std,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": len(arr),
    }


def _run_numbers(r: SimulationResult) -> dict[str, float | None]:
    decided = r.updates_accepted + r.updates_refused
    return {
        "final_auc": r.final_auc,
        "final_pr_auc": r.final_metrics.get("pr_auc"),
        "centralized_auc": r.centralized_auc,
        "gap": r.centralized_auc - r.final_auc,
        "initial_auc": r.initial_auc,
        "refused_fraction": r.updates_refused / decided if decided else 0.0,
        "time_to_target_s": r.time_to_target_s,
        "versions": float(r.versions),
    }


def _bank_numbers(p: Mapping[str, Any]) -> dict[str, float | None]:
    own = p["own_customers"]
    return {
        "own_global_auc": own.get("global_auc"),
        "own_local_only_auc": own.get("local_only_auc"),
        "local_only_pooled_auc": p["local_only_pooled_auc"],
        "weight_share": p["weight_share"],
        "data_share": p["data_share"],
    }


def _spread_of(rows: list[dict[str, float | None]]) -> dict[str, Any]:
    """The spread of each number over ``rows`` (None values left out)."""
    return {k: spread([v for r in rows if (v := r[k]) is not None]) for k in rows[0]}


@dataclass(slots=True)
class SeedRuns:
    """``--seeds K``: the whole run repeated over K split seeds."""

    runs: list[Run]

    @property
    def seeds(self) -> list[int]:
        return [next(iter(_modes(r).values())).seed for r in self.runs]

    def spread(self) -> dict[str, Any]:
        """Per mode: the mean, std, min and max over the seeds of each number, and of
        each bank's numbers (None values, e.g. a skipped own-customer AUC, left out)."""
        out: dict[str, Any] = {}
        for mode in _modes(self.runs[0]):
            results = [_modes(r)[mode] for r in self.runs]
            entry = _spread_of([_run_numbers(r) for r in results])
            entry["participants"] = {
                bank: _spread_of([_bank_numbers(r.participants[bank]) for r in results])
                for bank in results[0].participants
            }
            out[mode] = entry
        return out

    def to_json(self) -> dict[str, Any]:
        """One run: its own report; several: every run's report and the spread."""
        if len(self.runs) == 1:
            return self.runs[0].to_json()
        first = next(iter(_modes(self.runs[0]).values()))
        return {
            "seeds": self.seeds,
            "spread": self.spread(),
            "warnings": first.warnings,
            "runs": [r.to_json() for r in self.runs],
        }


async def run_seeds(
    config: SimulationConfig, *, both: bool = False, on_progress: Any = None
) -> SeedRuns:
    """Every split seed ``config.seed .. config.seed + seeds - 1``; per seed the data is
    split, the baselines trained once, then each mode run (``both``: async and sync)."""
    data = await asyncio.to_thread(load_data, config)
    runs: list[Run] = []
    for k in range(config.seeds):
        seeded = replace(config, seed=config.seed + k)
        prep = await asyncio.to_thread(prepare, seeded, data)
        base = await asyncio.to_thread(fit_baselines, prep, seeded)
        modes = ("async", "sync") if both else (config.mode,)
        results = {
            m: await run_simulation(replace(seeded, mode=m), on_progress, prep, base)  # type: ignore[arg-type]
            for m in modes
        }
        runs.append(Comparison(results) if both else results[config.mode])
    return SeedRuns(runs)
