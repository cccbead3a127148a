"""Models built deterministically from a spec and a seed."""

from __future__ import annotations

import math

import torch
from torch import nn

from common.dtypes import wire_name
from common.spec import ModelSpec, TaskSpec
from common.wire import Tensors, TensorSpec


def build_model(spec: ModelSpec, input_dim: int, seed: int) -> nn.Sequential:
    """A binary classifier (one logit out) whose initial weights depend only on the seed.

    Weights are drawn from a private generator, so building a model neither reads
    nor changes torch's global random state.
    """
    # Built on the meta device (no default init, no global RNG), then filled below.
    model = _meta_model(spec, input_dim).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
    return model


def forward(spec: ModelSpec, params: Tensors, x: torch.Tensor) -> torch.Tensor:
    """The logits of :func:`build_model`'s network with ``params``, in evaluation mode
    (dropout off), computed straight from the tensors: the same operations as the
    module's ``forward`` (``F.linear`` and the activation, layer by layer), without
    building and initialising a module for every evaluation."""
    index = 0
    out = x
    for _ in spec.hidden:
        out = nn.functional.linear(out, params[f"{index}.weight"], params[f"{index}.bias"])
        out = torch.relu(out) if spec.activation == "relu" else torch.tanh(out)
        index += 3 if spec.dropout else 2
    return nn.functional.linear(out, params[f"{index}.weight"], params[f"{index}.bias"])


def _meta_model(spec: ModelSpec, input_dim: int) -> nn.Sequential:
    """The network's layers on the meta device: shapes and dtypes, no memory."""
    if input_dim < 1:
        raise ValueError("input_dim must be at least 1")
    layers: list[nn.Module] = []
    width = input_dim
    for h in spec.hidden:
        layers.append(nn.Linear(width, h, device="meta"))
        layers.append(nn.ReLU() if spec.activation == "relu" else nn.Tanh())
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        width = h
    layers.append(nn.Linear(width, 1, device="meta"))
    return nn.Sequential(*layers)


def task_tensor_specs(task: TaskSpec) -> dict[str, TensorSpec]:
    """The task's model's tensor names, shapes and wire dtypes, in state_dict order,
    without allocating its parameters (a 100M-parameter model is 400 MB)."""
    return tensor_specs(dict(_meta_model(task.model, task.input_dim).state_dict()))


def initial_tensors(task: TaskSpec) -> Tensors:
    """Version 0's parameters (the task's model with the task's seed), taken from the
    model without a copy: the model itself is dropped."""
    return {k: v.detach() for k, v in build_task_model(task).state_dict().items()}


def build_task_model(task: TaskSpec) -> nn.Sequential:
    """The task's model with the task's seed."""
    return build_model(task.model, task.input_dim, task.seed)


def model_tensors(model: nn.Module) -> Tensors:
    """The model's parameters and buffers, detached, in state_dict order."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tensor_specs(tensors: Tensors) -> dict[str, TensorSpec]:
    """Names, shapes and wire dtypes, for validating incoming envelopes."""
    specs: dict[str, TensorSpec] = {}
    for name, t in tensors.items():
        dtype = wire_name(t.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which the wire does not carry")
        specs[name] = TensorSpec(shape=tuple(t.shape), dtype=dtype)
    return specs
