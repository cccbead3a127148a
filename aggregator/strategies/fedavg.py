"""Synchronous FedAvg rounds: version ``v`` is round ``v``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from aggregator import aggregate
from aggregator.server_opt import ServerOptimizer
from aggregator.strategies.base import (
    AcceptedUpdate,
    Step,
    StrategyBase,
    left_out,
    reweighted,
    robust_step,
)
from common.hashing import LineageEntry
from common.spec import RobustnessSpec, ServerOptimizerSpec, SyncSettings, TaskSpec
from common.staleness import staleness_weight
from common.wire import Tensors


class FedAvg(StrategyBase):
    """Synchronous FedAvg: version ``v`` is round ``v``.

    Updates of the round are collected, one per participant (admission refuses a
    second one); at the quorum the round closes with ``head + sum_i w_i * delta_i``
    where ``w_i = n_i / sum_j n_j`` (sample counts; ``1/k`` when unweighted). Because
    every delta starts from the head, this equals the sample-weighted mean of the
    local models. At the round's deadline the service calls :meth:`flush`, which
    closes the round if at least ``min_updates`` arrived.

    Late updates (trained on an older round) are refused by admission with the
    reason ``stale_round``, unless ``sync.late = "stale"``: then they join the round
    with their raw weight multiplied by the staleness weight ``s(t - v)`` of
    ``sync.staleness`` (fresh updates have ``s(0) = 1``).

    The round's step goes through the task's server optimizer (``spec.server``,
    :mod:`aggregator.server_opt`): ``sgd`` is the step above; momentum, FedAdam and
    FedYogi take ``sum_i w_i * delta_i`` as their pseudo-gradient.
    """

    __slots__ = ("_buffer", "_robust", "_sync", "quorum", "server")

    name = "fedavg"
    dp_linear = True
    mode = "sync"
    uses_base = False

    def __init__(
        self,
        sync: SyncSettings,
        participants: int,
        server: ServerOptimizerSpec | None = None,
        robust: RobustnessSpec | None = None,
    ) -> None:
        self._sync = sync
        #: How a round is combined (``robustness.aggregator``; ``mean``: FedAvg).
        self._robust = robust or RobustnessSpec()
        #: The server optimizer and the committed head's state (the service advances it).
        self.server = ServerOptimizer(server)
        #: Updates per round: ``sync.quorum``, or every participant when it is 0.
        self.quorum = sync.quorum or max(participants, 1)
        self._buffer: list[AcceptedUpdate] = []

    @classmethod
    def from_spec(cls, spec: TaskSpec) -> Self:
        """From ``spec.sync``, the number of participants and ``spec.server``."""
        return cls(spec.sync, len(spec.participants), spec.server, spec.robustness)

    @property
    def capacity(self) -> int:
        """The quorum: its last update closes the round."""
        return self.quorum

    def offer(self, head: Tensors, base: Tensors, update: AcceptedUpdate) -> Step | None:
        """Add the update to the round; at the quorum, close the round."""
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
            "staleness": self._sync.staleness.model_dump(mode="json"),
        }

    @classmethod
    def without(
        cls, lineage: tuple[LineageEntry, ...], participant: str
    ) -> tuple[LineageEntry, ...]:
        """The weights left, normalised over the round again."""
        kept = left_out(lineage, participant)
        if not kept or len(kept) == len(lineage):
            return kept
        if sum(e.weight for e in kept) == 0.0:
            return kept  # only multi-Krum's rejected updates are left: the round stays put
        return reweighted(kept, aggregate.normalised([e.weight for e in kept]))

    def _close(self, head: Tensors) -> Step:
        updates = list(self._buffer)

        def weights_of(chosen: Sequence[AcceptedUpdate]) -> list[float]:
            raw = [
                (float(u.num_samples) if self._sync.weighted else 1.0)
                * staleness_weight(self._sync.staleness, u.staleness)
                for u in chosen
            ]
            return aggregate.round_weights(raw)

        step = robust_step(self.server, self._robust, head, updates, weights_of, 1.0)
        self._buffer.clear()
        return step
