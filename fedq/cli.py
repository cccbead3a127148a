"""The ``fedq`` command. Thin: it parses options, builds config objects, calls in."""

from __future__ import annotations

import sys

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
