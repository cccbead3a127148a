"""Evaluating a model's parameters on encoded data.

:func:`evaluate` gives the few scores a worker and the aggregator track (ROC and PR
AUC, log loss, Brier); :func:`risk_metrics` (and :func:`evaluate_risk`, which scores
a model first) the fuller model-risk report: KS, a calibration table, precision and
recall at an alert rate, and the precision-recall curve.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from common.models import forward
from common.spec import TaskSpec
from common.wire import Tensors


def predict_proba(spec: TaskSpec, params: Tensors, x: torch.Tensor) -> torch.Tensor:
    """Probabilities of class 1 for the rows of ``x`` (the model in evaluation mode)."""
    with torch.no_grad():
        return torch.sigmoid(forward(spec.model, params, x).squeeze(1))


def roc_auc(y: npt.NDArray[np.floating[Any]], p: npt.NDArray[np.floating[Any]]) -> float:
    """ROC AUC of scores ``p`` for 0/1 labels ``y`` holding both classes: the
    Mann-Whitney statistic with tied scores counted half, which is the area under
    the ROC curve that scikit-learn's ``roc_auc_score`` computes (to rounding), in a
    fraction of its time (it is computed for every version)."""
    y = np.asarray(y, dtype=np.float64)
    ranks = _average_ranks(np.asarray(p, dtype=np.float64))
    pos = float(y.sum())
    neg = float(len(y)) - pos
    return float((ranks[y == 1].sum() - pos * (pos + 1.0) / 2.0) / (pos * neg))


def average_precision(y: npt.NDArray[np.floating[Any]], p: npt.NDArray[np.floating[Any]]) -> float:
    """Average precision (PR-AUC) as scikit-learn's ``average_precision_score``:
    ``sum_k (R_k - R_{k-1}) * P_k`` over the distinct scores from the highest down,
    ``P_k`` and ``R_k`` the precision and recall of flagging every row scoring at least
    the k-th; ``y`` must hold a positive."""
    y = np.asarray(y, dtype=np.float64)
    order = np.argsort(-np.asarray(p, dtype=np.float64), kind="mergesort")
    scores, labels = np.asarray(p, dtype=np.float64)[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # end of each tie group
    tp = np.cumsum(labels)[last]
    flagged = last + 1.0
    precision, recall = tp / flagged, tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _average_ranks(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """1-based ranks of ``values``, ties given the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def evaluate(spec: TaskSpec, params: Tensors, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Scores of ``params`` on ``(x, y)``.

    ``loss`` (log loss), ``brier`` (mean squared error of the probabilities),
    ``positive_rate`` and ``n``; ``auc`` (ROC) and ``pr_auc`` (average precision, what
    rare positives such as fraud call for) when ``y`` holds both classes.
    """
    if len(y) == 0:
        return {"n": 0.0}
    # A model pushed to ~1e38 (a hostile update nobody bounded) predicts NaN: scored as
    # uninformative (0.5), not a crash of whoever evaluates it.
    p = torch.nan_to_num(predict_proba(spec, params, x), nan=0.5)
    loss = float(nn.functional.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y))
    out = {
        "loss": loss if math.isfinite(loss) else 1e9,
        "brier": float(((p - y) ** 2).mean()),
        "positive_rate": float(y.mean()),
        "n": float(len(y)),
    }
    if 0 < float(y.sum()) < len(y):
        labels, scores = y.numpy(), p.numpy()
        out["auc"] = roc_auc(labels, scores)
        out["pr_auc"] = average_precision(labels, scores)
    return out


def evaluate_risk(
    spec: TaskSpec,
    params: Tensors,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    alert_rate: float = 0.05,
) -> dict[str, Any]:
    """:func:`risk_metrics` of ``params`` scored on ``(x, y)``."""
    if len(y) == 0:
        return risk_metrics(np.zeros(0), np.zeros(0), alert_rate=alert_rate)
    p = predict_proba(spec, params, x)
    return risk_metrics(y.detach().double().numpy(), p.double().numpy(), alert_rate=alert_rate)


#: Probabilities are clipped to [EPS, 1 - EPS] for the log loss (a certain, wrong
#: prediction costs -log(EPS), not infinity).
EPS = 1e-7
#: The most points :func:`risk_metrics` keeps of the precision-recall curve.
PR_POINTS = 101

_SCORED = ("auc", "pr_auc", "log_loss", "brier", "ks", "threshold_at_alert", "precision_at_alert")


def risk_metrics(
    y_true: npt.ArrayLike, prob: npt.ArrayLike, *, alert_rate: float = 0.05, bins: int = 10
) -> dict[str, Any]:
    """What a model-risk reviewer asks of a binary scorer, as JSON-able data.

    ``y_true`` holds 0/1 labels and ``prob`` the predicted probabilities of class 1
    (anything ``numpy.asarray`` takes: arrays, lists, CPU tensors). Returns:

    - ``n`` and ``positives`` (row counts);
    - ``auc`` (ROC), ``pr_auc`` (average precision), ``ks`` (Kolmogorov-Smirnov: the
      largest gap between the score CDFs of the two classes, ``max |TPR - FPR|``):
      both classes needed;
    - ``log_loss`` (probabilities clipped to ``[EPS, 1 - EPS]``) and ``brier``
      (mean squared error of the probabilities), both unweighted;
    - ``calibration``: rows sorted by probability (ties in input order) and cut into
      ``min(bins, n)`` consecutive groups of equal size (sizes differ by at most one,
      so tied probabilities may fall in two groups); per group ``lo``, ``hi`` (its
      smallest and largest probability), ``n``, ``mean_predicted``, ``observed_rate``;
    - the alert rule: ``threshold_at_alert`` is the ``k``-th highest probability for
      ``k = ceil(alert_rate * n)``, and every row scoring *at least* the threshold is
      flagged. Ties are therefore all flagged or none (the outcome never depends on
      row order), and ``alerts`` (the rows flagged) may exceed ``k``.
      ``precision_at_alert`` is the positive share of the flagged rows,
      ``recall_at_alert`` the flagged share of the positives;
    - ``pr_curve``: ``{"recall": [...], "precision": [...]}``, at most
      :data:`PR_POINTS` points of scikit-learn's precision-recall curve, evenly
      picked along it (both ends kept), for plotting;
    - ``skipped``: one ``"metric: reason"`` string per metric that could not be
      computed (no rows, one class only, probabilities not finite); that metric's
      value is None (JSON null).

    Never raises for an empty, tiny or one-class sample and never returns NaN or
    infinity. Raises ValueError only for misuse: lengths that differ, labels other
    than 0 and 1, ``alert_rate`` outside (0, 1] or ``bins`` below 1.
    """
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} probabilities")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if not 0.0 < alert_rate <= 1.0:
        raise ValueError(f"alert_rate must be in (0, 1], not {alert_rate!r}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, not {bins!r}")
    n, positives = len(y), int(y.sum())
    out: dict[str, Any] = dict.fromkeys(_SCORED)
    out.update(
        n=n,
        positives=positives,
        alert_rate=alert_rate,
        alerts=0,
        recall_at_alert=None,
        calibration=[],
        pr_curve={"recall": [], "precision": []},
        skipped=[],
    )
    bad = int((~np.isfinite(p)).sum())
    reason = "no rows" if n == 0 else f"{bad} of {n} probabilities are not finite" if bad else ""
    if reason:
        out["skipped"] = [f"{m}: {reason}" for m in (*_SCORED, "recall_at_alert", "calibration")]
        out["skipped"].append(f"pr_curve: {reason}")
        return out
    p = np.clip(p, 0.0, 1.0)
    clipped = np.clip(p, EPS, 1.0 - EPS)
    out["log_loss"] = float(-np.mean(y * np.log(clipped) + (1.0 - y) * np.log1p(-clipped)))
    out["brier"] = float(np.mean((p - y) ** 2))
    out["calibration"] = _calibration(y, p, bins)
    out.update(_alerts(y, p, alert_rate))
    if positives == 0:
        out["skipped"].append("recall_at_alert: no positive rows")
    if 0 < positives < n:
        out.update(_ranking(y, p))
    else:
        one = f"only one class present ({positives} positives of {n} rows)"
        out["skipped"] += [f"{m}: {one}" for m in ("auc", "pr_auc", "ks", "pr_curve")]
    return out


def _calibration(y: npt.NDArray[np.float64], p: npt.NDArray[np.float64], bins: int) -> list[Any]:
    order = np.argsort(p, kind="stable")
    table: list[dict[str, Any]] = []
    for idx in np.array_split(order, min(bins, len(p))):
        table.append(
            {
                "lo": float(p[idx].min()),
                "hi": float(p[idx].max()),
                "n": len(idx),
                "mean_predicted": float(p[idx].mean()),
                "observed_rate": float(y[idx].mean()),
            }
        )
    return table


def _alerts(
    y: npt.NDArray[np.float64], p: npt.NDArray[np.float64], alert_rate: float
) -> dict[str, Any]:
    n = len(p)
    # The 1e-9 keeps 0.05 * 1000 (50.000000000000004 in floating point) at 50.
    k = min(n, max(1, math.ceil(alert_rate * n - 1e-9)))
    threshold = float(np.sort(p)[n - k])
    flagged = p >= threshold
    hits, positives = float(y[flagged].sum()), float(y.sum())
    return {
        "threshold_at_alert": threshold,
        "alerts": int(flagged.sum()),
        "precision_at_alert": hits / float(flagged.sum()),
        "recall_at_alert": hits / positives if positives else None,
    }


def _ranking(y: npt.NDArray[np.float64], p: npt.NDArray[np.float64]) -> dict[str, Any]:
    """AUC, average precision, KS and the PR curve: both classes are present."""
    from sklearn.metrics import (  # slow to load
        average_precision_score,
        precision_recall_curve,
        roc_auc_score,
        roc_curve,
    )

    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    precision, recall, _ = precision_recall_curve(y, p)
    keep = np.unique(np.linspace(0, len(recall) - 1, min(PR_POINTS, len(recall))).round())
    keep = keep.astype(np.int64)
    return {
        "auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "ks": float(np.max(np.abs(tpr - fpr))),
        "pr_curve": {
            "recall": [float(v) for v in recall[keep]],
            "precision": [float(v) for v in precision[keep]],
        },
    }
