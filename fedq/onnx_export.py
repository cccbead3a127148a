"""``fedq export --format onnx``: a version as an ONNX model that takes the raw columns.

The graph holds the task spec's preprocessing as well as the network, so a scorer in
any language with an ONNX runtime feeds the raw feature values and gets the score
fedq computes (docs/export.md):

- one input per feature, named as the feature, shape ``[N, 1]``: a numeric feature is
  ``double`` (NaN for a missing cell: it takes the spec's ``fill``, the mean when
  unset, then ``(x - mean) / std`` in double, then float32, as
  :func:`participant.data.encode_features` does); a categorical feature is ``string``,
  one-hot over the vocabulary plus a last 'unknown' slot that every other string
  takes (a missing cell: the empty string);
- outputs ``features`` (the encoded float32 matrix ``[N, input_dim]``), ``logit`` and
  ``score`` (its sigmoid), ``[N, 1]`` float32.

The network is ``Gemm`` (``x @ W.T + b``, the weights the version's own float32
tensors) and ReLU or Tanh per hidden layer; dropout is off at inference, as in
:func:`common.models.forward`. onnx is imported by this module only, which only the
export command imports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from aggregator.audit.export import load_exported, spec_path
from common.errors import FedqError
from common.spec import NumericFeature, TaskSpec
from common.wire import Tensors

#: The ``format`` metadata of every ONNX model fedq writes.
ONNX_FORMAT = "fedq-onnx-1"
#: The ONNX opset and IR version: opset 19 is the first whose ``Equal`` takes strings;
#: IR 9 loads in onnxruntime 1.15 and later.
OPSET = 19
IR_VERSION = 9
#: The graph's outputs.
OUTPUTS = ("features", "logit", "score")
#: Names of the graph's own values start with this; no feature may.
_INTERNAL = "fedq::"


def build_onnx(spec: TaskSpec, params: Tensors, metadata: dict[str, str]) -> onnx.ModelProto:
    """The ONNX model of ``spec``'s preprocessing and network with ``params``.

    Raises:
        FedqError: a feature name clashes with an output or internal name, a
            vocabulary holds the empty string (the graph's missing cell), or a
            parameter is missing or not float32.
    """
    _check_names(spec)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    columns: list[str] = []
    for i, feature in enumerate(spec.features):
        p = f"{_INTERNAL}{i}/"
        if isinstance(feature, NumericFeature):
            inputs.append(helper.make_tensor_value_info(feature.name, TensorProto.DOUBLE, ["N", 1]))
            fill = feature.mean if feature.fill is None else feature.fill
            for name, value in (("fill", fill), ("mean", feature.mean), ("std", feature.std)):
                inits.append(numpy_helper.from_array(np.array([value], np.float64), p + name))
            nodes += [
                helper.make_node("IsNaN", [feature.name], [p + "missing"]),
                helper.make_node("Where", [p + "missing", p + "fill", feature.name], [p + "x"]),
                helper.make_node("Sub", [p + "x", p + "mean"], [p + "centred"]),
                helper.make_node("Div", [p + "centred", p + "std"], [p + "scaled"]),
                helper.make_node("Cast", [p + "scaled"], [p + "out"], to=TensorProto.FLOAT),
            ]
        else:
            inputs.append(helper.make_tensor_value_info(feature.name, TensorProto.STRING, ["N", 1]))
            vocabulary = np.array(feature.vocabulary, dtype=object)
            inits += [
                numpy_helper.from_array(vocabulary, p + "vocabulary"),
                numpy_helper.from_array(np.array([1], np.int64), p + "axis"),
                numpy_helper.from_array(np.array([1.0], np.float32), p + "one"),
            ]
            nodes += [
                helper.make_node("Equal", [feature.name, p + "vocabulary"], [p + "equal"]),
                helper.make_node("Cast", [p + "equal"], [p + "hot"], to=TensorProto.FLOAT),
                helper.make_node("ReduceSum", [p + "hot", p + "axis"], [p + "known"], keepdims=1),
                helper.make_node("Sub", [p + "one", p + "known"], [p + "unknown"]),
                helper.make_node("Concat", [p + "hot", p + "unknown"], [p + "out"], axis=1),
            ]
        columns.append(p + "out")
    nodes.append(helper.make_node("Concat", columns, ["features"], axis=1))
    network, weights = _network(spec, params)
    graph = helper.make_graph(
        nodes + network,
        f"fedq {spec.task_id}",
        inputs,
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", spec.input_dim]),
            helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1]),
        ],
        inits + weights,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="fedq",
        doc_string=(
            "fedq task version: raw feature columns in (numeric double, categorical string, "
            "[N, 1] each); encoded features, logit and score (sigmoid) out. See docs/export.md."
        ),
    )
    helper.set_model_props(model, {"format": ONNX_FORMAT, **metadata})
    onnx.checker.check_model(model, full_check=True)
    return model


def _check_names(spec: TaskSpec) -> None:
    for feature in spec.features:
        if feature.name in OUTPUTS or feature.name.startswith(_INTERNAL):
            raise FedqError(
                f"feature {feature.name!r} cannot be an ONNX input: the names "
                f"{', '.join(OUTPUTS)} and those starting {_INTERNAL!r} are the graph's own"
            )
        if not isinstance(feature, NumericFeature) and "" in feature.vocabulary:
            raise FedqError(
                f"the vocabulary of {feature.name!r} holds the empty string, which the ONNX "
                "model takes for a missing cell: export it as safetensors"
            )


def _network(spec: TaskSpec, params: Tensors) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Gemm and the activation per layer, named and indexed as common.models.forward."""
    nodes: list[onnx.NodeProto] = []
    weights: list[TensorProto] = []
    index, value = 0, "features"
    layers = len(spec.model.hidden) + 1
    for n in range(layers):
        last = n == layers - 1
        w, b = (_param(params, f"{index}.{k}") for k in ("weight", "bias"))
        weights += [w, b]
        out = "logit" if last else f"{_INTERNAL}layer{n}/linear"
        nodes.append(helper.make_node("Gemm", [value, w.name, b.name], [out], transB=1))
        if not last:
            act = "Relu" if spec.model.activation == "relu" else "Tanh"
            value = f"{_INTERNAL}layer{n}/{act.lower()}"
            nodes.append(helper.make_node(act, [out], [value]))
            index += 3 if spec.model.dropout else 2
    nodes.append(helper.make_node("Sigmoid", ["logit"], ["score"]))
    return nodes, weights


def _param(params: Tensors, name: str) -> TensorProto:
    tensor = params.get(name)
    if tensor is None:
        raise FedqError(f"the version has no parameter {name!r}")
    if tensor.dtype != torch.float32:
        raise FedqError(f"parameter {name!r} is {tensor.dtype}, not float32")
    return numpy_helper.from_array(tensor.detach().cpu().numpy(), f"{_INTERNAL}{name}")


def write_onnx(exported: Path, out: Path) -> dict[str, str]:
    """Convert an exported version (safetensors beside its spec, parameters checked
    against the exported hash) to ``out`` (ONNX), with the spec beside it as
    :func:`aggregator.audit.export.spec_path` names it; returns the model's metadata."""
    from safetensors import safe_open

    with safe_open(str(exported), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    spec, _, params = load_exported(exported)
    metadata.pop("format", None)
    model = build_onnx(spec, params, metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out))
    spec_path(out).write_text(json.dumps(json.loads(spec.to_json()), indent=2) + "\n")
    return {"format": ONNX_FORMAT, **metadata}
