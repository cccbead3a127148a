"""The figure of ``fedq simulate``: drawn from its JSON report, nothing else.

:func:`write_plot` takes the report as written (one mode: the result dict; ``--mode
both``: ``{"mode": "both", "modes": {"async": result, "sync": result}}``) and draws
four panels:

1. test AUC against wall-clock seconds for each mode, beside the centralized
   model, each bank's local-only model (a labelled line per bank, or the range
   as a band above :data:`MAX_BANK_LINES` banks), and the target; the stragglers
   (``speed > 1``) are named in the legend, and the versions that came after
   refused updates are marked on the curve;
2. the same AUC by version;
3. the precision-recall curves of the final global model and the centralized one;
4. their calibration (mean predicted probability against the observed rate per
   bin, beside the diagonal).

Fields added to the report later (``initial_auc``, ``events``, ``final_risk``,
``centralized_risk``) are drawn when present; a report without them still gives a
figure (panels 3 and 4 then say what is missing). It uses matplotlib's Agg canvas
directly (no pyplot, no global state), so it is safe in any thread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["MAX_BANK_LINES", "write_plot"]

#: Above this many banks, the local-only models are drawn as a band, not one line each.
MAX_BANK_LINES = 8

_COLORS = {"async": "tab:blue", "sync": "tab:orange"}
_CENTRAL = "tab:green"
_LOCAL = "tab:red"


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Draw the report of ``fedq simulate`` (one mode or both) as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = _runs(report)
    first = runs[0][1] if runs else {}
    fig = Figure(figsize=(14, 9.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    (by_time, by_version), (pr, calibration) = fig.subplots(2, 2)
    for mode, result in runs:
        _auc_curve(by_time, mode, result, x="seconds")
        _auc_curve(by_version, mode, result, x="version")
    for ax in (by_time, by_version):
        _yardsticks(ax, first)
    _stragglers(by_time, first)
    by_time.set_xlabel("wall-clock seconds")
    by_version.set_xlabel("global model version")
    for ax in (by_time, by_version):
        ax.set_ylabel("test AUC")
        ax.grid(alpha=0.3)
        _legend(ax, "lower right")
    by_time.set_title(_title(first, runs))
    by_version.set_title("test AUC by version")
    _pr_panel(pr, runs, first)
    _calibration_panel(calibration, runs, first)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _runs(report: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if report.get("mode") == "both" and isinstance(report.get("modes"), Mapping):
        return [(str(m), dict(r)) for m, r in report["modes"].items()]
    return [(str(report.get("mode", "fedq")), dict(report))]


def _num(value: Any) -> float | None:
    """A finite number, or None (absent, null, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _points(result: Mapping[str, Any], x: str) -> tuple[list[float], list[float]]:
    """The curve's (x, auc) points, from version 0 at ``initial_auc`` when reported."""
    xs: list[float] = []
    ys: list[float] = []
    start = _num(result.get("initial_auc"))
    if start is not None:
        xs.append(0.0)
        ys.append(start)
    for point in result.get("curve") or []:
        px, auc = _num(point.get(x)), _num(point.get("auc"))
        if px is not None and auc is not None:
            xs.append(px)
            ys.append(auc)
    return xs, ys


def _auc_curve(ax: Axes, mode: str, result: Mapping[str, Any], *, x: str) -> None:
    color = _COLORS.get(mode, "tab:blue")
    xs, ys = _points(result, x)
    label = f"fedq {mode} ({result.get('versions', len(xs))} versions)"
    reached = _num(result.get("time_to_target_s"))
    if reached is not None:
        label += f", target at {reached:.1f} s"
    ax.plot(xs, ys, color=color, lw=1.8, label=label)
    _refusals(ax, mode, result, x=x, color=color)


def _refusals(ax: Axes, mode: str, result: Mapping[str, Any], *, x: str, color: str) -> None:
    """Mark the versions published after refused updates (``events``), or count them."""
    events = result.get("events")
    total = sum(
        sum((p.get("updates_refused") or {}).values())
        for p in (result.get("participants") or {}).values()
        if isinstance(p, Mapping)
    )
    if not events:
        if total:  # refusals happened, but the report does not say when
            ax.plot([], [], " ", label=f"{mode}: {total} updates refused (times not reported)")
        return
    by_version = dict(zip(*_points(result, "version"), strict=True))
    mx: list[float] = []
    my: list[float] = []
    count = 0
    for event in events:
        refused = sum((event.get("refused") or {}).values())
        px, version = _num(event.get(x)), _num(event.get("version"))
        if not refused or px is None or version is None or version not in by_version:
            continue
        count += refused
        mx.append(px)
        my.append(by_version[version])
    if mx:
        ax.scatter(
            mx,
            my,
            marker="v",
            s=36,
            color=color,
            edgecolors="black",
            linewidths=0.6,
            zorder=3,
            label=f"{mode}: {count} updates refused (marked where they were)",
        )


def _yardsticks(ax: Axes, first: Mapping[str, Any]) -> None:
    """The centralized model, the banks' local-only models and the target."""
    central = _num(first.get("centralized_auc"))
    if central is not None:
        ax.axhline(central, color=_CENTRAL, ls="--", label=f"centralized (pooled) {central:.3f}")
    local = {
        str(bank): auc
        for bank, value in (first.get("local_only_auc") or {}).items()
        if (auc := _num(value)) is not None
    }
    speeds = _speeds(first)
    if 0 < len(local) <= MAX_BANK_LINES:
        styles = [":", "-.", (0, (1, 3)), (0, (5, 2)), (0, (3, 1, 1, 1))]
        for i, (bank, auc) in enumerate(local.items()):
            slow = f", speed {speeds[bank]:g}x" if speeds.get(bank, 1.0) > 1.0 else ""
            ax.axhline(
                auc,
                color=_LOCAL,
                ls=styles[i % len(styles)],
                lw=0.9,
                alpha=0.7,
                label=f"local-only {bank} {auc:.3f}{slow}",
            )
    elif local:
        lo, hi = min(local.values()), max(local.values())
        mean = sum(local.values()) / len(local)
        ax.axhspan(lo, hi, color=_LOCAL, alpha=0.12, label=f"local-only, {len(local)} banks")
        ax.axhline(mean, color=_LOCAL, ls=":", lw=1, label=f"local-only mean {mean:.3f}")
    target = _num(first.get("target_auc"))
    if target is not None:
        ax.axhline(target, color="gray", ls=":", lw=1, label=f"target {target:.3f}")


def _speeds(result: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for bank, info in (result.get("participants") or {}).items():
        speed = _num(info.get("speed")) if isinstance(info, Mapping) else None
        if speed is not None:
            out[str(bank)] = speed
    return out


def _stragglers(ax: Axes, first: Mapping[str, Any]) -> None:
    slow = {bank: s for bank, s in _speeds(first).items() if s > 1.0}
    if slow:
        shown = ", ".join(f"{bank} ({s:g}x)" for bank, s in list(slow.items())[:4])
        more = f" and {len(slow) - 4} more" if len(slow) > 4 else ""
        ax.plot([], [], " ", label=f"straggler{'s' if len(slow) > 1 else ''}: {shown}{more}")


def _title(first: Mapping[str, Any], runs: list[tuple[str, dict[str, Any]]]) -> str:
    banks = len(first.get("participants") or first.get("local_only_auc") or {})
    return f"fedq: {banks} banks, " + " vs ".join(mode for mode, _ in runs)


def _legend(ax: Axes, loc: Literal["lower right", "lower left", "upper left"]) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc=loc, fontsize=7)


def _risks(
    runs: list[tuple[str, dict[str, Any]]], first: Mapping[str, Any]
) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(label, color, risk_metrics) of each mode's final model, then the centralized one."""
    out: list[tuple[str, str, Mapping[str, Any]]] = []
    for mode, result in runs:
        risk = result.get("final_risk")
        if isinstance(risk, Mapping):
            out.append((f"fedq {mode} (final)", _COLORS.get(mode, "tab:blue"), risk))
    central = first.get("centralized_risk")
    if isinstance(central, Mapping):
        out.append(("centralized", _CENTRAL, central))
    return out


def _missing(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _pr_panel(ax: Axes, runs: list[tuple[str, dict[str, Any]]], first: Mapping[str, Any]) -> None:
    ax.set_title("precision-recall on the test set")
    rates: list[float] = []  # of the test sets the drawn curves were measured on
    for label, color, risk in _risks(runs, first):
        curve = risk.get("pr_curve") or {}
        recall, precision = curve.get("recall") or [], curve.get("precision") or []
        if not recall or len(recall) != len(precision):
            continue
        ap = _num(risk.get("pr_auc"))
        suffix = f" (AP {ap:.3f})" if ap is not None else ""
        ax.plot(recall, precision, color=color, lw=1.5, label=label + suffix)
        n, positives = _num(risk.get("n")), _num(risk.get("positives"))
        if n and positives is not None:
            rates.append(positives / n)
    if not ax.lines:
        _missing(ax, "no precision-recall curve in this report")
        return
    if rates:
        ax.axhline(rates[0], color="gray", ls=":", lw=1, label=f"base rate {rates[0]:.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    _legend(ax, "lower left")


def _calibration_panel(
    ax: Axes, runs: list[tuple[str, dict[str, Any]]], first: Mapping[str, Any]
) -> None:
    ax.set_title("calibration (equal-count bins)")
    drawn = False
    for label, color, risk in _risks(runs, first):
        rows = [r for r in risk.get("calibration") or [] if isinstance(r, Mapping)]
        pts = [(_num(r.get("mean_predicted")), _num(r.get("observed_rate"))) for r in rows]
        xs = [p for p, o in pts if p is not None and o is not None]
        ys = [o for p, o in pts if p is not None and o is not None]
        if xs:
            ax.plot(xs, ys, color=color, marker="o", ms=4, lw=1.2, label=label)
            drawn = True
    if not drawn:
        _missing(ax, "no calibration table in this report")
        return
    ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1, label="perfectly calibrated")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    _legend(ax, "upper left")
