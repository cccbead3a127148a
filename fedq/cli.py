"""The ``fedq`` command. Thin: it parses options, builds config objects, calls in."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from common.errors import ConfigError
from common.logging import configure_logging
from fedq import __version__
from fedq.cli_common import (
    F,
    FedqGroup,
    amqp_option,
    async_options,
    class_weight_option,
    compression_options,
    file_option,
    limit_option,
    log_options,
    model_options,
    redis_option,
    robustness_options,
    seconds_option,
    seed_option,
    server_options,
    signing_key_option,
    spec_file_option,
    spec_option,
    spec_overrides,
    target_options,
    underscored,
)


@click.group(cls=FedqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="fedq")
@log_options
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    envvar="FEDQ_CONFIG",
    default=None,
    is_eager=True,
    expose_value=False,
    callback=lambda ctx, _, value: _load_config(ctx, value),
    help="TOML file with [aggregator] and [participant] sections of option defaults.",
)
def main(log_level: str, log_format: str) -> None:
    """fedq: federated learning over RabbitMQ and Redis.

    Banks train locally and publish updates at their own pace; an aggregator folds
    them into versioned models kept in Redis; auditors replay every version.
    """
    ctx = click.get_current_context()
    ctx.obj = {"log_format": log_format}
    configure_logging(
        log_level,
        "json" if log_format == "json" else "console" if log_format == "console" else "auto",
    )


def _load_config(ctx: click.Context, path: Path | None) -> None:
    """Option defaults from a TOML file: flags and environment variables still win."""
    if path is None:
        return
    import tomllib

    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise click.BadParameter(f"{path}: {e}", param_hint="--config") from e
    unknown = set(doc) - {"aggregator", "participant"}
    if unknown:
        raise click.BadParameter(
            f"{path}: unknown sections {sorted(unknown)}", param_hint="--config"
        )
    ctx.default_map = {
        section: {"run": _by_option(_run_command(section), doc[section])} for section in doc
    }


def _run_command(section: str) -> click.Command:
    group = main.commands[section]
    assert isinstance(group, click.Group)
    return group.commands["run"]


def _by_option(command: click.Command, table: dict[str, Any]) -> dict[str, Any]:
    """A config file's section (keys named like the options) keyed by parameter name."""
    names = {
        opt.lstrip("-").replace("-", "_"): param.name
        for param in command.params
        for opt in param.opts
    }
    return {names.get(k.replace("-", "_"), k): v for k, v in table.items()}


def _speeds(value: str | None, participants: int, straggler: float | None) -> tuple[float, ...]:
    if value:
        try:
            speeds = tuple(float(s) for s in value.split(","))
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is not a comma-separated list of numbers, e.g. 1,1,1,1,10",
                param_hint="'--speeds'",
            ) from None
        bad = [s for s in speeds if not (math.isfinite(s) and s > 0)]
        if bad:
            raise click.BadParameter(
                f"{bad[0]:g} is not a positive factor; each factor must be a positive number",
                param_hint="'--speeds'",
            )
        if len(speeds) > participants:
            raise click.BadParameter(
                f"{len(speeds)} factors for {participants} participants; give at most one "
                "per participant (missing ones are 1)",
                param_hint="'--speeds'",
            )
        return speeds
    if straggler:
        return (1.0,) * (participants - 1) + (straggler,)
    return ()


def _shares(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[float, ...]:
    """``--shares 60,10,10,10,10``: positive numbers (normalised to shares of the rows)."""
    if not value:
        return ()
    try:
        shares = tuple(float(s) for s in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of numbers, e.g. 60,10,10,10,10"
        ) from None
    bad = [s for s in shares if not (math.isfinite(s) and s > 0)]
    if bad:
        raise click.BadParameter(f"{bad[0]:g} is not a positive share")
    return shares


def privacy_options(f: F) -> F:
    """``fedq simulate``'s differential-privacy options (docs/privacy.md)."""
    positive = click.FloatRange(min=0.0, min_open=True)
    options = [
        click.option(
            "--record-epsilon",
            type=positive,
            default=None,
            help="Record-level DP-SGD at each bank: the epsilon each bank may spend (its "
            "budget); the noise is calibrated to reach it after --dp-updates updates.",
        ),
        click.option(
            "--record-clip",
            type=positive,
            default=1.0,
            show_default=True,
            help="DP-SGD: per-example gradient L2 bound.",
        ),
        click.option(
            "--dp-updates",
            type=click.IntRange(min=1),
            default=30,
            show_default=True,
            help="Updates per bank the record-level budget is planned for.",
        ),
        click.option(
            "--laplace-epsilon",
            type=positive,
            default=None,
            help="The Laplace mechanism at each bank: pure epsilon per update (local DP).",
        ),
        click.option(
            "--laplace-clip",
            type=positive,
            default=1.0,
            show_default=True,
            help="Laplace: the update's L1 bound.",
        ),
        click.option(
            "--laplace-budget",
            type=positive,
            default=None,
            help="Laplace: the total epsilon a bank may spend (default: no limit).",
        ),
        click.option(
            "--bank-epsilon",
            type=positive,
            default=None,
            help="Bank-level DP at the aggregator: the model's epsilon after the version "
            "cap (--versions); each update clipped, each version noised.",
        ),
        click.option(
            "--bank-clip",
            type=positive,
            default=1.0,
            show_default=True,
            help="Bank-level DP: the update's L2 bound (the initial one with --adaptive-clip).",
        ),
        click.option(
            "--adaptive-clip",
            is_flag=True,
            help="Bank-level DP: adapt the bound to the median update norm (Andrew et al. 2021).",
        ),
        click.option(
            "--dp-delta",
            type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
            default=1e-5,
            show_default=True,
            help="The delta of every (epsilon, delta) reported.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


#: ``--checkpoint-every K`` (``aggregator run``, ``simulate``): a store setting, not
#: the task spec's (it changes no version, only which parameters are kept).
def checkpoint_option(also: str = "") -> Callable[[F], F]:
    """``--checkpoint-every K``; ``also`` names what else this command keeps."""
    return click.option(
        "--checkpoint-every",
        "checkpoint_every",
        default=None,
        type=click.IntRange(min=1),
        metavar="K",
        help=f"Keep the parameters of every K-th version (0, K, 2K, ...) and of the head{also} "
        "only; the others are rebuilt on demand from the nearest kept version and the "
        "retained updates, each checked (default: every version's are kept).",
    )


def _sim_spec(spec_field: str, *decls: str, **attrs: Any) -> Callable[[F], F]:
    """A task-spec option of ``fedq simulate``: its default is the simulation's."""
    return spec_option(spec_field, *decls, simulation=True, **attrs)


@main.command()
@file_option(
    "--data", help="CSV or Parquet with a binary target. Default: the bundled German credit data."
)
@target_options(
    "Target column. Default: creditability (bundled data).",
    "Value of the target that counts as class 1 when it is not 0/1 (bundled: bad).",
)
@click.option("--participants", "-n", default=5, show_default=True, type=click.IntRange(1, 1000))
@click.option(
    "--partition",
    type=click.Choice(["iid", "dirichlet", "column", "sizes"]),
    default="iid",
    show_default=True,
    help="How rows are dealt to banks: iid, dirichlet (label skew, --alpha), column (one "
    "bank per value of --partition-column), sizes (--shares).",
)
@click.option(
    "--shares",
    default=None,
    callback=_shares,
    help="With --partition sizes: each bank's share of the rows, e.g. 60,10,10,10,10 "
    "(normalised; stratified by class).",
)
@click.option(
    "--alpha",
    default=0.5,
    show_default=True,
    type=click.FloatRange(min=1e-6),
    help="Dirichlet concentration for label skew (smaller: more skew).",
)
@click.option(
    "--partition-column", default=None, help="With --partition column: one bank per value."
)
@click.option("--speeds", default=None, help="Slowness factor per bank, e.g. 1,1,1,1,10.")
@click.option(
    "--straggler",
    default=None,
    type=click.FloatRange(min=1.0),
    help="Make the last bank this many times slower.",
)
@seconds_option(
    "--base-delay",
    default=0.1,
    minimum=0.0,
    help="Seconds a bank at speed 1 pauses after each local round.",
)
@click.option(
    "--mode",
    type=click.Choice(["async", "sync", "both"]),
    default="async",
    show_default=True,
    help="both: async then sync on the same split, one plot, time to target for each.",
)
@_sim_spec(
    "sync.quorum",
    "--quorum",
    type=click.IntRange(min=0),
    help="Sync: updates per round (0: every bank).",
)
@_sim_spec(
    "sync.deadline_s",
    "--deadline",
    type=click.FloatRange(min=0.0, min_open=True),
    help="Sync: close a round after this many seconds if --min-updates arrived.",
)
@_sim_spec(
    "sync.min_updates",
    "--min-updates",
    type=click.IntRange(min=1),
    help="Sync: the fewest updates a round closes with at its deadline.",
)
@_sim_spec(
    "sync.late",
    "--late",
    type=click.Choice(["refuse", "stale"]),
    help="Sync: refuse updates for an older round, or fold them in with a staleness weight.",
)
@_sim_spec(
    "sync.weighted",
    "--weighted/--unweighted",
    help="Sync: sample-count weights, or a plain mean.",
)
@click.option(
    "--target-fraction",
    default=0.95,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Time to target: to initial AUC + this fraction of the centralized model's lift "
    "over the initial model.",
)
@class_weight_option
@async_options(simulation=True)
@server_options(simulation=True)
@robustness_options(simulation=True)
@compression_options(simulation=True)
@model_options(simulation=True)
@_sim_spec("training.epochs", "--epochs", type=click.IntRange(min=1))
@_sim_spec("training.lr", "--lr", type=click.FloatRange(min=0.0, min_open=True))
@_sim_spec(
    "training.batch_size",
    "--batch-size",
    type=click.IntRange(min=1),
    help="Rows per local SGD step.",
)
@limit_option(
    "--versions",
    help="Stop after this many versions at the latest (default: 1000 async; the same "
    "number of updates in sync rounds, 1000 / participants).",
)
@seconds_option(
    "--seconds", default=120.0, minimum=0.1, help="Stop after this many seconds at the latest."
)
@click.option(
    "--patience",
    default=10,
    show_default=True,
    type=click.IntRange(min=0),
    help="Stop when the global model's validation AUC (on the banks' validation rows, not "
    "the test set; averaged over the last round) has not improved by more than "
    "--min-delta for this many rounds of the federation (a round: one update from each "
    "bank); 0: never.",
)
@click.option(
    "--min-delta",
    default=1e-3,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="The validation AUC gain that counts as an improvement for --patience.",
)
@click.option(
    "--seeds",
    default=1,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Repeat the whole run over this many split seeds (--seed, --seed + 1, ...) and "
    "report the mean and spread.",
)
@click.option(
    "--baseline-epochs",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    help="The most epochs the centralized and local-only models train for (they stop "
    "sooner once converged).",
)
@click.option(
    "--alert-rate",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    help="The share of customers flagged for the report's precision and recall at alert.",
)
@seed_option
@click.option(
    "--attack",
    type=click.Choice(["scale", "sign-flip", "huge", "label-flip", "copies"]),
    default=None,
    callback=underscored,
    help="Make the last --attackers banks hostile: scale (delta x100), sign-flip (delta "
    "x-10), huge (every value 3e38), label-flip (train on flipped labels), copies (each "
    "update published 5 times) [default: every bank honest].",
)
@click.option(
    "--attackers",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="With --attack: how many banks are hostile (the last ones by name).",
)
@privacy_options
@amqp_option("Run against this RabbitMQ instead of the in-process broker.", default=None)
@file_option(
    "--bank-urls",
    help="With --amqp-url: JSON or TOML mapping each bank's name to its own AMQP URL "
    "(its broker user); the banks take these names and --participants follows.",
)
@click.option(
    "--secure-aggregation",
    is_flag=True,
    help="Mask every update (pairwise masks, secret-shared seeds): the aggregator sees "
    "only the sum of each round or FedBuff cohort.",
)
@click.option(
    "--secagg-threshold",
    type=click.IntRange(min=2),
    default=None,
    help="With --secure-aggregation: how many banks together can remove a dropped bank's "
    "masks [default: a majority of the banks].",
)
@redis_option("Keep versions in this Redis instead of an in-process one.", default=None)
@checkpoint_option()
@file_option("--report", help="Write the JSON report here.")
@file_option("--plot", help="Write the AUC-over-time plot (PNG) here.")
def simulate(**opts: Any) -> None:
    """Run an aggregator and N bank workers on this machine from one CSV."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    if ctx.parent is not None and ctx.parent.get_parameter_source("log_level") in (
        ParameterSource.DEFAULT,
        ParameterSource.DEFAULT_MAP,
    ):
        # The services run in this process: their per-version lines would drown the
        # progress bar. Warnings still show; --log-level info brings the rest back.
        configure_logging("warning", (ctx.obj or {}).get("log_format", "auto"))
    from fedq.simulate import SimulationConfig, bundled_data, load_bank_urls, load_data, prepare
    from fedq.simulate_privacy import PrivacyOptions

    bank_urls = None if opts["bank_urls"] is None else load_bank_urls(opts["bank_urls"])
    if bank_urls is not None:
        if ctx.get_parameter_source("participants") not in (
            ParameterSource.DEFAULT,
            ParameterSource.DEFAULT_MAP,
        ) and opts["participants"] != len(bank_urls):
            raise click.BadParameter(
                f"--bank-urls names {len(bank_urls)} banks", param_hint="'--participants'"
            )
        opts["participants"] = len(bank_urls)
    if opts["attack"] is None and ctx.get_parameter_source("attackers") not in (
        ParameterSource.DEFAULT,
        ParameterSource.DEFAULT_MAP,
    ):
        raise click.BadParameter("needs --attack", param_hint="'--attackers'")
    bundled = opts["data"] is None
    config = SimulationConfig(
        data=bundled_data() if bundled else opts["data"],
        target=opts["target"] or ("creditability" if bundled else ""),
        positive=opts["positive"] if opts["positive"] is not None else ("bad" if bundled else None),
        participants=opts["participants"],
        partition=opts["partition"],
        alpha=opts["alpha"],
        partition_column=opts["partition_column"],
        shares=opts["shares"],
        speeds=_speeds(opts["speeds"], opts["participants"], opts["straggler"]),
        base_delay_s=opts["base_delay"],
        mode="async" if opts["mode"] == "both" else opts["mode"],
        spec_overrides=_secagg_overrides(ctx, opts["secure_aggregation"]),
        class_weight=opts["class_weight"],
        target_fraction=opts["target_fraction"],
        versions=opts["versions"],
        seconds=opts["seconds"],
        patience=opts["patience"],
        min_delta=opts["min_delta"],
        seeds=opts["seeds"],
        baseline_epochs=opts["baseline_epochs"],
        alert_rate=opts["alert_rate"],
        seed=opts["seed"],
        amqp_url=opts["amqp_url"],
        bank_urls=bank_urls,
        secure_aggregation=(
            ({} if opts["secagg_threshold"] is None else {"threshold": opts["secagg_threshold"]})
            if opts["secure_aggregation"]
            else None
        ),
        privacy=PrivacyOptions(
            record_epsilon=opts["record_epsilon"],
            record_clip=opts["record_clip"],
            planned_updates=opts["dp_updates"],
            laplace_epsilon=opts["laplace_epsilon"],
            laplace_clip=opts["laplace_clip"],
            laplace_budget=opts["laplace_budget"],
            bank_epsilon=opts["bank_epsilon"],
            bank_clip=opts["bank_clip"],
            bank_adaptive=opts["adaptive_clip"],
            delta=opts["dp_delta"],
        ),
        redis_url=opts["redis_url"],
        checkpoint_every=opts["checkpoint_every"],
        report=opts["report"],
        plot=opts["plot"],
        attack=opts["attack"],
        attackers=opts["attackers"],
    )
    if not config.target:
        raise click.BadParameter("--target is required with --data", param_hint="'--target'")
    # Read and check the data and the options before anything starts: a bad cell or
    # option is one line here, before the banner and the progress bar.
    data = load_data(config)
    prepared = prepare(config, data)
    if config.privacy.any:  # a target that cannot be met: one line, before the run starts
        from fedq.simulate_privacy import privacy_spec

        declared = dict(prepared.spec.declared_samples)
        privacy_spec(config.privacy, prepared.spec, declared, config.max_versions)
    from fedq.simulate_cli import run_with_progress

    ok = run_with_progress(
        config, Console(), both=opts["mode"] == "both", prepared=prepared, data=data
    )
    sys.exit(0 if ok else 1)


@main.group()
def aggregator() -> None:
    """The aggregator service (one per task)."""


@aggregator.command("run")
@spec_file_option
@amqp_option("The broker the task's updates arrive on.")
@redis_option("The model store.")
@click.option("--prefetch", default=64, show_default=True, type=click.IntRange(1, 65535))
@limit_option(
    "--keep-blobs", help="Keep the parameters of the newest N versions only (default: all)."
)
@checkpoint_option(" (and those of the --keep-blobs newest)")
@seconds_option(
    "--lease-ttl",
    "lease_ttl_s",
    default=10.0,
    minimum=0.1,
    help="Seconds the writer lease lives unless renewed: how soon a standby takes over.",
)
@seconds_option(
    "--stall-timeout",
    "stall_s",
    default=60.0,
    minimum=0.1,
    help="/healthz turns unhealthy when updates wait and none is taken (or one is in hand) "
    "for this many seconds.",
)
@click.option(
    "--flag-after",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Flag a bank (log, fedq_participant_flagged, /healthz) after this many of its "
    "updates in a row were refused.",
)
@click.option(
    "--audit-max-age",
    default="90D",
    show_default=True,
    help="Retention of the audit stream by age (RabbitMQ units: Y, M, D, h, m, s), "
    "set when the task's stream is first declared; an existing stream's retention is "
    "changed with a RabbitMQ policy (docs/operations.md).",
)
@click.option(
    "--audit-max-bytes",
    default=20 * 1024**3,
    show_default=True,
    type=click.IntRange(min=1),
    help="Retention of the audit stream by size.",
)
@click.option(
    "--sender-check/--no-sender-check",
    "require_sender_match",
    default=True,
    show_default=True,
    help="Refuse updates whose broker user is not the participant they name.",
)
@click.option("--http-host", default="0.0.0.0", show_default=True, envvar="FEDQ_HTTP_HOST")  # noqa: S104
@click.option(
    "--http-port",
    default=9108,
    show_default=True,
    envvar="FEDQ_HTTP_PORT",
    type=click.IntRange(0, 65535),
    help="/healthz, /metrics and /status (fedq status).",
)
@signing_key_option
def aggregator_run(
    spec_path: Path,
    amqp_url: str,
    redis_url: str,
    keep_blobs: int | None,
    checkpoint_every: int | None,
    http_host: str,
    http_port: int,
    **service: Any,
) -> None:
    """Consume the task's updates and commit versions until SIGTERM."""
    import asyncio

    from aggregator.service import ServiceConfig
    from aggregator.store import StoreConfig
    from fedq.services import AggregatorRunConfig, load_spec, run_aggregator

    store = StoreConfig(keep_blobs=keep_blobs, checkpoint_every=checkpoint_every)
    config = AggregatorRunConfig(
        load_spec(spec_path),
        amqp_url,
        redis_url,
        store,
        ServiceConfig(**service),
        http_host,
        http_port,
    )
    asyncio.run(run_aggregator(config))


@main.group()
def participant() -> None:
    """A bank's participant worker."""


@participant.command("run")
@spec_file_option
@click.option(
    "--participant",
    required=True,
    envvar="FEDQ_PARTICIPANT",
    help="This bank's participant id (its broker user name).",
)
@file_option("--data", required=True, envvar="FEDQ_DATA", help="Local CSV or Parquet.")
@amqp_option("The bank's own broker credentials.")
@click.option("--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0.0, 0.9))
@seed_option
@limit_option("--max-updates", help="Stop after this many updates (default: run until SIGTERM).")
@seconds_option(
    "--delay", "delay_s", default=0.0, minimum=0.0, help="Pause after each local round (seconds)."
)
@signing_key_option
@click.option(
    "--metrics-port",
    default=0,
    show_default=True,
    type=click.IntRange(0, 65535),
    envvar="FEDQ_METRICS_PORT",
    help="Serve Prometheus /metrics on this port (0: off).",
)
@file_option(
    "--privacy-ledger",
    envvar="FEDQ_PRIVACY_LEDGER",
    help="With DP in the task spec: the file that keeps this bank's privacy spending "
    "across restarts (created if missing; keep it with the bank's data).",
)
@file_option(
    "--recent",
    envvar="FEDQ_RECENT",
    help="With monitoring in the task spec: the bank's recent rows (CSV or Parquet, read "
    "again at every monitoring pass). Drift summaries and, when the rows carry the target, "
    "evaluations of the model held are published; never the rows.",
)
@file_option(
    "--secagg-state",
    envvar="FEDQ_SECAGG_STATE",
    help="With secure aggregation in the task spec: the file that records the unmask "
    "questions this bank answered, so that a restart never answers a second one for a "
    "cohort (created if missing).",
)
def participant_run(
    spec_path: Path, amqp_url: str, data: Path, metrics_port: int, **worker: Any
) -> None:
    """Train on local data and publish updates at this bank's pace."""
    import asyncio

    from fedq.services import ParticipantRunConfig, load_spec, run_participant
    from participant.worker import WorkerConfig

    spec = load_spec(spec_path)
    ledger = worker["privacy_ledger"]
    if ledger is not None and not ledger.parent.is_dir():
        raise ConfigError(f"--privacy-ledger {ledger}: its directory does not exist")
    local_dp = spec.privacy.record is not None or spec.privacy.laplace is not None
    if local_dp and worker["privacy_ledger"] is None:
        raise ConfigError(
            f"task {spec.task_id!r} uses differential privacy at the bank: give "
            "--privacy-ledger FILE, so its privacy spending survives restarts"
        )
    state = worker["secagg_state"]
    if spec.secure_aggregation is not None and state is None:
        raise ConfigError(
            f"task {spec.task_id!r} uses secure aggregation: give --secagg-state FILE, so "
            "that the unmask questions this bank answered survive restarts"
        )
    if state is not None and not state.parent.is_dir():
        raise ConfigError(f"--secagg-state {state}: its directory does not exist")
    config = ParticipantRunConfig(spec, amqp_url, data, WorkerConfig(**worker), metrics_port)
    asyncio.run(run_participant(config))


@main.group()
def task() -> None:
    """Task specs."""


@task.command("init")
@file_option(
    "--data",
    required=True,
    help="A reference sample the banks agree on: fixes vocabularies and scaling.",
)
@target_options(
    "The binary target column.", "Target value of class 1 when it is not 0/1.", required=True
)
@click.option("--task-id", required=True)
@click.option("--participants", required=True, help="Comma-separated participant ids.")
@class_weight_option
@model_options(simulation=False)
@async_options(simulation=False)
@server_options(simulation=False)
@robustness_options(simulation=False)
@compression_options(simulation=False)
@click.option(
    "--max-samples",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    help="The largest sample count any update may claim (FedAvg weighs by it).",
)
@click.option(
    "--declared-samples",
    default="",
    help="What each bank holds, e.g. bank-a=12000,bank-b=800: its updates may claim no more.",
)
@click.option(
    "--participant-key",
    "participant_keys",
    multiple=True,
    metavar="NAME=KEY",
    help="A participant's public key (ed25519:..., from `fedq keys generate`); repeat.",
)
@click.option(
    "--agreement-key",
    "agreement_keys",
    multiple=True,
    metavar="NAME=KEY",
    help="A bank's agreement key (x25519:..., from `fedq keys show`) for secure "
    "aggregation; repeat.",
)
@click.option("--aggregator-key", default=None, help="The aggregator's public key (ed25519:...).")
@click.option(
    "--require-signatures/--no-require-signatures",
    default=None,
    help="Refuse unsigned updates and models [default: on when --aggregator-key is given].",
)
@click.option(
    "--secure-aggregation/--no-secure-aggregation",
    default=False,
    show_default=True,
    help="Mask every update (pairwise masks): the aggregator sees only cohort sums. Needs "
    "signatures and every bank's --participant-key and --agreement-key.",
)
@click.option(
    "--secagg-threshold",
    type=click.IntRange(min=2),
    default=None,
    help="With --secure-aggregation: how many banks together can remove a dropped bank's "
    "masks [default: a majority of the participants].",
)
@click.option(
    "--monitoring/--no-monitoring",
    default=False,
    show_default=True,
    help="Record each feature's distribution in the reference sample: the banks compare "
    "their recent rows with it (drift) and evaluate the model (docs/drift.md).",
)
@click.option(
    "--psi-threshold",
    type=click.FloatRange(min=0, min_open=True),
    default=0.25,
    show_default=True,
    help="With --monitoring: a PSI above it is drift (a retraining signal).",
)
@click.option(
    "--monitor-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=3600.0,
    show_default=True,
    help="With --monitoring: seconds between a bank's drift summaries.",
)
@click.option(
    "--min-rows",
    type=click.IntRange(min=20),
    default=100,
    show_default=True,
    help="With --monitoring: a bank publishes nothing from fewer recent rows than this.",
)
@click.option(
    "--on-drift",
    type=click.Choice(["record", "resume"]),
    default="record",
    show_default=True,
    help="With --monitoring: record a retraining signal, or also resume paused training.",
)
@file_option("--out", help="Write here (default: standard output).")
def task_init(**opts: Any) -> None:
    """Derive a task spec (shared feature schema) from a reference sample."""
    from common.spec import TargetSpec, TaskSpec, positive_weight_for
    from participant.data import binary_labels, infer_features, load_table, resolve_positive

    target = opts["target"]
    df = load_table(opts["data"])
    positive = resolve_positive(df, target, opts["positive"])
    schema = infer_features(df, target)
    overrides = spec_overrides(click.get_current_context())
    rate = float(binary_labels(df, target, positive).mean())
    overrides.setdefault("training", {})["positive_weight"] = positive_weight_for(
        rate, opts["class_weight"]
    )
    spec = TaskSpec.parse(
        {
            **overrides,
            "task_id": opts["task_id"],
            "features": schema.features,
            "target": TargetSpec(name=target, positive=positive),
            "participants": [p.strip() for p in opts["participants"].split(",") if p.strip()],
            "max_samples": opts["max_samples"],
            "declared_samples": _declared(opts["declared_samples"]),
            "identity": _identity(opts),
            "secure_aggregation": _secure_aggregation(opts),
            "monitoring": _monitoring(opts, df, schema.features),
        }
    )
    warn = Console(stderr=True, soft_wrap=True, highlight=False)
    for line in schema.warnings:  # columns left out or constant: never silent
        warn.print(f"warning: {line}", markup=False)
    # The canonical JSON, as hashed into every update's and model's spec hash (``sh``):
    # a participant in another language hashes these bytes (docs/protocol.md).
    text = spec.to_json()
    if opts["out"] is None:
        click.echo(text)
    else:
        opts["out"].write_text(text + "\n")
    warn.print(f"spec hash: {spec.spec_hash().hex()}", markup=False)


@task.command("hash")
@spec_file_option
def task_hash(spec_path: Path) -> None:
    """Print the spec hash every update and model of this spec names."""
    from fedq.services import load_spec

    click.echo(load_spec(spec_path).spec_hash().hex())


def _identity(opts: dict[str, Any]) -> dict[str, Any]:
    """The spec's identity section from task init's key options."""
    keys = _named_keys(opts["participant_keys"], "'--participant-key'")
    require = opts["require_signatures"]
    if require is None:
        require = opts["aggregator_key"] is not None
    return {
        "require_signatures": require,
        "aggregator_key": opts["aggregator_key"],
        "participant_keys": keys,
        "agreement_keys": _named_keys(opts["agreement_keys"], "'--agreement-key'"),
    }


def _named_keys(items: tuple[str, ...], hint: str) -> dict[str, str]:
    """``NAME=KEY`` options as a mapping; a usage error names the bad item."""
    keys: dict[str, str] = {}
    for item in items:
        name, sep, key = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not NAME=KEY", param_hint=hint)
        keys[name.strip()] = key.strip()
    return keys


def _secure_aggregation(opts: dict[str, Any]) -> dict[str, Any] | None:
    """The spec's secure_aggregation section from task init's options (None: off)."""
    if not opts["secure_aggregation"]:
        if opts["secagg_threshold"] is not None:
            raise click.BadParameter(
                "needs --secure-aggregation", param_hint="'--secagg-threshold'"
            )
        return None
    return {"threshold": opts["secagg_threshold"]}


def _secagg_overrides(ctx: click.Context, secure: bool) -> dict[str, Any]:
    """The spec options; with --secure-aggregation, the async strategy, weighting and
    buffer size left to the simulation (FedBuff, staleness, the minimum cohort) unless
    given on the command line."""
    from click.core import ParameterSource

    overrides = spec_overrides(ctx)
    if secure:
        chosen = overrides.get("async", {})
        for name in ("strategy", "weighting", "buffer_size"):
            if ctx.get_parameter_source(name) in (
                ParameterSource.DEFAULT,
                ParameterSource.DEFAULT_MAP,
            ):
                chosen.pop(name, None)
    return overrides


def _monitoring(opts: dict[str, Any], df: Any, features: Any) -> dict[str, Any] | None:
    """The spec's ``monitoring`` from ``--monitoring`` and the reference sample."""
    if not opts["monitoring"]:
        return None
    from participant.drift import reference_of

    return {
        "reference": [r.model_dump(mode="json") for r in reference_of(df, tuple(features))],
        "psi_threshold": opts["psi_threshold"],
        "interval_s": opts["monitor_interval"],
        "min_rows": opts["min_rows"],
        "on_drift": opts["on_drift"],
    }


def _declared(text: str) -> dict[str, int]:
    """``bank-a=12000,bank-b=800`` as a mapping; a usage error names the bad item."""
    out: dict[str, int] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, sep, count = item.partition("=")
        if not sep or not count.strip().isdigit():
            raise click.BadParameter(
                f"{item!r} is not NAME=COUNT (e.g. bank-a=12000)", param_hint="'--declared-samples'"
            )
        out[name.strip()] = int(count)
    return out


def _register_audit_commands() -> None:
    from fedq.cli_audit import audit, export, replay
    from fedq.cli_drift import drift, pause, resume
    from fedq.cli_keys import keys
    from fedq.cli_status import status

    main.add_command(drift)
    task.add_command(pause)
    task.add_command(resume)
    main.add_command(keys)
    main.add_command(status)
    main.add_command(replay)
    main.add_command(audit)
    main.add_command(export)


_register_audit_commands()
