"""monitoring/: Prometheus config, alert rules and their unit tests, Grafana files.

The rules are checked and their unit tests (monitoring/alerts_test.yml: each alert's
condition created from input series, the alert asserted firing and not firing) run
with ``promtool`` from Debian's ``prometheus`` package. The last test runs a private
``prometheus`` server (same package) on the shipped config and rules, scraping an
aggregator and two bank workers in process, and asks it every dashboard query.
Without the package these tests fail and say how to install it: never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import fakeredis
import numpy as np
import pandas as pd
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from aggregator.http import start_http
from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, StoreConfig
from common.spec import AsyncSettings, NumericFeature, TargetSpec, TaskSpec
from common.transport.memory import MemoryBroker, MemoryTransport
from participant.metrics import ParticipantMetrics
from participant.worker import ParticipantWorker, WorkerConfig
from tests.servers import free_port

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
PROMETHEUS = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "fedq.json"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = MONITORING / "grafana" / "provisioning" / "dashboards" / "fedq.yml"

#: The compose file mounts these at /etc/prometheus/ (prometheus.yml loads alerts.yml).
RULES_IN_CONTAINER = "/etc/prometheus/alerts.yml"
JOBS = {
    "fedq-aggregator": ["aggregator:9108", "aggregator-standby:9108"],
    "fedq-participant": ["bank-1:9109", "bank-2:9109", "bank-3:9109"],
}
#: Series fedq does not export that the rules and the dashboard may use.
PROMETHEUS_SERIES = {"up", "ALERTS"}
METRIC = re.compile(r"\b(fedq_[a-zA-Z0-9_]+)\b")


def _tool(name: str) -> str:
    tool = shutil.which(name)
    if tool is None:
        pytest.fail(
            f"{name} not found on PATH: install Debian's prometheus package "
            f"(apt-get install prometheus), which ships /usr/bin/{name}"
        )
    return tool


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    tool = _tool("promtool")
    return subprocess.run(
        [tool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _load(ALERTS)["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _exported(registry: CollectorRegistry) -> set[str]:
    """Every series name a registry serves, labelled children or not."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    return {f.name + s for f in registry.collect() for s in suffixes[f.type]}


def test_the_alert_rules_are_valid() -> None:
    done = _promtool("check", "rules", ALERTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in done.stdout


def test_the_prometheus_config_is_valid_and_scrapes_every_service(tmp_path: Path) -> None:
    config = _load(PROMETHEUS)
    assert config["rule_files"] == [RULES_IN_CONTAINER]
    scraped = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    assert scraped == JOBS
    # promtool reads rule_files relative to the config: check a copy that names the
    # rules next to it.
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    text = PROMETHEUS.read_text().replace(RULES_IN_CONTAINER, "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(text)
    done = _promtool("check", "config", tmp_path / "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_says_how_long_how_bad_and_what_to_do() -> None:
    rules = _rules()
    assert len({r["alert"] for r in rules}) == len(rules)
    for rule in rules:
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 100, rule["alert"]


def test_every_alert_fires_in_a_unit_test_and_stays_quiet_in_one() -> None:
    tests = _load(ALERTS_TEST)["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in tests:
        for case in test["alert_rule_test"]:
            expected = case.get("exp_alerts") or []
            (fired if expected else quiet).add(case["alertname"])
            for alert in expected:
                assert alert["exp_labels"]["severity"], case
                assert set(alert["exp_annotations"]) == {"summary", "description"}, case
    names = {r["alert"] for r in _rules()}
    assert fired == names, f"never fired: {sorted(names - fired)}"
    assert quiet == names, f"never asserted quiet: {sorted(names - quiet)}"
    done = _promtool("test", "rules", ALERTS_TEST)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_a_rule_that_no_longer_matches_its_condition_fails_its_unit_test(
    tmp_path: Path,
) -> None:
    # FedqBankSilent at one hour instead of 30 minutes: its test's bank, silent 36
    # minutes, no longer raises it, and promtool says so.
    text = ALERTS.read_text()
    assert text.count("> 1800") == 1
    (tmp_path / "alerts.yml").write_text(text.replace("> 1800", "> 3600"))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    done = _promtool("test", "rules", tmp_path / "alerts_test.yml")
    assert done.returncode != 0
    assert "alertname: FedqBankSilent" in done.stdout + done.stderr


def test_the_rules_and_the_dashboard_use_only_series_fedq_exports() -> None:
    exported = _exported(AggregatorMetrics().registry) | _exported(ParticipantMetrics().registry)
    exprs = [r["expr"] for r in _rules()] + _dashboard_exprs()
    series = [s["series"] for t in _load(ALERTS_TEST)["tests"] for s in t.get("input_series", [])]
    used = {m for text in exprs + series for m in METRIC.findall(text)}
    assert used, "no fedq series found in the rules"
    assert not used - exported, f"not exported by fedq: {sorted(used - exported)}"
    # The other series: Prometheus's own, of the jobs prometheus.yml scrapes.
    names = {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s).group(0) for s in series}  # type: ignore[union-attr]
    assert names - used <= PROMETHEUS_SERIES
    jobs = {j for text in exprs + series for j in re.findall(r'job="([^"]+)"', text)}
    assert jobs <= set(JOBS)


def test_the_dashboard_is_a_provisioned_dashboard_of_every_topic(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "fedq" and dashboard["schemaVersion"] >= 36
    datasource = _load(DATASOURCES)["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = _load(PROVIDERS)["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["targets"], panel["title"]
    used = {m for e in _dashboard_exprs() for m in METRIC.findall(e)}
    topics = {
        "fedq_head_version",
        "fedq_updates_accepted_total",
        "fedq_updates_refused_total",
        "fedq_queue_depth",
        "fedq_update_staleness_bucket",
        "fedq_participant_last_update_timestamp_seconds",
        "fedq_participant_weight_share",
        "fedq_lease_held",
        "fedq_receipts_sent_total",
        "fedq_participant_training_seconds_bucket",
        "fedq_participant_validation_auc",
        "fedq_participant_privacy_epsilon",
        "fedq_participant_receipts_total",
        "fedq_drift_over_threshold",
        "fedq_drift_psi",
        "fedq_bank_evaluation",
    }
    assert topics <= used, f"no panel for {sorted(topics - used)}"
    # Every query parses: promtool checks them as recording rules ($task: any task).
    rules = [
        {"record": f"fedq_dashboard:query{i}", "expr": e.replace("$task", ".*")}
        for i, e in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = _promtool("check", "rules", path)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------- a live Prometheus server

#: Dashboard queries that have no series in the live run: no alert fires, nothing is
#: refused or flagged, the task has no local privacy mechanism and no monitoring.
QUIET_PANELS = {
    "Features drifting (PSI over the threshold)",
    "PSI of the score and the largest feature",
    "ROC AUC at the banks (recent labelled rows)",
    "Firing alerts",
    "Flagged banks",
    "Privacy spent (epsilon)",
    "Models refused by the banks (15 min)",
}


def _frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    return pd.DataFrame(
        {"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2], "y": (x[:, 0] > 0).astype(int)}
    )


@contextlib.asynccontextmanager
async def _federation_serving_metrics() -> AsyncIterator[dict[str, list[str]]]:
    """An aggregator (its /metrics server) and two bank workers (theirs, as
    ``fedq participant run --metrics-port`` serves them) working in process; yields
    the scrape targets by job. The standby and a third bank are named at closed
    ports: they are down."""
    spec = TaskSpec.model_validate(
        {
            "task_id": f"mon{uuid.uuid4().hex[:10]}",
            "features": tuple(NumericFeature(name=f"x{i}") for i in range(3)),
            "target": TargetSpec(name="y"),
            "participants": ("bank-a", "bank-b"),
            "async": AsyncSettings(max_staleness=50),
        }
    )
    broker = MemoryBroker()
    store = RedisModelStore(
        fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), StoreConfig(prefix="fedq")
    )
    metrics = AggregatorMetrics()
    service = AggregatorService(
        spec,
        store,
        MemoryTransport(broker, "fedq-aggregator"),
        ServiceConfig(lease_ttl_s=5.0),
        metrics,
    )
    stop = asyncio.Event()
    tasks: list[asyncio.Task[object]] = [asyncio.create_task(service.run(stop))]
    aggregator_port, closed = free_port(), [free_port(), free_port()]
    runner = await start_http(metrics, service.health, "127.0.0.1", aggregator_port)
    servers = []
    banks = []
    try:
        async with asyncio.timeout(30):
            await service.ready.wait()
        for i, name in enumerate(("bank-a", "bank-b")):
            config = WorkerConfig(participant=name, wait_for_model_s=0.1, delay_s=0.2)
            worker = ParticipantWorker(spec, config, MemoryTransport(broker, name), _frame(200, i))
            port = free_port()
            servers.append(start_http_server(port, "127.0.0.1", registry=worker.metrics.registry))
            banks.append(f"127.0.0.1:{port}")
            tasks.append(asyncio.create_task(worker.run(stop)))
        yield {
            "fedq-aggregator": [f"127.0.0.1:{aggregator_port}", f"127.0.0.1:{closed[0]}"],
            "fedq-participant": [*banks, f"127.0.0.1:{closed[1]}"],
        }
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join()
        await runner.cleanup()
        await store.close()


@contextlib.contextmanager
def _prometheus(tmp_path: Path, targets: dict[str, list[str]], port: int) -> Any:
    """A private Prometheus on ``port`` (own data directory) running the shipped
    prometheus.yml and alerts.yml, with only the targets, the rules' path and the
    intervals (1 s, for a short test) changed."""
    config = _load(PROMETHEUS)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={path}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _query(http: aiohttp.ClientSession, url: str, expr: str) -> list[Any]:
    async with http.get(f"{url}/api/v1/query", params={"query": expr}) as resp:
        body = await resp.json()
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_live_prometheus_scrapes_fedq_evaluates_every_rule_and_fills_the_dashboard(
    tmp_path: Path,
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        (p["title"], t["expr"].replace("$task", ".*"))
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    ]
    expected = {title for title, _ in queries} - QUIET_PANELS
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with _federation_serving_metrics() as targets, aiohttp.ClientSession() as http:
        with _prometheus(tmp_path, targets, port):
            filled: set[str] = set()
            results: dict[str, list[Any]] = {}
            rules: list[dict[str, Any]] = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(90):
                    while True:
                        await asyncio.sleep(1)
                        with contextlib.suppress(aiohttp.ClientError):
                            for title, expr in queries:
                                results[expr] = await _query(http, url, expr)
                                if results[expr]:
                                    filled.add(title)
                            async with http.get(f"{url}/api/v1/rules") as resp:
                                groups = (await resp.json())["data"]["groups"]
                            rules = [r for g in groups for r in g["rules"]]
                            # A rule never evaluated reports the zero time.
                            evaluated = all(
                                not r.get("lastEvaluation", "0001").startswith("0001")
                                for r in rules
                            )
                            if filled >= expected and rules and evaluated:
                                break
            up = {
                (r["metric"]["job"], r["metric"]["instance"]): r["value"][1]
                for r in await _query(http, url, "up")
            }
    log = (tmp_path / "prometheus.log").read_text()[-3000:]
    assert filled >= expected, f"no data for {sorted(expected - filled)}\n{log}"
    # Every rule of alerts.yml loaded and evaluated without an error.
    assert sorted(r["name"] for r in rules) == sorted(r["alert"] for r in _rules()), log
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
    # The live values are the federation's: two banks, both named, both scored.
    auc = next(e for t, e in queries if t == "Validation AUC")
    named = {r["metric"]["participant"] for r in results[auc]}
    assert named == {"bank-a", "bank-b"}
    assert all(0.0 <= float(r["value"][1]) <= 1.0 for r in results[auc])
    lease = next(e for t, e in queries if t == "Writer lease")
    assert [r["value"][1] for r in results[lease]] == ["1"]
    # The standby and the third bank were never there; the others answered.
    assert sorted(up.values()) == ["0", "0", "1", "1", "1"]
