"""Terminal presentation of ``fedq simulate``: live progress, summary table, files."""

from __future__ import annotations

import asyncio

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedq.simulate import (
    Progress as SimProgress,
)
from fedq.simulate import (
    SimulationConfig,
    SimulationResult,
    run_simulation,
    write_plot,
    write_report,
)


def run_with_progress(config: SimulationConfig, console: Console) -> bool:
    """Run, show progress, print the summary, write report and plot. True if it ran."""
    where = "embedded (in-process broker and Redis)" if config.embedded else "real servers"
    console.print(
        f"fedq simulate: {config.participants} banks, mode {config.mode}/{config.strategy}, "
        f"data {config.data.name}, {where}"
    )
    with Progress(
        TextColumn("[bold]versions"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        job = bar.add_task("versions", total=config.versions, status="starting")

        def on_progress(p: SimProgress) -> None:
            auc = f"{p.auc:.3f}" if p.auc is not None else "-"
            bar.update(
                job,
                completed=p.version,
                status=f"AUC {auc}  staleness {p.staleness:.1f}  "
                f"accepted {p.accepted}  refused {p.refused}",
            )

        result = asyncio.run(run_simulation(config, on_progress))
    _summary(result, console)
    if config.report:
        write_report(result, config.report)
        console.print(f"report: {config.report}")
    if config.plot:
        write_plot(result, config.plot)
        console.print(f"plot: {config.plot}")
    return True


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
    console.print(
        f"{r.versions} versions, {r.updates_accepted} updates accepted, "
        f"{r.updates_refused} refused, {r.wall_seconds:.1f} s"
    )
