"""Hostile banks for ``fedq simulate --attack KIND --attackers N``.

A hostile bank is a real participant worker (participant.worker.ParticipantWorker)
whose behaviour is changed at the bank, before anything leaves it: it trains on the
task's model, signs its updates with its own key and publishes them over its own
transport like any bank, so the aggregator sees exactly what a broken or malicious
bank would send. The participant package knows nothing of attacks; this module sits
above it, beside the simulation.

The attacks (``SimulationConfig.attack``; the last ``attackers`` banks by name are
hostile, see :func:`hostile_banks`):

* ``scale``: the bank's delta times :data:`SCALE_FACTOR` (100): a boosted update that
  drags the model towards the bank (model replacement, Bagdasaryan et al. 2020);
* ``sign_flip``: the delta times :data:`SIGN_FLIP_FACTOR` (-10). Negating alone (-1)
  only cancels one honest bank's step; the attack literature (e.g. Li et al. 2019,
  "RSA"; Karimireddy et al. 2021) scales the flipped update up so that one bank in
  five outweighs the four others: ``4 g - 10 g = -6 g`` moves the model uphill;
* ``huge``: every value of the delta set to :data:`HUGE_VALUE` (3e38: finite in
  float32, so it passes the wire format's finite-value check; the incident that
  asked for bounded influence);
* ``label_flip``: the bank trains honestly on its own rows with their labels flipped
  (0 <-> 1); its validation rows keep their true labels;
* ``copies``: the bank publishes each update :data:`COPIES` (5) times, each copy a
  fresh update id signed anew with its key, one after the other: enough to fill a
  FedBuff buffer on its own. (Refused with secure aggregation: a bank masks one
  update per cohort.)
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any, Final, Literal, get_args

import torch

from common.errors import ConfigError
from common.transport import ModelDelivery, Subscription
from common.wire import ModelEnvelope, Tensors
from participant.worker import ParticipantWorker

Attack = Literal["scale", "sign_flip", "huge", "label_flip", "copies"]
#: Every attack, in the order the CLI lists them.
ATTACKS: Final[tuple[str, ...]] = get_args(Attack)

#: ``scale``: the factor on the bank's delta.
SCALE_FACTOR: Final = 100.0
#: ``sign_flip``: the factor on the bank's delta (negated and boosted).
SIGN_FLIP_FACTOR: Final = -10.0
#: ``huge``: the value of every element of the delta (largest float32: about 3.4e38).
HUGE_VALUE: Final = 3e38
#: ``copies``: how many times each update is published (under as many update ids).
COPIES: Final = 5


def check_attack(
    attack: str | None, attackers: int, participants: int, *, secure_aggregation: bool = False
) -> None:
    """ConfigError (one line, naming the option) for an attack the simulation cannot run."""
    if attack is None:
        return
    if attack not in ATTACKS:
        raise ConfigError(f"--attack {attack!r} is not one of {', '.join(ATTACKS)}")
    if not 0 <= attackers <= participants:
        raise ConfigError(
            f"--attackers {attackers} must be between 0 and --participants {participants}"
        )
    if attack == "copies" and secure_aggregation:
        raise ConfigError(
            "--attack copies cannot run with --secure-aggregation: a bank masks one update "
            "per cohort"
        )


def hostile_banks(names: Sequence[str], attack: str | None, attackers: int) -> tuple[str, ...]:
    """The hostile banks: the last ``attackers`` of ``names`` in name order (none
    without an attack)."""
    if attack is None or attackers <= 0:
        return ()
    return tuple(sorted(names)[-attackers:])


def tampered(attack: str, delta: Tensors) -> Tensors:
    """The delta a bank running ``attack`` publishes in place of its honest ``delta``
    (unchanged for the attacks that are not on the delta)."""
    if attack == "scale":
        return {k: v * SCALE_FACTOR for k, v in delta.items()}
    if attack == "sign_flip":
        return {k: v * SIGN_FLIP_FACTOR for k, v in delta.items()}
    if attack == "huge":
        return {k: torch.full_like(v, _huge(v.dtype)) for k, v in delta.items()}
    return delta


def _huge(dtype: torch.dtype) -> float:
    """:data:`HUGE_VALUE`, or the largest finite value of a narrower float type."""
    if dtype.is_floating_point:
        return min(HUGE_VALUE, float(torch.finfo(dtype).max))
    return float(torch.iinfo(dtype).max)


class HostileWorker(ParticipantWorker):
    """A bank's worker running ``attack`` (see the module's docstring); everything
    else (training, signing, receipts, pace) as an honest worker's."""

    def __init__(self, *args: Any, attack: str, **kwargs: Any) -> None:
        if attack not in ATTACKS:
            raise ConfigError(f"unknown attack {attack!r}: one of {', '.join(ATTACKS)}")
        super().__init__(*args, **kwargs)
        self.attack = attack
        if attack == "label_flip":
            self.y_train = 1 - self.y_train
        #: ``copies``: the last training's result, published again under new ids.
        self._last: tuple[Tensors, dict[str, float], int] | None = None
        self._replaying = False

    def _train(self, model: ModelEnvelope, seed: int) -> tuple[Tensors, dict[str, float], int]:
        if self._replaying and self._last is not None:
            return self._last
        delta, metrics, steps = super()._train(model, seed)
        self._last = (tampered(self.attack, delta), metrics, steps)
        return self._last

    async def _train_and_publish(
        self,
        model: ModelEnvelope,
        val_metrics: dict[str, float],
        sub: Subscription[ModelDelivery] | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        await super()._train_and_publish(model, val_metrics, sub, stop)
        if self.attack != "copies":
            return
        # The same delta again, at once (no pause), each copy with a fresh update id
        # and its own signature: the honest path encodes and signs each one.
        honest = self.config
        self.config = dataclasses.replace(honest, delay_s=0.0)
        self._replaying = True
        try:
            for _ in range(COPIES - 1):
                if stop is not None and stop.is_set():
                    break
                await super()._train_and_publish(model, val_metrics, sub, stop)
        finally:
            self.config, self._replaying = honest, False
