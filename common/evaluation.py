"""Evaluating a model's parameters on encoded data: AUC and log loss."""

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
    """``auc`` (omitted when ``y`` holds one class only), ``loss`` and ``n``."""
    if len(y) == 0:
        return {"n": 0.0}
    from sklearn.metrics import roc_auc_score  # scikit-learn loads slowly: only when scoring

    p = predict_proba(spec, params, x)
    loss = float(nn.functional.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y))
    out = {"loss": loss if math.isfinite(loss) else 1e9, "n": float(len(y))}
    if 0 < float(y.sum()) < len(y):
        out["auc"] = float(roc_auc_score(y.numpy(), p.numpy()))
    return out
