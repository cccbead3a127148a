"""Summaries of py-spy's raw (collapsed-stack) output, so a profile fits in a report."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter, or on PATH."""
    import sys

    here = Path(sys.executable).parent / "py-spy"
    if here.exists():
        return str(here)
    return shutil.which("py-spy")


#: Frames every sample passes through (event loop, thread pool, runners): not informative.
_GENERIC = (
    "threading.py",
    "concurrent/futures/thread.py",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "asyncio/events.py",
    "<frozen importlib",
)


def _short(frame: str, with_line: bool) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if with_line and m.group("line"):
        path = f"{path}:{m.group('line')}"
    return f"{m.group('func')} ({path})"


def summarize(path: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive sample shares per function from ``py-spy record --format raw``.

    Only on-CPU samples are recorded (py-spy drops idle threads by default), so the
    shares are of the time some thread of the process was busy.
    """
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count_s = line.rpartition(" ")
        try:
            count = int(count_s)
        except ValueError:
            continue
        raw = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not raw:
            continue
        total += count
        self_counts[_short(raw[-1], with_line=True)] += count
        for f in {_short(f, with_line=False) for f in raw}:
            if not any(g in f for g in _GENERIC):
                incl_counts[f] += count

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100.0 * n / total, 1)) for f, n in c.most_common(top)]

    return {"samples": total, "self_pct": share(self_counts), "inclusive_pct": share(incl_counts)}


def render(summary: dict[str, Any], top: int = 12) -> str:
    lines = [f"  samples: {summary['samples']}", "  self time (%):"]
    lines += [f"    {pct:5.1f}  {f}" for f, pct in summary["self_pct"][:top]]
    lines.append("  inclusive (%):")
    lines += [f"    {pct:5.1f}  {f}" for f, pct in summary["inclusive_pct"][:top]]
    return "\n".join(lines)
