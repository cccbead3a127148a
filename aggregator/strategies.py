"""Aggregation strategies: FedAsync and FedBuff (async), FedAvg rounds (sync). Pure, no I/O.

The service validates an update (decoding limits, identity, duplicates, maximum
staleness), wraps it in an :class:`AcceptedUpdate` and offers it to the task's
strategy together with the current head (version ``t``) and the parameters of
the update's base version ``v``. The strategy either emits a :class:`Step` (the
parameters of version ``t + 1`` and its ordered lineage) or buffers the update
and emits nothing. The service commits a step and only then acks the messages
that went into it.

Arithmetic and determinism
--------------------------
Every computation runs in float64, in a fixed order (tensors in the head's order,
updates in arrival order) and is cast back to each head tensor's dtype exactly
once. Only elementwise multiplications and additions are used, each its own
correctly rounded IEEE operation: no fused ``alpha=`` forms, whose vectorised
kernels may use FMA on one CPU and not on another. So identical inputs in
identical order give bit-identical parameters, which is what replay relies on.

Strategies average floating-point parameters only; a head tensor of another
dtype is refused. Tensor names and shapes must match the head's exactly: a
mismatch raises ValueError naming the tensor, and leaves the strategy's state as
it was.

- **FedAsync** (Xie, Koyejo and Gupta, 2019): every update yields a version.
  ``w_new = base + delta``, ``a_t = mixing * s(t - v)`` and
  ``w <- (1 - a_t) * head + a_t * w_new``. Lineage: the update with weight ``a_t``.
- **FedBuff** (Nguyen et al., 2022): updates are buffered; at ``K = buffer_size``
  the server steps ``head + server_lr * (1/K) * sum_i s(t - v_i) * delta_i``.
  Lineage: the K updates in arrival order with
  ``weight_i = server_lr * s(t - v_i) / K``, and the step is computed from those
  very weights as ``head + sum_i weight_i * delta_i``, so the lineage is a
  complete recipe for the version. Sample counts are not used: the FedBuff
  server step is an unweighted mean over the buffer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from aggregator.staleness import staleness_weight
from common.hashing import LineageEntry
from common.spec import AsyncSettings, StalenessSpec, SyncSettings, TaskSpec
from common.wire import Tensors

__all__ = [
    "AcceptedUpdate",
    "FedAsync",
    "FedAvg",
    "FedBuff",
    "Step",
    "Strategy",
    "make_strategy",
    "mix_step",
    "strategy_for",
    "weighted_step",
]


@dataclass(frozen=True, slots=True)
class AcceptedUpdate:
    """An update the service has validated, ready for a strategy."""

    update_id: str
    participant: str
    base_version: int
    #: ``t - v``: the head's version when the update arrived minus its base version.
    staleness: int
    num_samples: int
    #: The local model minus the base version's parameters.
    delta: Tensors
    content_hash: bytes


@dataclass(frozen=True, slots=True)
class Step:
    """What a strategy emits: the next version's parameters and its ordered lineage."""

    params: Tensors
    lineage: tuple[LineageEntry, ...]


class Strategy(Protocol):
    """An aggregation strategy (see the module docstring)."""

    @property
    def name(self) -> str:
        """The strategy's name, as in ``AsyncSettings.strategy``."""
        ...

    @property
    def uses_base(self) -> bool:
        """Whether ``offer`` reads the base version's parameters (else any value will do)."""
        ...

    def offer(self, head: Tensors, base: Tensors, update: AcceptedUpdate) -> Step | None:
        """Take one update; return the next version's step, or None if it was buffered."""
        ...

    def flush(self, head: Tensors) -> Step | None:
        """Emit whatever is buffered (shutdown, deadline); None when nothing is."""
        ...

    def pending(self) -> tuple[AcceptedUpdate, ...]:
        """Updates buffered and not yet emitted, in arrival order."""
        ...

    def settings(self) -> dict[str, object]:
        """JSON-able settings, recorded with each version so replay can rebuild the strategy."""
        ...


def _check_update(settings: AsyncSettings, update: AcceptedUpdate) -> None:
    if update.staleness < 0:
        raise ValueError(
            f"update {update.update_id!r}: staleness must be >= 0, got {update.staleness}"
        )
    if update.staleness > settings.max_staleness:
        raise ValueError(
            f"update {update.update_id!r}: staleness {update.staleness} is above the maximum "
            f"{settings.max_staleness}; the service should have refused it"
        )


def _check_like(what: str, tensors: Mapping[str, torch.Tensor], head: Tensors) -> None:
    """``tensors`` must name exactly the head's tensors, with the same shapes, all floating."""
    for name, h in head.items():
        if not h.is_floating_point():
            raise ValueError(f"head tensor {name!r} has dtype {h.dtype}, not floating point")
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{what} lacks tensor {name!r}")
        if t.shape != h.shape:
            raise ValueError(
                f"{what} tensor {name!r} has shape {list(t.shape)}, the head has {list(h.shape)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{what} tensor {name!r} has dtype {t.dtype}, not floating point")
    for name in tensors:
        if name not in head:
            raise ValueError(f"{what} has tensor {name!r}, which the head does not")


def _entry(update: AcceptedUpdate, weight: float) -> LineageEntry:
    return LineageEntry(
        update_id=update.update_id,
        participant=update.participant,
        base_version=update.base_version,
        staleness=update.staleness,
        weight=weight,
        content_hash=update.content_hash,
    )


class FedAsync:
    """FedAsync: mix every update into the head, weighted by its staleness.

    ``params = (1 - a_t) * head + a_t * (base + delta)`` with
    ``a_t = mixing * s(t - v)``, in float64, cast back to each tensor's dtype.
    Nothing is ever buffered.
    """

    __slots__ = ("_settings",)

    def __init__(self, settings: AsyncSettings) -> None:
        self._settings = settings

    @property
    def name(self) -> str:
        """``"fedasync"``."""
        return "fedasync"

    @property
    def uses_base(self) -> bool:
        """Yes: ``w_new = base + delta``."""
        return True

    def mixing_weight(self, staleness: int) -> float:
        """``a_t = mixing * s(staleness)``."""
        return float(self._settings.mixing) * staleness_weight(self._settings.staleness, staleness)

    def offer(self, head: Tensors, base: Tensors, update: AcceptedUpdate) -> Step:
        """Mix the update in; always emits a step."""
        _check_update(self._settings, update)
        _check_like("base", base, head)
        _check_like(f"update {update.update_id!r}: delta", update.delta, head)
        return mix_step(head, base, update, self.mixing_weight(update.staleness))

    def flush(self, head: Tensors) -> Step | None:
        """FedAsync buffers nothing: always None."""
        return None

    def pending(self) -> tuple[AcceptedUpdate, ...]:
        """Always empty."""
        return ()

    def settings(self) -> dict[str, object]:
        """All of :class:`AsyncSettings` as JSON data, for ``AsyncSettings.model_validate``."""
        return self._settings.model_dump(mode="json")


class FedBuff:
    """FedBuff: buffer K deltas, then take one server step from the head.

    ``base`` is not used: FedBuff applies the buffered deltas to the current head,
    not to the versions they were trained from, as in the FedBuff paper; staleness
    enters only through ``s(t - v)``. Each delta's staleness is the one computed
    when it arrived; as FedBuff is the only writer of its task, the head does not
    move while the buffer fills, so that is also its staleness at the step.
    """

    __slots__ = ("_buffer", "_settings")

    def __init__(self, settings: AsyncSettings) -> None:
        self._settings = settings
        self._buffer: list[AcceptedUpdate] = []

    @property
    def name(self) -> str:
        """``"fedbuff"``."""
        return "fedbuff"

    @property
    def uses_base(self) -> bool:
        """No: deltas are applied to the head."""
        return False

    @property
    def buffer_size(self) -> int:
        """K, the number of updates per server step."""
        return self._settings.buffer_size

    def offer(self, head: Tensors, base: Tensors, update: AcceptedUpdate) -> Step | None:
        """Buffer the update; at K updates, emit the step and clear the buffer.

        ``base`` is accepted for the common interface and ignored (see the class).
        On a ValueError the buffer is left as it was.
        """
        _check_update(self._settings, update)
        _check_like(f"update {update.update_id!r}: delta", update.delta, head)
        if any(u.update_id == update.update_id for u in self._buffer):
            raise ValueError(f"update {update.update_id!r} is already in the buffer")
        if len(self._buffer) + 1 < self._settings.buffer_size:
            self._buffer.append(update)
            return None
        step = self._step(head, [*self._buffer, update])
        self._buffer.clear()
        return step

    def flush(self, head: Tensors) -> Step | None:
        """Emit a partial buffer of K' < K updates (shutdown, deadline); None when empty.

        The mean is over the K' updates present: ``weight_i = server_lr * s_i / K'``,
        so a partial step has the size of a full one rather than K'/K of it.
        """
        if not self._buffer:
            return None
        step = self._step(head, self._buffer)
        self._buffer.clear()
        return step

    def pending(self) -> tuple[AcceptedUpdate, ...]:
        """The buffered updates, in arrival order."""
        return tuple(self._buffer)

    def settings(self) -> dict[str, object]:
        """All of :class:`AsyncSettings` as JSON data, for ``AsyncSettings.model_validate``."""
        return self._settings.model_dump(mode="json")

    def _step(self, head: Tensors, updates: Sequence[AcceptedUpdate]) -> Step:
        k = float(len(updates))
        lr = float(self._settings.server_lr)
        weights = [
            lr * staleness_weight(self._settings.staleness, u.staleness) / k for u in updates
        ]
        return weighted_step(head, updates, weights)


def mix_step(head: Tensors, base: Tensors, update: AcceptedUpdate, a_t: float) -> Step:
    """FedAsync's step: ``(1 - a_t) * head + a_t * (base + delta)``, float64, cast back once.

    The lineage records ``a_t``; replay recomputes the step from that recorded weight.
    """
    _check_like("base", base, head)
    _check_like(f"update {update.update_id!r}: delta", update.delta, head)
    keep = 1.0 - a_t
    params: Tensors = {}
    for name, h in head.items():
        # In place, one float64 buffer per operand; each operation is rounded alone
        # (no fused multiply-add), so the result is the same bit for bit as
        # keep * head + a_t * (base + delta) computed out of place.
        w_new = base[name].to(torch.float64, copy=True)
        w_new.add_(update.delta[name].to(torch.float64))
        w_new.mul_(a_t)
        mixed = h.to(torch.float64, copy=True)
        mixed.mul_(keep)
        mixed.add_(w_new)
        params[name] = mixed.to(h.dtype)
    return Step(params=params, lineage=(_entry(update, a_t),))


def weighted_step(
    head: Tensors, updates: Sequence[AcceptedUpdate], weights: Sequence[float]
) -> Step:
    """``head + sum_i weight_i * delta_i`` in float64, in order, cast back once.

    The lineage records exactly these weights, so it is a complete recipe for the
    version: replay recomputes the step from the recorded weights.
    """
    for u in updates:
        _check_like(f"update {u.update_id!r}: delta", u.delta, head)
    params: Tensors = {}
    for name, h in head.items():
        # sum_i w_i * delta_i in lineage order, then head + sum: in place, each
        # operation rounded alone (no fused multiply-add), bit-identical to the
        # out-of-place formula and without a temporary per update.
        acc = updates[0].delta[name].to(torch.float64, copy=True)
        acc.mul_(weights[0])
        tmp = torch.empty_like(acc)
        for u, w in zip(updates[1:], weights[1:], strict=True):
            tmp.copy_(u.delta[name])
            tmp.mul_(w)
            acc.add_(tmp)
        out = h.to(torch.float64, copy=True)
        out.add_(acc)
        params[name] = out.to(h.dtype)
    lineage = tuple(_entry(u, w) for u, w in zip(updates, weights, strict=True))
    return Step(params=params, lineage=lineage)


class FedAvg:
    """Synchronous FedAvg: version ``v`` is round ``v``.

    Updates trained on the head (staleness 0) are collected, one per participant;
    at the quorum the round closes with ``head + sum_i w_i * delta_i`` where
    ``w_i = n_i / sum_j n_j`` (sample counts; ``1/k`` when unweighted). Because every
    delta starts from the head, this equals the sample-weighted mean of the local
    models. At the round's deadline the service calls :meth:`flush`, which closes
    the round if at least ``min_updates`` arrived.

    Late updates (trained on an older round) are refused by the service with the
    reason ``stale_round``, unless ``late = "stale"``: then they join the round with
    their raw weight multiplied by the staleness weight ``s(t - v)``.
    """

    __slots__ = ("_buffer", "_staleness", "_sync", "quorum")

    def __init__(self, sync: SyncSettings, staleness: StalenessSpec, participants: int) -> None:
        self._sync = sync
        self._staleness = staleness
        self.quorum = sync.quorum or max(participants, 1)
        self._buffer: list[AcceptedUpdate] = []

    @property
    def name(self) -> str:
        """``"fedavg"``."""
        return "fedavg"

    @property
    def uses_base(self) -> bool:
        """No: deltas are applied to the head."""
        return False

    def offer(self, head: Tensors, base: Tensors, update: AcceptedUpdate) -> Step | None:
        """Add the update to the round; at the quorum, close the round."""
        if update.staleness < 0:
            raise ValueError(f"update {update.update_id!r}: staleness must be >= 0")
        if update.staleness > 0 and self._sync.late == "refuse":
            raise ValueError(f"update {update.update_id!r} is for an older round")
        _check_like(f"update {update.update_id!r}: delta", update.delta, head)
        for u in self._buffer:
            if u.update_id == update.update_id or u.participant == update.participant:
                raise ValueError(
                    f"participant {update.participant!r} already has an update in this round"
                )
        self._buffer.append(update)
        if len(self._buffer) < self.quorum:
            return None
        return self._close(head)

    def flush(self, head: Tensors) -> Step | None:
        """Close the round at its deadline if at least ``min_updates`` arrived."""
        if len(self._buffer) < self._sync.min_updates:
            return None
        return self._close(head)

    def pending(self) -> tuple[AcceptedUpdate, ...]:
        """The round's updates so far, in arrival order."""
        return tuple(self._buffer)

    def settings(self) -> dict[str, object]:
        """Sync settings, the resolved quorum and the staleness function for late updates."""
        return {
            "sync": self._sync.model_dump(mode="json"),
            "quorum": self.quorum,
            "staleness": self._staleness.model_dump(mode="json"),
        }

    def _close(self, head: Tensors) -> Step:
        updates = list(self._buffer)
        raw = [
            (float(u.num_samples) if self._sync.weighted else 1.0)
            * staleness_weight(self._staleness, u.staleness)
            for u in updates
        ]
        total = sum(raw)
        step = weighted_step(head, updates, [r / total for r in raw])
        self._buffer.clear()
        return step


def strategy_for(spec: TaskSpec) -> Strategy:
    """The strategy of a task: FedAvg rounds in sync mode, else the async strategy."""
    if spec.mode == "sync":
        return FedAvg(spec.sync, spec.async_.staleness, len(spec.participants))
    return make_strategy(spec.async_)


def make_strategy(settings: AsyncSettings) -> Strategy:
    """The async strategy named by ``settings.strategy``."""
    if settings.strategy == "fedasync":
        return FedAsync(settings)
    if settings.strategy == "fedbuff":
        return FedBuff(settings)
    raise ValueError(f"unknown async strategy {settings.strategy!r}")
