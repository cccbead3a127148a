"""Evaluating a model's parameters on encoded data: ROC and PR AUC, log loss, Brier."""

from __future__ import annotations

import math

import torch
from torch import nn

from common.models import build_task_model
from common.spec import TaskSpec
from common.wire import Tensors


def predict_proba(spec: TaskSpec, params: Tensors, x: torch.Tensor) -> torch.Tensor:
    """Probabilities of class 1 for the rows of ``x``."""
    model = build_task_model(spec)
    model.load_state_dict(params)
    model.eval()
    with torch.no_grad():
        return torch.sigmoid(model(x).squeeze(1))


def evaluate(spec: TaskSpec, params: Tensors, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Scores of ``params`` on ``(x, y)``.

    ``loss`` (log loss), ``brier`` (mean squared error of the probabilities),
    ``positive_rate`` and ``n``; ``auc`` (ROC) and ``pr_auc`` (average precision, what
    rare positives such as fraud call for) when ``y`` holds both classes.
    """
    if len(y) == 0:
        return {"n": 0.0}
    from sklearn.metrics import average_precision_score, roc_auc_score  # slow to load

    p = predict_proba(spec, params, x)
    loss = float(nn.functional.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y))
    out = {
        "loss": loss if math.isfinite(loss) else 1e9,
        "brier": float(((p - y) ** 2).mean()),
        "positive_rate": float(y.mean()),
        "n": float(len(y)),
    }
    if 0 < float(y.sum()) < len(y):
        out["auc"] = float(roc_auc_score(y.numpy(), p.numpy()))
        out["pr_auc"] = float(average_precision_score(y.numpy(), p.numpy()))
    return out
