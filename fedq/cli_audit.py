"""``fedq replay``, ``fedq audit show``, ``fedq audit contributions``, ``fedq export``:
what auditors run."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
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
    from aggregator.audit.contributions import ContributionReport
    from aggregator.audit.replay import ReplayReport
    from aggregator.store import RedisModelStore
    from common.spec import TaskSpec
    from common.transport import Chunking

store_option = redis_option("The model store (read-only access is enough).")


async def audit_stream(
    amqp_url: str, task: str, name: str, spec: TaskSpec | None = None
) -> AsyncGenerator[bytes, None]:
    """The task's audit stream, oldest first; the broker is reached only once it is read
    (a command that may not need it never connects). With ``spec``, chunk sets as large
    as the task's own updates are reassembled (:func:`fedq.services.chunking_for`)."""
    from common.transport.amqp import AmqpTransport

    transport = await AmqpTransport.connect(
        amqp_url, name=name, chunking=_chunking(spec) if spec is not None else None
    )
    try:
        async for body in transport.read_audit(task):
            yield body
    finally:
        await transport.close()


def _chunking(spec: TaskSpec) -> Chunking:
    """The chunking of a transport that reads the task's audit stream: its largest
    body is the task's largest update (a 100M-parameter model's is 400 MB), not the
    64 MiB default."""
    from fedq.services import chunking_for

    return chunking_for(spec)


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
    from aggregator.audit.replay import index_answers, index_updates
    from aggregator.audit.replay import replay as run_replay
    from common.transport.amqp import AmqpTransport

    console = Console(stderr=as_json)
    async with _store(redis_url) as store:
        transport = await AmqpTransport.connect(
            amqp_url, name="fedq-replay", chunking=_chunking(await store.get_spec(task))
        )
        try:
            bodies = [b async for b in transport.read_audit(task)]
        finally:
            await transport.close()
        updates, answers = index_updates(bodies), index_answers(bodies)
        console.print(
            f"audit stream: {len(bodies)} messages, {len(updates)} distinct updates"
            + (f", {len(answers)} unmask answers" if answers else "")
        )
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
                answers=answers,
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
            "secure_versions": report.secure_versions,
            "answer_signatures": report.answer_signatures,
            "failed_cohorts": report.failed_cohorts,
            "cohorts_checked": report.cohorts_checked,
            "individually_unmasked": report.individually_unmasked,
            "cohort_problems": report.cohort_problems,
        }
        if exclude is not None:
            retained = (updates, answers)
            result.update(await _counterfactual(store, task, report, retained, evaluation, out))
        if report.note:
            result["note"] = report.note
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif report.ok:
        what = "rebuilt" if exclude else "verified"
        failed = (
            f", {report.failed_cohorts} failed cohorts (parameters unchanged)"
            if report.failed_cohorts
            else ""
        )
        secure = (
            f", {report.secure_versions} by secure aggregation ({report.answer_signatures} "
            f"unmask answers verified, {report.cohorts_checked} cohorts checked){failed}"
            if report.secure_versions or report.cohorts_checked or report.failed_cohorts
            else ""
        )
        console.print(
            f"[green]{what} versions {report.from_version + 1}..{report.to_version}[/] "
            f"({report.checked} versions, {report.signatures} update signatures verified"
            f"{secure})"
        )
        if report.note:
            console.print(f"[yellow]note:[/] {report.note}")
    else:
        if report.first_bad_version is not None:
            console.print(f"[red]version {report.first_bad_version} diverges:[/] {report.reason}")
        for bank in report.individually_unmasked:
            console.print(f"[red]individually unmasked:[/] {bank}")
        for problem in report.cohort_problems:
            console.print(f"[red]secure aggregation:[/] {problem}")
    return report.ok or not verify


async def _counterfactual(
    store: RedisModelStore,
    task: str,
    report: ReplayReport,
    retained: tuple[Mapping[str, bytes], Mapping[str, Sequence[bytes]]],
    evaluation: tuple[Path | None, str | None, str | None],
    out: Path | None,
) -> dict[str, Any]:
    """What ``--exclude`` adds to the result: hashes, scores on ``--data``, ``--out``."""
    from aggregator.audit.counterfactual import Counterfactual
    from aggregator.audit.rebuild import rebuild

    updates, answers = retained
    # The real model: stored, or rebuilt when retention pruned it (checkpoints).
    real = (await rebuild(store, task, report.to_version, updates, answers=answers)).params
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
            doc = await version_lineage(store, task, version)
            # Secure aggregation (aggregator.secagg.SecureRecord): cohort, survivors,
            # dropped, answers used, sum hash; None for a version made without it.
            info = (await store.get_version(task, version)).info
            doc["secagg"] = info.get("secagg")
            # A cohort whose sum could not be trusted: cohort, reason, and its
            # decision (survivors, dropped) when it had one; None otherwise.
            doc["secagg_failed"] = info.get("secagg_failed")
            return doc

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
    if doc.get("secagg"):
        console.print(_secagg_lines(doc["secagg"]))
    if doc.get("secagg_failed"):
        console.print(_failed_lines(doc["secagg_failed"]), markup=False)
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


@audit.command("contributions")
@task_option
@file_option(
    "--data",
    help="Holdout CSV or Parquet with the task's features and target: every model is "
    "scored on it (required).",
)
@target_options(
    "With --data: the target column, if not the task's.", "With --target: the value of class 1."
)
@click.option(
    "--metric",
    type=click.Choice(["auc", "loss"]),
    default="auc",
    show_default=True,
    help="auc: ROC AUC; loss: the negative log loss (higher is better).",
)
@click.option(
    "--permutations",
    default=50,
    show_default=True,
    type=click.IntRange(min=2),
    help="Orders of the banks sampled (truncated Monte Carlo Shapley).",
)
@click.option(
    "--exact",
    is_flag=True,
    help="Average over every order of the banks instead (at most 6 banks): no sampling error.",
)
@click.option(
    "--truncation",
    default=0.001,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="Along an order, stop replaying once the value is this close to the full "
    "model's (in the metric's units); the values then sum to the full gain within it.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Seed of the sampled permutations: the same seed gives the same values.",
)
@click.option("--to-version", default=None, type=click.IntRange(min=0), help="Default: the head.")
@json_option
@amqp_option("The broker holding the audit stream.")
@store_option
def audit_contributions(
    task: str,
    data: Path | None,
    target: str | None,
    positive: str | None,
    metric: str,
    permutations: int,
    exact: bool,
    truncation: float,
    seed: int,
    to_version: int | None,
    as_json: bool,
    amqp_url: str,
    redis_url: str,
) -> None:
    """Each bank's leave-one-out and Shapley value, over replayed coalitions.

    The value of a coalition of banks is the metric, on --data, of the model replayed
    from the recorded updates of those banks only (docs/audit.md, Contributions).
    """
    if data is None:
        raise FedqError(
            "a holdout set is needed: each coalition's model is valued by its metric on "
            "held-out rows the banks did not train on; give --data holdout.csv (the "
            "task's features and target)"
        )
    console = Console(stderr=as_json)
    report = asyncio.run(
        _contributions(
            task,
            (data, target, positive),
            metric,
            (permutations, exact, truncation, seed),
            to_version,
            console,
            amqp_url,
            redis_url,
        )
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_contributions(console, report)


async def _contributions(
    task: str,
    evaluation: tuple[Path, str | None, str | None],
    metric: str,
    estimator: tuple[int, bool, float, int],
    to_version: int | None,
    console: Console,
    amqp_url: str,
    redis_url: str,
) -> ContributionReport:
    from aggregator.audit.contributions import Holdout, replay_contributions
    from aggregator.audit.replay import index_answers, index_updates
    from common.spec import TargetSpec
    from common.transport.amqp import AmqpTransport
    from participant.data import encode, load_table

    data, target, positive = evaluation
    permutations, exact, truncation, seed = estimator
    async with _store(redis_url) as store:
        spec = await store.get_spec(task)
        if target is not None:
            spec = spec.model_copy(update={"target": TargetSpec(name=target, positive=positive)})
        x, y = encode(load_table(data), spec)
        holdout = Holdout(spec, x, y, "auc" if metric == "auc" else "loss")
        transport = await AmqpTransport.connect(
            amqp_url, name="fedq-contributions", chunking=_chunking(spec)
        )
        try:
            bodies = [b async for b in transport.read_audit(task)]
        finally:
            await transport.close()
        updates, answers = index_updates(bodies), index_answers(bodies)
        console.print(f"audit stream: {len(bodies)} messages, {len(updates)} distinct updates")
        with console.status("replaying coalitions") as status:
            return await replay_contributions(
                store,
                updates,
                task,
                holdout,
                answers=answers,
                to_version=to_version,
                permutations=permutations,
                truncation=truncation,
                seed=seed,
                exact=exact,
                metric=holdout.description,
                on_replay=lambda n: status.update(f"replaying coalitions ({n} valued)"),
            )


def _print_contributions(console: Console, report: ContributionReport) -> None:
    """The per-bank table, the estimator, the sum check and the caveat."""
    from aggregator.audit.contributions import CAVEAT

    console.print(
        f"[bold]{report.task}[/] version {report.to_version}: {report.metric}\n"
        f"all banks {report.value_all:.4f}, no bank (version 0) {report.value_empty:.4f}, "
        f"gain {report.gain:+.4f}"
    )
    table = Table(title="contributions")
    for col in ("bank", "updates", "leave-one-out", "Shapley", "± s.e.", "share of gain"):
        table.add_column(col, justify="left" if col == "bank" else "right")
    for b in report.banks:
        share = f"{report.shapley[b] / report.gain:.1%}" if report.gain else "-"
        table.add_row(
            b,
            str(report.updates.get(b, 0)),
            f"{report.leave_one_out[b]:+.4f}",
            f"{report.shapley[b]:+.4f}",
            "exact" if report.exact else f"{report.stderr[b]:.4f}",
            share,
        )
    console.print(table)
    if report.exact:
        how = f"exact: every order of the {len(report.banks)} banks ({report.permutations} orders)"
    else:
        how = (
            f"truncated Monte Carlo Shapley: {report.permutations} permutations, seed "
            f"{report.seed}, truncation {report.truncation:g} ({report.truncated} marginal "
            "gains truncated); ± is the Monte Carlo standard error"
        )
    console.print(f"estimator: {how}; {report.evaluations} coalitions valued")
    bound = f"at most {report.efficiency_bound:g} by truncation" if report.truncated else "exact"
    console.print(
        f"sum check: Shapley values sum to {report.shapley_sum:+.6f}, all banks minus no "
        f"bank is {report.gain:+.6f}, gap {report.efficiency_gap:+.2e} ({bound})"
    )
    console.print(f"[yellow]caveat:[/] {CAVEAT}", markup=True)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")


@audit.command("report")
@task_option
@click.option(
    "--version", "version", default=None, type=click.IntRange(min=0), help="Default: the head."
)
@file_option(
    "--data",
    help="The auditor's labelled holdout CSV or Parquet (the task's features and target): "
    "the ROC, PR and calibration curves, KS and the banks' contribution values are "
    "computed on it. Without it the page has no evaluation.",
)
@target_options(
    "With --data: the target column, if not the task's.", "With --target: the value of class 1."
)
@click.option(
    "--contributions/--no-contributions",
    default=True,
    show_default=True,
    help="With --data: each bank's leave-one-out and Shapley value over replayed "
    "coalitions (as fedq audit contributions; exact up to 5 banks).",
)
@file_option("--out", required=True, help="The page to write (report.html).")
@amqp_option("The broker holding the audit stream.")
@store_option
def audit_report(
    task: str,
    version: int | None,
    data: Path | None,
    target: str | None,
    positive: str | None,
    contributions: bool,
    out: Path,
    amqp_url: str,
    redis_url: str,
) -> None:
    """One self-contained HTML page for a model-risk reviewer (docs/report.md).

    The task spec and its hash, the lineage (versions, updates per bank, refusals by
    reason), replay and signature verification, per-bank contributions and reported
    metrics, evaluation on --data (ROC, PR, calibration, KS), privacy cost, settings.
    """
    from fedq.report_html import render

    report = asyncio.run(
        _gather_report(task, version, (data, target, positive), contributions, amqp_url, redis_url)
    )
    try:
        out.write_text(render(report), encoding="utf-8")
    except OSError as err:
        raise FedqError(f"cannot write {str(out)!r}: {err.strerror or err}") from err
    v = report.verification
    status = "verified" if v.ok else "NOT verified"
    auc = report.evaluation.risk.get("auc") if report.evaluation else None
    Console().print(
        f"{out}: {task} version {report.version}, replay {status}"
        + (f", holdout AUC {auc:.4f}" if auc is not None else "")
    )


async def _gather_report(
    task: str,
    version: int | None,
    evaluation: tuple[Path | None, str | None, str | None],
    contributions: bool,
    amqp_url: str,
    redis_url: str,
) -> Any:
    from fedq.report import HoldoutData, ReportError, gather

    data, target, positive = evaluation
    async with _store(redis_url) as store:
        head = await store.head(task)
        if head is None:
            raise ReportError(f"task {task!r} has no versions in the store")
        if version is not None and version > head:
            raise ReportError(f"task {task!r} has no version {version} (versions 0..{head})")
        spec = await store.get_spec(task)
        holdout = None
        if data is not None:
            from common.spec import TargetSpec
            from participant.data import encode, load_table

            if target is not None:
                spec = spec.model_copy(
                    update={"target": TargetSpec(name=target, positive=positive)}
                )
            x, y = encode(load_table(data), spec)
            holdout = HoldoutData(str(data), x, y)
        stream = audit_stream(amqp_url, task, "fedq-report", spec)
        bodies = [b async for b in stream]
        return await gather(store, task, version, bodies, holdout, contributions=contributions)


def _privacy_line(p: dict[str, Any]) -> str:
    """``audit show``'s bank-level DP lines: the cumulative epsilon and the mechanism."""
    clip = f"clip bound {p['clip']:.6g}"
    if p.get("adaptive"):
        clip += f" (adaptive, next {p['next_clip']:.6g}, target quantile {p['target_quantile']})"
    fraction = p.get("clipped_fraction")
    clipped = (
        "each bank clipped its own update (secure aggregation)"
        if fraction is None
        else f"clipped {fraction:.0%} of the updates"
    )
    return (
        f"privacy      epsilon {p['epsilon']:.6g} (cumulative over {p['versions']} private "
        f"versions), delta {p['delta']:.3g}\n"
        f"             noise multiplier {p['noise_multiplier']:.6g}, noise std "
        f"{p['noise_std']:.6g}, {clip}, {clipped}, seed {p['seed']}"
    )


def _secagg_lines(sa: dict[str, Any]) -> str:
    """``audit show``'s secure aggregation lines: the cohort, who survived and who
    dropped, the unmask answers used and the hash of the unmasked sum."""
    survivors, dropped = sa.get("survivors", []), sa.get("dropped", [])
    answers = [f"{p} ({i})" for p, i in sa.get("answers", [])]
    return (
        f"secure aggregation: cohort {sa.get('cohort')}, threshold {sa.get('threshold')}, "
        f"scale {sa.get('scale')}\n"
        f"             survivors ({len(survivors)}) {', '.join(survivors) or '-'}\n"
        f"             dropped ({len(dropped)}) {', '.join(dropped) or '-'}\n"
        f"             answers used ({len(answers)}) {', '.join(answers) or '-'}\n"
        f"             sum hash {sa.get('sum_hash')}"
    )


def _failed_lines(failed: Any) -> str:
    """``audit show``'s lines for a version committed for a cohort whose sum could not
    be trusted: the cohort, why, and the decision when the cohort had one."""
    if not isinstance(failed, dict):
        return f"secure aggregation: failed cohort (unreadable record {failed!r})"
    lines = [
        f"secure aggregation: cohort {failed.get('cohort')} FAILED, parameters unchanged "
        "(no update)",
        f"             reason {failed.get('reason', '-')}",
    ]
    for key in ("survivors", "dropped"):
        names = failed.get(key)
        if isinstance(names, list):
            lines.append(f"             {key} ({len(names)}) {', '.join(map(str, names)) or '-'}")
    return "\n".join(lines)


@click.command("export")
@task_option
@click.option(
    "--version", "version", default=None, type=click.IntRange(min=0), help="Default: the head."
)
@file_option(
    "--out",
    required=True,
    help="model.safetensors, or model.onnx (the spec goes to model.spec.json beside it).",
)
@amqp_option(
    "The broker holding the audit stream: read only to rebuild a version whose "
    "parameters retention pruned (checkpoints)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "onnx"]),
    default="safetensors",
    show_default=True,
    help="onnx: one model with the spec's preprocessing inside (docs/export.md).",
)
@store_option
def export(
    task: str, version: int | None, out: Path, fmt: str, amqp_url: str, redis_url: str
) -> None:
    """Export a version for serving: safetensors plus the spec to rebuild the module,
    or (``--format onnx``) an ONNX model that takes the raw columns.

    A version whose parameters were pruned (``--checkpoint-every``) is rebuilt from the
    nearest kept version and the retained updates, every version checked."""
    from aggregator.audit.export import export_version, spec_path

    async def run(path: Path) -> dict[str, str]:
        async with _store(redis_url) as store:
            v = version if version is not None else await store.head(task)
            if v is None:
                raise FedqError(f"task {task!r} has no versions")
            stream = audit_stream(amqp_url, task, "fedq-export", await store.get_spec(task))
            try:
                return await export_version(store, task, v, path, updates=stream)
            finally:
                await stream.aclose()

    if fmt == "onnx":
        import tempfile

        from fedq.onnx_export import write_onnx

        with tempfile.TemporaryDirectory(prefix="fedq-export-") as staging:
            staged = Path(staging) / "model.safetensors"
            asyncio.run(run(staged))
            meta = write_onnx(staged, out)
    else:
        meta = asyncio.run(run(out))
    Console().print(
        f"{out} and {spec_path(out)}: {task} version {meta['version']}, "
        f"version hash {meta['version_hash'][:16]}"
    )
