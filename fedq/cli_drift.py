"""``fedq drift`` (what each bank's recent rows say against the task's reference) and
``fedq task pause`` / ``fedq task resume`` (the task's training), docs/drift.md."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from common.drift import SCORE
from common.errors import ConfigError
from fedq.cli_common import json_option, redis_option, task_option

store_option = redis_option("The model store (read-only access is enough).")


async def drift_state(redis_url: str, task: str) -> dict[str, Any]:
    """The task's threshold, each bank's newest summary, the retraining signals, the
    newest evaluations and the pause, as ``fedq drift --json`` prints them."""
    from aggregator.store import RedisModelStore, connect_redis

    store = RedisModelStore(connect_redis(redis_url))
    try:
        spec = await store.get_spec(task)
        if spec.monitoring is None:
            raise ConfigError(
                f"task {task!r} has no monitoring in its spec (`fedq task init --monitoring`)"
            )
        m = store.monitoring
        return {
            "task": task,
            "psi_threshold": spec.monitoring.psi_threshold,
            "min_rows": spec.monitoring.min_rows,
            "on_drift": spec.monitoring.on_drift,
            "banks": await m.drift(task),
            "retrain_signals": await m.retrain_signals(task),
            "evaluations": await m.evaluations(task),
            "paused": await m.paused(task),
            "head": await store.head(task),
        }
    finally:
        await store.close()


@click.command()
@task_option
@json_option
@store_option
def drift(task: str, as_json: bool, redis_url: str) -> None:
    """Drift per bank and feature (PSI, KS), the retraining signals, the pause."""
    state = asyncio.run(drift_state(redis_url, task))
    if as_json:
        click.echo(json.dumps(state, indent=2, sort_keys=True))
        return
    console = Console(soft_wrap=True, highlight=False)
    threshold = state["psi_threshold"]
    paused = state["paused"]
    console.print(
        f"[bold]{task}[/]: head {state['head']}; PSI threshold {threshold:g} (at least "
        f"{state['min_rows']} recent rows); on drift: {state['on_drift']}; training "
        + (f"[yellow]paused[/] since version {paused.get('version')}" if paused else "running")
    )
    banks: dict[str, Any] = state["banks"]
    if not banks:
        console.print("no drift summary yet: banks report every monitoring.interval_s")
        return
    names = sorted({f for b in banks.values() for f in b["features"]})
    table = Table("feature", *banks, title="PSI (KS) of each bank's recent rows")
    for name in [*names, SCORE]:
        cells = []
        for b in banks.values():
            d = b["score"] if name == SCORE else b["features"].get(name)
            cells.append(_cell(d, name in b["drifted"]))
        table.add_row(name, *cells)
    table.add_row("rows", *(str(b["rows"]) for b in banks.values()))
    table.add_row("version", *(str(b["version"]) for b in banks.values()))
    table.add_row("age", *(_age(b["at"]) for b in banks.values()))
    console.print(table)
    for name, b in banks.items():
        if b["drifted"]:
            console.print(f"[red]drift[/] at {name}: {', '.join(b['drifted'])}")
    signals = state["retrain_signals"]
    console.print(
        f"retraining signals: {len(signals)}"
        + (
            f" (newest: {signals[-1]['participant']}, {', '.join(signals[-1]['drifted'])})"
            if signals
            else ""
        )
    )


def _cell(d: dict[str, Any] | None, over: bool) -> str:
    if d is None:
        return "-"
    text = f"{d['psi']:.3f}" + (f" ({d['ks']:.2f})" if d.get("ks") is not None else "")
    return f"[red]{text}[/]" if over else text


def _age(at: float) -> str:
    seconds = max(0.0, time.time() - float(at))
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


@click.command("pause")
@task_option
@click.option("--note", default="", help="Why (kept with the pause).")
@redis_option("The model store (the aggregator reads the pause from it).")
def pause(task: str, note: str, redis_url: str) -> None:
    """Pause the task's training: updates are refused training_paused until resumed."""

    async def run() -> tuple[bool, int | None]:
        from aggregator.store import RedisModelStore, connect_redis

        store = RedisModelStore(connect_redis(redis_url))
        try:
            head = await store.head(task)
            if head is None:
                raise ConfigError(f"task {task!r} is not in the store")
            if (await store.get_spec(task)).secure_aggregation is not None:
                raise ConfigError(
                    f"task {task!r} uses secure aggregation: its cohorts take one masked "
                    "update per bank and cannot wait for a pause; it cannot be paused"
                )
            return await store.monitoring.pause(task, time.time(), head, note), head
        finally:
            await store.close()

    done, head = asyncio.run(run())
    click.echo(f"{task}: training paused at version {head}" if done else f"{task}: already paused")


@click.command("resume")
@task_option
@redis_option("The model store (the aggregator reads the pause from it).")
def resume(task: str, redis_url: str) -> None:
    """Resume the task's training after ``fedq task pause``."""

    async def run() -> bool:
        from aggregator.store import RedisModelStore, connect_redis

        store = RedisModelStore(connect_redis(redis_url))
        try:
            if await store.head(task) is None:
                raise ConfigError(f"task {task!r} is not in the store")
            return await store.monitoring.resume(task)
        finally:
            await store.close()

    click.echo(f"{task}: training resumed" if asyncio.run(run()) else f"{task}: was not paused")
