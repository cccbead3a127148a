"""bench/codecs.py's quick mode runs and says what it measured: the raw run's payload is
4 bytes a parameter, int8 carries one byte a parameter and a 4-byte scale per tensor,
top-k its count, values and one-byte gaps, top-k with int8 values its count, scale,
one byte a value and one-byte gaps, every update in the codec asked for.
Timings and AUCs are reported, never asserted beyond being measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_quick_mode_measures_bytes_aucs_and_times(tmp_path: Path) -> None:
    out = tmp_path / "codecs.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "codecs.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "codecs" and doc["quick"] is True
    assert {"date", "git", "command", "machine", "settings", "figures"} <= set(doc)
    assert set(doc["figures"]) == {"quality", "speed", "targets"}
    rows = {r["variant"]: r for r in doc["figures"]["quality"]}
    assert list(rows) == ["raw", "zstd", "int8", "topk 10%", "topk8 5%"]
    params = rows["raw"]["params"]
    assert params == 75  # German credit's logistic regression: 74 weights and a bias
    assert rows["raw"]["payload_bytes"] == 4 * params and rows["raw"]["payload_ratio"] == 1.0
    assert rows["int8"]["payload_bytes"] == params + 2 * 4  # a scale per tensor
    # k = round(0.1 x 74) = 7 of the weights and 1 bias: count, values, one-byte gaps.
    assert rows["topk 10%"]["payload_bytes"] == (4 + 7 * 5) + (4 + 5)
    # k = round(0.05 x 74) = 4 of the weights and 1 bias: count, scale, a byte a value
    # and a byte a gap.
    assert rows["topk8 5%"]["payload_bytes"] == (8 + 4 * 2) + (8 + 2)
    for r in rows.values():
        assert 0.5 <= r["auc_mean"] <= 1.0
        assert r["refused"] == 0
        (run,) = r["runs"]
        assert run["updates"] >= 5 * 5  # 5 banks, 5 rounds
    assert rows["zstd"]["auc_mean"] == rows["raw"]["auc_mean"]  # the same values
    speed = {r["codec"]: r for r in doc["figures"]["speed"]}
    assert list(speed) == ["raw", "zstd", "int8", "topk 10%", "topk8 5%"]
    for r in speed.values():
        assert r["encode_ms"] > 0 and r["decode_ms"] > 0
    assert speed["raw"]["max_abs_error"] == 0.0 == speed["zstd"]["max_abs_error"]
    assert 0.25 <= speed["int8"]["payload_ratio"] < 0.2501
    targets = [(t["variant"], t["payload_holds"]) for t in doc["figures"]["targets"]]
    assert targets == [("int8", False), ("topk8 5%", False)]  # 83 / 300, 26 / 300
    assert 0.02 < speed["topk8 5%"]["payload_ratio"] < 0.03  # 5% of (a byte and a gap) / 4 B
    assert "| codec" in out.with_suffix(".md").read_text()
