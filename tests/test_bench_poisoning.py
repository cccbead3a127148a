"""bench/poisoning.py: its robust configurations are valid tasks for their modes, its
verdicts say what the issue's bounds say, and its contributions path runs and finds
what tests/test_contributions.py finds. The attack runs themselves are the benchmark's
(minutes), not a test's."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def poisoning() -> ModuleType:
    """The script as a module (its helpers import ``_common`` from bench/)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_poisoning", BENCH / "poisoning.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_every_configuration_is_a_valid_task_of_its_mode(poisoning: ModuleType) -> None:
    from fedq.simulate import prepare

    configs = [(mode, robust) for mode, robust in poisoning.ROBUST.items()]
    configs += [(m, r) for m, named in poisoning.CANDIDATES.items() for r in named.values()]
    for mode, robust in configs:
        for banks in (poisoning.BANKS, poisoning.SCALE_BANKS):
            if mode == "fedbuff" and banks == poisoning.SCALE_BANKS:
                continue  # the scale section runs sync rounds only
            spec = prepare(poisoning._config(mode, 0, banks, robust)).spec
            assert spec.robustness.model_dump() == {
                **spec.robustness.model_dump(),
                **robust,
            }, (mode, robust)
            assert spec.mode == ("sync" if mode == "sync" else "async")
            if mode == "fedbuff":
                assert spec.async_.strategy == "fedbuff"
                assert spec.async_.buffer_size == poisoning.BUFFER


def _rows(aucs: list[float]) -> list[dict[str, Any]]:
    group = {"published": 0, "accepted": 0, "refused": {}, "clipped": 0, "weight_share": 0.0}
    return [
        {"seed": i, "auc": a, "stopped_by": "versions", "versions": 20, "hostile": group}
        | {"honest": group}
        for i, a in enumerate(aucs)
    ]


def test_the_verdicts_follow_the_bounds(poisoning: ModuleType) -> None:
    plain = {c: _rows([0.75, 0.77]) for c in poisoning.CONDITIONS}
    robust = {c: _rows([0.748, 0.766]) for c in poisoning.CONDITIONS}  # clean: -0.003
    robust["sign_flip"] = _rows([0.72, 0.75])  # -0.022 from the robust clean run
    s = poisoning._summary(plain, robust)
    assert s["clean_robust_minus_plain"] == pytest.approx(-0.003)
    assert s["clean_within_tolerance"]
    by = {r["condition"]: r for r in s["conditions"]}
    assert by["sign_flip"]["robust_minus_clean"] == pytest.approx(-0.022)
    assert by["sign_flip"]["robust_worst_seed"] == {"seed": 0, "minus_clean": pytest.approx(-0.028)}
    assert not by["sign_flip"]["within_tolerance"] and by["scale"]["within_tolerance"]
    assert not s["attacks_within_tolerance"]
    robust["clean"] = _rows([0.74, 0.76])  # -0.01 on average
    assert not poisoning._summary(plain, robust)["clean_within_tolerance"]


@pytest.mark.slow
def test_the_contributions_path_runs_and_finds_the_noisy_banks(tmp_path: Path) -> None:
    out = tmp_path / "poisoning.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "poisoning.py"), "--only", "contributions", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "poisoning" and set(doc["figures"]) == {"contributions"}
    c = doc["figures"]["contributions"]
    assert all(c["checks"].values()), c["checks"]
    assert set(c["chains"]) == {"noisy", "solo", "dup", "label_flip"}
    assert "| federation |" in out.with_suffix(".md").read_text()
