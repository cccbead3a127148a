"""``fedq audit report``'s page: one self-contained HTML file drawn from a
:class:`fedq.report.Report`.

Inline CSS, inline SVG charts (:mod:`fedq.svg_plots`), no script and no external
resource, so the file can be mailed, archived and opened offline. Every text that
comes from the store, the spec, the audit stream or the holdout's path is escaped.
docs/report.md says what each section shows and where it comes from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

from fedq.report import BankFacts, Report
from fedq.svg_plots import Series, bar_chart, line_chart

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;
max-width:1180px;color:#1b1b1b;line-height:1.4;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;border-bottom:2px solid #ddd;
padding-bottom:4px;margin-top:28px}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.n{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;max-height:420px}
.ok{color:#0a6b2d;font-weight:bold}.bad{color:#b00020;font-weight:bold}
.muted{color:#666}.plots{display:flex;flex-wrap:wrap;gap:16px}
.summary td{font-size:14px}.hash{word-break:break-all}.bank{white-space:nowrap}
"""


def render(report: Report) -> str:
    """The whole page."""
    r = report
    title = f"fedq audit report: {r.task} version {r.version}"
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="muted">Generated {_when(r.generated_at)} by <code>fedq audit report</code>'
        f" from the model store and the retained audit stream ({r.audit_messages} messages)."
        f" The head of the task is version {r.head}.</p>",
        _summary(r),
        _spec_section(r),
        _lineage_section(r),
        _verification_section(r),
        _banks_section(r),
        _evaluation_section(r),
        _bank_evaluation_section(r),
        _drift_section(r),
        _privacy_section(r),
        _settings_section(r),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


# ---------------------------------------------------------------------- pieces


def _when(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):  # a time no calendar holds
        return f"time {ts!r}"


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)


def _table(
    head: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "", attrs: str = ""
) -> str:
    """A table of already-escaped cells (a cell starting with ``\\x00`` is numeric)."""
    out = [f'<table class="{cls}"{attrs}><tr>']
    out.extend(f"<th>{escape(h)}</th>" for h in head)
    out.append("</tr>")
    for row in rows:
        out.append("<tr>")
        for cell in row:
            if cell.startswith("\x00"):
                out.append(f'<td class="n">{cell[1:]}</td>')
            else:
                out.append(f"<td>{cell}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _n(v: Any, digits: int = 4) -> str:
    """A numeric cell."""
    return "\x00" + escape(_fmt(v, digits))


def _verdict(r: Report) -> str:
    v = r.verification
    if v.ok:
        return (
            f'<span class="ok" id="verified">verified</span>: versions 1..{v.to_version} '
            f"replayed bit for bit ({v.checked} versions, {v.signatures} update signatures)"
        )
    why = v.error or (
        f"version {v.first_bad_version} diverges: {v.reason}"
        if v.first_bad_version is not None
        else v.note or v.reason
    )
    return f'<span class="bad" id="verified">NOT verified</span>: {escape(why)}'


def _summary(r: Report) -> str:
    auc = r.evaluation.risk.get("auc") if r.evaluation else None
    rows = [
        ("task", f'<code id="task">{escape(r.task)}</code>'),
        ("version", f'<span id="version">{r.version}</span>'),
        ("spec hash", f'<code class="hash" id="spec-hash">{escape(r.spec_hash)}</code>'),
        ("versions", f'<span id="versions">{len(r.versions)}</span> after version 0'),
        ("updates applied", str(sum(b.updates for b in r.banks))),
        ("refusals", str(sum(r.refusals.values()))),
        ("replay", _verdict(r)),
        (
            "ROC AUC (holdout)",
            f'<span id="auc">{_fmt(auc)}</span>' if r.evaluation else "no holdout given",
        ),
    ]
    return "<h2>Summary</h2>" + _table(
        ("", ""), ((escape(k), v) for k, v in rows), cls="summary"
    ).replace("<tr><th></th><th></th></tr>", "")


def _spec_section(r: Report) -> str:
    spec = r.spec
    model = spec.get("model", {})
    feats = spec.get("features", [])
    ident = spec.get("identity", {})
    target = spec.get("target", {})
    rows = [
        ("model", escape(json.dumps(model, sort_keys=True))),
        ("target", escape(f"{target.get('name')} (class 1: {target.get('positive')})")),
        ("features", str(len(feats))),
        ("participants", escape(", ".join(map(str, spec.get("participants", []))) or "-")),
        ("signatures required", _fmt(bool(ident.get("require_signatures")))),
        ("version hash", f'<code class="hash">{escape(r.version_hash)}</code>'),
        ("parameter hash", f'<code class="hash">{escape(r.param_hash)}</code>'),
        ("version made", escape(_when(r.created_at))),
    ]
    feature_rows = (
        (
            escape(str(f.get("name"))),
            escape(str(f.get("kind", "numeric"))),
            escape(_feature_detail(f)),
        )
        for f in feats
    )
    return (
        '<h2 id="spec">Model and task spec</h2>'
        "<p>The spec the task runs under, as the store holds it. Every update and every "
        f"model names its hash, <code>{escape(r.spec_hash)}</code> (SHA-256 of its "
        "canonical JSON).</p>"
        + _table(("", ""), ((escape(k), v) for k, v in rows)).replace(
            "<tr><th></th><th></th></tr>", ""
        )
        + "<details><summary>features</summary>"
        + _table(("feature", "kind", "encoding"), feature_rows)
        + "</details><details><summary>the whole spec (JSON)</summary><pre>"
        + escape(json.dumps(spec, indent=2, sort_keys=True))
        + "</pre></details>"
    )


def _feature_detail(f: Mapping[str, Any]) -> str:
    if "vocabulary" in f:
        vocab = [str(v) for v in f["vocabulary"]]
        return f"{len(vocab)} categories: {', '.join(vocab[:8])}" + (
            ", ..." if len(vocab) > 8 else ""
        )
    return f"mean {f.get('mean')}, std {f.get('std')}"


def _lineage_section(r: Report) -> str:
    strategies: dict[str, int] = {}
    for row in r.versions:
        s = str(row["strategy"])
        strategies[s] = strategies.get(s, 0) + 1
    made = ", ".join(f"{n} by {escape(s)}" for s, n in strategies.items()) or "none"
    bars = [(b.name, float(b.updates)) for b in r.banks]
    refusal_rows = (
        (f'<span class="reason">{escape(reason)}</span>', _n(count))
        for reason, count in r.refusals.items()
    )
    version_rows = (
        (
            _n(row["version"]),
            escape(str(row["strategy"])),
            _n(row["updates"]),
            escape(", ".join(row["banks"])),
            escape(_when(row["created_at"])),
        )
        for row in r.versions
    )
    refused = (
        _table(("reason", "refusals"), refusal_rows, attrs=' id="refusals"')
        if r.refusals
        else '<p id="refusals">No update was refused.</p>'
    )
    return (
        '<h2 id="lineage">Lineage</h2>'
        f"<p>{len(r.versions)} versions after version 0 ({made}); "
        f"{sum(b.updates for b in r.banks)} updates applied. Refusals are those the "
        f"aggregator recorded while the head was below version {r.version}.</p>"
        '<div class="plots">'
        + bar_chart("plot-updates", "updates applied per bank", bars)
        + bar_chart(
            "plot-refusals",
            "refusals by reason",
            [(k, float(v)) for k, v in r.refusals.items()],
        )
        + "</div><h3>Refusals by reason</h3>"
        + refused
        + "<details><summary>every version</summary>"
        + _table(("version", "strategy", "updates", "banks", "made"), version_rows)
        + "</details>"
    )


def _verification_section(r: Report) -> str:
    v = r.verification
    extra = ""
    if v.secure_versions:
        extra += f"<p>{v.secure_versions} versions were made by secure aggregation.</p>"
    if v.note:
        extra += f'<p class="bad">note: {escape(v.note)}</p>'
    return (
        '<h2 id="verification">Signature and replay verification</h2>'
        f"<p>{_verdict(r)}.</p>"
        "<p>Each version was recomputed from its parent and the retained updates of its "
        "lineage, by the strategy recorded with it, and compared with the stored "
        "parameter hash and the chained version hash; every update's signature was "
        "checked under the key the spec in force named for its bank (the same check as "
        "<code>fedq replay --verify</code>).</p>" + extra
    )


def _banks_section(r: Report) -> str:
    total = sum(b.weight for b in r.banks) or 1.0
    names = sorted({k for b in r.banks for k in b.metrics})
    head = [
        "bank",
        "updates",
        "weight share",
        "mean staleness",
        "refusals",
        "leave-one-out",
        "Shapley",
        *names,
    ]
    rows = [_bank_row(b, total, names) for b in r.banks]
    c = r.contributions
    if c is None:
        how = "Leave-one-out and Shapley values need a holdout set (<code>--data</code>)."
    elif c.error:
        how = f"No contribution values: {escape(c.error)}"
    else:
        how = (
            f"Leave-one-out and Shapley values: {escape(c.metric)} of the model of version "
            f"{r.version} replayed from each coalition's updates ({escape(c.how)}); all "
            f"banks {_fmt(c.value_all)}, no bank {_fmt(c.value_empty)}."
        )
    return (
        '<h2 id="banks">Per-bank contributions</h2>'
        + _table(head, rows, attrs=' id="bank-table"')
        + f"<p>{how}</p>"
        + (
            "<p>The metric columns are what each bank's last applied update carried "
            "(its own training and validation rows, as the bank reported them; "
            "<code>dp_epsilon_total</code>: the bank's privacy spent).</p>"
            if names
            else "<p>No update carried metrics.</p>"
        )
    )


def _bank_row(b: BankFacts, total: float, names: Sequence[str]) -> list[str]:
    refusals = ", ".join(f"{escape(k)} {v}" for k, v in sorted(b.refusals.items())) or "-"
    shapley = _fmt(b.shapley)
    if b.shapley_stderr is not None:
        shapley += f" ± {b.shapley_stderr:.4f}"
    return [
        f'<span class="bank">{escape(b.name)}</span>',
        _n(b.updates),
        _n(b.weight / total, 3),
        _n(b.mean_staleness, 2),
        refusals,
        _n(b.leave_one_out),
        "\x00" + escape(shapley),
        *(_n(_metric(b.metrics.get(k))) for k in names),
    ]


def _metric(v: float | None) -> float | int | None:
    """A reported metric: a count (``val_n``) without decimals."""
    return int(v) if v is not None and math.isfinite(v) and v.is_integer() else v


def _evaluation_section(r: Report) -> str:
    e = r.evaluation
    if e is None:
        why = (
            escape(r.evaluation_error)
            if r.evaluation_error
            else (
                "No holdout set was given (<code>--data holdout.csv</code>): the page has no "
                "ROC, PR or calibration curves."
            )
        )
        return f'<h2 id="evaluation">Evaluation</h2><p>{why}</p>'
    m = e.risk
    rows = [
        ("ROC AUC", m.get("auc")),
        ("PR AUC (average precision)", m.get("pr_auc")),
        ("KS", m.get("ks")),
        ("log loss", m.get("log_loss")),
        ("Brier score", m.get("brier")),
        (f"precision at alert rate {m.get('alert_rate')}", m.get("precision_at_alert")),
        (f"recall at alert rate {m.get('alert_rate')}", m.get("recall_at_alert")),
    ]
    cal = m.get("calibration", [])
    plots = [
        line_chart(
            "plot-roc",
            f"ROC curve (AUC {_fmt(m.get('auc'), 3)})",
            "false positive rate",
            "true positive rate",
            [Series(f"version {r.version}", e.roc["fpr"], e.roc["tpr"])],
            diagonal=True,
        ),
        line_chart(
            "plot-pr",
            f"precision-recall (AP {_fmt(m.get('pr_auc'), 3)})",
            "recall",
            "precision",
            [
                Series(f"version {r.version}", m["pr_curve"]["recall"], m["pr_curve"]["precision"]),
                Series(
                    f"base rate {m['positives'] / max(m['n'], 1):.2f}",
                    [0.0, 1.0],
                    [m["positives"] / max(m["n"], 1)] * 2,
                    dashed=True,
                ),
            ],
        ),
        line_chart(
            "plot-calibration",
            "calibration",
            "mean predicted probability",
            "observed rate",
            [
                Series(
                    f"version {r.version}",
                    [g["mean_predicted"] for g in cal],
                    [g["observed_rate"] for g in cal],
                    markers=True,
                )
            ],
            diagonal=True,
        ),
    ]
    cal_rows = (
        (
            _n(i + 1, 0),
            _n(g["lo"], 3),
            _n(g["hi"], 3),
            _n(g["n"]),
            _n(g["mean_predicted"], 3),
            _n(g["observed_rate"], 3),
        )
        for i, g in enumerate(cal)
    )
    skipped = "".join(f"<li>{escape(s)}</li>" for s in m.get("skipped", []))
    return (
        '<h2 id="evaluation">Evaluation</h2>'
        f'<p id="holdout">On the auditor\'s holdout set <code>{escape(e.source)}</code>: '
        f"{m['n']} rows, {m['positives']} positives (class 1), scored by the model of "
        f"version {r.version}. The banks' own validation scores are in the per-bank "
        "table.</p>"
        + _table(
            ("metric", "value"),
            ((escape(k), f'<span class="metric">{_n(v)[1:]}</span>') for k, v in rows),
            attrs=' id="metrics"',
        )
        + f'<div class="plots">{"".join(plots)}</div>'
        + "<h3>Calibration (equal-count groups by predicted probability)</h3>"
        + _table(("group", "lowest", "highest", "rows", "mean predicted", "observed"), cal_rows)
        + (f"<p>Not computed:</p><ul>{skipped}</ul>" if skipped else "")
    )


_BANK_METRICS = (
    ("ROC AUC", "auc"),
    ("PR AUC", "pr_auc"),
    ("KS", "ks"),
    ("log loss", "log_loss"),
    ("Brier", "brier"),
    ("positive rate", "positive_rate"),
)


def _bank_evaluation_section(r: Report) -> str:
    title = '<h2 id="bank-evaluation">Evaluation at the banks</h2>'
    if r.drift is None:
        return (
            f"{title}<p>The task does not monitor (no <code>monitoring</code> in its spec): "
            "the banks do not evaluate versions on their own recent rows.</p>"
        )
    if not r.bank_evaluations:
        return f"{title}<p>No bank has reported an evaluation of a version up to {r.version}.</p>"
    rows = [
        [
            _n(e["version"], 0),
            escape(str(e["participant"])),
            _n(e["rows"], 0),
            *(_n(e["metrics"].get(key)) for _, key in _BANK_METRICS),
            escape(_when(float(e["at"]))),
        ]
        for e in r.bank_evaluations
    ]
    return (
        f"{title}<p>Each bank scored the version it held on its own recent labelled rows and "
        "published only these metrics, signed (docs/drift.md); the newest per version and "
        "bank. The rows never left the banks.</p>"
        + _table(
            ["version", "bank", "rows", *(name for name, _ in _BANK_METRICS), "reported"],
            rows,
            attrs=' id="bank-evaluation-table"',
        )
    )


def _drift_section(r: Report) -> str:
    title = '<h2 id="drift">Drift at the banks</h2>'
    d = r.drift
    if d is None:
        return ""
    banks: Mapping[str, Any] = d["banks"]
    if not banks:
        return f"{title}<p>No bank has published a drift summary yet.</p>"
    rows = []
    for name, b in banks.items():
        features = b["features"].values()
        rows.append(
            [
                escape(name),
                _n(b["rows"], 0),
                _n(b["version"], 0),
                _n(max((f["psi"] for f in features), default=None)),
                _n(b["score"]["psi"]),
                escape(", ".join(b["drifted"]) or "none"),
            ]
        )
    signals = d["retrain_signals"]
    paused = d["paused"]
    return (
        f"{title}<p>Population stability index of each bank's newest recent rows against the "
        f"task's reference; above {_fmt(d['psi_threshold'])} is drift. Retraining signals "
        f"recorded: {len(signals)}. Training is "
        + (f"paused since version {escape(str(paused.get('version')))}" if paused else "running")
        + ".</p>"
        + _table(
            ["bank", "rows", "version", "max feature PSI", "score PSI", "over the threshold"],
            rows,
            attrs=' id="drift-table"',
        )
    )


def _privacy_section(r: Report) -> str:
    priv = r.spec.get("privacy") or {}
    parts = []
    record, laplace, bank = priv.get("record"), priv.get("laplace"), priv.get("bank")
    if record:
        parts.append(
            f"<li>record-level DP-SGD at each bank: {escape(json.dumps(record, sort_keys=True))}"
            "</li>"
        )
    if laplace:
        parts.append(
            f"<li>Laplace mechanism at each bank: {escape(json.dumps(laplace, sort_keys=True))}"
            "</li>"
        )
    if bank:
        parts.append(
            f"<li>bank-level DP at the aggregator: {escape(json.dumps(bank, sort_keys=True))}</li>"
        )
    spent = [
        (b.name, b.metrics["dp_epsilon_total"]) for b in r.banks if "dp_epsilon_total" in b.metrics
    ]
    p = r.privacy_record
    out = ['<h2 id="privacy">Privacy cost</h2>']
    if not parts:
        out.append(
            '<p id="privacy-none">The spec sets no differential privacy: no privacy cost is '
            "accounted (the updates are exact, not noised).</p>"
        )
    else:
        out.append(f"<ul>{''.join(parts)}</ul>")
    if p:
        out.append(
            f"<p>Bank-level DP at version {r.version}: epsilon "
            f"{escape(_fmt(p.get('epsilon'), 4))} cumulative over {escape(str(p.get('versions')))}"
            f" private versions, delta {escape(_fmt(p.get('delta'), 6))}, noise multiplier "
            f"{escape(_fmt(p.get('noise_multiplier')))}, clip bound {escape(_fmt(p.get('clip')))}"
            ".</p>"
        )
    if spent:
        out.append(
            "<p>Privacy each bank spent, as its last applied update reported it:</p>"
            + _table(("bank", "epsilon spent"), ((escape(n), _n(e)) for n, e in spent))
        )
    return "".join(out)


def _settings_section(r: Report) -> str:
    rows = (
        (f"<code>{escape(k)}</code>", f"<code>{escape(json.dumps(v, sort_keys=True))}</code>")
        for k, v in r.settings.items()
    )
    return (
        '<h2 id="settings">Settings</h2><p>The spec\'s settings the versions were made under.'
        "</p>" + _table(("setting", "value"), rows)
    )
