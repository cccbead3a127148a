"""``GET /status`` and ``fedq status``: checked against a real run, and piece by piece.

The real run: two ``fedq aggregator run`` processes on the shared servers (one holds
the lease, one waits as standby), updates published through RabbitMQ (three accepted,
one refused as a duplicate, one as too stale), then ``fedq status --once --json``
against each; its document must agree with the store, the decisions it recorded, and
what was sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner
from rich.console import Console

from aggregator.http import start_http
from aggregator.metrics import AggregatorMetrics
from aggregator.stats import ServiceStats
from aggregator.status import SCHEMA, SERVICE, BankActivity, StatusTracker, build_status
from aggregator.store import RedisModelStore, connect_redis
from common.hashing import LineageEntry
from common.refusals import Refusal
from common.spec import TaskSpec
from common.transport.amqp import AmqpTransport
from fedq.cli import main
from fedq.cli_status import render
from tests.helpers import AMQP_URL, REDIS_URL, encoded_update, forget_task, service_spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fedq(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedq", "--log-format", "json", *args]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def _entry(participant: str, staleness: int, weight: float = 1.0) -> LineageEntry:
    return LineageEntry(
        update_id=f"{participant}-{staleness}-{weight}",
        participant=participant,
        base_version=0,
        staleness=staleness,
        weight=weight,
        content_hash=bytes(32),
    )


# ------------------------------------------------------------- the real run


class Run:
    """Two aggregator processes of one task on the shared servers."""

    def __init__(self, spec: TaskSpec, tmp: Path) -> None:
        self.spec = spec
        self.tmp = tmp
        self.spec_file = tmp / "task.json"
        self.spec_file.write_text(spec.to_json())
        self.env = {**os.environ, "FEDQ_AMQP_URL": AMQP_URL, "FEDQ_REDIS_URL": REDIS_URL}
        self.procs: list[subprocess.Popen[str]] = []
        self.logs: list[Path] = []

    def start(self) -> str:
        """Start one aggregator; its base URL."""
        port = _free_port()
        args = ("--spec", str(self.spec_file), "--no-sender-check", "--http-host", "127.0.0.1")
        log = self.tmp / f"aggregator-{len(self.procs)}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                _fedq("aggregator", "run", *args, "--http-port", str(port)),
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=out,
                text=True,
            )
        self.procs.append(proc)
        self.logs.append(log)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if _get(f"{url}/status")[0] == 200:
                    return url
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("the aggregator's /status never answered")

    def stop(self) -> list[str]:
        """SIGTERM every process, newest first; what each wrote on stderr."""
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        return [log.read_text() for log in self.logs]


def status_json(url: str) -> dict[str, Any]:
    """``fedq status --once --json`` as the operator runs it: a separate process."""
    done = subprocess.run(
        _fedq("status", "--url", url, "--once", "--json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def wait_status(url: str, cond: Any, seconds: float = 30.0) -> dict[str, Any]:
    """Poll /status until ``cond(doc)``."""
    deadline = time.monotonic() + seconds
    while True:
        doc: dict[str, Any] = json.loads(_get(f"{url}/status")[1])
        if cond(doc) or time.monotonic() > deadline:
            return doc
        time.sleep(0.2)


async def publish(spec: TaskSpec, updates: list[tuple[str, str, bytes]]) -> None:
    bank = await AmqpTransport.connect(AMQP_URL, name="fedq-test-status")
    try:
        for participant, uid, body in updates:
            await bank.publish_update(spec.task_id, participant, body, message_id=uid)
    finally:
        await bank.close()


async def stored(spec: TaskSpec) -> tuple[int, Counter[str], Counter[tuple[str, str]], str]:
    """The store's head, accepted entries per bank, refusals per (bank, reason), lease owner."""
    r = connect_redis(REDIS_URL)
    store = RedisModelStore(r)
    try:
        head = await store.head(spec.task_id)
        assert head is not None
        records = await store.get_versions(spec.task_id, range(1, head + 1))
        accepted = Counter(e.participant for rec in records for e in rec.lineage)
        refused = Counter(
            (d.get("participant", ""), d["reason"])
            for d in await store.decisions(spec.task_id)
            if d.get("reason")
        )
        lease = await r.get(store.keys.lease(spec.task_id))
        assert isinstance(lease, bytes)
        return head, accepted, refused, lease.decode().rpartition(":")[0]
    finally:
        await store.close()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    spec = service_spec(staleness_unit="versions")  # max_staleness 2 versions
    r = Run(spec, tmp_path)
    try:
        yield r
    finally:
        for proc in r.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        asyncio.run(forget_task(spec.task_id, spec.participants))


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fedq_status_agrees_with_a_real_run(run: Run) -> None:
    spec = run.spec
    active = run.start()
    wait_status(active, lambda d: d["role"] == "active")  # the lease first, then a standby
    standby = run.start()
    standby_owner = wait_status(standby, lambda d: True)["owner"]
    doc = wait_status(active, lambda d: d["standbys"] == [standby_owner])
    assert doc["standbys"] == [standby_owner]

    # bank-a: one update on version 0, a copy of it (duplicate), two on version 1
    # (staleness 0 and 1); then bank-b's on version 0 at head 3 (too stale: the
    # bound is 2 versions)
    first = encoded_update(spec, base=0, participant="bank-a")
    asyncio.run(publish(spec, [("bank-a", *first)]))
    wait_status(active, lambda d: d["head"]["version"] == 1)
    asyncio.run(publish(spec, [("bank-a", "copy", first[1])]))
    wait_status(active, lambda d: d["totals"]["refused"] == {"duplicate": 1})
    later = [encoded_update(spec, base=1, participant="bank-a") for _ in range(2)]
    asyncio.run(publish(spec, [("bank-a", *u) for u in later]))
    wait_status(active, lambda d: d["head"]["version"] == 3)
    asyncio.run(publish(spec, [("bank-b", *encoded_update(spec, base=0, participant="bank-b"))]))
    wait_status(active, lambda d: sum(d["totals"]["refused"].values()) == 2)

    doc = status_json(active)
    head, accepted, refused, holder = asyncio.run(stored(spec))
    assert doc["schema"] == SCHEMA and doc["service"] == SERVICE
    assert (doc["task"], doc["mode"], doc["strategy"]) == (spec.task_id, "async", "fedasync")
    assert doc["role"] == "active" and doc["lease"]["state"] == "active"
    assert doc["owner"] == doc["lease"]["holder"] == holder
    assert doc["standbys"] == [standby_owner]
    assert doc["head"]["version"] == head == 3
    assert doc["head"]["versions_per_s"] > 0
    assert doc["queue"]["unacked"] == 0
    assert doc["totals"] == {"accepted": 3, "refused": {"duplicate": 1, "too_stale": 1}}
    banks = {b["participant"]: b for b in doc["banks"]}
    assert set(banks) == {"bank-a", "bank-b"}
    for name, bank in banks.items():
        assert bank["accepted"] == accepted[name]
        assert bank["refused"] == {r: n for (p, r), n in refused.items() if p == name}
        assert bank["age_s"] is not None and bank["last_update"] <= doc["now"]
    assert banks["bank-a"]["accepted"] == 3
    assert banks["bank-a"]["refused"] == {"duplicate": 1}
    assert banks["bank-b"]["refused"] == {"too_stale": 1}
    assert banks["bank-a"]["staleness_last"] == 1
    assert banks["bank-a"]["staleness_mean"] == pytest.approx(1 / 3)
    assert banks["bank-b"]["staleness_last"] is None
    assert banks["bank-a"]["weight_share"] == 1.0 and banks["bank-b"]["weight_share"] == 0.0
    assert doc["privacy"] == {"bank": None}
    assert all(b["epsilon"] is None for b in doc["banks"])

    # the standby: its own state, the holder from Redis, the head from the store
    other = status_json(standby)
    assert other["role"] == "standby" and other["owner"] == standby_owner
    assert other["lease"]["holder"] == holder and other["head"]["version"] == 3
    assert other["banks"] == [] and other["totals"] is None

    # the metrics other tools alert on
    metrics = _get(f"{active}/metrics")[1]
    task = spec.task_id
    assert (
        f'fedq_participant_updates_total{{outcome="accepted",participant="bank-a",'
        f'reason="",task="{task}"}} 3.0' in metrics
    )
    assert (
        f'fedq_participant_updates_total{{outcome="refused",participant="bank-b",'
        f'reason="too_stale",task="{task}"}} 1.0' in metrics
    )
    assert re.search(
        rf'fedq_participant_last_update_timestamp_seconds{{participant="bank-b",task="{task}"}} '
        r"1\.\d+e\+09",
        metrics,
    )
    assert f'fedq_lease_held{{task="{task}"}} 1.0' in metrics
    assert f'fedq_store_regressed{{task="{task}"}} 0.0' in metrics
    assert f'fedq_lease_held{{task="{task}"}} 0.0' in _get(f"{standby}/metrics")[1]

    # the view an operator reads: every bank, its refusals
    frame = subprocess.run(
        _fedq("status", "--url", active, "--once"),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert frame.returncode == 0, frame.stderr
    for text in ("bank-a", "bank-b", "duplicate 1", "too_stale 1", standby_owner):
        assert text in frame.stdout
    outs = run.stop()
    assert all("Traceback" not in out for out in outs), outs


# ------------------------------------------------------------- the document


def _doc(**over: Any) -> dict[str, Any]:
    stats = ServiceStats(flag_after=2)
    stats.count_accepted("bank-a", 1)
    stats.count_refusal(Refusal.TOO_STALE, "bank-b")
    stats.count_refusal(Refusal.TOO_STALE, "bank-b")
    args: dict[str, Any] = {
        "task": "t",
        "mode": "async",
        "strategy": "fedbuff",
        "secure_aggregation": False,
        "owner": "host-1",
        "lease_state": "active",
        "active": True,
        "holder": "host-1",
        "fence": 7,
        "lease_ttl_s": 10.0,
        "standbys": ["host-2"],
        "head": 12,
        "versions_per_s": 0.5,
        "window_s": 60.0,
        "started_at": 1000.0,
        "now": 1100.0,
        "waiting": 4,
        "unacked": 2,
        "participants": ("bank-a", "bank-b", "bank-c"),
        "stats": stats,
        "activity": {"bank-a": BankActivity(1090.0, 1, 3, 2), "bank-b": BankActivity(1050.0)},
        "bank_dp": None,
        "bank_dp_on": False,
        "error": None,
    }
    args.update(over)
    return build_status(**args)


def test_the_document_lists_every_bank_with_its_counts() -> None:
    doc = _doc()
    assert json.loads(json.dumps(doc)) == doc  # plain JSON
    banks = {b["participant"]: b for b in doc["banks"]}
    assert list(banks) == ["bank-a", "bank-b", "bank-c"]  # a silent bank is listed too
    a, b, c = banks["bank-a"], banks["bank-b"], banks["bank-c"]
    assert (a["accepted"], a["age_s"], a["staleness_last"], a["staleness_mean"]) == (1, 10, 1, 1.5)
    assert a["last_version"] == 1 and not a["flagged"]
    assert b["refused"] == {"too_stale": 2} and b["refused_total"] == 2
    assert b["flagged"] and b["flag_reasons"] == ["refused"]
    assert c["last_update"] is None and c["age_s"] is None and c["last_version"] is None
    assert doc["totals"] == {"accepted": 1, "refused": {"too_stale": 2}}
    assert doc["lease"] == {"state": "active", "holder": "host-1", "fence": 7, "ttl_s": 10.0}
    assert doc["privacy"] == {"bank": None} and a["epsilon"] is None


def test_a_standby_lists_no_bank_and_bank_dp_is_every_banks_epsilon() -> None:
    standby = _doc(active=False, stats=None, lease_state="standby", holder="host-9")
    assert standby["role"] == "standby" and standby["banks"] == []
    assert standby["totals"] is None

    from aggregator.privacy import VersionPrivacy

    record = VersionPrivacy(
        seed=1,
        clip=1.0,
        next_clip=1.0,
        noise_multiplier=1.1,
        main_noise_multiplier=1.1,
        sensitivity=0.1,
        noise_std=0.11,
        delta=1e-5,
        versions=12,
        epsilon=2.5,
        accounted_multiplier=1.1,
        clipped_fraction=0.0,
    )
    private = _doc(bank_dp=record, bank_dp_on=True)
    assert private["privacy"]["bank"] == {
        "epsilon": 2.5,
        "delta": 1e-5,
        "versions": 12,
        "noise_multiplier": 1.1,
        "clip": 1.0,
    }
    assert {b["epsilon"] for b in private["banks"]} == {2.5}
    fresh = _doc(bank_dp=None, bank_dp_on=True)  # DP on, no private version yet
    assert fresh["privacy"]["bank"]["epsilon"] == 0.0


def test_the_tracker_counts_rates_and_metrics() -> None:
    clock = [1000.0]
    metrics = AggregatorMetrics()
    tracker = StatusTracker(
        "t", metrics, clock=lambda: clock[0], monotonic=lambda: clock[0], window_s=10.0
    )
    clock[0] = 1002.0
    tracker.accepted([_entry("bank-a", 0), _entry("bank-a", 2)], versions=2)
    tracker.refused("bank-b", "duplicate")
    tracker.refused(None, "malformed")  # no participant: no bank, no per-bank series
    assert tracker.versions_per_s() == 1.0  # 2 versions in 2 s
    a = tracker.banks["bank-a"]
    assert (a.last_update, a.last_staleness, a.mean_staleness) == (1002.0, 2, 1.0)
    assert set(tracker.banks) == {"bank-a", "bank-b"}
    clock[0] = 1020.0
    assert tracker.versions_per_s() == 0.0  # the commits left the window
    held = [False]
    tracker.watch(lease_held=lambda: held[0], regressed=lambda: True)
    text = metrics.render().decode()
    assert 'fedq_participant_updates_total{outcome="accepted",participant="bank-a",' in text
    assert 'reason="duplicate",task="t"} 1.0' in text
    assert (
        'fedq_participant_last_update_timestamp_seconds{participant="bank-b",task="t"} 1002.0'
        in text
    )
    assert 'fedq_lease_held{task="t"} 0.0' in text
    assert 'fedq_store_regressed{task="t"} 1.0' in text
    held[0] = True
    assert 'fedq_lease_held{task="t"} 1.0' in metrics.render().decode()


# ------------------------------------------------------------- the view and the command


def _frame(doc: dict[str, Any]) -> str:
    console = Console(record=True, width=160, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render(doc))
    text = console.export_text()
    console.file.close()
    return text


def test_the_view_shows_the_header_and_every_bank() -> None:
    text = _frame(_doc())
    for part in ("task t", "async / fedbuff", "active", "fence 7", "host-2", "version 12"):
        assert part in text
    assert "4 waiting" in text and "0.50 versions/s" in text
    for bank in ("bank-a", "bank-b", "bank-c"):
        assert re.search(rf"│ {bank}\s", text), bank
    assert "too_stale 2" in text and "10s ago" in text and "never" in text
    assert "epsilon" not in text  # no DP: no column
    standby = _frame(_doc(active=False, stats=None, holder="host-9", error="store went back"))
    assert "standby" in standby and "host-9" in standby and "bank-a" not in standby
    assert "store went back" in standby


@pytest.fixture
async def served() -> Any:
    """A /status served over HTTP the way the aggregator serves it."""
    port = _free_port()
    doc = _doc()
    metrics = AggregatorMetrics()

    async def health() -> dict[str, object]:
        return {"ok": True}

    async def status() -> dict[str, object]:
        return doc

    runner = await start_http(metrics, health, "127.0.0.1", port, status=status)
    yield f"http://127.0.0.1:{port}", doc
    await runner.cleanup()


async def test_once_json_prints_the_document_as_served(served: Any) -> None:
    url, doc = served
    result = await asyncio.to_thread(
        CliRunner().invoke, main, ["status", "--url", url, "--once", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == doc
    served_body = await asyncio.to_thread(_get, f"{url}/status")
    assert result.output.strip() == served_body[1].strip()
    frame = await asyncio.to_thread(
        CliRunner().invoke, main, ["status", "--url", url + "/status", "--once"]
    )
    assert frame.exit_code == 0 and "bank-c" in frame.output


@pytest.fixture
async def impostor() -> Any:
    """An HTTP server whose /status is not a fedq aggregator's."""
    port = _free_port()
    app = web.Application()

    async def not_status(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def not_json(_: web.Request) -> web.Response:
        return web.Response(text="<html>hi")

    app.router.add_get("/json/status", not_status)
    app.router.add_get("/text/status", not_json)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_an_answer_that_is_not_a_fedq_status_is_one_line(impostor: str) -> None:
    for path, why in (
        ("/json", "answered JSON that is not a fedq aggregator's status"),
        ("/text", "did not answer JSON"),
        ("/nothing", "answered HTTP 404 Not Found"),
    ):
        result = await asyncio.to_thread(
            CliRunner().invoke, main, ["status", "--url", impostor + path, "--once"]
        )
        assert result.exit_code == 2, result.output
        assert why in result.output and len(result.output.strip().splitlines()) == 1


def test_an_unreachable_or_bad_url_is_one_line_and_no_traceback() -> None:
    for url, why in (
        (f"http://127.0.0.1:{_free_port()}", "cannot reach"),
        ("ftp://example.org", "not an http:// or https:// URL"),
    ):
        done = subprocess.run(
            _fedq("status", "--url", url, "--once", "--json"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and done.stdout == ""
        assert why in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    from fedq.cli_status import StatusError, fetch

    page = tmp_path / "status.json"
    page.write_text(json.dumps({**_doc(), "schema": 2}))
    with pytest.raises(StatusError, match="schema 2; this fedq reads schema 1"):
        fetch(page.as_uri())


# ------------------------------------------------------------- the lease's standbys


async def test_a_waiting_keeper_is_listed_as_standby_until_it_stops(
    store: RedisModelStore,
) -> None:
    from aggregator.lease import LeaseConfig, WriterLease

    writer = WriterLease(store, "t", LeaseConfig("writer", ttl_s=0.6))
    waiting = WriterLease(store, "t", LeaseConfig("waiting", ttl_s=0.6))
    assert (writer.state, await writer.holder(), await writer.standbys()) == ("starting", None, [])
    stop = asyncio.Event()
    assert await writer.acquire(stop) is not None
    assert writer.held and writer.state == "active"
    standby = asyncio.create_task(waiting.acquire(stop))
    async with asyncio.timeout(10):
        while await writer.standbys() != ["waiting"]:
            await asyncio.sleep(0.02)
    assert waiting.state == "standby" and not waiting.held
    holder = await waiting.holder()
    assert holder is not None and (holder.owner, holder.token) == ("writer", writer.token)
    stop.set()
    assert await standby is None
    assert await writer.standbys() == []  # it took itself off as it stopped
    await waiting._present(waiting=True)  # as if it was killed while waiting ...
    assert await writer.standbys() == ["waiting"]
    await asyncio.sleep(0.7)  # ... it is no longer listed one TTL later
    assert await writer.standbys() == []
    writer.lost.set()  # a fenced commit
    assert str(writer.state) == "lost" and not writer.held  # (str: mypy narrowed it)
