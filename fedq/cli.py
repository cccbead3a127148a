"""The ``fedq`` command. Thin: it parses options, builds config objects, calls in."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from common.errors import FedqError
from common.logging import configure_logging
from fedq import __version__
from fedq.cli_common import AMQP_DEFAULT, REDIS_DEFAULT, fail


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="fedq")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    envvar="FEDQ_LOG_LEVEL",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.option(
    "--log-format",
    default="auto",
    show_default=True,
    envvar="FEDQ_LOG_FORMAT",
    type=click.Choice(["auto", "console", "json"]),
    help="auto: console on a terminal, JSON lines otherwise.",
)
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
        section: {"run": {k.replace("-", "_"): v for k, v in doc[section].items()}}
        for section in doc
    }


@main.command()
@click.option(
    "--redis-url",
    default="memory://",
    show_default=True,
    envvar="FEDQ_REDIS_URL",
    help="Model store; memory:// runs an in-process Redis.",
)
@click.option("--versions", default=5, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--banks", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
def demo(redis_url: str, versions: int, banks: int, seed: int) -> None:
    """Train a toy federation through the wire format and the model store."""
    from fedq.demo import DemoConfig
    from fedq.demo import main as run

    console = Console()
    try:
        ok = run(
            DemoConfig(redis_url=redis_url, versions=versions, banks=banks, seed=seed), console
        )
    except FedqError as e:
        console.print(f"[red]error:[/] {e}")
        sys.exit(2)
    sys.exit(0 if ok else 1)


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


@main.command()
@click.option(
    "--data",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="CSV or Parquet with a binary target. Default: the bundled German credit data.",
)
@click.option(
    "--target", default=None, help="Target column. Default: creditability (bundled data)."
)
@click.option(
    "--positive",
    default=None,
    help="Value of the target that counts as class 1 when it is not 0/1 (bundled: bad).",
)
@click.option("--participants", "-n", default=5, show_default=True, type=click.IntRange(1, 1000))
@click.option(
    "--partition",
    type=click.Choice(["iid", "dirichlet", "column"]),
    default="iid",
    show_default=True,
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
@click.option(
    "--base-delay",
    default=0.1,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="Seconds a bank at speed 1 pauses after each local round.",
)
@click.option(
    "--mode",
    type=click.Choice(["async", "sync", "both"]),
    default="async",
    show_default=True,
    help="both: async then sync on the same split, one plot, time to target for each.",
)
@click.option(
    "--quorum",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Sync: updates per round (0: every bank).",
)
@click.option(
    "--deadline",
    default=None,
    type=click.FloatRange(min=0.0, min_open=True),
    help="Sync: close a round after this many seconds if --min-updates arrived.",
)
@click.option("--min-updates", default=1, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--late",
    type=click.Choice(["refuse", "stale"]),
    default="refuse",
    show_default=True,
    help="Sync: refuse updates for an older round, or fold them in with a staleness weight.",
)
@click.option(
    "--unweighted", is_flag=True, help="Sync: plain mean instead of sample-count weights."
)
@click.option(
    "--target-fraction",
    default=0.95,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Time to target is measured to this fraction of the centralized AUC.",
)
@click.option(
    "--strategy", type=click.Choice(["fedasync", "fedbuff"]), default="fedasync", show_default=True
)
@click.option(
    "--mixing", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True)
)
@click.option(
    "--staleness",
    "staleness_kind",
    type=click.Choice(["constant", "polynomial", "hinge"]),
    default="polynomial",
    show_default=True,
)
@click.option("--staleness-a", default=0.5, show_default=True, type=click.FloatRange(min=0.0))
@click.option("--staleness-b", default=4, show_default=True, type=click.IntRange(min=0))
@click.option("--buffer-size", default=3, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--model",
    "model_kind",
    type=click.Choice(["logreg", "mlp"]),
    default="logreg",
    show_default=True,
)
@click.option(
    "--hidden", default="16", show_default=True, help="MLP hidden layer widths, e.g. 32,16."
)
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=0.1, show_default=True, type=click.FloatRange(min=0.0, min_open=True))
@click.option(
    "--versions",
    default=None,
    type=click.IntRange(min=1),
    help="Stop after this many versions (default: 200 async; the same number of updates "
    "in sync rounds, 200 / participants).",
)
@click.option(
    "--seconds",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Stop after this many seconds at the latest.",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option(
    "--amqp-url",
    default=None,
    envvar="FEDQ_AMQP_URL",
    help="Run against this RabbitMQ instead of the in-process broker.",
)
@click.option(
    "--redis-url",
    default=None,
    envvar="FEDQ_REDIS_URL",
    help="Keep versions in this Redis instead of an in-process one.",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the JSON report here.",
)
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the AUC-over-time plot (PNG) here.",
)
def simulate(**opts: Any) -> None:
    """Run an aggregator and N bank workers on this machine from one CSV."""
    from click.core import ParameterSource

    from common.spec import ModelSpec, StalenessSpec, TrainingSettings

    ctx = click.get_current_context()
    if ctx.parent is not None and ctx.parent.get_parameter_source("log_level") in (
        ParameterSource.DEFAULT,
        ParameterSource.DEFAULT_MAP,
    ):
        # The services run in this process: their per-version lines would drown the
        # progress bar. Warnings still show; --log-level info brings the rest back.
        configure_logging("warning", (ctx.obj or {}).get("log_format", "auto"))
    from pydantic import ValidationError

    from fedq.simulate import SimulationConfig, bundled_data, prepare

    console = Console()
    bundled = opts["data"] is None
    try:
        hidden = _hidden(opts["hidden"]) if opts["model_kind"] == "mlp" else ()
        config = SimulationConfig(
            data=bundled_data() if bundled else opts["data"],
            target=opts["target"] or ("creditability" if bundled else ""),
            positive=opts["positive"]
            if opts["positive"] is not None
            else ("bad" if bundled else None),
            participants=opts["participants"],
            partition=opts["partition"],
            alpha=opts["alpha"],
            partition_column=opts["partition_column"],
            speeds=_speeds(opts["speeds"], opts["participants"], opts["straggler"]),
            base_delay_s=opts["base_delay"],
            mode="async" if opts["mode"] == "both" else opts["mode"],
            quorum=opts["quorum"],
            deadline_s=opts["deadline"],
            min_updates=opts["min_updates"],
            late=opts["late"],
            weighted=not opts["unweighted"],
            target_fraction=opts["target_fraction"],
            strategy=opts["strategy"],
            mixing=opts["mixing"],
            staleness=StalenessSpec(
                kind=opts["staleness_kind"], a=opts["staleness_a"], b=opts["staleness_b"]
            ),
            buffer_size=opts["buffer_size"],
            model=ModelSpec(kind=opts["model_kind"], hidden=hidden),
            training=TrainingSettings(epochs=opts["epochs"], lr=opts["lr"]),
            versions=opts["versions"],
            seconds=opts["seconds"],
            seed=opts["seed"],
            amqp_url=opts["amqp_url"],
            redis_url=opts["redis_url"],
            report=opts["report"],
            plot=opts["plot"],
        )
        if not config.target:
            raise click.BadParameter("--target is required with --data", param_hint="'--target'")
    except ValueError as e:  # pydantic's ValidationError too
        raise click.UsageError(_one_line(e)) from e
    try:
        # Read and check the data and the options before anything starts: a bad cell
        # or option is one line here, before the banner and the progress bar.
        prepared = prepare(config)
        from fedq.simulate_cli import run_with_progress

        ok = run_with_progress(config, console, both=opts["mode"] == "both", prepared=prepared)
    except FedqError as e:
        fail(e)
    except ValidationError as e:  # a task spec the options cannot make
        raise click.UsageError(_one_line(e)) from e
    sys.exit(0 if ok else 1)


def _hidden(value: str) -> tuple[int, ...]:
    """``--hidden 32,16``: positive layer widths."""
    try:
        widths = tuple(int(h) for h in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of whole numbers, e.g. 32,16",
            param_hint="'--hidden'",
        ) from None
    if any(w < 1 for w in widths):
        raise click.BadParameter("each layer width must be at least 1", param_hint="'--hidden'")
    return widths


def _one_line(e: Exception) -> str:
    """A pydantic ValidationError (several lines) as one line; others as they are."""
    from pydantic import ValidationError

    if not isinstance(e, ValidationError):
        return str(e)
    parts = [
        f"{'.'.join(str(x) for x in err['loc']) or e.title}: {err['msg']}" for err in e.errors()
    ]
    return f"invalid {e.title}: " + "; ".join(parts)


spec_option = click.option(
    "--spec",
    "spec_path",
    required=True,
    envvar="FEDQ_SPEC",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Task spec (JSON or TOML), e.g. from `fedq task init`.",
)


@main.group()
def aggregator() -> None:
    """The aggregator service (one per task)."""


@aggregator.command("run")
@spec_option
@click.option("--amqp-url", default=AMQP_DEFAULT, show_default=True, envvar="FEDQ_AMQP_URL")
@click.option("--redis-url", default=REDIS_DEFAULT, show_default=True, envvar="FEDQ_REDIS_URL")
@click.option("--prefetch", default=64, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--keep-blobs",
    default=None,
    type=click.IntRange(min=1),
    help="Keep the parameters of the newest N versions only (default: all).",
)
@click.option(
    "--lease-ttl",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds the writer lease lives unless renewed: how soon a standby takes over.",
)
@click.option(
    "--stall-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="/healthz turns unhealthy when updates wait and none is taken (or one is in hand) "
    "for this many seconds.",
)
@click.option(
    "--audit-max-age",
    default="90D",
    show_default=True,
    help="Retention of the audit stream by age (RabbitMQ units: Y, M, D, h, m, s).",
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
    help="/healthz and /metrics.",
)
def aggregator_run(
    spec_path: Path,
    amqp_url: str,
    redis_url: str,
    prefetch: int,
    keep_blobs: int | None,
    lease_ttl: float,
    stall_timeout: float,
    audit_max_age: str,
    audit_max_bytes: int,
    sender_check: bool,
    http_host: str,
    http_port: int,
) -> None:
    """Consume the task's updates and commit versions until SIGTERM."""
    import asyncio

    from aggregator.service import ServiceConfig
    from aggregator.store import StoreConfig
    from fedq.services import AggregatorRunConfig, load_spec, run_aggregator

    try:
        config = AggregatorRunConfig(
            spec=load_spec(spec_path),
            amqp_url=amqp_url,
            redis_url=redis_url,
            store=StoreConfig(keep_blobs=keep_blobs),
            service=ServiceConfig(
                prefetch=prefetch,
                require_sender_match=sender_check,
                lease_ttl_s=lease_ttl,
                stall_s=stall_timeout,
                audit_max_age=audit_max_age,
                audit_max_bytes=audit_max_bytes,
            ),
            http_host=http_host,
            http_port=http_port,
        )
        asyncio.run(run_aggregator(config))
    except FedqError as e:
        fail(e)


@main.group()
def participant() -> None:
    """A bank's participant worker."""


@participant.command("run")
@spec_option
@click.option(
    "--participant",
    "name",
    required=True,
    envvar="FEDQ_PARTICIPANT",
    help="This bank's participant id (its broker user name).",
)
@click.option(
    "--data",
    required=True,
    envvar="FEDQ_DATA",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Local CSV or Parquet.",
)
@click.option(
    "--amqp-url",
    default=AMQP_DEFAULT,
    show_default=True,
    envvar="FEDQ_AMQP_URL",
    help="The bank's own broker credentials.",
)
@click.option("--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0.0, 0.9))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option(
    "--max-updates",
    default=None,
    type=click.IntRange(min=1),
    help="Stop after this many updates (default: run until SIGTERM).",
)
@click.option(
    "--delay",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="Pause after each local round (seconds).",
)
def participant_run(
    spec_path: Path,
    name: str,
    data: Path,
    amqp_url: str,
    val_fraction: float,
    seed: int,
    max_updates: int | None,
    delay: float,
) -> None:
    """Train on local data and publish updates at this bank's pace."""
    import asyncio

    from fedq.services import ParticipantRunConfig, load_spec, run_participant
    from participant.worker import WorkerConfig

    try:
        config = ParticipantRunConfig(
            spec=load_spec(spec_path),
            amqp_url=amqp_url,
            data=data,
            worker=WorkerConfig(
                participant=name,
                val_fraction=val_fraction,
                seed=seed,
                max_updates=max_updates,
                delay_s=delay,
            ),
        )
        asyncio.run(run_participant(config))
    except FedqError as e:
        fail(e)


@main.group()
def task() -> None:
    """Task specs."""


@task.command("init")
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="A reference sample the banks agree on: fixes vocabularies and scaling.",
)
@click.option("--target", required=True)
@click.option("--positive", default=None, help="Target value of class 1 when it is not 0/1.")
@click.option("--task-id", required=True)
@click.option("--participants", required=True, help="Comma-separated participant ids.")
@click.option("--model", "model_kind", type=click.Choice(["logreg", "mlp"]), default="logreg")
@click.option("--hidden", default="16", help="MLP hidden widths, e.g. 32,16.")
@click.option("--strategy", type=click.Choice(["fedasync", "fedbuff"]), default="fedasync")
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
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write here (default: standard output).",
)
def task_init(
    data: Path,
    target: str,
    positive: str | None,
    task_id: str,
    participants: str,
    model_kind: str,
    hidden: str,
    strategy: str,
    max_samples: int,
    declared_samples: str,
    out: Path | None,
) -> None:
    """Derive a task spec (shared feature schema) from a reference sample."""
    from common.spec import AsyncSettings, ModelSpec, TargetSpec, TaskSpec
    from participant.data import infer_features, load_table, resolve_positive

    try:
        df = load_table(data)
        positive = resolve_positive(df, target, positive)
        schema = infer_features(df, target)
        spec = TaskSpec.parse(
            {
                "task_id": task_id,
                "model": ModelSpec.model_validate(
                    {
                        "kind": model_kind,
                        "hidden": [int(h) for h in hidden.split(",")]
                        if model_kind == "mlp"
                        else [],
                    }
                ).model_dump(),
                "features": [f.model_dump() for f in schema.features],
                "target": TargetSpec(name=target, positive=positive).model_dump(),
                "async": AsyncSettings(strategy=strategy).model_dump(),
                "participants": [p.strip() for p in participants.split(",") if p.strip()],
                "max_samples": max_samples,
                "declared_samples": _declared(declared_samples),
            }
        )
    except FedqError as e:
        fail(e)
    except ValueError as e:  # pydantic's ValidationError too
        raise click.UsageError(_one_line(e)) from e
    warn = Console(stderr=True, soft_wrap=True, highlight=False)
    for line in schema.warnings:  # columns left out or constant: never silent
        warn.print(f"warning: {line}", markup=False)
    text = json.dumps(json.loads(spec.to_json()), indent=2)
    if out is None:
        click.echo(text)
    else:
        out.write_text(text + "\n")


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

    main.add_command(replay)
    main.add_command(audit)
    main.add_command(export)


_register_audit_commands()
