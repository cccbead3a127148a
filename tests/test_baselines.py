"""The simulation's yardsticks (fedq.baselines): converged fits, in parallel, deterministic."""

from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from common.evaluation import evaluate, predict_proba
from common.models import build_task_model, model_tensors
from common.spec import ModelSpec, NumericFeature, TargetSpec, TaskSpec, TrainingSettings
from fedq.baselines import CENTRALIZED, Fitted, fit, fit_all
from participant.data import encode, infer_features, load_table

Split = tuple[TaskSpec, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _german(seed: int) -> Split:
    """The bundled German credit data, split and encoded as ``fedq simulate`` does."""
    df = load_table(Path(str(files("fedq") / "data" / "german_credit.csv")))
    labels = (df["creditability"].astype(str) == "bad").to_numpy()
    train, test = train_test_split(df, test_size=0.25, random_state=seed, stratify=labels)
    train = train.reset_index(drop=True)
    spec = TaskSpec(
        task_id="german",
        features=infer_features(train, "creditability").features,
        target=TargetSpec(name="creditability", positive="bad"),
        seed=seed,
    )
    x_train, y_train = encode(train, spec)
    x_test, y_test = encode(test.reset_index(drop=True), spec)
    return spec, x_train, y_train, x_test, y_test


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_centralized_logistic_model_matches_sklearn_on_german_credit(seed: int) -> None:
    spec, x_train, y_train, x_test, y_test = _german(seed)
    fitted = fit(spec, x_train, y_train, max_epochs=500, seed=seed)
    ours = evaluate(spec, fitted.params, x_test, y_test)["auc"]
    sk = LogisticRegression(max_iter=5000).fit(x_train.numpy(), y_train.numpy())
    theirs = roc_auc_score(y_test.numpy(), sk.predict_proba(x_test.numpy())[:, 1])
    assert ours >= theirs - 0.005
    how = fitted.how
    assert how["method"] == "lbfgs" and how["converged"] is True
    assert 0 < how["epochs"] < 500 and how["rows"] == len(y_train)
    assert how["l2"] == pytest.approx(1 / len(y_train))
    # The same objective as sklearn's C=1, minimised at least as well, and the same weights.
    w, b = fitted.params["0.weight"].double().numpy()[0], float(fitted.params["0.bias"])
    assert (
        _objective(x_train, y_train, w, b)
        <= _objective(x_train, y_train, sk.coef_[0], float(sk.intercept_[0])) + 1e-7
    )
    exact = LogisticRegression(max_iter=5000, tol=1e-10).fit(x_train.numpy(), y_train.numpy())
    assert np.allclose(w, exact.coef_[0], atol=1e-2)


def _objective(x: torch.Tensor, y: torch.Tensor, w: np.ndarray, b: float) -> float:
    """Mean log loss plus ||w||^2 / (2 n): sklearn's LogisticRegression(C=1) over n."""
    z = x.double().numpy() @ w + b
    t = y.double().numpy()
    loss = np.logaddexp(0.0, z) - t * z
    return float(loss.mean() + (w @ w) / (2 * len(t)))


def _task(d: int = 4, **model: object) -> TaskSpec:
    return TaskSpec(
        task_id="fit",
        features=tuple(NumericFeature(name=f"x{i}") for i in range(d)),
        target=TargetSpec(name="y"),
        model=ModelSpec.model_validate(model) if model else ModelSpec(),
    )


def _linear(n: int, seed: int, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    logit = x @ torch.linspace(-1.5, 1.5, d) - 1.0
    y = (torch.rand(n, generator=gen) < torch.sigmoid(logit)).float()
    return x, y


def test_a_budget_too_small_is_reported_as_not_converged() -> None:
    x, y = _linear(500, 1)
    short = fit(_task(), x, y, max_epochs=2, seed=0)
    assert short.how["converged"] is False and short.how["epochs"] <= 2
    full = fit(_task(), x, y, max_epochs=500, seed=0)
    assert full.how["converged"] is True
    assert full.how["train_loss"] < short.how["train_loss"]


def test_the_positive_weight_of_the_spec_is_used() -> None:
    x, y = _linear(800, 2)
    plain = _task()
    heavy = plain.model_copy(update={"training": TrainingSettings(positive_weight=20.0)})
    p_plain = predict_proba(plain, fit(plain, x, y, max_epochs=300, seed=0).params, x)
    p_heavy = predict_proba(heavy, fit(heavy, x, y, max_epochs=300, seed=0).params, x)
    assert float(p_heavy.mean()) > float(p_plain.mean()) + 0.2


def test_the_mlp_fits_what_a_linear_model_cannot_and_stops_early() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 2, generator=gen)
    y = ((x[:, 0] * x[:, 1]) > 0).float()  # XOR of the signs
    x_test, y_test = x[2000:], y[2000:]
    mlp = _task(2, kind="mlp", hidden=(16,))
    fitted = fit(mlp, x[:2000], y[:2000], max_epochs=400, seed=0)
    linear = fit(_task(2), x[:2000], y[:2000], max_epochs=400, seed=0)
    assert evaluate(mlp, fitted.params, x_test, y_test)["auc"] > 0.95
    assert evaluate(_task(2), linear.params, x_test, y_test)["auc"] < 0.65
    how = fitted.how
    assert how["method"] == "adam" and how["converged"] is True
    assert how["best_epoch"] < how["epochs"] < 400 and how["val_rows"] == 400


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_one_class_tiny_and_empty_samples_fit_without_raising(kind: str) -> None:
    spec = _task(kind=kind, hidden=(8,)) if kind == "mlp" else _task()
    x, _ = _linear(60, 3)
    for xs, ys in ((x, torch.zeros(60)), (x[:3], torch.tensor([0.0, 1.0, 1.0]))):
        fitted = fit(spec, xs, ys, max_epochs=200, seed=0)
        assert all(bool(torch.isfinite(t).all()) for t in fitted.params.values())
        assert math.isfinite(fitted.how["train_loss"])
        assert all(t.dtype == torch.float32 for t in fitted.params.values())
    empty = fit(spec, x[:0], torch.zeros(0), max_epochs=10, seed=0)
    assert empty.how["converged"] is False
    start = model_tensors(build_task_model(spec))
    assert all(torch.equal(empty.params[k], start[k]) for k in start)


def _banks(n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {f"bank-{i:02d}": _linear(150 + 10 * i, 10 + i) for i in range(n)}


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_fit_all_gives_the_same_params_whatever_the_number_of_workers(kind: str) -> None:
    spec = _task(kind=kind, hidden=(8,)) if kind == "mlp" else _task()
    pooled = _linear(2000, 9)
    banks = _banks(5)
    runs: list[tuple[Fitted, dict[str, Fitted]]] = []
    for workers in (1, 3):
        seen: list[str] = []
        runs.append(
            fit_all(
                spec, pooled, banks, max_epochs=100, seed=7, workers=workers, on_done=seen.append
            )
        )
        assert sorted(seen) == sorted([CENTRALIZED, *banks])
    (c1, l1), (c3, l3) = runs
    assert list(l1) == list(l3) == list(banks)  # the banks' order, not the finishing order
    for a, b in [(c1, c3)] + [(l1[k], l3[k]) for k in banks]:
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    # Each fit is the fit of that data alone, not of another bank's.
    assert not torch.equal(l1["bank-00"].params["0.weight"], l1["bank-01"].params["0.weight"])
    assert torch.equal(
        c1.params["0.weight"],
        fit_all(spec, pooled, {}, max_epochs=100, seed=7, workers=2, on_done=None)[0].params[
            "0.weight"
        ],
    )


def test_fit_all_restores_torch_threads_and_refuses_bad_arguments() -> None:
    before = torch.get_num_threads()
    fit_all(_task(), _linear(100, 1), _banks(2), max_epochs=20, seed=0, workers=2, on_done=None)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="workers"):
        fit_all(_task(), _linear(100, 1), {}, max_epochs=20, seed=0, workers=0, on_done=None)
    with pytest.raises(ValueError, match="centralized"):
        fit_all(
            _task(),
            _linear(100, 1),
            {CENTRALIZED: _linear(50, 2)},
            max_epochs=5,
            seed=0,
            workers=1,
            on_done=None,
        )
    with pytest.raises(ValueError, match="max_epochs"):
        fit(_task(), *_linear(10, 1), max_epochs=0, seed=0)
