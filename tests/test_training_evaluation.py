"""Local training with a weighted positive class, the evaluation metrics, and the
model-risk report (:func:`common.evaluation.risk_metrics`)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    log_loss,
    precision_recall_curve,
    roc_auc_score,
)

from common.evaluation import evaluate, evaluate_risk, predict_proba, risk_metrics
from common.models import build_task_model, model_tensors
from common.spec import ModelSpec, NumericFeature, TargetSpec, TaskSpec, TrainingSettings
from participant.training import train_local


def _spec(positive_weight: float = 1.0) -> TaskSpec:
    return TaskSpec(
        task_id="weights",
        features=tuple(NumericFeature(name=f"x{i}") for i in range(3)),
        target=TargetSpec(name="y"),
        training=TrainingSettings(epochs=3, lr=0.1, positive_weight=positive_weight),
    )


def _rare(n: int = 400, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=gen) > 2.0).float()  # about 3% positive
    return x, y


def test_a_positive_weight_moves_the_model_towards_the_rare_class() -> None:
    x, y = _rare()
    assert 0 < float(y.mean()) < 0.06
    start = model_tensors(build_task_model(_spec()))
    plain, _ = train_local(_spec(), start, x, y, seed=3)
    weighted, _ = train_local(_spec(30.0), start, x, y, seed=3)
    again, _ = train_local(_spec(30.0), start, x, y, seed=3)
    assert all(torch.equal(weighted[k], again[k]) for k in weighted)  # deterministic

    def mean_score(delta: dict[str, torch.Tensor], spec: TaskSpec) -> float:
        params = {k: start[k] + delta[k] for k in start}
        return float(predict_proba(spec, params, x).mean())

    # Unweighted, the model learns to say "negative"; weighted, it scores higher.
    assert mean_score(weighted, _spec(30.0)) > mean_score(plain, _spec()) + 0.05
    assert float(weighted["0.bias"]) > float(plain["0.bias"])


def test_evaluate_reports_roc_and_pr_auc_log_loss_and_brier() -> None:
    x, y = _rare()
    spec = _spec()
    params = model_tensors(build_task_model(spec))
    params = {k: v + 0.3 for k, v in params.items()}
    out = evaluate(spec, params, x, y)
    p = predict_proba(spec, params, x)
    assert out["auc"] == pytest.approx(roc_auc_score(y.numpy(), p.numpy()))
    assert out["pr_auc"] == pytest.approx(average_precision_score(y.numpy(), p.numpy()))
    assert out["brier"] == pytest.approx(float(((p - y) ** 2).mean()))
    assert out["positive_rate"] == pytest.approx(float(y.mean()))
    assert out["n"] == len(y)
    one_class = evaluate(spec, params, x, torch.zeros(len(x)))
    assert "auc" not in one_class and "pr_auc" not in one_class and "brier" in one_class


# --- risk_metrics: the model-risk report -------------------------------------------


def _scored(n: int = 600, seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(np.float64)
    prob = 1.0 / (1.0 + np.exp(-(2.0 * y - 1.0 + rng.normal(size=n))))
    return y, prob


def _ks_by_hand(y: np.ndarray, p: np.ndarray) -> float:
    """Largest gap between the two classes' empirical score CDFs, at every score."""
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    gaps = [
        abs(
            np.searchsorted(pos, t, "right") / len(pos)
            - np.searchsorted(neg, t, "right") / len(neg)
        )
        for t in np.unique(p)
    ]
    return float(max(gaps))


def test_risk_metrics_agree_with_sklearn_and_a_by_hand_ks() -> None:
    y, p = _scored()
    out = risk_metrics(y, p)
    assert out["auc"] == pytest.approx(roc_auc_score(y, p))
    assert out["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert out["log_loss"] == pytest.approx(log_loss(y, p))
    assert out["brier"] == pytest.approx(brier_score_loss(y, p))
    assert out["ks"] == pytest.approx(_ks_by_hand(y, p))
    assert 0.3 < out["ks"] < 1.0
    assert out["n"] == len(y) and out["positives"] == int(y.sum())
    assert out["skipped"] == []
    json.dumps(out, allow_nan=False)  # JSON-able, no NaN


def test_the_calibration_table_has_equal_count_bins_in_order() -> None:
    y, p = _scored(n=603)
    table = risk_metrics(y, p, bins=10)["calibration"]
    assert len(table) == 10
    sizes = [row["n"] for row in table]
    assert sum(sizes) == 603 and max(sizes) - min(sizes) <= 1
    order = np.argsort(p, kind="stable")
    start = 0
    for row in table:
        idx = order[start : start + row["n"]]
        start += row["n"]
        assert row["lo"] == pytest.approx(p[idx].min()) and row["hi"] == pytest.approx(p[idx].max())
        assert row["mean_predicted"] == pytest.approx(p[idx].mean())
        assert row["observed_rate"] == pytest.approx(y[idx].mean())
    assert all(a["hi"] <= b["lo"] for a, b in itertools.pairwise(table))
    # A well-separated scorer: the top bin holds far more positives than the bottom one.
    assert table[-1]["observed_rate"] > table[0]["observed_rate"] + 0.3
    assert len(risk_metrics(y[:4], p[:4], bins=10)["calibration"]) == 4  # never an empty bin


def test_alerts_flag_the_top_share_and_all_ties_at_the_threshold() -> None:
    y = np.array([1, 0, 1, 0, 0, 0, 0, 1, 0, 0], dtype=np.float64)
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    out = risk_metrics(y, p, alert_rate=0.3)  # the top 3: 0.9, 0.8, 0.7
    assert out["threshold_at_alert"] == pytest.approx(0.7)
    assert out["alerts"] == 3
    assert out["precision_at_alert"] == pytest.approx(2 / 3)
    assert out["recall_at_alert"] == pytest.approx(2 / 3)
    # 0.05 * 1000 is 50.000000000000004 in floating point: still 50 alerts, not 51.
    big_y, big_p = _scored(n=1000)
    assert risk_metrics(big_y, big_p, alert_rate=0.05)["alerts"] == 50
    # Ties at the threshold are all flagged, whatever the row order.
    tied = np.array([0.9, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    for perm in (np.arange(10), np.arange(10)[::-1]):
        ties = risk_metrics(y[perm], tied[perm], alert_rate=0.2)
        assert ties["threshold_at_alert"] == 0.5 and ties["alerts"] == 4
        assert ties["precision_at_alert"] == pytest.approx(float(y[:4].sum()) / 4)
    flat = risk_metrics(y, np.full(10, 0.3), alert_rate=0.05)  # a constant score flags all
    assert flat["alerts"] == 10 and flat["precision_at_alert"] == pytest.approx(0.3)
    assert flat["recall_at_alert"] == 1.0


def test_the_pr_curve_is_thinned_to_101_points_keeping_both_ends() -> None:
    y, p = _scored(n=5000)
    curve = risk_metrics(y, p)["pr_curve"]
    full_precision, full_recall, _ = precision_recall_curve(y, p)
    assert len(full_recall) > 101
    assert len(curve["recall"]) == len(curve["precision"]) == 101
    assert curve["recall"][0] == full_recall[0] and curve["recall"][-1] == full_recall[-1]
    assert curve["precision"][0] == pytest.approx(full_precision[0])
    assert curve["recall"] == sorted(curve["recall"], reverse=True)
    small = risk_metrics(y[:30], p[:30])["pr_curve"]
    assert len(small["recall"]) == len(precision_recall_curve(y[:30], p[:30])[1])


@pytest.mark.parametrize(
    ("y", "p", "missing"),
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], {"auc", "pr_auc", "ks", "recall_at_alert"}),
        ([1, 1], [0.9, 0.4], {"auc", "pr_auc", "ks"}),
        ([1], [0.7], {"auc", "pr_auc", "ks"}),
        ([], [], {"auc", "log_loss", "brier", "ks", "precision_at_alert", "calibration"}),
        ([0, 1, 1], [0.2, float("nan"), 0.9], {"auc", "log_loss", "brier", "ks"}),
        ([0, 1], [0.0, 1.0], set()),
    ],
)
def test_risk_metrics_never_raise_or_give_nan_on_tiny_one_class_or_broken_input(
    y: list[float], p: list[float], missing: set[str]
) -> None:
    out = risk_metrics(y, p)
    text = json.dumps(out, allow_nan=False)  # raises on NaN or infinity
    skipped = {line.split(":")[0] for line in out["skipped"]}
    assert missing <= skipped
    for name in missing - {"calibration"}:
        assert out[name] is None
    for name in {"auc", "log_loss", "brier", "ks"} - skipped:
        assert isinstance(out[name], float) and math.isfinite(out[name])
    assert "NaN" not in text and "Infinity" not in text
    assert out["n"] == len(y)


def test_risk_metrics_refuse_misuse() -> None:
    with pytest.raises(ValueError, match="labels but"):
        risk_metrics([0, 1], [0.5])
    with pytest.raises(ValueError, match="0 or 1"):
        risk_metrics([0, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match="alert_rate"):
        risk_metrics([0, 1], [0.5, 0.5], alert_rate=0.0)
    with pytest.raises(ValueError, match="bins"):
        risk_metrics([0, 1], [0.5, 0.5], bins=0)


def test_evaluate_risk_scores_the_model_then_reports_its_risk_metrics() -> None:
    x, y = _rare()
    spec = _spec()
    params = {k: v + 0.3 for k, v in model_tensors(build_task_model(spec)).items()}
    p = predict_proba(spec, params, x)
    out = evaluate_risk(spec, params, x, y, alert_rate=0.1)
    assert out == risk_metrics(y.double().numpy(), p.double().numpy(), alert_rate=0.1)
    assert out["auc"] == pytest.approx(evaluate(spec, params, x, y)["auc"])
    assert out["alert_rate"] == 0.1 and out["alerts"] == 40
    empty = evaluate_risk(spec, params, x[:0], y[:0])
    assert empty["n"] == 0 and empty["auc"] is None


def test_the_fast_auc_and_average_precision_equal_scikit_learns() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    from common.evaluation import average_precision, roc_auc

    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(2, 400))
        y = rng.integers(0, 2, n).astype(np.float64)
        if y.sum() in (0, n):
            continue
        # Rounded scores: many ties, which both must count the same way.
        p = np.round(rng.random(n), int(rng.integers(1, 4)))
        assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert average_precision(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)
        checked += 1
    assert checked > 250


@pytest.mark.parametrize(
    "model",
    [
        ModelSpec(),
        ModelSpec(kind="mlp", hidden=(8, 4), dropout=0.2),
        ModelSpec(kind="mlp", hidden=(5,), activation="tanh"),
    ],
)
def test_the_functional_forward_equals_the_modules(model: ModelSpec) -> None:
    from common.models import build_model, forward

    net = build_model(model, 7, seed=3).eval()
    params = {k: v.detach() for k, v in net.state_dict().items()}
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(forward(model, params, x), net(x))
