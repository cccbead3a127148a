"""Terminal presentation of ``fedq simulate``: live progress, summary tables, files."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedq.simulate import (
    Baselines,
    Comparison,
    Dataset,
    Prepared,
    Run,
    SeedRuns,
    SimulationConfig,
    SimulationResult,
    fit_baselines,
    load_data,
    prepare,
    run_simulation,
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
    data: Dataset | None = None,
) -> bool:
    """Run, show progress, print the summary, write report and plot. True if it ran.

    ``prepared`` is :func:`fedq.simulate.prepare` of ``config`` (its first seed), done
    here if None: bad data or options fail before the banner. Its warnings are printed
    first, on standard error, and kept in the report. With ``config.seeds`` K > 1 the
    whole run (split, baselines, each mode) repeats for seeds ``seed .. seed + K - 1``.
    """
    if data is None:
        data = load_data(config)
    prep = prepare(config, data) if prepared is None else prepared
    warn = Console(stderr=True)
    for w in prep.warnings:
        warn.print(f"[yellow]warning:[/] {escape(w)}")
    where = "embedded (in-process broker and Redis)" if config.embedded else "real servers"
    modes = ["async", "sync"] if both else [config.mode]
    seeds = f", {config.seeds} split seeds" if config.seeds > 1 else ""
    hostile = ""
    if config.attack is not None and config.attackers > 0:
        hostile = f", {config.attackers} hostile ({config.attack})"
    console.print(
        f"fedq simulate: {config.participants} banks{hostile}, mode {' and '.join(modes)}, "
        f"data {config.data.name}, {where}{seeds}"
    )
    runs: list[Run] = []
    for k in range(config.seeds):
        seeded = replace(config, seed=config.seed + k)
        if k > 0:
            prep = prepare(seeded, data)
        base = _fit_with_progress(seeded, console, prep)
        results = {m: _run_one(replace(seeded, mode=m), console, prep, base) for m in modes}  # type: ignore[arg-type]
        run: Run = Comparison(results) if both else results[config.mode]
        for r in results.values():
            _summary(r, console)
        if isinstance(run, Comparison):
            _comparison(run, console)
        runs.append(run)
    everything = SeedRuns(runs)
    if len(runs) > 1:
        _spread(everything, console)
    _write(config, everything, console)
    return True


def _write(config: SimulationConfig, everything: SeedRuns, console: Console) -> None:
    if config.report:
        config.report.parent.mkdir(parents=True, exist_ok=True)
        config.report.write_text(json.dumps(everything.to_json(), indent=2, default=str))
        console.print(f"report: {config.report}")
    if config.plot:
        from fedq.plot import write_plot

        first = everything.runs[0].to_json()
        write_plot(json.loads(json.dumps(first, default=str)), config.plot)
        note = " (the first seed's run)" if len(everything.runs) > 1 else ""
        console.print(f"plot: {config.plot}{note}")


def _bar(title: str, console: Console) -> Progress:
    """A progress bar: title, bar, done / total, a status field, elapsed time."""
    return Progress(
        TextColumn(f"[bold]{title}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _fit_with_progress(config: SimulationConfig, console: Console, prep: Prepared) -> Baselines:
    """The split's baselines, trained once (for every mode), with a progress bar."""
    with _bar(f"baselines (seed {config.seed})", console) as bar:
        job = bar.add_task("baselines", total=len(prep.shards) + 1, status="centralized, local")

        def on_done(name: str) -> None:
            bar.update(job, advance=1, status=f"{name} done")

        base = fit_baselines(prep, config, on_done)
        bar.update(job, status=f"{base.seconds:.1f} s")
    return base


def _comparison(c: Comparison, console: Console) -> None:
    first = next(iter(c.runs.values()))
    if first.target_auc is None:
        console.print(f"[yellow]no time to target:[/] {first.target_note}", highlight=False)
        return
    table = Table(
        title=f"time to AUC {first.target_auc:.4f} (initial {first.initial_auc:.4f} + "
        f"{100 * first.settings['target_fraction']:.0f}% of the centralized lift)"
    )
    table.add_column("mode")
    table.add_column("seconds to target", justify="right")
    table.add_column("final AUC", justify="right")
    table.add_column("stopped by")
    for mode, r in c.runs.items():
        t = "not reached" if r.time_to_target_s is None else f"{r.time_to_target_s:.2f}"
        table.add_row(mode, t, f"{r.final_auc:.4f}", r.stopped_by)
    console.print(table)
    if c.speedup is not None and c.speedup >= 1:
        console.print(f"async reached the target {c.speedup:.1f}x sooner than sync")
    elif c.speedup is not None:
        console.print(f"sync reached the target {1 / c.speedup:.1f}x sooner than async")


def _run_one(
    config: SimulationConfig, console: Console, prep: Prepared, base: Baselines
) -> SimulationResult:
    strategy = "fedavg" if config.mode == "sync" else prep.spec.async_.strategy
    patience = config.patience_versions(prep.spec.model_copy(update={"mode": config.mode}))
    with _bar(f"{config.mode}/{strategy}", console) as bar:
        job = bar.add_task("versions", total=config.max_versions, status="starting")

        def on_progress(p: SimProgress) -> None:
            auc = f"{p.auc:.3f}" if p.auc is not None else "-"
            val = f"{p.val_auc:.3f}" if p.val_auc is not None else "-"
            flat = f"  flat {p.since_best}/{patience}" if patience else ""
            bar.update(
                job,
                completed=p.version,
                status=f"AUC {auc}  val {val}{flat}  staleness {p.staleness:.1f}  "
                f"accepted {p.accepted}  refused {p.refused}",
            )

        return asyncio.run(run_simulation(config, on_progress, prep, base))


_STOPS = {
    "versions": "the version budget",
    "seconds": "the time budget",
    "plateau": "a plateau of the validation AUC",
    "budget": "the banks' privacy budgets: every bank stopped publishing",
}


def _own(p: dict[str, Any], key: str) -> str:
    value = p["own_customers"].get(key)
    return "skipped" if value is None else f"{value:.3f}"


def _summary(r: SimulationResult, console: Console) -> None:
    table = Table(title=f"{r.task} ({r.mode}, seed {r.seed}): pooled test set")
    table.add_column("model")
    table.add_column("test AUC", justify="right")
    table.add_row("fedq global (final)", f"{r.final_auc:.4f}")
    table.add_row("centralized (pooled data)", f"{r.centralized_auc:.4f}")
    table.add_row("local-only, mean of banks", f"{r.local_only_auc_mean:.4f}")
    table.add_row("initial model (version 0)", f"{r.initial_auc:.4f}")
    console.print(table)
    _banks(r, console)
    _hostile(r, console)
    _flagged(r, console)
    fm, cr = r.final_metrics, r.centralized_risk
    if "pr_auc" in fm and "pr_auc" in r.centralized_metrics:
        console.print(
            f"PR-AUC {fm['pr_auc']:.4f} (centralized {r.centralized_metrics['pr_auc']:.4f}), "
            f"Brier {fm['brier']:.4f} ({r.centralized_metrics['brier']:.4f}); test positives "
            f"{100 * fm['positive_rate']:.1f}%"
        )
    fr = r.final_risk
    if fr.get("ks") is not None and cr.get("ks") is not None:
        console.print(
            f"KS {fr['ks']:.3f} ({cr['ks']:.3f}); flagging the top "
            f"{100 * fr['alert_rate']:g}%: precision {fr['precision_at_alert']:.3f} "
            f"({cr['precision_at_alert']:.3f}), recall {fr['recall_at_alert'] or 0:.3f} "
            f"({cr['recall_at_alert'] or 0:.3f})"
        )
    for line in _privacy_lines(r.privacy):
        console.print(line, highlight=False)
    for line in r.warnings:
        if line.startswith("the global model was still improving"):
            console.print(f"[yellow]warning:[/] {line}", highlight=False)
    console.print(
        f"{r.versions} versions (stopped by {_STOPS.get(r.stopped_by, 'an error')}), "
        f"{r.updates_accepted} updates accepted, {r.updates_refused} refused, "
        f"{r.wall_seconds:.1f} s (baselines {r.baseline_seconds:.1f} s); {_reached(r)}",
        highlight=False,
    )


def _privacy_lines(privacy: dict[str, Any]) -> list[str]:
    """One line per privacy mechanism the run used: its settings and what it spent."""
    lines = []
    rec = privacy.get("record")
    if rec is not None:
        spent = rec["epsilon_per_bank"]
        lines.append(
            f"record-level DP-SGD: clip {rec['clip']:g}, noise multiplier "
            f"{rec['noise_multiplier']:.3f}, delta {rec['delta']:g}; epsilon per bank "
            f"{min(spent.values()):.2f}-{max(spent.values()):.2f} (budget {rec['budget']})"
        )
    lap = privacy.get("laplace")
    if lap is not None:
        spent = lap["epsilon_per_bank"]
        lines.append(
            f"Laplace at the banks: L1 clip {lap['clip_l1']:g}, epsilon "
            f"{lap['epsilon_per_update']:g} per update; epsilon per bank up to "
            f"{max(spent.values()):.2f} (pure)"
        )
    bank = privacy.get("bank")
    if bank is not None:
        lines.append(
            f"bank-level DP at the aggregator: clip {bank['clip']:g}"
            f"{' (adaptive)' if bank['adaptive'] else ''}, noise multiplier "
            f"{bank['noise_multiplier']:.3f}; model epsilon {bank['model_epsilon']:.2f} "
            f"at delta {bank['delta']:g} after {bank['versions']} versions"
        )
    return lines


def _reached(r: SimulationResult) -> str:
    if r.target_auc is None:
        return str(r.target_note)
    when = "not reached" if r.time_to_target_s is None else f"{r.time_to_target_s:.2f} s"
    return f"target AUC {r.target_auc:.4f} (lift over initial {r.initial_auc:.4f}) reached: {when}"


def _banks(r: SimulationResult, console: Console) -> None:
    """Per bank: its data beside its weight, its updates, its own customers' AUC."""
    table = Table(title="per bank: own held-out customers")
    for name, justify in (
        ("bank", "left"),
        ("rows", "right"),
        ("speed", "right"),
        ("data / weight", "right"),
        ("accepted / refused", "right"),
        ("own AUC global", "right"),
        ("own AUC local", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for name, p in r.participants.items():
        refused = sum(p["updates_refused"].values())
        marks = [m for m, on in (("hostile", p.get("hostile")), ("flagged", p["flagged"])) if on]
        table.add_row(
            f"{name}{''.join(f' ({m})' for m in marks)}",
            str(p["rows"]),
            f"{p['speed']:g}",
            f"{100 * p['data_share']:.0f}% / {100 * p['weight_share']:.0f}%",
            f"{p['updates_accepted']} / {refused}",
            _own(p, "global_auc"),
            _own(p, "local_only_auc"),
        )
    console.print(table)


def _hostile(r: SimulationResult, console: Console) -> None:
    """Which banks ran an attack (--attack), and what the aggregator made of them."""
    hostile = [n for n, p in r.participants.items() if p.get("hostile")]
    if not hostile:
        return
    attack = r.participants[hostile[0]]["hostile"]
    refused = sum(sum(r.participants[n]["updates_refused"].values()) for n in hostile)
    accepted = sum(r.participants[n]["updates_accepted"] for n in hostile)
    clipped = sum(e.get("clipped", {}).get(n, 0) for e in r.events for n in hostile)
    whose = "its" if len(hostile) == 1 else "their"
    console.print(
        f"[red]hostile:[/] {', '.join(hostile)} ran the {attack} attack: {accepted} of "
        f"{whose} updates accepted ({clipped} clipped), {refused} refused",
        highlight=False,
    )


def _flagged(r: SimulationResult, console: Console) -> None:
    for name, p in r.participants.items():
        if p.get("flagged"):
            refused = p["updates_refused"]
            why = ", ".join(f"{k} {v}" for k, v in sorted(refused.items()))
            console.print(
                f"[yellow]flagged:[/] {name}: {sum(refused.values())} of "
                f"{p['updates_published']} updates refused ({why}), {p['updates_accepted']} "
                "accepted: its data barely reaches the model"
            )


def _spread(everything: SeedRuns, console: Console) -> None:
    for mode, numbers in everything.spread().items():
        table = Table(title=f"{mode}: over {len(everything.runs)} split seeds")
        table.add_column("")
        for col in ("mean", "std", "min", "max"):
            table.add_column(col, justify="right")
        for key in ("final_auc", "final_pr_auc", "centralized_auc", "gap", "refused_fraction"):
            s = numbers[key]
            if s["n"]:
                table.add_row(key, *(f"{s[c]:.4f}" for c in ("mean", "std", "min", "max")))
        for bank, entry in numbers["participants"].items():
            for key in ("own_global_auc", "own_local_only_auc"):
                s = entry[key]
                if s["n"]:
                    row = (f"{s[c]:.4f}" for c in ("mean", "std", "min", "max"))
                    table.add_row(f"{bank} {key}", *row)
        console.print(table)
