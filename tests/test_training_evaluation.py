"""Local training with a weighted positive class, and the evaluation metrics."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from common.evaluation import evaluate, predict_proba
from common.models import build_task_model, model_tensors
from common.spec import NumericFeature, TargetSpec, TaskSpec, TrainingSettings
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
