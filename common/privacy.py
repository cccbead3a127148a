"""Privacy accounting: what a sequence of noisy steps costs in (epsilon, delta).

The accounting is Google's ``dp-accounting`` (Rényi DP accountant, integer orders),
never written by hand here; this module only names the events fedq's mechanisms
produce and calibrates noise to a target:

* record-level DP-SGD at a bank: each local step is a Poisson-sampled Gaussian
  mechanism (sampling rate ``q``, noise multiplier ``sigma``), composed over every step
  the bank has taken (:func:`dpsgd_epsilon`);
* bank-level DP at the aggregator: each version is one Gaussian mechanism on the
  clipped updates (noise multiplier ``z``, no subsampling assumed), composed over the
  versions (:func:`gaussian_epsilon`);
* the Laplace mechanism is pure epsilon-DP and composes by addition (no accountant
  needed: :func:`laplace_epsilon`).

Neighbouring datasets differ by adding or removing one record (record level) or one
bank's update (bank level).
"""

from __future__ import annotations

import importlib.metadata
import math
from types import ModuleType
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from dp_accounting.rdp import RdpAccountant

from common.errors import ConfigError

#: Rényi orders the accountant optimises over (integers: no numerical warnings).
ORDERS: Final = (*range(2, 64), 80, 96, 128, 192, 256, 512)


def _library_version() -> str:
    try:
        return importlib.metadata.version("dp-accounting")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - installed with fedq
        return "unknown"


#: Which accountant computed an epsilon, recorded with it: another library version or
#: other orders may compute another (equally valid) bound.
ACCOUNTANT: Final = (
    f"dp-accounting {_library_version()} RDP, orders {ORDERS[0]}-{ORDERS[-1]} ({len(ORDERS)})"
)


def _dp() -> ModuleType:
    """dp-accounting, imported when a privacy cost is first computed: it brings scipy
    (about 70 MB resident), which a task without differential privacy never needs."""
    import dp_accounting

    module: ModuleType = dp_accounting
    return module


def _accountant() -> RdpAccountant:
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant(orders=list(ORDERS))


def dpsgd_epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """Epsilon after ``steps`` Poisson-sampled Gaussian steps (0 steps: 0)."""
    if steps <= 0:
        return 0.0
    dp = _dp()
    acc = _accountant()
    event = dp.PoissonSampledDpEvent(sample_rate, dp.GaussianDpEvent(noise_multiplier))
    acc.compose(event, steps)
    return float(acc.get_epsilon(delta))


def gaussian_epsilon(noise_multiplier: float, count: int, delta: float) -> float:
    """Epsilon after ``count`` Gaussian mechanisms of multiplier ``noise_multiplier``."""
    if count <= 0:
        return 0.0
    dp = _dp()
    acc = _accountant()
    acc.compose(dp.GaussianDpEvent(noise_multiplier), count)
    return float(acc.get_epsilon(delta))


def laplace_epsilon(per_release: float, count: int) -> float:
    """Pure epsilon after ``count`` Laplace releases of ``per_release`` each (basic
    composition: exact for pure DP)."""
    return per_release * max(0, count)


def calibrate_dpsgd(target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier whose ``steps`` steps cost at most the target."""
    _check_target(target_epsilon, delta)
    dp = _dp()
    return float(
        dp.calibrate_dp_mechanism(
            _accountant,
            lambda s: dp.SelfComposedDpEvent(
                dp.PoissonSampledDpEvent(sample_rate, dp.GaussianDpEvent(s)),
                max(1, steps),
            ),
            target_epsilon,
            delta,
            bracket_interval=dp.LowerEndpointAndGuess(1e-3, 1.0),
        )
    )


def calibrate_gaussian(target_epsilon: float, count: int, delta: float) -> float:
    """The smallest noise multiplier whose ``count`` Gaussian mechanisms cost at most the
    target."""
    _check_target(target_epsilon, delta)
    dp = _dp()
    return float(
        dp.calibrate_dp_mechanism(
            _accountant,
            lambda z: dp.SelfComposedDpEvent(dp.GaussianDpEvent(z), max(1, count)),
            target_epsilon,
            delta,
            bracket_interval=dp.LowerEndpointAndGuess(1e-3, 1.0),
        )
    )


def _check_target(target_epsilon: float, delta: float) -> None:
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target epsilon must be a positive number, not {target_epsilon!r}")
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"delta must be in (0, 1), not {delta!r}")
