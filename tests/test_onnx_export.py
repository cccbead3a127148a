"""``fedq export --format onnx``: the ONNX model takes the raw German credit columns and
scores every row as fedq does (participant.data encoding, common.models.forward, sigmoid)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort  # type: ignore[import-untyped]
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from aggregator.store import RedisModelStore, connect_redis
from common.errors import FedqError
from common.evaluation import predict_proba
from common.models import forward, initial_tensors
from common.spec import CategoricalFeature, NumericFeature, TaskSpec
from common.wire import Tensors
from fedq.cli import main
from fedq.onnx_export import ONNX_FORMAT, build_onnx
from fedq.simulate import SimulationConfig, bundled_data, prepare, run_simulation
from participant.data import canonical, encode_features, load_table
from tests.helpers import AMQP_URL, REDIS_URL, forget_task

pytestmark = pytest.mark.slow

LOGREG: dict[str, Any] = {"kind": "logreg"}
MLP: dict[str, Any] = {"kind": "mlp", "hidden": [16, 8], "activation": "relu"}


def _credit() -> pd.DataFrame:
    return load_table(bundled_data())


def _feeds(df: pd.DataFrame, spec: TaskSpec) -> dict[str, npt.NDArray[Any]]:
    """The raw columns as docs/export.md says a scorer passes them: numeric as double
    (NaN when missing), categorical as the canonical string ('' when missing)."""
    feeds: dict[str, npt.NDArray[Any]] = {}
    for f in spec.features:
        col = df[f.name]
        if isinstance(f, NumericFeature):
            values = pd.to_numeric(col).to_numpy(dtype=np.float64, na_value=np.nan)
            feeds[f.name] = values.reshape(-1, 1)
        else:
            text = [canonical(v) if pd.notna(v) else "" for v in col]
            feeds[f.name] = np.array(text, dtype=object).reshape(-1, 1)
    return feeds


def _session(model: onnx.ModelProto | Path) -> Any:
    data = model.read_bytes() if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _check_parity(session: Any, df: pd.DataFrame, spec: TaskSpec, params: Tensors) -> None:
    """Every row: the graph's encoding is fedq's bit for bit, its score within 1e-6."""
    features, logit, score = session.run(["features", "logit", "score"], _feeds(df, spec))
    x = encode_features(df, spec)
    assert features.dtype == np.float32 and features.shape == (len(df), spec.input_dim)
    assert np.array_equal(features, x.numpy())
    expected = predict_proba(spec, params, x).numpy()
    assert score.shape == (len(df), 1) and logit.shape == (len(df), 1)
    assert np.abs(score[:, 0] - expected).max() <= 1e-6
    with torch.no_grad():
        logits = forward(spec.model, params, x).numpy()[:, 0]
    assert np.abs(logit[:, 0] - logits).max() <= 1e-5 * max(1.0, float(np.abs(logits).max()))
    assert expected.std() > 0  # the rows do not all score the same: the check means something


def _spec(model: dict[str, Any]) -> TaskSpec:
    return prepare(SimulationConfig(participants=2, spec_overrides={"model": model})).spec


def _nudged(spec: TaskSpec) -> Tensors:
    """Version 0's parameters moved off their initial values, deterministically."""
    gen = torch.Generator().manual_seed(7)
    return {
        k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in initial_tensors(spec).items()
    }


@pytest.mark.parametrize(
    "model",
    [
        LOGREG,
        MLP,
        {"kind": "mlp", "hidden": [12, 6, 3], "activation": "tanh", "dropout": 0.2},
    ],
    ids=["logreg", "mlp-relu", "mlp-tanh-dropout"],
)
def test_the_graph_scores_every_german_credit_row_as_fedq(model: dict[str, Any]) -> None:
    spec = _spec(model)
    params = _nudged(spec)
    built = build_onnx(spec, params, {"task": spec.task_id})
    onnx.checker.check_model(built, full_check=True)
    assert [i.name for i in built.graph.input] == [f.name for f in spec.features]
    assert [o.name for o in built.graph.output] == ["features", "logit", "score"]
    _check_parity(_session(built), _credit(), spec, params)


def test_unseen_categories_and_missing_cells_encode_as_fedq() -> None:
    spec = _spec(MLP)
    numeric = [f for f in spec.features if isinstance(f, NumericFeature)]
    categorical = [f for f in spec.features if isinstance(f, CategoricalFeature)]
    # A numeric feature with its own fill value (not the mean) for missing cells.
    filled = numeric[0].model_copy(update={"fill": 3.5})
    spec = spec.model_copy(
        update={"features": tuple(filled if f is numeric[0] else f for f in spec.features)}
    )
    params = _nudged(spec)
    df = _credit().head(40).copy()
    cat, other = categorical[0].name, categorical[1].name
    df[cat] = df[cat].astype(object)
    df.loc[0:9, cat] = "a value no bank ever had"
    df.loc[10:14, cat] = None
    df.loc[15:19, other] = np.nan
    for f in numeric[:2]:
        df[f.name] = df[f.name].astype(np.float64)
        df.loc[20:29, f.name] = np.nan
    x = encode_features(df, spec).numpy()
    start = _offset(spec, cat)
    unknown = start + len(categorical[0].vocabulary)
    assert (x[:15, unknown] == 1).all() and (x[:15, start:unknown] == 0).all()
    # fill (3.5) and the mean, each standardised, where the cells are missing
    first = _offset(spec, numeric[0].name)
    assert np.allclose(x[20:30, first], (3.5 - filled.mean) / filled.std)
    assert np.allclose(x[20:30, _offset(spec, numeric[1].name)], 0.0)
    _check_parity(_session(build_onnx(spec, params, {})), df, spec, params)


def _offset(spec: TaskSpec, name: str) -> int:
    at = 0
    for f in spec.features:
        if f.name == name:
            return at
        at += 1 if isinstance(f, NumericFeature) else len(f.vocabulary) + 1
    raise AssertionError(name)


def test_names_the_graph_cannot_take_are_refused() -> None:
    spec = _spec(LOGREG)
    params = initial_tensors(spec)
    first = spec.features[0]
    clash = spec.model_copy(
        update={"features": (first.model_copy(update={"name": "score"}), *spec.features[1:])}
    )
    with pytest.raises(FedqError, match="'score' cannot be an ONNX input"):
        build_onnx(clash, params, {})
    cat = next(f for f in spec.features if isinstance(f, CategoricalFeature))
    empty = cat.model_copy(update={"vocabulary": (*cat.vocabulary, "")})
    spec2 = spec.model_copy(
        update={"features": tuple(empty if f is cat else f for f in spec.features)}
    )
    with pytest.raises(FedqError, match="holds the empty string"):
        build_onnx(spec2, initial_tensors(spec2), {})
    half = {k: v.half() for k, v in params.items()}
    with pytest.raises(FedqError, match="not float32"):
        build_onnx(spec, half, {})


def test_a_bad_format_is_refused_on_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["export", "--task", "t", "--out", str(tmp_path / "m.onnx"), "--format", "pmml"]
    )
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors == [
        "Error: Invalid value for '--format': 'pmml' is not one of 'safetensors', 'onnx'."
    ]
    assert "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.real
@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", [LOGREG, MLP], ids=["logreg", "mlp"])
async def test_fedq_export_onnx_of_a_trained_version_scores_as_fedq(
    model: dict[str, Any], tmp_path: Path
) -> None:
    result = await run_simulation(
        SimulationConfig(
            participants=2,
            versions=6,
            redis_url=REDIS_URL,
            seconds=60,
            baseline_epochs=2,
            spec_overrides={"model": model},
        )
    )
    task = result.task
    store = RedisModelStore(connect_redis(REDIS_URL))
    try:
        assert result.versions >= 2
        spec = await store.get_spec(task)
        assert spec.model.kind == model["kind"]
        for version in (1, result.versions):
            out = tmp_path / f"v{version}.onnx"
            args = ["export", "--task", task, "--version", str(version), "--out", str(out)]
            urls = ["--format", "onnx", "--redis-url", REDIS_URL, "--amqp-url", AMQP_URL]
            cli = await asyncio.to_thread(CliRunner().invoke, main, [*args, *urls])
            assert cli.exit_code == 0, cli.output
            loaded = onnx.load(str(out))
            onnx.checker.check_model(loaded, full_check=True)
            record = await store.get_version(task, version)
            props = {p.key: p.value for p in loaded.metadata_props}
            assert props["format"] == ONNX_FORMAT
            assert props["version"] == str(version) and props["task"] == task
            assert props["version_hash"] == record.version_hash.hex()
            assert props["param_hash"] == record.param_hash.hex()
            beside = json.loads(out.with_suffix(".spec.json").read_text())
            assert TaskSpec.parse(beside) == spec
            params = (await store.get_params(task, version)).tensors
            _check_parity(_session(out), _credit(), spec, params)
    finally:
        await store.close()
        await forget_task(task, tuple(result.participants))
