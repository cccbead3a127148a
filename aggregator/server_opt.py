"""The server optimizer: how a step over several updates moves the head (FedBuff, sync).

Reddi et al. (2021), "Adaptive Federated Optimization", Algorithm 2. A step's
**pseudo-gradient** is ``D = sum_i w_i * delta_i`` over its updates, with the weights
recorded in its lineage (in lineage order). Then, per tensor, elementwise:

- ``sgd``:      ``x = head + D`` (no state; exactly :func:`aggregate.weighted_sum`,
  so versions are bit-identical to those made before server optimizers existed);
- ``momentum``: ``m = beta1 * m + D``; ``x = head + lr * m`` (server momentum, FedAvgM);
- ``adam``:     ``m = beta1 * m + (1 - beta1) * D``; ``v = beta2 * v + (1 - beta2) * D*D``;
  ``x = head + (lr * m) / (sqrt(v) + tau)`` (FedAdam);
- ``yogi``:     ``m`` as adam; ``v = v - ((1 - beta2) * D*D) * sign(v - D*D)``;
  ``x`` as adam (FedYogi).

The state starts at ``m = 0`` and ``v = tau * tau`` (the paper's ``v_{-1} >= tau^2``);
there is no bias correction (none in Algorithm 2). A version's state carries on to
the next step only when that step uses the same ``kind`` (hyperparameters may change
between runs); otherwise the step starts from the initial state.

Arithmetic and determinism are those of :mod:`aggregator.aggregate`: everything in
float64, tensors in the head's order, updates in lineage order, each operation its
own correctly rounded IEEE operation exactly as written above, left to right (no
fused forms), parameters cast back to each head tensor's dtype once. The state stays
float64 (it is stored so, and a restart or a replay continues from it bit for bit).

Pure: no I/O. :class:`ServerOptimizer` holds the state of the committed head for a
strategy; the service advances it only after a commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aggregator import aggregate
from common.spec import ServerOptimizerSpec
from common.wire import Tensors, tensors_hash

__all__ = [
    "M_PREFIX",
    "V_PREFIX",
    "ServerOptimizer",
    "ServerState",
    "apply",
    "carried",
    "initial_state",
    "pseudo_gradient",
]

#: State tensor names: ``m/<parameter name>``, then (adam, yogi) ``v/<parameter name>``.
M_PREFIX = "m/"
V_PREFIX = "v/"

_F64 = torch.float64


@dataclass(frozen=True, slots=True)
class ServerState:
    """The optimizer state after a version: float64 moments by parameter name.

    ``m`` (every kind but sgd) and ``v`` (adam, yogi; empty for momentum) hold one
    float64 tensor per head tensor, in the head's order.
    """

    spec: ServerOptimizerSpec
    m: Tensors
    v: Tensors

    def tensors(self) -> Tensors:
        """The state as stored and hashed: ``m/<name>`` for each tensor, then ``v/<name>``."""
        out: Tensors = {M_PREFIX + k: t for k, t in self.m.items()}
        out.update({V_PREFIX + k: t for k, t in self.v.items()})
        return out

    def digest(self) -> bytes:
        """The state hash: the content hash (docs/wire-format.md, section 8) of :meth:`tensors`."""
        return tensors_hash(self.tensors())

    @classmethod
    def from_tensors(cls, spec: ServerOptimizerSpec, tensors: Tensors) -> ServerState:
        """The inverse of :meth:`tensors`; ValueError if the layout does not fit ``spec``."""
        m = {k[len(M_PREFIX) :]: t for k, t in tensors.items() if k.startswith(M_PREFIX)}
        v = {k[len(V_PREFIX) :]: t for k, t in tensors.items() if k.startswith(V_PREFIX)}
        if len(m) + len(v) != len(tensors) or any(t.dtype != _F64 for t in tensors.values()):
            raise ValueError("optimizer state tensors must be float64 named m/<name> or v/<name>")
        wants_v = spec.kind in ("adam", "yogi")
        if spec.kind == "sgd" or list(v) != (list(m) if wants_v else []):
            raise ValueError(f"optimizer state does not fit kind {spec.kind!r}")
        return cls(spec, m, v)


def initial_state(spec: ServerOptimizerSpec, head: Tensors) -> ServerState:
    """``m = 0`` and (adam, yogi) ``v = tau * tau`` for every head tensor, float64."""
    m = {k: torch.zeros(h.shape, dtype=_F64) for k, h in head.items()}
    v: Tensors = {}
    if spec.kind in ("adam", "yogi"):
        tau2 = float(spec.tau) * float(spec.tau)
        v = {k: torch.full(h.shape, tau2, dtype=_F64) for k, h in head.items()}
    return ServerState(spec, m, v)


def carried(spec: ServerOptimizerSpec, parent: ServerState | None) -> ServerState | None:
    """The parent's state if this step continues it (same kind), else None (start afresh)."""
    if parent is None or parent.spec.kind != spec.kind:
        return None
    return parent


def pseudo_gradient(head: Tensors, deltas: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """``D = sum_i w_i * delta_i`` per head tensor, float64, in order (not cast back)."""
    if len(deltas) != len(weights) or not deltas:
        raise ValueError(f"{len(deltas)} deltas and {len(weights)} weights: need as many, >= 1")
    # The same sum as aggregate.weighted_sum's: each product and sum rounded alone.
    return {name: aggregate.weighted_delta(name, deltas, weights) for name in head}


def apply(
    spec: ServerOptimizerSpec,
    head: Tensors,
    parent: ServerState | None,
    deltas: Sequence[Tensors],
    weights: Sequence[float],
) -> tuple[Tensors, ServerState | None]:
    """One server step: the next parameters and the next state (None for sgd).

    ``parent`` is the head's state (None: the initial state; a state of another
    kind is not continued, see :func:`carried`). With no deltas nothing moves:
    ``(head, parent)``.
    """
    if not deltas:
        return head, parent
    if spec.kind == "sgd":
        return aggregate.weighted_sum(head, deltas, weights), None
    state = carried(spec, parent) or initial_state(spec, head)
    grad = pseudo_gradient(head, deltas, weights)
    m = {k: _first_moment(spec, state.m[k], g) for k, g in grad.items()}
    v = {k: _second_moment(spec, state.v[k], g) for k, g in grad.items()} if state.v else {}
    params: Tensors = {}
    for name, h in head.items():
        step = m[name].clone()
        step.mul_(float(spec.lr))
        if v:
            den = torch.sqrt(v[name])
            den.add_(float(spec.tau))
            step.div_(den)
        x = h.to(_F64, copy=True)
        x.add_(step)
        params[name] = x.to(h.dtype)
    return params, ServerState(spec, m, v)


def _first_moment(spec: ServerOptimizerSpec, m: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """momentum: ``beta1 * m + D``; adam, yogi: ``beta1 * m + (1 - beta1) * D``."""
    out = m.clone()
    out.mul_(float(spec.beta1))
    if spec.kind == "momentum":
        out.add_(g)
        return out
    scaled = g.clone()
    scaled.mul_(1.0 - float(spec.beta1))
    out.add_(scaled)
    return out


def _second_moment(spec: ServerOptimizerSpec, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """adam: ``beta2 * v + (1 - beta2) * D*D``;
    yogi: ``v - ((1 - beta2) * D*D) * sign(v - D*D)``."""
    sq = g.clone()
    sq.mul_(g)
    if spec.kind == "yogi":
        sign = torch.sign(v - sq)
        sq.mul_(1.0 - float(spec.beta2))
        sq.mul_(sign)
        out = v.clone()
        out.sub_(sq)
        return out
    sq.mul_(1.0 - float(spec.beta2))
    out = v.clone()
    out.mul_(float(spec.beta2))
    out.add_(sq)
    return out


class ServerOptimizer:
    """A strategy's server optimizer and the state of the committed head.

    :meth:`step` computes from :attr:`state` without changing it; the service calls
    :meth:`advance` with the committed step's state (and :meth:`advance` with the
    stored head state when it starts), so a step that is not committed (a non-finite
    result, a lost race) leaves nothing behind.
    """

    __slots__ = ("spec", "state")

    def __init__(self, spec: ServerOptimizerSpec | None = None) -> None:
        self.spec = spec or ServerOptimizerSpec()
        #: The committed head's state (None: the initial state).
        self.state: ServerState | None = None

    def step(
        self, head: Tensors, deltas: Sequence[Tensors], weights: Sequence[float]
    ) -> tuple[Tensors, ServerState | None]:
        """:func:`apply` from the head's state."""
        return apply(self.spec, head, self.state, deltas, weights)

    def advance(self, state: ServerState | None) -> None:
        """The head moved (a commit, or a restart from the store): its state is ``state``."""
        self.state = state

    def settings(self) -> dict[str, object]:
        """The optimizer's settings as JSON data (recorded with each version, for people)."""
        return self.spec.model_dump(mode="json")
