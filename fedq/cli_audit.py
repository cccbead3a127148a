"""``fedq replay``, ``fedq audit show``, ``fedq export``: what auditors run."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from common.errors import FedqError
from fedq.cli_common import (
    amqp_option,
    file_option,
    json_option,
    redis_option,
    target_options,
    task_option,
)

if TYPE_CHECKING:
    from aggregator.audit.replay import ReplayReport
    from aggregator.store import RedisModelStore

store_option = redis_option("The model store (read-only access is enough).")


@asynccontextmanager
async def _store(redis_url: str) -> AsyncIterator[RedisModelStore]:
    from aggregator.store import RedisModelStore, connect_redis

    store = RedisModelStore(connect_redis(redis_url))
    try:
        yield store
    finally:
        await store.close()


@click.command()
@task_option
@click.option("--from-version", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--to-version", default=None, type=click.IntRange(min=0), help="Default: the head.")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check every version's parameter hash and chained hash against the store.",
)
@click.option(
    "--exclude",
    default=None,
    metavar="PARTICIPANT",
    help="Rebuild the chain without this participant's updates (counterfactual).",
)
@file_option("--data", help="With --exclude: evaluate both models on this CSV or Parquet.")
@target_options(
    "With --data: the target column, if not the task's.", "With --target: the value of class 1."
)
@file_option("--out", help="With --exclude: write the counterfactual model (safetensors).")
@json_option
@amqp_option("The broker holding the audit stream.")
@store_option
def replay(
    task: str,
    from_version: int,
    to_version: int | None,
    verify: bool,
    exclude: str | None,
    data: Path | None,
    target: str | None,
    positive: str | None,
    out: Path | None,
    as_json: bool,
    amqp_url: str,
    redis_url: str,
) -> None:
    """Re-apply the retained updates and reproduce every version bit for bit.

    Exit status 0 only when every version matches; otherwise the first version that
    diverges is named with the reason.
    """
    ok = asyncio.run(
        _replay(
            task,
            from_version,
            to_version,
            verify,
            exclude,
            (data, target, positive),
            out,
            as_json,
            amqp_url,
            redis_url,
        )
    )
    sys.exit(0 if ok else 1)


async def _replay(
    task: str,
    from_version: int,
    to_version: int | None,
    verify: bool,
    exclude: str | None,
    evaluation: tuple[Path | None, str | None, str | None],
    out: Path | None,
    as_json: bool,
    amqp_url: str,
    redis_url: str,
) -> bool:
    from aggregator.audit.replay import index_updates
    from aggregator.audit.replay import replay as run_replay
    from common.transport.amqp import AmqpTransport

    console = Console(stderr=as_json)
    async with _store(redis_url) as store:
        transport = await AmqpTransport.connect(amqp_url, name="fedq-replay")
        try:
            bodies = [b async for b in transport.read_audit(task)]
        finally:
            await transport.close()
        updates = index_updates(bodies)
        console.print(f"audit stream: {len(bodies)} messages, {len(updates)} distinct updates")
        head = await store.head(task)
        last = head if to_version is None else to_version
        with Progress(console=console, transient=True) as bar:
            job = bar.add_task("replaying", total=max((last or 0) - from_version, 1))
            report = await run_replay(
                store,
                updates,
                task,
                from_version=from_version,
                to_version=to_version,
                exclude=exclude,
                on_version=lambda _: bar.advance(job),
            )
        result: dict[str, Any] = {
            "task": task,
            "from_version": report.from_version,
            "to_version": report.to_version,
            "checked": report.checked,
            "signatures": report.signatures,
            "ok": report.ok,
            "first_bad_version": report.first_bad_version,
            "reason": report.reason,
        }
        if exclude is not None:
            result.update(await _counterfactual(store, task, report, evaluation, out))
            if report.note:
                result["note"] = report.note
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif report.ok:
        what = "rebuilt" if exclude else "verified"
        console.print(
            f"[green]{what} versions {report.from_version + 1}..{report.to_version}[/] "
            f"({report.checked} versions, {report.signatures} update signatures verified)"
        )
        if report.note:
            console.print(f"[yellow]note:[/] {report.note}")
    else:
        console.print(f"[red]version {report.first_bad_version} diverges:[/] {report.reason}")
    return report.ok or not verify


async def _counterfactual(
    store: RedisModelStore,
    task: str,
    report: ReplayReport,
    evaluation: tuple[Path | None, str | None, str | None],
    out: Path | None,
) -> dict[str, Any]:
    """What ``--exclude`` adds to the result: hashes, scores on ``--data``, ``--out``."""
    from aggregator.audit.counterfactual import Counterfactual

    real = (await store.get_params(task, report.to_version)).tensors
    counterfactual = Counterfactual(task, report, real)
    result = counterfactual.summary()
    data, target, positive = evaluation
    if data is not None:
        from common.spec import TargetSpec
        from participant.data import encode, load_table

        spec = await store.get_spec(task)
        if target is not None:
            spec = spec.model_copy(update={"target": TargetSpec(name=target, positive=positive)})
        x, y = encode(load_table(data), spec)
        result["metrics"] = counterfactual.evaluate(spec, x, y)
    if out is not None:
        counterfactual.save(out)
        result["out"] = str(out)
    return result


@click.group()
def audit() -> None:
    """Inspect what went into each version."""


@audit.command("show")
@task_option
@click.option("--version", "version", required=True, type=click.IntRange(min=0))
@json_option
@store_option
def audit_show(task: str, version: int, as_json: bool, redis_url: str) -> None:
    """A version's lineage: parent, contributing updates, refusals in its window."""
    from aggregator.audit.lineage import version_lineage

    async def load() -> dict[str, Any]:
        async with _store(redis_url) as store:
            return await version_lineage(store, task, version)

    doc = asyncio.run(load())
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    console = Console()
    console.print(
        f"[bold]{task}[/] version {version} (parent {doc['parent']}), strategy {doc['strategy']}"
    )
    console.print(f"version hash {doc['version_hash']}\nparam hash   {doc['param_hash']}")
    if doc.get("optimizer"):
        o = doc["optimizer"]
        console.print(
            f"optimizer    {o['kind']} (lr {o['lr']}, beta1 {o['beta1']}, beta2 {o['beta2']}, "
            f"tau {o['tau']})\nstate hash   {doc['state_hash']}"
        )
    if doc.get("privacy"):
        console.print(_privacy_line(doc["privacy"]))
    table = Table(title="contributing updates")
    for col in ("participant", "update id", "base", "staleness", "weight", "content hash"):
        table.add_column(col)
    for u in doc["updates"]:
        table.add_row(
            u["participant"],
            u["update_id"],
            str(u["base_version"]),
            str(u["staleness"]),
            f"{u['weight']:.6g}",
            u["content_hash"][:16],
        )
    console.print(table)
    if doc["refusals"]:
        refused = Table(title="refused while this version was being made")
        for col in ("participant", "update id", "reason", "detail"):
            refused.add_column(col)
        for r in doc["refusals"]:
            refused.add_row(
                r.get("participant", "-"), r.get("update_id", "-"), r["reason"], r.get("detail", "")
            )
        console.print(refused)
    else:
        console.print("no refusals in this window")


def _privacy_line(p: dict[str, Any]) -> str:
    """``audit show``'s bank-level DP lines: the cumulative epsilon and the mechanism."""
    clip = f"clip bound {p['clip']:.6g}"
    if p.get("adaptive"):
        clip += f" (adaptive, next {p['next_clip']:.6g}, target quantile {p['target_quantile']})"
    return (
        f"privacy      epsilon {p['epsilon']:.6g} (cumulative over {p['versions']} private "
        f"versions), delta {p['delta']:.3g}\n"
        f"             noise multiplier {p['noise_multiplier']:.6g}, noise std "
        f"{p['noise_std']:.6g}, {clip}, clipped {p['clipped_fraction']:.0%} of the updates, "
        f"seed {p['seed']}"
    )


@click.command("export")
@task_option
@click.option(
    "--version", "version", default=None, type=click.IntRange(min=0), help="Default: the head."
)
@file_option(
    "--out", required=True, help="model.safetensors (the spec goes to model.spec.json beside it)."
)
@store_option
def export(task: str, version: int | None, out: Path, redis_url: str) -> None:
    """Export a version for serving: safetensors plus the spec to rebuild the module."""
    from aggregator.audit.export import export_version, spec_path

    async def run() -> dict[str, str]:
        async with _store(redis_url) as store:
            v = version if version is not None else await store.head(task)
            if v is None:
                raise FedqError(f"task {task!r} has no versions")
            return await export_version(store, task, v, out)

    meta = asyncio.run(run())
    Console().print(
        f"{out} and {spec_path(out)}: {task} version {meta['version']}, "
        f"version hash {meta['version_hash'][:16]}"
    )
