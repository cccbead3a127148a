"""Differential privacy in ``fedq simulate``: from target epsilons to the task's settings.

A user asks for an epsilon; the mechanisms take noise multipliers. Record-level
DP-SGD is calibrated so that the bank with the largest sampling rate (the fewest
rows) reaches the target after ``planned_updates`` updates, which is also every
bank's budget (a bank with more rows spends less per update); bank-level DP is
calibrated so that the model reaches the target after the run's version cap. The
accountant is common/privacy.py's (dp-accounting, RDP).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from common.errors import ConfigError
from common.privacy import (
    calibrate_dpsgd,
    calibrate_gaussian,
    dpsgd_epsilon,
    gaussian_epsilon,
    laplace_epsilon,
)
from common.spec import (
    BankPrivacy,
    LaplacePrivacy,
    PrivacySpec,
    RecordPrivacy,
    TaskSpec,
    validation_reasons,
)


@dataclass(frozen=True, slots=True)
class PrivacyOptions:
    """What ``fedq simulate`` takes about privacy (all off by default)."""

    #: Record-level DP-SGD at each bank: the target (and budget) epsilon per bank.
    record_epsilon: float | None = None
    record_clip: float = 1.0
    #: Updates per bank the record-level budget is planned for.
    planned_updates: int = 30
    #: The Laplace mechanism at each bank: epsilon per update, and the L1 clip.
    laplace_epsilon: float | None = None
    laplace_clip: float = 1.0
    #: A budget for the Laplace releases of each bank (None: no limit).
    laplace_budget: float | None = None
    #: Bank-level DP at the aggregator: the target epsilon of the model.
    bank_epsilon: float | None = None
    bank_clip: float = 1.0
    bank_adaptive: bool = False
    delta: float = 1e-5

    @property
    def any(self) -> bool:
        return (
            self.record_epsilon is not None
            or self.laplace_epsilon is not None
            or self.bank_epsilon is not None
        )

    def check(self) -> None:
        """ConfigError naming the option at fault."""
        if self.record_epsilon is not None and self.laplace_epsilon is not None:
            raise ConfigError("--record-epsilon and --laplace-epsilon are alternatives")
        for name, value in (
            ("--record-epsilon", self.record_epsilon),
            ("--laplace-epsilon", self.laplace_epsilon),
            ("--bank-epsilon", self.bank_epsilon),
            ("--record-clip", self.record_clip),
            ("--laplace-clip", self.laplace_clip),
            ("--bank-clip", self.bank_clip),
        ):
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be a positive number, not {value}")
        if self.planned_updates < 1:
            raise ConfigError(f"--dp-updates must be at least 1, not {self.planned_updates}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"--dp-delta must be in (0, 1), not {self.delta}")


def sample_rate(spec: TaskSpec, rows: int) -> float:
    """DP-SGD's Poisson sampling rate for a bank with ``rows`` training rows."""
    return min(1.0, spec.training.batch_size / max(1, rows))


def steps_per_update(spec: TaskSpec, rows: int) -> int:
    """DP-SGD steps in one local update: ``epochs * round(1 / q)``."""
    return spec.training.epochs * max(1, round(1.0 / sample_rate(spec, rows)))


def privacy_spec(
    options: PrivacyOptions, spec: TaskSpec, train_rows: Mapping[str, int], versions: int
) -> PrivacySpec:
    """The task's privacy section for these options, calibrated to their targets.

    ``train_rows`` is each bank's public row count (the spec's declared samples, from
    which DP-SGD takes its sampling rate and steps); ``versions`` the run's version cap.
    Raises ConfigError naming the option when the target needs more noise than the
    spec allows.
    """
    options.check()
    try:
        return _privacy_spec(options, spec, train_rows, versions)
    except ValidationError as e:
        raise ConfigError(
            f"the privacy targets cannot be met within the spec's bounds "
            f"({validation_reasons(e)}): ask for a larger epsilon or plan fewer "
            "updates (--dp-updates) or versions (--versions)"
        ) from None


def _privacy_spec(
    options: PrivacyOptions, spec: TaskSpec, train_rows: Mapping[str, int], versions: int
) -> PrivacySpec:
    record = laplace = bank = None
    if options.record_epsilon is not None:
        smallest = min(train_rows.values())
        q = sample_rate(spec, smallest)
        steps = options.planned_updates * steps_per_update(spec, smallest)
        sigma = calibrate_dpsgd(options.record_epsilon, q, steps, options.delta)
        record = RecordPrivacy(
            clip=options.record_clip,
            noise_multiplier=sigma,
            delta=options.delta,
            epsilon_budget=options.record_epsilon,
        )
    if options.laplace_epsilon is not None:
        laplace = LaplacePrivacy(
            clip_l1=options.laplace_clip,
            epsilon=options.laplace_epsilon,
            epsilon_budget=options.laplace_budget,
        )
    if options.bank_epsilon is not None:
        z = calibrate_gaussian(options.bank_epsilon, max(1, versions), options.delta)
        bank = BankPrivacy(
            clip=options.bank_clip,
            noise_multiplier=z,
            delta=options.delta,
            adaptive=options.bank_adaptive,
        )
    return PrivacySpec(record=record, laplace=laplace, bank=bank)


def privacy_report(
    spec: TaskSpec, banks: Mapping[str, tuple[int, int]], versions: int
) -> dict[str, Any]:
    """The report's privacy section: the settings, and what each mechanism spent.

    ``banks`` maps each bank to (its training rows, the updates it published): a
    bank's epsilon is the accountant's over the steps of the updates it published
    (what its own ledger counts); the model's, over the versions committed.
    """
    p = spec.privacy
    out: dict[str, Any] = {}
    if p.record is not None:
        r = p.record
        out["record"] = {
            "mechanism": "DP-SGD (Poisson sampling, per-example clipping, Gaussian noise)",
            "clip": r.clip,
            "noise_multiplier": r.noise_multiplier,
            "delta": r.delta,
            "budget": r.epsilon_budget,
            "epsilon_per_bank": {
                name: dpsgd_epsilon(
                    sample_rate(spec, rows),
                    r.noise_multiplier,
                    published * steps_per_update(spec, rows),
                    r.delta,
                )
                for name, (rows, published) in banks.items()
            },
        }
    if p.laplace is not None:
        lp = p.laplace
        out["laplace"] = {
            "mechanism": "Laplace on each whole update (pure epsilon, local)",
            "clip_l1": lp.clip_l1,
            "epsilon_per_update": lp.epsilon,
            "budget": lp.epsilon_budget,
            "epsilon_per_bank": {
                name: laplace_epsilon(lp.epsilon, published)
                for name, (_, published) in banks.items()
            },
        }
    if p.bank is not None:
        b = p.bank
        out["bank"] = {
            "mechanism": "clipped updates, Gaussian noise on each version (at the aggregator)",
            "clip": b.clip,
            "adaptive": b.adaptive,
            "noise_multiplier": b.noise_multiplier,
            "delta": b.delta,
            "versions": versions,
            "model_epsilon": gaussian_epsilon(b.noise_multiplier, versions, b.delta),
        }
    return out
