"""Aggregation strategies: FedAsync and FedBuff (async), FedAvg rounds (sync). Pure, no I/O.

The service admits an update (decoding limits and the head's shapes, identity,
duplicates, maximum staleness, the sync round's rules), wraps it in an
:class:`AcceptedUpdate` and offers it to the task's strategy together with the
current head (version ``t``) and the parameters of the update's base version
``v``. The strategy either emits a :class:`Step` (the parameters of version
``t + 1`` and its ordered lineage) or holds the update and emits nothing. The
service commits a step and only then acks the messages that went into it.
Strategies trust what admission let through and check none of it again.

A strategy owns its whole story, in one class (see :class:`Strategy`): its name
and mode, how many updates it may hold (``capacity``, for the prefetch), its step,
how to recompute a version from what was recorded (``recompute``, for replay) and
the weights it would give without one participant (``without``, for the
counterfactual). :data:`STRATEGIES` maps names to classes; adding a strategy is
one class (usually a :class:`StrategyBase` subclass) and one :func:`register`
line. Every registered strategy must pass ``tests/test_strategy_contract.py``.

The arithmetic lives in :mod:`aggregator.aggregate`: float64, a fixed order,
no fused operations, so identical inputs give bit-identical versions.

- **FedAsync** (Xie, Koyejo and Gupta, 2019): every update yields a version.
  ``w_new = base + delta``, ``a_t = mixing * s(t - v)`` and
  ``w <- (1 - a_t) * head + a_t * w_new``. Lineage: the update with weight ``a_t``.
- **FedBuff** (Nguyen et al., 2022): updates are buffered; at ``K = buffer_size``
  the server steps ``head + server_lr * (1/K) * sum_i s(t - v_i) * delta_i``,
  computed from the recorded ``weight_i = server_lr * s(t - v_i) / K``.
- **FedAvg** (sync): a round closes at the quorum with the sample-weighted mean;
  late updates (``sync.late = "stale"``) are weighted with ``sync.staleness``.
"""

from __future__ import annotations

from aggregator.strategies.base import (
    MODES,
    AcceptedUpdate,
    BaseLookup,
    Step,
    Strategy,
    StrategyBase,
    entry,
    left_out,
    mix_step,
    reweighted,
    weighted_step,
)
from aggregator.strategies.fedasync import FedAsync
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedbuff import FedBuff
from aggregator.strategies.registry import (
    STRATEGIES,
    SYNC_STRATEGY,
    names,
    register,
    registered,
    strategy_class,
    strategy_for,
    unregister,
)

__all__ = [
    "MODES",
    "STRATEGIES",
    "SYNC_STRATEGY",
    "AcceptedUpdate",
    "BaseLookup",
    "FedAsync",
    "FedAvg",
    "FedBuff",
    "Step",
    "Strategy",
    "StrategyBase",
    "entry",
    "left_out",
    "mix_step",
    "names",
    "register",
    "registered",
    "reweighted",
    "strategy_class",
    "strategy_for",
    "unregister",
    "weighted_step",
]
