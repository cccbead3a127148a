"""The ``fedq`` command. Thin: it parses options, builds config objects, calls in."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from common.errors import FedqError
from common.logging import configure_logging
from fedq import __version__


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
def main(log_level: str, log_format: str) -> None:
    """fedq: federated learning over RabbitMQ and Redis.

    Banks train locally and publish updates at their own pace; an aggregator folds
    them into versioned models kept in Redis; auditors replay every version.
    """
    configure_logging(
        log_level,
        "json" if log_format == "json" else "console" if log_format == "console" else "auto",
    )


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
            raise click.BadParameter("a comma-separated list of numbers, e.g. 1,1,1,1,10") from None
        if any(s <= 0 for s in speeds) or len(speeds) > participants:
            raise click.BadParameter("one positive factor per participant at most")
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
@click.option("--mode", type=click.Choice(["async"]), default="async", show_default=True)
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
@click.option(
    "--lr", default=0.1, show_default=True, type=click.FloatRange(min=0.0, min_open=True)
)
@click.option(
    "--versions",
    default=200,
    show_default=True,
    type=click.IntRange(min=1),
    help="Stop after this many versions.",
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
    from common.spec import ModelSpec, StalenessSpec, TrainingSettings
    from fedq.simulate import SimulationConfig, bundled_data
    from fedq.simulate_cli import run_with_progress

    console = Console()
    bundled = opts["data"] is None
    try:
        hidden = (
            tuple(int(h) for h in opts["hidden"].split(",")) if opts["model_kind"] == "mlp" else ()
        )
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
            mode=opts["mode"],
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
            raise click.BadParameter("--target is required with --data", param_hint="--target")
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    try:
        ok = run_with_progress(config, console)
    except FedqError as e:
        console.print(f"[red]error:[/] {e}")
        sys.exit(2)
    sys.exit(0 if ok else 1)
