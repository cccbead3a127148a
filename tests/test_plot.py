"""The figure of ``fedq simulate`` (fedq.plot), drawn from reports with and without the
fields added for the model-risk report."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from common.evaluation import risk_metrics
from fedq import plot
from fedq.plot import write_plot


def _risk(strength: float, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    y = (rng.random(300) < 0.3).astype(np.float64)
    prob = 1.0 / (1.0 + np.exp(-(strength * (2.0 * y - 1.0) + rng.normal(size=300))))
    return risk_metrics(y, prob)


def _result(mode: str, banks: int = 4, *, new_fields: bool = True) -> dict[str, Any]:
    names = [f"bank-{i + 1:02d}" for i in range(banks)]
    result: dict[str, Any] = {
        "mode": mode,
        "curve": [
            {"seconds": 0.4 * v, "version": v, "auc": 0.75 - 0.2 * 0.8**v} for v in range(1, 16)
        ],
        "centralized_auc": 0.78,
        "local_only_auc": {n: 0.66 + 0.01 * i for i, n in enumerate(names)},
        "local_only_auc_mean": 0.68,
        "target_auc": 0.741,
        "time_to_target_s": 3.6,
        "versions": 15,
        "participants": {
            n: {"speed": 10.0 if i == 1 else 1.0, "updates_refused": {"too_stale": 2} if i else {}}
            for i, n in enumerate(names)
        },
    }
    if new_fields:
        result["initial_auc"] = 0.5
        result["events"] = [
            {"seconds": 1.2, "version": 3, "refused": {names[1]: 1}},
            {"seconds": 2.0, "version": 5, "refused": {}},
            {"seconds": 4.4, "version": 11, "refused": {names[1]: 2}},
        ]
        result["final_risk"] = _risk(1.0)
        result["centralized_risk"] = _risk(1.4, seed=1)
    return result


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 30_000  # four drawn panels, not a blank canvas
    pixels = imread(str(path))
    assert pixels.shape[0] > 500 and pixels.shape[1] > 800
    assert float(pixels[..., :3].std()) > 0.05  # something is drawn


@pytest.mark.parametrize("new_fields", [True, False])
def test_both_modes_render_with_and_without_the_new_fields(
    tmp_path: Path, new_fields: bool
) -> None:
    report = {
        "mode": "both",
        "modes": {m: _result(m, new_fields=new_fields) for m in ("async", "sync")},
    }
    report = json.loads(json.dumps(report, allow_nan=False))  # as read back from the file
    path = tmp_path / "deep" / "plot.png"
    write_plot(report, path)
    _check_png(path)


def test_one_mode_many_banks_and_one_class_risk_render(tmp_path: Path) -> None:
    result = _result("async", banks=20)
    result["final_risk"] = risk_metrics([0, 0, 0], [0.1, 0.2, 0.3])  # no PR curve: skipped
    result["curve"] = []
    path = tmp_path / "plot.png"
    write_plot(result, path)
    _check_png(path)


def _labels(draw: Any, *args: Any) -> list[str]:
    ax = Figure().subplots()
    draw(ax, *args)
    return ax.get_legend_handles_labels()[1]


def test_the_legend_names_each_bank_or_a_band_and_the_straggler() -> None:
    few = _labels(plot._yardsticks, _result("async", banks=4))
    assert [label for label in few if label.startswith("local-only bank-")] == [
        "local-only bank-01 0.660",
        "local-only bank-02 0.670, speed 10x",
        "local-only bank-03 0.680",
        "local-only bank-04 0.690",
    ]
    assert "centralized (pooled) 0.780" in few and "target 0.741" in few
    many = _labels(plot._yardsticks, _result("async", banks=plot.MAX_BANK_LINES + 1))
    assert "local-only, 9 banks" in many
    assert not any(label.startswith("local-only bank-") for label in many)
    assert _labels(plot._stragglers, _result("async")) == ["straggler: bank-02 (10x)"]
    assert _labels(plot._stragglers, {"participants": {"a": {"speed": 1.0}}}) == []


def test_the_pr_panel_draws_only_the_curves_present_with_their_base_rate() -> None:
    result = _result("async")
    result["final_risk"] = risk_metrics([0, 0, 0], [0.1, 0.2, 0.3])  # one class: no curve
    labels = _labels(plot._pr_panel, [("async", result)], result)
    central = result["centralized_risk"]
    rate = central["positives"] / central["n"]
    assert labels == [f"centralized (AP {central['pr_auc']:.3f})", f"base rate {rate:.3f}"]
    del result["centralized_risk"]
    ax = Figure().subplots()
    plot._pr_panel(ax, [("async", result)], result)
    assert not ax.lines and "no precision-recall curve" in ax.texts[0].get_text()


def test_refusals_are_marked_at_their_versions_or_counted_when_untimed() -> None:
    result = _result("sync")
    ax = Figure().subplots()
    plot._refusals(ax, "sync", result, x="seconds", color="tab:orange")
    (marks,) = ax.collections
    offsets = np.asarray(marks.get_offsets())
    # Versions 3 and 11 followed refusals (version 5's event refused nothing).
    assert offsets[:, 0].tolist() == [1.2, 4.4]
    aucs = {p["version"]: p["auc"] for p in result["curve"]}
    assert offsets[:, 1].tolist() == pytest.approx([aucs[3], aucs[11]])
    assert ax.get_legend_handles_labels()[1] == ["sync: 3 updates refused (marked where they were)"]
    untimed = copy.deepcopy(result)
    del untimed["events"]
    labels = _labels(lambda a: plot._refusals(a, "sync", untimed, x="seconds", color="k"))
    assert labels == ["sync: 6 updates refused (times not reported)"]
