"""bench/ingest.py's quick mode runs against the real servers and says what it measured:
for both strategies a positive aggregator rate, its ratio to the raw broker's, and the
per-update counters (Redis round trips, thread hops, log lines) counted inside the
aggregator process. Rates are reported, never asserted beyond being positive."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import AMQP_URL, REDIS_URL

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.real, pytest.mark.slow]

COUNTERS = (
    "redis_round_trips_per_update",
    "thread_hops_per_update",
    "to_thread_per_update",
    "log_lines_per_update",
)


@pytest.mark.timeout(90)
def test_quick_lr_reports_rates_ratios_and_counters_for_both_strategies(tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "ingest.py"),
            "--quick",
            "--sizes",
            "lr",
            "--count",
            "60",
            "--runs",
            "1",
            "--amqp-url",
            AMQP_URL,
            "--redis-url",
            REDIS_URL,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "ingest"
    assert {"date", "git", "command", "machine", "settings", "figures"} <= set(doc)
    assert doc["settings"]["sizes"] == ["lr"]
    rows = doc["figures"]["rows"]
    assert sorted(r["strategy"] for r in rows) == ["fedasync", "fedbuff K=10"]
    for row in rows:
        assert (row["size"], row["params"], row["run"]) == ("lr", 75, 1)
        assert row["refused"] == 0 and row["drained"] > 0
        assert row["agg_per_s"] > 0 and math.isfinite(row["agg_per_s"])
        assert row["raw_consume_per_s"] > 0
        assert row["ratio"] > 0 and math.isfinite(row["ratio"])
        assert row["ratio"] == pytest.approx(row["agg_per_s"] / row["raw_consume_per_s"])
        for key in COUNTERS:
            assert math.isfinite(row[key]) and row[key] >= 0, (key, row[key])
        assert row["to_thread_per_update"] <= row["thread_hops_per_update"]
        # Every commit goes to Redis: the service does talk to it during the drain.
        assert row["redis_round_trips_per_update"] > 0
        assert any(row[key] > 0 for key in COUNTERS)
        # The store's codec is the one the service ships, not one the bench picked.
        assert row["blob_codec"] == doc["settings"]["shipped_defaults"]["blob_codec"]
    ranges = doc["figures"]["ranges"]["lr"]
    assert set(ranges) == {"fedasync", "fedbuff K=10"}
    for entry in ranges.values():
        assert len(entry["ratios"]) == 1
        assert entry["ratios_min"] == entry["ratios_max"] > 0
    assert "Redis round trips" in done.stdout
