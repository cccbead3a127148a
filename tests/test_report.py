"""``fedq audit report``: one self-contained HTML page of a version for a model-risk
reviewer (fedq/report.py gathers, fedq/report_html.py draws, fedq/svg_plots.py plots).

The end-to-end test runs a real simulation on the shared servers (four banks, FedBuff,
one bank publishing each update five times against a cap of one update per bank per
buffer, so ``over_cap`` refusals are recorded), writes the page through the command
line with the banks' held-out rows as the holdout set, renders it in headless
Chromium (Debian's ``chromium``; never skipped: CI installs it) and reads what the
rendered page shows against the store, the audit stream and an independent AUC.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import uuid
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import redis.asyncio as aioredis
import torch
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from aggregator.store import RedisModelStore
from common.evaluation import predict_proba
from common.spec import NumericFeature, TargetSpec, TaskSpec
from common.wire import UpdateEnvelope, encode_update
from fedq.cli import main
from fedq.report import (
    BankFacts,
    Contributions,
    Evaluation,
    Report,
    Verification,
    reported_metrics,
)
from fedq.report_html import render
from fedq.simulate import SimulationConfig, bundled_data, prepare, run_simulation
from fedq.svg_plots import Series, bar_chart, line_chart
from participant.data import encode, load_table
from tests.bank_users import shared_bank_urls
from tests.helpers import AMQP_URL, REDIS_URL, forget_task, model_params

SERVERS = ("--amqp-url", AMQP_URL, "--redis-url", REDIS_URL)
#: The plots the page embeds (the ids of their <svg> elements).
PLOTS = ("plot-updates", "plot-refusals", "plot-roc", "plot-pr", "plot-calibration")


class Page(HTMLParser):
    """What a rendered page holds: the text of each element with an id, the text of
    each table row, every tag and every src/href."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.by_id: dict[str, str] = {}
        self.rows: list[list[str]] = []
        self.tags: Counter[str] = Counter()
        self.links: list[str] = []
        self.svg_children: dict[str, Counter[str]] = {}
        self._open: list[tuple[str, str | None]] = []
        self._texts: dict[int, list[str]] = {}
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._svg: str | None = None
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags[tag] += 1
        self.links += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href")]
        if self._svg is not None:
            self.svg_children[self._svg][tag] += 1
        if tag == "svg":
            self._svg = a.get("id") or ""
            self.svg_children[self._svg] = Counter()
        if tag == "tr":
            self._row = []
        if tag in ("td", "th"):
            self._cell = []
        self._open.append((tag, a.get("id")))
        self._texts[len(self._open)] = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg = None
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        while self._open:
            t, ident = self._open.pop()
            text = "".join(self._texts.pop(len(self._open) + 1, []))
            if self._open:
                self._texts[len(self._open)].append(text)
            if ident is not None:
                self.by_id[ident] = " ".join(text.split())
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._open:
            self._texts[len(self._open)].append(data)
        if self._cell is not None:
            self._cell.append(data)

    def row(self, first: str) -> list[str]:
        found = [r for r in self.rows if r and r[0] == first]
        assert len(found) == 1, (first, found)
        return found[0]


def chromium_dom(page: Path) -> str:
    """The DOM of ``page`` after headless Chromium loaded it."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail(
            "chromium is not installed: the report is checked in a real headless browser; "
            "install Debian's package: apt-get install -y chromium"
        )
    done = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "<body" in done.stdout, done.stderr[-2000:]
    return done.stdout


def _holdout(config: SimulationConfig, path: Path) -> None:
    """The rows no bank trained on (the banks' held-out customers) as a CSV."""
    train = pd.concat(prepare(config).shards.values()).drop_duplicates()
    merged = pd.read_csv(bundled_data()).merge(train, how="left", indicator=True)
    held = merged[merged["_merge"] == "left_only"].drop(columns="_merge")
    assert 100 < len(held) < 400
    held.to_csv(path, index=False)


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_the_report_of_a_real_run_in_headless_chromium(tmp_path: Path) -> None:
    config = SimulationConfig(
        participants=4,
        mode="async",
        versions=8,
        seconds=90,
        patience=0,
        base_delay_s=0.0,
        baseline_epochs=3,
        attack="copies",
        spec_overrides={
            "async": {"strategy": "fedbuff", "buffer_size": 4},
            "robustness": {"max_per_bank": 1},
        },
        amqp_url=AMQP_URL,
        bank_urls=shared_bank_urls(4),
        redis_url=REDIS_URL,
    )
    result = await run_simulation(config)
    task = result.task
    try:
        holdout, out = tmp_path / "holdout.csv", tmp_path / "report.html"
        _holdout(config, holdout)
        args = ["audit", "report", "--task", task, "--data", str(holdout), "--out", str(out)]
        cli = await asyncio.to_thread(CliRunner().invoke, main, [*args, *SERVERS])
        assert cli.exit_code == 0, cli.output
        assert "replay verified" in cli.output

        # What the store holds, read independently of fedq.report.
        store = RedisModelStore(aioredis.Redis.from_url(REDIS_URL))
        try:
            head = await store.head(task)
            assert head is not None and head >= result.versions
            spec = await store.get_spec(task)
            records = [await store.get_version(task, v) for v in range(1, head + 1)]
            refused = Counter(
                d["reason"]
                for d in await store.decisions(task)
                if d.get("decision") == "refused" and int(d["head"]) < head
            )
            params = (await store.get_params(task, head)).tensors
            genesis = (await store.get_params(task, 0)).tensors
        finally:
            await store.close()
        per_bank = Counter(e.participant for r in records for e in r.lineage)
        assert refused["over_cap"] >= 1, refused  # the flooding bank was capped
        x, y = encode(load_table(holdout), spec)
        auc = roc_auc_score(y.numpy(), predict_proba(spec, params, x).numpy())
        auc0 = roc_auc_score(y.numpy(), predict_proba(spec, genesis, x).numpy())

        page = Page(chromium_dom(out))
        assert page.by_id["task"] == task
        assert page.by_id["spec-hash"] == spec.spec_hash().hex()
        assert page.by_id["versions"] == str(head)
        assert page.by_id["verified"] == "verified"
        assert page.by_id["auc"] == f"{auc:.4f}"
        if head == result.versions:  # the simulation scored the same model on the same rows
            assert float(page.by_id["auc"]) == pytest.approx(result.final_auc, abs=5e-5)
        assert str(holdout) in page.by_id["holdout"]
        for bank in spec.participants:
            row = page.row(bank)
            assert row[1] == str(per_bank[bank]), (bank, row)
        assert "over_cap" in page.row("bank-04")[4]  # the flooding bank's refusals
        # Exact Shapley values (four banks) share out the whole gain over version 0.
        shapley = [float(page.row(bank)[6]) for bank in spec.participants]
        assert sum(shapley) == pytest.approx(auc - auc0, abs=1e-3)
        for reason, count in refused.items():
            assert page.row(reason)[1] == str(count)

        # Each plot is inline SVG with something drawn in it.
        assert set(PLOTS) <= set(page.svg_children), page.svg_children
        assert page.svg_children["plot-updates"]["rect"] == len(spec.participants)
        assert page.svg_children["plot-refusals"]["rect"] == len(refused)
        for curve in ("plot-roc", "plot-pr", "plot-calibration"):
            assert page.svg_children[curve]["polyline"] >= 1, (curve, page.svg_children[curve])
        # Self-contained: no script, no stylesheet link, no image or link to elsewhere.
        assert page.tags["script"] == 0 and page.tags["link"] == 0 and page.tags["img"] == 0
        assert not [u for u in page.links if u.lower().startswith(("http:", "https:", "//"))]
        assert "http://" not in out.read_text() and "https://" not in out.read_text()

        # An earlier version, without a holdout: its own lineage, no curves, still verified.
        early = tmp_path / "early.html"
        args = ["audit", "report", "--task", task, "--version", "3", "--out", str(early)]
        cli = await asyncio.to_thread(CliRunner().invoke, main, [*args, *SERVERS])
        assert cli.exit_code == 0, cli.output
        page = Page(chromium_dom(early))
        assert page.by_id["version"] == "3" and page.by_id["versions"] == "3"
        assert page.by_id["verified"] == "verified"
        assert "auc" not in page.by_id and "plot-roc" not in page.svg_children
        assert "No holdout set was given" in "".join(page.text)
        early_counts = Counter(e.participant for r in records[:3] for e in r.lineage)
        for bank in spec.participants:
            assert page.row(bank)[1] == str(early_counts[bank]), bank
    finally:
        await forget_task(task, tuple(result.participants))


# --------------------------------------------------------------------------- unit tests


def _report(bank: str, task: str = "credit") -> Report:
    risk = {
        "n": 4,
        "positives": 2,
        "auc": 0.75,
        "pr_auc": 0.8,
        "ks": 0.5,
        "log_loss": 0.6,
        "brier": 0.2,
        "alert_rate": 0.05,
        "precision_at_alert": 1.0,
        "recall_at_alert": 0.5,
        "calibration": [
            {"lo": 0.1, "hi": 0.4, "n": 2, "mean_predicted": 0.25, "observed_rate": 0.0},
            {"lo": 0.6, "hi": 0.9, "n": 2, "mean_predicted": 0.75, "observed_rate": 1.0},
        ],
        "pr_curve": {"recall": [0.0, 0.5, 1.0], "precision": [1.0, 1.0, 0.5]},
        "skipped": [],
    }
    return Report(
        task=task,
        version=1,
        head=1,
        generated_at=0.0,
        spec={"task_id": task, "model": {"kind": "logreg"}, "participants": [bank]},
        spec_hash="ab" * 32,
        version_hash="cd" * 32,
        param_hash="ef" * 32,
        created_at=0.0,
        versions=[
            {"version": 1, "strategy": "fedavg", "updates": 1, "banks": [bank], "created_at": 0}
        ],
        banks=[BankFacts(bank, updates=1, weight=1.0, metrics={"val_auc": 0.7})],
        refusals={f"<b>{bank}</b>": 1},
        audit_messages=1,
        verification=Verification(ok=False, checked=0, signatures=0, to_version=1, reason=bank),
        evaluation=Evaluation(
            f"/data/{bank}.csv", risk, {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 1.0, 1.0]}
        ),
        evaluation_error="",
        contributions=Contributions(error=bank),
        privacy_record=None,
        settings={"mode": bank},
    )


def test_text_from_the_store_cannot_inject_markup() -> None:
    evil = '<script>alert("x")</script><img src=https://evil.example/x onerror=alert(1)>'
    html = render(_report(evil, task=evil))
    page = Page(html)
    assert page.tags["script"] == 0 and page.tags["img"] == 0
    assert not page.links
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert page.by_id["task"] == evil  # shown as text, exactly
    assert page.by_id["verified"] == "NOT verified"
    assert page.row(evil)[0] == evil  # the bank's row names it as text


def test_plots_escape_labels_and_leave_out_values_that_are_not_finite() -> None:
    svg = line_chart(
        "p", "a <b>", "x", "y", [Series("s<1>", [0.0, math.nan, 1.0], [0.0, 0.5, math.inf])]
    )
    assert "<b>" not in svg and "s&lt;1&gt;" in svg
    assert "nan" not in svg and "inf" not in svg
    points = svg.split('points="')[1].split('"')[0].split()
    assert len(points) == 1  # only (0, 0) is finite
    bars = bar_chart("b", "t", [("a&b", 3.0), ("c", 1.0)])
    assert "a&amp;b" in bars and bars.count('class="bar"') == 2
    widths = [float(w.split('"')[0]) for w in bars.split('width="')[2:]]
    assert widths[0] == pytest.approx(3 * widths[1])


@pytest.mark.real
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--version", "5"], "has no version 5 (versions 0..0)"),
        (["--data", "/nonexistent/holdout.csv"], "does not exist"),
    ],
)
def test_bad_arguments_are_one_line(args: list[str], says: str, tmp_path: Path) -> None:
    """A version the task does not have (and a holdout that is not there): one line
    naming it, exit status 2, no page written."""
    task = f"report{uuid.uuid4().hex[:10]}"

    async def setup() -> None:
        store = RedisModelStore(aioredis.Redis.from_url(REDIS_URL))
        spec = TaskSpec(
            task_id=task, features=(NumericFeature(name="a"),), target=TargetSpec(name="y")
        )
        await store.register_task(spec)
        await store.create_genesis(task, model_params(spec), info={"strategy": "genesis"})
        await store.close()

    asyncio.run(setup())
    out = tmp_path / "r.html"
    try:
        cli = CliRunner().invoke(
            main, ["audit", "report", "--task", task, "--out", str(out), *args, *SERVERS]
        )
    finally:
        asyncio.run(forget_task(task, ()))
    assert cli.exit_code == 2, cli.output
    lines = cli.output.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in cli.output, cli.output
    assert not out.exists()
    missing = CliRunner().invoke(
        main, ["audit", "report", "--task", f"{task}x", "--out", str(out), *SERVERS]
    )
    assert missing.exit_code == 2
    assert f"task '{task}x' has no versions" in missing.output


def test_reported_metrics_come_from_the_header_alone() -> None:
    body, _ = encode_update(
        UpdateEnvelope(
            task="credit",
            participant="bank-a",
            update_id="u1",
            base_version=0,
            num_samples=10,
            tensors={"w": torch.ones(3)},
            metrics={"val_auc": 0.75, "val_n": 37.0, "dp_epsilon_total": 1.5},
        )
    )
    assert reported_metrics(body) == {"dp_epsilon_total": 1.5, "val_auc": 0.75, "val_n": 37.0}
    assert reported_metrics(b"\x00not msgpack") == {}
