"""Task specs validate at the edge; models are built deterministically from spec and seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.errors import SpecError
from common.models import build_model, build_task_model, model_tensors, tensor_specs
from common.spec import ModelSpec, TaskSpec, positive_weight_for
from common.wire import TensorSpec


def _doc(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "task_id": "credit",
        "features": [
            {"name": "duration", "kind": "numeric", "mean": 20.9, "std": 12.1},
            {"name": "purpose", "kind": "categorical", "vocabulary": ["car", "tv"]},
        ],
        "target": {"name": "creditability", "positive": "good"},
        "model": {"kind": "mlp", "hidden": [10]},
        "async": {"strategy": "fedbuff", "buffer_size": 5},
    }
    doc.update(changes)
    return doc


def test_spec_parses_and_round_trips_through_json() -> None:
    spec = TaskSpec.parse(_doc())
    assert spec.input_dim == 1 + 3  # numeric + (2 words + unknown)
    assert spec.async_.strategy == "fedbuff"
    assert spec.async_.buffer_size == 5
    assert TaskSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"task_id": "has.dot"}, "task_id"),
        ({"features": []}, "features"),
        ({"model": {"kind": "logreg", "hidden": [4]}}, "logreg has no hidden layers"),
        ({"model": {"kind": "mlp"}}, "at least one hidden layer"),
        ({"model": {"kind": "transformer"}}, "model.kind"),
        ({"target": {"name": "duration"}}, "also a feature"),
        ({"mode": "sometimes"}, "mode"),
        ({"surprise": 1}, "surprise"),
        (
            {"features": [{"name": "x", "kind": "numeric", "std": 0}]},
            "greater than 0",
        ),
        (
            {"features": [{"name": "c", "kind": "categorical", "vocabulary": ["a", "a"]}]},
            "repeated values",
        ),
    ],
)
def test_invalid_specs_fail_with_a_reason(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(SpecError, match="invalid task spec") as info:
        TaskSpec.parse(_doc(**changes))
    assert fragment in str(info.value)


def test_invalid_json_is_a_spec_error() -> None:
    with pytest.raises(SpecError):
        TaskSpec.from_json(b"{not json")


@pytest.mark.parametrize(
    ("spec", "dim", "shapes"),
    [
        (ModelSpec(kind="logreg"), 30, [(1, 30), (1,)]),
        (ModelSpec(kind="logreg"), 50, [(1, 50), (1,)]),
        (ModelSpec(kind="mlp", hidden=(10,)), 20, [(10, 20), (10,), (1, 10), (1,)]),
        (
            ModelSpec(kind="mlp", hidden=(64, 32), activation="tanh"),
            24,
            [(64, 24), (64,), (32, 64), (32,), (1, 32), (1,)],
        ),
    ],
)
def test_models_of_the_field(spec: ModelSpec, dim: int, shapes: list[tuple[int, ...]]) -> None:
    model = build_model(spec, dim, seed=1)
    assert [tuple(t.shape) for t in model_tensors(model).values()] == shapes
    out = model(torch.zeros(5, dim))
    assert out.shape == (5, 1)  # one logit; its sigmoid is the probability


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    spec = ModelSpec(kind="mlp", hidden=(16, 8))
    a = model_tensors(build_model(spec, 12, seed=7))
    b = model_tensors(build_model(spec, 12, seed=7))
    c = model_tensors(build_model(spec, 12, seed=8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_building_a_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(ModelSpec(kind="mlp", hidden=(8,)), 4, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_dropout_and_task_model() -> None:
    spec = TaskSpec.parse(_doc(model={"kind": "mlp", "hidden": [6], "dropout": 0.2}))
    model = build_task_model(spec)
    assert any(isinstance(m, nn.Dropout) for m in model)
    specs = tensor_specs(model_tensors(model))
    assert specs["0.weight"] == TensorSpec((6, spec.input_dim), "f32")


def test_sample_bound_is_the_smaller_of_the_declared_count_and_the_task_maximum() -> None:
    spec = TaskSpec.parse(
        _doc(
            participants=["bank-a", "bank-b"],
            max_samples=500,
            declared_samples={"bank-a": 100, "bank-b": 9000},
        )
    )
    assert spec.sample_bound("bank-a") == 100
    assert spec.sample_bound("bank-b") == 500
    assert TaskSpec.parse(_doc()).sample_bound("anyone") == 1_000_000


def test_declared_samples_must_name_participants_and_errors_fit_one_line() -> None:
    with pytest.raises(SpecError, match="declared_samples names non-participants: bank-z") as e:
        TaskSpec.parse(_doc(participants=["bank-a"], declared_samples={"bank-z": 5}))
    assert "\n" not in str(e.value)
    with pytest.raises(SpecError, match="max_samples"):
        TaskSpec.parse(_doc(max_samples=0))


def test_the_positive_weight_follows_the_class_weight_rule() -> None:
    assert positive_weight_for(0.3, "auto") == 1.0  # German credit: not rare
    assert positive_weight_for(0.02, "auto") == pytest.approx(49.0)
    assert positive_weight_for(0.02, "none") == 1.0
    assert positive_weight_for(0.5, "7.5") == 7.5
    for bad in ("x", "0", "-2", "inf"):
        with pytest.raises(SpecError, match="class weight"):
            positive_weight_for(0.5, bad)
    with pytest.raises(SpecError, match="positive rate"):
        positive_weight_for(0.0, "auto")
