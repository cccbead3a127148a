"""Small inline SVG charts for ``fedq audit report``: line charts (ROC, PR,
calibration) and horizontal bar charts (updates per bank, refusals by reason).

They are drawn here, without matplotlib, so that the auditor's install
(``fedq[aggregator]``) needs nothing more, and the page holds them as plain markup
(no script, no external file). Every text is escaped; every number is finite (a
value that is not is left out of the chart).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

#: The colours of successive series (colour-blind safe: Okabe-Ito).
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
WIDTH, HEIGHT = 360, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 12, 28, 40


@dataclass(frozen=True, slots=True)
class Series:
    """One line of a :func:`line_chart`: points ``(x, y)``, optional markers."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float]
    markers: bool = False
    dashed: bool = False


def _num(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _finite(xs: Sequence[float], ys: Sequence[float]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in zip(xs, ys, strict=False) if math.isfinite(x) and math.isfinite(y)]


def line_chart(
    plot_id: str,
    title: str,
    x_label: str,
    y_label: str,
    series: Sequence[Series],
    *,
    diagonal: bool = False,
) -> str:
    """An SVG chart of ``series`` on the unit square (probabilities, rates), with a
    dotted diagonal if asked (the chance line, perfect calibration) and a legend."""
    pw, ph = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + min(max(x, 0.0), 1.0) * pw

    def py(y: float) -> float:
        return _TOP + (1.0 - min(max(y, 0.0), 1.0)) * ph

    out = [_open(plot_id, title), _frame(pw, ph)]
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(
            f'<line x1="{_num(px(t))}" y1="{_num(py(0))}" x2="{_num(px(t))}" '
            f'y2="{_num(py(0) + 4)}" stroke="#444"/>'
            f'<text x="{_num(px(t))}" y="{_num(py(0) + 15)}" text-anchor="middle">{t:g}</text>'
            f'<line x1="{_num(px(0) - 4)}" y1="{_num(py(t))}" x2="{_num(px(0))}" '
            f'y2="{_num(py(t))}" stroke="#444"/>'
            f'<text x="{_num(px(0) - 6)}" y="{_num(py(t) + 4)}" text-anchor="end">{t:g}</text>'
        )
    if diagonal:
        out.append(
            f'<line x1="{_num(px(0))}" y1="{_num(py(0))}" x2="{_num(px(1))}" y2="{_num(py(1))}" '
            'stroke="#999" stroke-dasharray="3 3"/>'
        )
    for i, s in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        points = _finite(s.xs, s.ys)
        if not points:
            continue
        path = " ".join(f"{_num(px(x))},{_num(py(y))}" for x, y in points)
        dash = ' stroke-dasharray="6 3"' if s.dashed else ""
        out.append(
            f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="2"{dash} '
            f'points="{path}"><title>{escape(s.name)}</title></polyline>'
        )
        if s.markers:
            out.extend(
                f'<circle cx="{_num(px(x))}" cy="{_num(py(y))}" r="3" fill="{colour}"/>'
                for x, y in points
            )
        ly = _TOP + 14 + 14 * i
        out.append(
            f'<line x1="{_num(px(0.55))}" y1="{ly - 4}" x2="{_num(px(0.62))}" y2="{ly - 4}" '
            f'stroke="{colour}" stroke-width="2"{dash}/>'
            f'<text x="{_num(px(0.64))}" y="{ly}">{escape(s.name)}</text>'
        )
    out.append(
        f'<text x="{_num(_LEFT + pw / 2)}" y="{HEIGHT - 6}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
        f'<text transform="translate(12 {_num(_TOP + ph / 2)}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text></svg>'
    )
    return "".join(out)


def bar_chart(plot_id: str, title: str, bars: Sequence[tuple[str, float]]) -> str:
    """A horizontal bar chart: one bar per ``(label, value)``, the value written at
    its end (values below zero are drawn as zero)."""
    row = 22
    label_w = 120
    height = _TOP + row * max(len(bars), 1) + 12
    top = max((v for _, v in bars if math.isfinite(v)), default=0.0)
    scale = (WIDTH - label_w - 60) / top if top > 0 else 0.0
    out = [_open(plot_id, title, height)]
    for i, (label, value) in enumerate(bars):
        y = _TOP + row * i
        w = max(value, 0.0) * scale if math.isfinite(value) else 0.0
        out.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{escape(label)}</text>'
            f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{_num(w)}" height="{row - 6}" '
            f'fill="{COLOURS[0]}"><title>{escape(label)}: {value:g}</title></rect>'
            f'<text x="{_num(label_w + w + 4)}" y="{y + 15}">{value:g}</text>'
        )
    if not bars:
        out.append(f'<text x="{label_w}" y="{_TOP + 15}">none</text>')
    out.append("</svg>")
    return "".join(out)


def _open(plot_id: str, title: str, height: int = HEIGHT) -> str:
    t = escape(title)
    return (
        f'<svg class="plot" id="{escape(plot_id)}" '
        f'role="img" aria-label="{t}" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">'
        f"<title>{t}</title>"
        f'<text x="{WIDTH / 2:g}" y="16" text-anchor="middle" font-weight="bold" '
        f'font-size="12">{t}</text>'
    )


def _frame(pw: float, ph: float) -> str:
    return (
        f'<rect x="{_LEFT}" y="{_TOP}" width="{_num(pw)}" height="{_num(ph)}" '
        'fill="none" stroke="#444"/>'
    )
