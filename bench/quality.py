"""The model-quality experiments of docs/quality.md: each one `fedq simulate` command.

Each experiment runs the command it prints (a real `fedq simulate` process, embedded
broker and store), reads the JSON report and checks what docs/quality.md says it
must show, over every split seed of the run:

- ``unequal``: German credit split by ``housing`` (one bank holds 71% of the rows),
  that bank ten times slower, async and sync on the same splits: async final AUC
  at least sync's - 0.01; on the big bank's own held-out customers the global
  model at least as good as that bank's local-only model; every bank's share of
  weight within a factor 2 of its share of the rows.
- ``banks20``: 20 banks on German credit: under 5% of updates refused, final AUC
  within 0.02 of the centralized model (mean over the seeds).
- ``fraud50k``: a generated 50,000-row table with 1.5% positives (bench/make_fraud_csv.py),
  split unevenly by product line: PR-AUC reported, final AUC within 0.02 of
  centralized, the whole command under 2 minutes.
- ``weak``: a weak generated table on which the untrained model already scores 95%
  of the centralized AUC, ``--mode both --straggler 10``: time to target (on the
  lift over the initial model) reached by both modes and not equal.

    python bench/quality.py [--only NAME ...] [--seeds K] [--merge]
                            [--out bench/results/quality.json]

Timings depend on the machine; the checks are on model quality and on the wall
clock of the 50k run only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_json

FEDQ = [sys.executable, "-m", "fedq"]
MAKE_DATA = [sys.executable, str(Path(__file__).resolve().parent / "make_fraud_csv.py")]

Report = dict[str, Any]
Check = Callable[[list[dict[str, Report]], float], list[tuple[str, bool, str]]]


@dataclass
class Experiment:
    name: str
    what: str
    args: list[str]
    check: Check
    #: Arguments to bench/make_fraud_csv.py (the data file is appended as --data).
    data: list[str] = field(default_factory=list)
    seeds: int = 3


def runs_by_mode(report: Report) -> list[dict[str, Report]]:
    """Every seed's results, as ``{mode: result}``."""
    runs = report.get("runs", [report])
    return [r["modes"] if r.get("mode") == "both" else {r["mode"]: r} for r in runs]


def _fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.3f}" for x in xs)


def check_unequal(runs: list[dict[str, Report]], wall: float) -> list[tuple[str, bool, str]]:
    asyn = [r["async"] for r in runs]
    sync = [r["sync"] for r in runs]
    a_auc, s_auc = [r["final_auc"] for r in asyn], [r["final_auc"] for r in sync]
    out = [
        (
            "async final AUC >= sync - 0.01 (mean)",
            mean(a_auc) >= mean(s_auc) - 0.01,
            f"async {mean(a_auc):.3f} [{_fmt(a_auc)}], sync {mean(s_auc):.3f} [{_fmt(s_auc)}]",
        )
    ]
    big = max(asyn[0]["participants"], key=lambda b: asyn[0]["participants"][b]["rows"])
    own_g = [r["participants"][big]["own_customers"]["global_auc"] for r in asyn]
    own_l = [r["participants"][big]["own_customers"]["local_only_auc"] for r in asyn]
    out.append(
        (
            f"on {big}'s own customers, async global >= {big} alone (mean)",
            mean(own_g) >= mean(own_l),
            f"global {mean(own_g):.3f} [{_fmt(own_g)}], alone {mean(own_l):.3f} [{_fmt(own_l)}]",
        )
    )
    ratios = [p["weight_share"] / p["data_share"] for r in asyn for p in r["participants"].values()]
    out.append(
        (
            "every bank's weight share / data share in [0.5, 2] (every seed)",
            all(0.5 <= x <= 2.0 for x in ratios),
            f"ratios {min(ratios):.2f} .. {max(ratios):.2f}",
        )
    )
    return out


def check_banks20(runs: list[dict[str, Report]], wall: float) -> list[tuple[str, bool, str]]:
    rs = [r["async"] for r in runs]
    refused = [
        r["updates_refused"] / max(1, r["updates_accepted"] + r["updates_refused"]) for r in rs
    ]
    gap = [r["centralized_auc"] - r["final_auc"] for r in rs]
    return [
        ("under 5% of updates refused (every seed)", max(refused) < 0.05, f"{_fmt(refused)}"),
        (
            "final AUC within 0.02 of centralized (mean)",
            abs(mean(gap)) <= 0.02,
            f"gap {mean(gap):+.3f} [{_fmt(gap)}]; final {_fmt([r['final_auc'] for r in rs])}",
        ),
    ]


def check_fraud(runs: list[dict[str, Report]], wall: float) -> list[tuple[str, bool, str]]:
    rs = [r["async"] for r in runs]
    pr = [r["final_risk"]["pr_auc"] for r in rs]
    gap = [r["centralized_auc"] - r["final_auc"] for r in rs]
    return [
        (
            "PR-AUC reported (final vs centralized)",
            all(x is not None for x in pr),
            f"final {_fmt(pr)}, centralized {_fmt([r['centralized_risk']['pr_auc'] for r in rs])}",
        ),
        ("final AUC within 0.02 of centralized (mean)", abs(mean(gap)) <= 0.02, _fmt(gap)),
        ("simulate on 50k rows under 2 minutes per seed", wall / len(rs) < 120, f"{wall:.0f} s"),
    ]


def check_weak(runs: list[dict[str, Report]], wall: float) -> list[tuple[str, bool, str]]:
    """Every seed where the initial model already scores 95% of the centralized AUC
    (and the centralized model beats it): both modes reach the lift-based target, at
    different times. Seeds where the centralized model does not beat the initial one
    must report no target (not 0 s). At least one seed must be of the first kind."""
    out = []
    weak_seeds = 0
    for r in runs:
        a, s = r["async"], r["sync"]
        ta, ts = a["time_to_target_s"], s["time_to_target_s"]
        figures = (
            f"initial {a['initial_auc']:.3f}, centralized {a['centralized_auc']:.3f}; "
            f"async {'-' if ta is None else f'{ta:.2f}'} s, "
            f"sync {'-' if ts is None else f'{ts:.2f}'} s"
        )
        if a["target_auc"] is None:
            out.append(
                (
                    f"seed {a['seed']}: centralized does not beat the initial model: no target",
                    ta is None and ts is None and bool(a.get("target_note")),
                    figures,
                )
            )
            continue
        beats = a["initial_auc"] >= 0.95 * a["centralized_auc"]
        weak_seeds += beats
        what = "initial >= 95% of centralized" if beats else "initial < 95% of centralized"
        out.append(
            (
                f"seed {a['seed']} ({what}): both modes reach the target "
                f"{a['target_auc']:.3f}, at different times",
                ta is not None and ts is not None and ta != ts,
                figures,
            )
        )
    out.append(("at least one seed with initial >= 95% of centralized", weak_seeds > 0, ""))
    return out


EXPERIMENTS = [
    Experiment(
        "unequal",
        "German credit by housing, the 71% bank 10x slower, async vs sync",
        [
            "-n", "3", "--partition", "column", "--partition-column", "housing",
            "--speeds", "1,10,1", "--mode", "both", "--strategy", "fedbuff",
        ],
        check_unequal,
    ),
    Experiment(
        "banks20",
        "20 banks on German credit, each pausing 1 s between updates",
        ["-n", "20", "--strategy", "fedbuff", "--base-delay", "1.0"],
        check_banks20,
        seeds=5,
    ),
    Experiment(
        "fraud50k",
        "50k rows, 1.5% positives, split by product line (60/20/10/10)",
        [
            "--target", "fraud", "--positive", "yes", "-n", "4",
            "--partition", "column", "--partition-column", "product", "--batch-size", "256",
        ],
        check_fraud,
        data=["--rows", "50000", "--positive-rate", "0.015"],
    ),
    Experiment(
        "weak",
        "weak data (the untrained model already near centralized), --mode both --straggler 10",
        [
            "--target", "fraud", "--positive", "yes", "--mode", "both", "--straggler", "10",
            "--strategy", "fedbuff",
        ],
        check_weak,
        data=["--rows", "4000", "--positive-rate", "0.3", "--class-sep", "0.1", "--flip-y", "0.3"],
    ),
]  # fmt: skip


def run(exp: Experiment, seeds: int, tmp: Path) -> dict[str, Any]:
    args = list(exp.args)
    if exp.data:
        data = tmp / f"{exp.name}.csv"
        subprocess.run([*MAKE_DATA, str(data), *exp.data], check=True, capture_output=True)  # noqa: S603
        args += ["--data", str(data)]
    report = tmp / f"{exp.name}.json"
    cmd = [*FEDQ, "simulate", *args, "--seeds", str(seeds), "--report", str(report)]
    shown = " ".join(shlex.quote(a) for a in ["fedq", *cmd[3:]])
    print(f"\n== {exp.name}: {exp.what}\n$ {shown}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)  # noqa: S603
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        return {"name": exp.name, "command": shown, "error": proc.stderr[-2000:]}
    runs = runs_by_mode(json.loads(report.read_text()))
    checks = exp.check(runs, wall)
    for what, ok, figures in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {what}: {figures}")
    return {
        "name": exp.name,
        "what": exp.what,
        "command": shown,
        "data": exp.data,
        "seeds": seeds,
        "wall_seconds": wall,
        "checks": [{"check": w, "pass": ok, "figures": f} for w, ok, f in checks],
        "runs": [
            {
                mode: {
                    k: r.get(k)
                    for k in (
                        "seed", "final_auc", "centralized_auc", "initial_auc", "target_auc",
                        "time_to_target_s", "versions", "stopped_by", "updates_accepted",
                        "updates_refused", "wall_seconds", "centralized_how",
                    )
                }
                | {
                    "final_pr_auc": r["final_risk"].get("pr_auc"),
                    "centralized_pr_auc": r["centralized_risk"].get("pr_auc"),
                    "banks": {
                        b: {
                            k: p.get(k)
                            for k in ("rows", "speed", "data_share", "weight_share", "flagged")
                        }
                        | {"own": p.get("own_customers")}
                        for b, p in r["participants"].items()
                    },
                }
                for mode, r in by_mode.items()
            }
            for by_mode in runs
        ],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=[e.name for e in EXPERIMENTS])
    parser.add_argument("--seeds", type=int, help="override each experiment's seed count")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    parser.add_argument(
        "--merge", action="store_true", help="keep the other experiments already in --out"
    )
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedq-quality-") as tmp:
        for exp in EXPERIMENTS:
            if args.only and exp.name not in args.only:
                continue
            results.append(run(exp, args.seeds or exp.seeds, Path(tmp)))
    if args.merge and args.out.exists():  # keep the experiments not rerun
        ran = {r["name"] for r in results}
        kept = [r for r in json.loads(args.out.read_text())["experiments"] if r["name"] not in ran]
        results = [r for e in EXPERIMENTS for r in [*kept, *results] if r["name"] == e.name]
    write_json(args.out, {"machine": machine(), "experiments": results})


if __name__ == "__main__":
    main()
