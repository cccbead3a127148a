"""bench/large_model.py's quick mode (~1M parameters, 2 chunked updates) runs the whole
path against the real servers: publish, aggregate, receive the announced model,
replay. Times and RSS are reported, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import AMQP_URL, REDIS_URL

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.mark.timeout(90)
def test_quick_mode_aggregates_announces_and_replays(tmp_path: Path) -> None:
    out = tmp_path / "large_model.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "large_model.py"),
            "--quick",
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
    f = json.loads(out.read_text())["figures"]
    assert f["parameters"] == 999_955
    assert all(p["chunks"] > 1 for p in f["published"])  # chunked at the quick chunk size
    assert f["aggregator"]["head"] == 2 and f["aggregator"]["peak_rss_mib"] > 0
    p = f["participant"]
    assert p["version_hash_matches"] and p["param_hash_matches"] and p["parameters_equal"]
    assert f["replay"]["ok"] is True and f["replay"]["checked"] == 2
