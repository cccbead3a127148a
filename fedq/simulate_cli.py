"""Terminal presentation of ``fedq simulate``: live progress, summary table, files."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedq.simulate import (
    Comparison,
    Prepared,
    SimulationConfig,
    SimulationResult,
    prepare,
    run_simulation,
    write_plot,
)
from fedq.simulate import (
    Progress as SimProgress,
)


def run_with_progress(
    config: SimulationConfig,
    console: Console,
    *,
    both: bool = False,
    prepared: Prepared | None = None,
) -> bool:
    """Run, show progress, print the summary, write report and plot. True if it ran.

    ``prepared`` is :func:`fedq.simulate.prepare` of ``config``, done here if None:
    bad data or options fail before the banner. Its warnings are printed first, on
    standard error, and kept in the report.
    """
    prep = prepare(config) if prepared is None else prepared
    warn = Console(stderr=True)
    for w in prep.warnings:
        warn.print(f"[yellow]warning:[/] {escape(w)}")
    where = "embedded (in-process broker and Redis)" if config.embedded else "real servers"
    modes = ["async", "sync"] if both else [config.mode]
    console.print(
        f"fedq simulate: {config.participants} banks, mode {' and '.join(modes)}, "
        f"data {config.data.name}, {where}"
    )
    results: list[SimulationResult] = []
    for mode in modes:
        results.append(_run_one(replace(config, mode=mode), console, prep))  # type: ignore[arg-type]
    for r in results:
        _summary(r, console)
    doc: dict[str, object]
    if both:
        comparison = Comparison({r.mode: r for r in results})
        doc = comparison.to_json()
        _comparison(comparison, console)
    else:
        doc = results[0].to_json()
    if config.report:
        config.report.parent.mkdir(parents=True, exist_ok=True)
        config.report.write_text(json.dumps(doc, indent=2, default=str))
        console.print(f"report: {config.report}")
    if config.plot:
        write_plot(results, config.plot)
        console.print(f"plot: {config.plot}")
    return True


def _comparison(c: Comparison, console: Console) -> None:
    table = Table(
        title=f"time to AUC {next(iter(c.runs.values())).target_auc:.4f} (95% of centralized)"
    )
    table.add_column("mode")
    table.add_column("seconds to target", justify="right")
    table.add_column("final AUC", justify="right")
    for mode, r in c.runs.items():
        t = "not reached" if r.time_to_target_s is None else f"{r.time_to_target_s:.2f}"
        table.add_row(mode, t, f"{r.final_auc:.4f}")
    console.print(table)
    if c.speedup is not None and c.speedup >= 1:
        console.print(f"async reached the target {c.speedup:.1f}x sooner than sync")
    elif c.speedup is not None:
        console.print(f"sync reached the target {1 / c.speedup:.1f}x sooner than async")


def _run_one(config: SimulationConfig, console: Console, prep: Prepared) -> SimulationResult:
    strategy = "fedavg" if config.mode == "sync" else prep.spec.async_.strategy
    with Progress(
        TextColumn(f"[bold]{config.mode}/{strategy}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        job = bar.add_task("versions", total=config.max_versions, status="starting")

        def on_progress(p: SimProgress) -> None:
            auc = f"{p.auc:.3f}" if p.auc is not None else "-"
            bar.update(
                job,
                completed=p.version,
                status=f"AUC {auc}  staleness {p.staleness:.1f}  "
                f"accepted {p.accepted}  refused {p.refused}",
            )

        return asyncio.run(run_simulation(config, on_progress, prep))


_BUDGETS = {"versions": "the version budget", "seconds": "the time budget"}


def _summary(r: SimulationResult, console: Console) -> None:
    table = Table(title=f"{r.task} ({r.mode})")
    table.add_column("model")
    table.add_column("test AUC", justify="right")
    table.add_row("fedq global (final)", f"{r.final_auc:.4f}")
    table.add_row("centralized (pooled data)", f"{r.centralized_auc:.4f}")
    table.add_row("local-only, mean of banks", f"{r.local_only_auc_mean:.4f}")
    for name, auc in r.local_only_auc.items():
        p = r.participants[name]
        table.add_row(f"  local-only {name} ({p['rows']} rows, speed {p['speed']:g})", f"{auc:.4f}")
    console.print(table)
    for name, p in r.participants.items():
        if p.get("flagged"):
            refused = p["updates_refused"]
            why = ", ".join(f"{k} {v}" for k, v in sorted(refused.items()))
            console.print(
                f"[yellow]flagged:[/] {name}: {sum(refused.values())} of "
                f"{p['updates_published']} updates refused ({why}), {p['updates_accepted']} "
                "accepted: its data barely reaches the model"
            )
    fm, cm = r.final_metrics, r.centralized_metrics
    if "pr_auc" in fm and "pr_auc" in cm:
        console.print(
            f"PR-AUC {fm['pr_auc']:.4f} (centralized {cm['pr_auc']:.4f}), Brier "
            f"{fm['brier']:.4f} ({cm['brier']:.4f}); test positives "
            f"{100 * fm['positive_rate']:.1f}%"
        )
    reached = "not reached" if r.time_to_target_s is None else f"{r.time_to_target_s:.2f} s"
    for line in r.warnings:
        if line.startswith("the global model was still improving"):
            console.print(f"[yellow]warning:[/] {line}", highlight=False)
    budget = _BUDGETS.get(r.stopped_by, "an early stop")
    console.print(
        f"{r.versions} versions (stopped by {budget}), "
        f"{r.updates_accepted} updates accepted, "
        f"{r.updates_refused} refused, {r.wall_seconds:.1f} s; "
        f"AUC {r.target_auc:.4f} (target) reached: {reached}"
    )
