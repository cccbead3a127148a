"""bench/secagg.py's micro-benchmark path runs and says what it measured: the secure
and the plain aggregate agree within the stated bound, and the masked update carries
every member's shares (12 + 16 + 32 n bytes each). Timings are reported, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_the_pieces_run_and_the_secure_sum_is_the_plain_one_within_the_bound(
    tmp_path: Path,
) -> None:
    out = tmp_path / "secagg.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "secagg.py"),
            "--only",
            "pieces",
            "--quick",
            "--participants",
            "5",
            "--params",
            "75",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "secagg"
    assert {"date", "git", "command", "machine", "settings", "figures"} <= set(doc)
    assert set(doc["figures"]) == {"pieces"}
    (row,) = doc["figures"]["pieces"]
    assert (row["participants"], row["params"], row["threshold"]) == (5, 75, 3)
    for key in ("mask_ms", "encode_plain_zstd_ms", "encode_masked_raw_ms"):
        assert row[key] > 0
    assert row["share_ciphertext_bytes"] == 12 + 16 + 32 * 5
    assert row["masked_update_bytes"] > row["plain_update_bytes"]
    assert [c["dropped"] for c in row["cohorts"]] == [0, 2]
    for cohort in row["cohorts"]:
        assert cohort["survivors"] == 5 - cohort["dropped"]
        assert 0 <= cohort["max_error"] <= cohort["error_bound"] < 1e-7
        for key in ("answer_ms", "secure_step_ms", "unmasked_sum_ms", "plain_fedavg_ms"):
            assert cohort[key] > 0
    assert "| banks |" in out.with_suffix(".md").read_text()
