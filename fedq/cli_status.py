"""``fedq status``: the operator's live view of one aggregator, from its HTTP /status.

The aggregator serves the document (aggregator/status.py, docs/status.md); this
command needs its URL only, no Redis or RabbitMQ credentials. It imports no server
client: the HTTP request is the standard library's.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from common.errors import FedqError

#: The schema this command reads (aggregator/status.py SCHEMA).
SCHEMA = 1
SERVICE = "fedq-aggregator"
DEFAULT_URL = "http://127.0.0.1:9108"


class StatusError(FedqError):
    """The aggregator's status could not be read: unreachable, or not a fedq aggregator."""


def status_url(url: str) -> str:
    """``/status`` under ``url`` (an aggregator's base URL, or its /status itself)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StatusError(f"--url {url!r} is not an http:// or https:// URL")
    path = parts.path.rstrip("/")
    if not path.endswith("/status"):
        path += "/status"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def fetch(url: str, timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
    """The body as served and the document, checked to be a fedq aggregator's status of
    a schema this command reads. Raises StatusError saying why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - http(s) only
            raw = r.read()
    except urllib.error.HTTPError as e:
        e.close()
        raise StatusError(
            f"{url} answered HTTP {e.code} {e.reason}: not a fedq aggregator's /status"
        ) from e
    except (urllib.error.URLError, OSError) as e:
        why = e.reason if isinstance(e, urllib.error.URLError) else e
        raise StatusError(f"cannot reach {url}: {why}") from e
    try:
        body = raw.decode()
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StatusError(f"{url} did not answer JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("service") != SERVICE:
        raise StatusError(f"{url} answered JSON that is not a fedq aggregator's status")
    if doc.get("schema") != SCHEMA:
        raise StatusError(
            f"{url} serves status schema {doc.get('schema')!r}; this fedq reads schema {SCHEMA}"
        )
    return body, doc


# ------------------------------------------------------------------ rendering


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _clock(unix: float | None) -> str:
    if unix is None:
        return "-"
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _reasons(refused: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in refused.items()) or "-"


def header(doc: Mapping[str, Any]) -> Panel:
    """The task, the lease, the head, the queue, the totals."""
    lease, head, queue = doc["lease"], doc["head"], doc["queue"]
    totals, privacy = doc["totals"], doc["privacy"]["bank"]
    role = doc["role"]
    lines = Table.grid(padding=(0, 2))
    lines.add_column(style="bold")
    lines.add_column()
    mode = f"{doc['mode']} / {doc['strategy']}"
    if doc.get("secure_aggregation"):
        mode += " / secure aggregation"
    lines.add_row("mode", mode)
    lines.add_row(
        "role",
        Text.assemble(
            (role, "green" if role == "active" else "yellow"),
            f"  owner {doc['owner']}  (lease {lease['state']})",
        ),
    )
    standbys = doc["standbys"]
    lines.add_row(
        "lease",
        f"holder {lease['holder'] or '-'}"
        + (f"  fence {lease['fence']}" if lease["fence"] is not None else "")
        + f"  standbys {', '.join(standbys) if standbys else '-' if standbys == [] else '?'}",
    )
    rate = head["versions_per_s"]
    lines.add_row(
        "head",
        f"version {_num(head['version'], '{}')}"
        + ("" if rate is None else f"  {rate:.2f} versions/s over {head['window_s']:.0f}s"),
    )
    lines.add_row(
        "queue", f"{_num(queue['waiting'], '{}')} waiting  {queue['unacked']} held unacked"
    )
    if totals is not None:
        refused = totals["refused"]
        lines.add_row(
            "updates",
            f"{totals['accepted']} accepted  {sum(refused.values())} refused"
            + (f" ({_reasons(refused)})" if refused else ""),
        )
    if privacy is not None:
        lines.add_row(
            "privacy",
            f"bank-level DP: epsilon {privacy['epsilon']:.3f} at delta "
            f"{_num(privacy['delta'], '{:g}')} after {privacy['versions']} private versions",
        )
    uptime = doc["now"] - doc["started_at"]
    lines.add_row("started", f"{_clock(doc['started_at'])} ({_ago(uptime).replace(' ago', '')})")
    monitoring = doc.get("monitoring")
    if monitoring is not None:
        paused = monitoring["paused"]
        lines.add_row(
            "training",
            Text(f"paused at version {paused.get('version')}", style="yellow")
            if paused
            else Text("running"),
        )
        lines.add_row(
            "drift",
            f"PSI threshold {monitoring['psi_threshold']:g}, on drift: {monitoring['on_drift']}, "
            f"retraining signals {_num(monitoring['retrain_signals'], '{}')}",
        )
    if doc.get("error"):
        lines.add_row(Text("error", style="bold red"), Text(str(doc["error"]), style="red"))
    return Panel(lines, title=f"fedq status: task {doc['task']}", title_align="left", expand=False)


def bank_table(doc: Mapping[str, Any]) -> Table:
    """One row per bank: its activity as this aggregator settled it."""
    privacy = doc["privacy"]["bank"] is not None
    table = Table(expand=False)
    table.add_column("bank", style="bold")
    table.add_column("last update")
    table.add_column("accepted", justify="right")
    table.add_column("refused (by reason)")
    table.add_column("staleness last / mean", justify="right")
    table.add_column("weight share", justify="right")
    table.add_column("flags")
    if privacy:
        table.add_column("epsilon", justify="right")
    monitoring = doc.get("monitoring") is not None
    if monitoring:
        table.add_column("drift (max PSI / score PSI)")
    for bank in doc["banks"]:
        flags = ", ".join(bank["flag_reasons"]) or ("low weight" if bank["low_weight"] else "")
        row = [
            bank["participant"],
            _ago(bank["age_s"]),
            str(bank["accepted"]),
            _reasons(bank["refused"]),
            f"{_num(bank['staleness_last'], '{}')} / {_num(bank['staleness_mean'])}",
            f"{100 * bank['weight_share']:.1f}%",
            Text(flags, style="red") if flags else "",
        ]
        if privacy:
            row.append(_num(bank["epsilon"], "{:.3f}"))
        if monitoring:
            row.append(_drift_cell(bank.get("drift")))
        table.add_row(*row)
    return table


def _drift_cell(drift: Mapping[str, Any] | None) -> Text:
    if drift is None:
        return Text("-")
    text = f"{_num(drift['max_feature_psi'], '{:.3f}')} / {_num(drift['score_psi'], '{:.3f}')}"
    if drift["drifted"]:
        return Text(f"{text}  {', '.join(drift['drifted'])}", style="red")
    return Text(text)


def render(doc: Mapping[str, Any], problem: str | None = None) -> RenderableType:
    """One frame: the header panel, then the banks (a standby has none: it says where
    they are), then ``problem`` (the last refresh failed) if any."""
    parts: list[RenderableType] = [header(doc)]
    if doc["role"] == "active":
        parts.append(bank_table(doc))
    else:
        holder = doc["lease"]["holder"] or "nobody yet"
        parts.append(Text(f"standby: the lease holder ({holder}) settles the banks' updates"))
    if problem is not None:
        parts.append(Text(f"refresh failed: {problem}", style="bold red"))
    return Group(*parts)


# ------------------------------------------------------------------ the command


@click.command("status")
@click.option(
    "--url",
    default=DEFAULT_URL,
    show_default=True,
    envvar="FEDQ_STATUS_URL",
    help="The aggregator's HTTP address (its --http-port); /status is read under it.",
)
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the JSON document as served (docs/status.md), one per line each refresh.",
)
@click.option(
    "--interval",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.2),
    help="Seconds between refreshes.",
)
def status(url: str, once: bool, as_json: bool, interval: float) -> None:
    """A live view of one aggregator: task, lease, head, queue and every bank.

    Reads the aggregator's /status (HTTP, JSON): no Redis or RabbitMQ credentials.
    Ctrl-C ends it.
    """
    target = status_url(url)
    body, doc = fetch(target)
    try:
        if as_json:
            _print_json(target, body, once, interval)
        elif once:
            Console().print(render(doc))
        else:
            _live(target, doc, interval)
    except KeyboardInterrupt:
        pass


def _print_json(target: str, body: str, once: bool, interval: float) -> None:
    click.echo(body.strip())
    while not once:
        time.sleep(interval)
        body, _ = fetch(target)
        click.echo(body.strip())


def _live(target: str, doc: Mapping[str, Any], interval: float) -> None:
    with Live(render(doc), auto_refresh=False, screen=False) as live:
        while True:
            time.sleep(interval)
            try:
                _, doc = fetch(target)
                live.update(render(doc), refresh=True)
            except StatusError as e:  # keep the last frame; say why it is not fresh
                live.update(render(doc, str(e)), refresh=True)
