"""Differential privacy at the bank: DP-SGD (record level) and the Laplace mechanism.

Both run where the rows are, before anything leaves the bank, so they protect the
rows against every other party, the aggregator included.

**DP-SGD** (:func:`train_dpsgd`, the spec's ``privacy.record``; Abadi et al. 2016).
With ``n`` training rows, ``q = min(1, batch_size / n)``, one local update takes
``epochs * round(1 / q)`` steps (:func:`dpsgd_steps`), each:

1. Poisson sampling: every row joins the step's batch independently with probability
   ``q`` (``torch.rand(n) < q`` from the update's generator). The batch size varies
   and may be 0; that is exactly the sampled Gaussian mechanism the accountant
   (``common.privacy.dpsgd_epsilon``, a ``PoissonSampledDpEvent``) composes.
2. Per-example gradients (``torch.func``: ``vmap`` of ``grad``) of the loss
   :func:`participant.training.train_local` uses: ``BCEWithLogits`` with
   ``positive_weight``, through ``common.models.forward``, i.e. in evaluation mode:
   **dropout is off under DP** (a dropout mask per example would need its own
   randomness per row; the model and its parameters are the same either way).
3. Each example's gradient is clipped to L2 norm ``clip`` over all tensors jointly
   (scaled by ``min(1, clip / (norm + 1e-6))``) and the clipped gradients are summed.
4. Gaussian noise ``N(0, (noise_multiplier * clip)^2)`` is added to every coordinate
   of the sum (also when the batch is empty), from the same generator.
5. The noisy sum is divided by ``q * n``, the expected batch size (the unbiased
   estimate of the mean gradient; a data-independent divisor, so the sensitivity
   stays ``clip``).
6. The FedProx gradient ``prox_mu * (theta - theta_received)``, which does not
   depend on the rows, is added after the noise; then plain SGD:
   ``theta <- theta - lr * g``.

The update's metrics carry no training loss under DP: it is a function of the rows
that no noise covers. The validation metrics are about the validation rows, which
are never trained on and are outside this guarantee (see docs/privacy.md).

**Laplace** (:func:`laplace_release`, ``privacy.laplace``): the ordinary local
training's whole delta is clipped to L1 norm ``clip_l1`` (all tensors jointly), so
any two releasable deltas differ by at most ``2 * clip_l1`` in L1 norm, whatever the
rows were; Laplace noise of scale ``2 * clip_l1 / epsilon`` per coordinate then makes
each update ``epsilon``-DP with respect to the bank's *whole* data set (pure DP, no
delta). It protects everything the delta carries, but only that: not the sample
count the envelope names, nor the validation metrics. The noise grows with the
number of coordinates, so it suits small models.

**Randomness.** Anyone who knows the generator's seed can recompute the noise and
subtract it: the worker draws a fresh seed from the operating system for every
update unless a seed is configured (tests, reproducible experiments). ``torch``'s
generator is not a cryptographic one, and floating-point noise has known weaknesses
(Mironov 2012); neither is addressed here.

The :class:`PrivacyLedger` keeps a bank's spending: the accountant's cumulative
epsilon over every step (DP-SGD) or release (Laplace) it published, and whether one
more update would pass the spec's ``epsilon_budget``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant
from torch import func as tfunc
from torch.nn import functional as F

from common.errors import ConfigError
from common.models import forward
from common.privacy import ORDERS, dpsgd_epsilon, laplace_epsilon
from common.spec import LaplacePrivacy, RecordPrivacy, TaskSpec
from common.wire import Tensors

#: Added to the norm before dividing (as Opacus does): a zero gradient stays zero.
_NORM_EPS = 1e-6


def sample_rate(batch_size: int, rows: int) -> float:
    """Poisson sampling rate ``q = min(1, batch_size / rows)`` (1 for no rows)."""
    return 1.0 if rows <= 0 else min(1.0, batch_size / rows)


def dpsgd_steps(spec: TaskSpec, rows: int) -> int:
    """Steps of one DP-SGD update: ``epochs * round(1 / q)`` (0 without rows)."""
    if rows <= 0:
        return 0
    q = sample_rate(spec.training.batch_size, rows)
    return spec.training.epochs * max(1, round(1.0 / q))


def _record(spec: TaskSpec) -> RecordPrivacy:
    record = spec.privacy.record
    if record is None:
        raise ValueError("the task spec has no privacy.record settings")
    return record


def _laplace(spec: TaskSpec) -> LaplacePrivacy:
    laplace = spec.privacy.laplace
    if laplace is None:
        raise ValueError("the task spec has no privacy.laplace settings")
    return laplace


def per_example_grads(
    spec: TaskSpec, params: Tensors, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The gradient of each row's loss (without the prox term): name -> ``(rows, *shape)``."""
    weight = spec.training.positive_weight
    pos_weight = None if weight == 1.0 else torch.tensor([weight], dtype=torch.float32)
    model = spec.model

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logit = forward(model, p, xi.unsqueeze(0)).reshape(1)
        return F.binary_cross_entropy_with_logits(logit, yi.reshape(1), pos_weight=pos_weight)

    if len(x) == 0:
        return {k: torch.zeros((0, *v.shape), dtype=v.dtype) for k, v in params.items()}
    grads = tfunc.vmap(tfunc.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return cast(dict[str, torch.Tensor], grads)


def clip_and_sum(grads: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """Clip each row's gradient to L2 norm ``clip`` (all tensors jointly) and sum them."""
    first = next(iter(grads.values()))
    rows = first.shape[0]
    if rows == 0:
        return {k: torch.zeros(g.shape[1:], dtype=g.dtype) for k, g in grads.items()}
    squares = sum(g.reshape(rows, -1).pow(2).sum(dim=1) for g in grads.values())
    norms = torch.as_tensor(squares).sqrt()
    factor = (clip / (norms + _NORM_EPS)).clamp(max=1.0)
    return {k: torch.einsum("i,i...->...", factor, g) for k, g in grads.items()}


def train_dpsgd(
    spec: TaskSpec,
    params: Tensors,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    public_rows: int | None = None,
    on_batch: Callable[[int], object] | None = None,
) -> tuple[Tensors, dict[str, float], int]:
    """DP-SGD from ``params`` on ``(x, y)`` (see the module docstring for the steps).

    ``public_rows`` is the row count the bank declared (the task spec's
    ``declared_samples``): the sampling rate, the steps and the divisor come from it,
    never from the private ``len(x)``, so nothing the update carries depends on how
    many rows the bank really has (None: ``len(x)``, for tests). Returns the delta
    (trained - params, float32), the metrics (``dp_steps``) and the number of steps,
    which the accountant composes. ``on_batch`` is told each step's Poisson batch size
    (it stays in the bank: the update does not carry it).
    """
    record = _record(spec)
    settings = spec.training
    n = len(x)
    public = n if public_rows is None else public_rows
    steps = dpsgd_steps(spec, public)
    q = sample_rate(settings.batch_size, public)
    gen = torch.Generator().manual_seed(seed)
    theta = {k: v.detach().to(torch.float32).clone() for k, v in params.items()}
    anchors = {k: v.clone() for k, v in theta.items()}
    x = x.to(torch.float32)
    y = y.to(torch.float32)
    std = record.noise_multiplier * record.clip
    divisor = q * public
    for _ in range(steps):
        chosen = torch.nonzero(torch.rand(n, generator=gen) < q).squeeze(1)
        if on_batch is not None:
            on_batch(len(chosen))
        summed = clip_and_sum(per_example_grads(spec, theta, x[chosen], y[chosen]), record.clip)
        with torch.no_grad():
            for k, s in summed.items():
                noise = torch.normal(0.0, std, size=s.shape, generator=gen)
                g = (s + noise) / divisor
                if settings.prox_mu > 0:
                    g = g + settings.prox_mu * (theta[k] - anchors[k])
                theta[k] = theta[k] - settings.lr * g
    delta = {k: (theta[k] - params[k].to(torch.float32)).contiguous() for k in params}
    metrics = {"dp_steps": float(steps)}
    return delta, metrics, steps


def l1_clip(delta: Tensors, bound: float) -> Tensors:
    """Scale ``delta`` (all tensors jointly) down to L1 norm at most ``bound``."""
    norm = float(sum(float(v.abs().sum()) for v in delta.values()))
    scale = 1.0 if norm <= bound else bound / norm
    return {k: (v.to(torch.float32) * scale).contiguous() for k, v in delta.items()}


def laplace_release(spec: TaskSpec, delta: Tensors, *, seed: int) -> Tensors:
    """The Laplace mechanism on a whole update: L1-clip to ``clip_l1``, then add
    ``Laplace(0, 2 * clip_l1 / epsilon)`` to every coordinate (float32)."""
    laplace = _laplace(spec)
    clipped = l1_clip(delta, laplace.clip_l1)
    scale = 2.0 * laplace.clip_l1 / laplace.epsilon
    gen = torch.Generator().manual_seed(seed)
    out: Tensors = {}
    for k, v in clipped.items():
        # Inverse CDF: u ~ U(-1/2, 1/2), noise = -scale * sign(u) * log(1 - 2|u|).
        u = torch.rand(v.shape, generator=gen, dtype=torch.float64) - 0.5
        noise = -scale * torch.sign(u) * torch.log1p(-2.0 * u.abs())
        out[k] = (v.to(torch.float64) + noise).to(torch.float32).contiguous()
    return out


class PrivacyLedger:
    """One bank's privacy spending under its task's local mechanism.

    Counts what was *published*: DP-SGD steps (composed by the RDP accountant at the
    spec's ``delta``) and Laplace releases (pure epsilon, adding up; with both, the
    two add: basic composition). ``exhausted`` is true when one more update would take
    the cumulative epsilon past the spec's ``epsilon_budget``. Without a local
    mechanism it is inactive and spends nothing.

    With a ``path`` (a JSON file), the spending survives restarts: it is read at start
    and written by :meth:`quote`, i.e. *before* the update leaves the bank, so a crash
    between publishing and counting cannot forget an update (an update whose publish
    fails is counted all the same: the safe side). One file per data set, used by
    one worker at a time: whatever else was released about those rows must be in it.
    """

    def __init__(self, spec: TaskSpec, rows: int, path: Path | None = None) -> None:
        self.spec = spec
        self.rows = rows
        self.path = path
        self.record = spec.privacy.record
        self.laplace = spec.privacy.laplace
        #: DP-SGD steps by (sampling rate, noise multiplier); Laplace epsilon spent.
        self._sgd: dict[tuple[float, float], int] = {}
        self._pure = 0.0
        self._delta = self.record.delta if self.record is not None else None
        #: Updates counted (all runs that shared the file).
        self.updates = 0
        if path is not None and path.exists():
            self._load(path)
        self._q = sample_rate(spec.training.batch_size, rows)
        self.epsilon = self._total(self._sgd, self._pure)
        self._next: float | None = None

    @property
    def active(self) -> bool:
        return self.record is not None or self.laplace is not None

    @property
    def budget(self) -> float | None:
        mech = self.record or self.laplace
        return None if mech is None else mech.epsilon_budget

    @property
    def delta(self) -> float | None:
        """The ``delta`` of the (epsilon, delta) guarantee: 0 when only pure-DP
        releases were made (None)."""
        return self._delta if self._sgd or self.record is not None else None

    @property
    def steps(self) -> int:
        """DP-SGD steps counted."""
        return sum(self._sgd.values())

    def _after(self, steps: int) -> tuple[dict[tuple[float, float], int], float]:
        sgd, pure = dict(self._sgd), self._pure
        if self.record is not None:
            key = (self._q, self.record.noise_multiplier)
            sgd[key] = sgd.get(key, 0) + steps
        elif self.laplace is not None:
            pure += laplace_epsilon(self.laplace.epsilon, 1)
        return sgd, pure

    def _total(self, sgd: dict[tuple[float, float], int], pure: float) -> float:
        live = {k: v for k, v in sgd.items() if v > 0}
        if not live or self._delta is None:
            return pure
        if len(live) == 1:
            ((q, sigma), steps), *_ = live.items()
            return pure + dpsgd_epsilon(q, sigma, steps, self._delta)
        acc = RdpAccountant(orders=list(ORDERS))
        for (q, sigma), steps in live.items():
            acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)
        return pure + float(acc.get_epsilon(self._delta))

    def next_cost(self) -> float:
        """The cumulative epsilon after one more update."""
        if self._next is None:
            self._next = self._total(*self._after(dpsgd_steps(self.spec, self.rows)))
        return self._next

    @property
    def exhausted(self) -> bool:
        """One more update would spend more than the budget."""
        budget = self.budget
        return budget is not None and self.next_cost() > budget

    def quote(self, steps: int = 0) -> dict[str, float]:
        """The metrics an update of ``steps`` DP-SGD steps (or one Laplace release)
        carries: ``dp_epsilon`` (what it costs), ``dp_epsilon_total`` (the bank's
        cumulative epsilon with it) and, for DP-SGD, ``dp_delta``. Counted in memory
        by :meth:`spend` once published; with a file, written there now."""
        sgd, pure = self._after(steps)
        after = self._total(sgd, pure)
        if self.path is not None:
            self._save(self.path, sgd, pure, self.updates + 1)
        metrics = {"dp_epsilon": after - self.epsilon, "dp_epsilon_total": after}
        if self.delta is not None:
            metrics["dp_delta"] = self.delta
        return metrics

    def spend(self, steps: int = 0) -> None:
        """Count one published update (``steps`` DP-SGD steps, or one release)."""
        self._sgd, self._pure = self._after(steps)
        self.updates += 1
        self.epsilon = self._total(self._sgd, self._pure)
        self._next = None

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
            for q, sigma, steps in doc["dpsgd"]:
                key = (float(q), float(sigma))
                self._sgd[key] = self._sgd.get(key, 0) + int(steps)
            self._pure = float(doc["laplace_epsilon"])
            self.updates = int(doc["updates"])
            if doc.get("delta") is not None and self._delta is None:
                # The guarantee is stated at the current spec's delta, else the file's.
                self._delta = float(doc["delta"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"privacy ledger {path}: cannot read it ({e})") from e

    def _save(
        self, path: Path, sgd: dict[tuple[float, float], int], pure: float, updates: int
    ) -> None:
        doc = {
            "dpsgd": [[q, sigma, steps] for (q, sigma), steps in sorted(sgd.items())],
            "laplace_epsilon": pure,
            "delta": self._delta,
            "updates": updates,
        }
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
