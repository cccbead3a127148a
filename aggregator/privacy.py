"""Bank-level differential privacy at the aggregator: clipping, noise, adaptive clipping,
accounting. Pure functions (no I/O), float64, deterministic; the service and replay
compute every private version with :func:`private_version`, so they agree bit for bit.

The mechanism (DP-FedAvg, McMahan et al. 2018; adaptive clipping, Andrew et al. 2021)
------------------------------------------------------------------------------------
For a version with lineage ``e_1 .. e_m`` (weights ``w_i``, as the strategy recorded
them) and clip bound ``C``:

* every update's delta is clipped to L2 norm ``C`` (:func:`clip_delta`: the joint norm
  over all its tensors, float64, scaled by ``min(1, C / norm)``); the lineage weights
  stay as they are;
* the strategy's own step is recomputed from the clipped deltas in float64
  (``type(strategy).recompute`` on the float64 head and bases), Gaussian noise of
  standard deviation ``noise_std`` is added to the new parameters, and the sum is cast
  to each parameter's dtype once;
* the noise is drawn from ``torch.Generator().manual_seed(seed)``, a fresh 63-bit seed
  per version that is recorded with it: first one float64 tensor per parameter in the
  head's tensor order (``randn * noise_std``), then, with adaptive clipping, one
  float64 scalar for the clipped count (``randn * count_noise_std``).

**Sensitivity.** Every step is ``head + sum_i c_i * delta_i`` plus terms that do not
depend on the updates' contents, where ``c_i`` is the recorded lineage weight:
FedAsync's mixing ``a_t`` (``(1 - a) head + a (base + delta)``), FedBuff's
``server_lr * s_i * f_i / K`` (the server learning rate is already in the weight),
FedAvg's normalised ``n_i / sum_j n_j`` (``server.kind`` must be ``sgd``, whose step is
the weighted sum itself). A bank's clipped deltas move the step by at most
``C * sum_{i of that bank} |c_i|``, so the L2 sensitivity of a version is
``C * max over banks of the sum of that bank's |c_i|`` (:func:`sensitivity`).

Neighbouring federations differ in the *contents* of one bank's updates (its terms
removed from the sum, the others' weights unchanged: DP-FedAvg's fixed-denominator
estimator); who took part in which version, staleness, sample counts and hence the
weights are treated as public. No sampling is assumed and every version counts for
every bank (no amplification): after ``N`` private versions with noise multiplier
``z`` the model is ``(gaussian_epsilon(z, N, delta), delta)``-DP for each bank
(:func:`common.privacy.gaussian_epsilon`, an RDP accountant). Should ``z`` change
between versions (a new spec), the versions are composed as RDP adds up, through
:func:`accounted_multiplier`.

**Adaptive clipping** (Andrew et al. 2021, geometric update). With ``b_t`` the fraction
of the version's ``m`` updates whose norm was ``<= C_t``, released with noise,
``b~_t = (sum_i 1[norm_i <= C_t] + N(0, count_noise_std^2)) / m`` and
``C_{t+1} = C_t * exp(-clip_lr * (b~_t - target_quantile))``, ``b~_t`` clamped to
``[0, 1]`` first (post-processing, no privacy cost; it keeps ``exp`` finite). The count is a second
Gaussian query on the same updates; its centred form ``sum_i (1[...] - 1/2)`` has
sensitivity ``k / 2`` for a bank with ``k`` updates in the version. The two compose
as one Gaussian mechanism of multiplier ``z`` when (the paper's Theorem 1, with ``k``)

    ``z_main^-2 + (k / (2 * count_noise_std))^2 = z^-2``.

fedq gives the count the fixed share :data:`COUNT_SHARE` of the budget:
``count_noise_std = k * z / (2 * sqrt(COUNT_SHARE))`` and
``z_main = z / sqrt(1 - COUNT_SHARE)`` (so ``noise_std = z_main * sensitivity``), with
``k`` the largest number of updates one bank has in the version. The accountant then
counts each version as one Gaussian mechanism of multiplier ``z``, as without
adaptive clipping. With a fixed bound ``z_main = z`` and no count is released.

Reproducibility: norms are summed exactly (``math.fsum`` of float64 squares, then one
correctly rounded ``sqrt``), so they do not depend on the number of threads; every
other operation is an elementwise IEEE float64 operation, and float64 ``randn`` on
the CPU is serial. The noise is therefore reproduced bit for bit on the same torch
version. Replay uses the recorded bound and seed; it recomputes the noise standard
deviation from the lineage and checks it is the recorded one exactly, and checks the
next bound and the epsilon (libm's ``exp``/``log`` may differ in the last bit between
platforms) to a relative ``1e-9``.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Protocol

import torch

from aggregator.robust import delta_norm
from common.hashing import LineageEntry
from common.privacy import ACCOUNTANT, gaussian_epsilon
from common.spec import BankPrivacy
from common.wire import Tensors

__all__ = [
    "COUNT_SHARE",
    "BankAggregation",
    "VersionPrivacy",
    "accounted_multiplier",
    "bank_coefficients",
    "check_version",
    "clip_delta",
    "count_noise_std",
    "delta_norm",
    "draw",
    "epsilon",
    "main_multiplier",
    "most_updates",
    "new_seed",
    "noise",
    "noisy_step",
    "private_version",
    "sensitivity",
    "settings_of",
]

_F64 = torch.float64

#: The share of each version's privacy budget spent on the adaptive clipping count.
COUNT_SHARE: Final = 0.1

#: Relative tolerance of the checks on values computed through libm (exp, log).
_REL_TOL: Final = 1e-9


class _Recompute(Protocol):
    """What :func:`private_version` needs of a strategy class: its ``recompute``."""

    def recompute(
        self,
        parent: Tensors,
        base_of: Callable[[int], Tensors],
        lineage: Sequence[LineageEntry],
        deltas: Mapping[str, Tensors],
    ) -> Tensors: ...


def new_seed() -> int:
    """A fresh 63-bit noise seed (:mod:`secrets`)."""
    return secrets.randbits(63)


def clip_delta(delta: Tensors, bound: float) -> tuple[Tensors, float]:
    """``delta * min(1, bound / norm)`` per tensor in float64, and the norm before.

    A delta within the bound is returned unscaled (converted to float64).
    """
    norm = delta_norm(delta)
    if norm <= bound:
        return {k: t.to(_F64) for k, t in delta.items()}, norm
    scale = bound / norm
    clipped: Tensors = {}
    for k, t in delta.items():
        c = t.to(_F64, copy=True)
        c.mul_(scale)
        clipped[k] = c
    return clipped, norm


def bank_coefficients(lineage: Sequence[LineageEntry]) -> dict[str, float]:
    """Per participant, the sum of its ``|weight|`` in the lineage (lineage order)."""
    out: dict[str, float] = {}
    for e in lineage:
        out[e.participant] = out.get(e.participant, 0.0) + abs(e.weight)
    return out


def sensitivity(bound: float, lineage: Sequence[LineageEntry]) -> float:
    """``bound * max over banks of the sum of that bank's |weight|`` (0 when empty)."""
    return bound * max(bank_coefficients(lineage).values(), default=0.0)


def most_updates(lineage: Sequence[LineageEntry]) -> int:
    """``k``: the largest number of updates one participant has in the lineage."""
    counts: dict[str, int] = {}
    for e in lineage:
        counts[e.participant] = counts.get(e.participant, 0) + 1
    return max(counts.values(), default=0)


def main_multiplier(z: float, adaptive: bool) -> float:
    """The parameters' noise multiplier: ``z / sqrt(1 - COUNT_SHARE)`` when adaptive, else ``z``."""
    return z / math.sqrt(1.0 - COUNT_SHARE) if adaptive else z


def count_noise_std(z: float, k: int) -> float:
    """The clipped count's noise: ``k * z / (2 * sqrt(COUNT_SHARE))``."""
    return k * z / (2.0 * math.sqrt(COUNT_SHARE))


def draw(
    shapes: Mapping[str, torch.Size], std: float, seed: int, count_std: float | None = None
) -> tuple[Tensors, float | None]:
    """Gaussian noise from ``seed``: one float64 tensor per shape (in the mapping's
    order, ``randn * std``), then, with ``count_std``, one scalar ``randn * count_std``."""
    g = torch.Generator().manual_seed(seed)
    out: Tensors = {}
    for name, shape in shapes.items():
        n = torch.randn(shape, generator=g, dtype=_F64)
        n.mul_(std)
        out[name] = n
    if count_std is None:
        return out, None
    return out, float(torch.randn((), generator=g, dtype=_F64)) * count_std


def noise(shapes: Mapping[str, torch.Size], std: float, seed: int) -> Tensors:
    """Gaussian noise of standard deviation ``std`` from ``seed``, float64, in order."""
    return draw(shapes, std, seed)[0]


@functools.lru_cache(maxsize=4096)
def epsilon(z: float, versions: int, delta: float) -> float:
    """The cumulative epsilon after ``versions`` Gaussian mechanisms of multiplier ``z``."""
    return gaussian_epsilon(z, versions, delta)


def accounted_multiplier(z: float, versions: int, parent: VersionPrivacy | None) -> float:
    """``z_acc`` after ``versions`` private versions, the last of multiplier ``z``:
    ``z`` itself while every version had it, else from ``versions / z_acc^2 =
    parent.versions / parent.z_acc^2 + 1 / z^2`` (Gaussian RDP composes additively)."""
    if parent is None or parent.accounted_multiplier == z:
        return z
    before = parent.versions / (parent.accounted_multiplier * parent.accounted_multiplier)
    return math.sqrt(versions / (before + 1.0 / (z * z)))


@dataclass(frozen=True, slots=True)
class VersionPrivacy:
    """What a private version records (its metadata's ``info["privacy"]``)."""

    #: The noise seed (63 bits).
    seed: int
    #: The clip bound used by this version, and the one the next version uses.
    clip: float
    next_clip: float
    #: ``z`` (what the accountant counts per version) and the parameters' own multiplier.
    noise_multiplier: float
    main_noise_multiplier: float
    #: ``clip * max over banks of the sum of its weights``; ``noise_std`` is
    #: ``main_noise_multiplier * sensitivity``.
    sensitivity: float
    noise_std: float
    delta: float
    #: Private versions in the chain so far, this one included, and the cumulative epsilon.
    versions: int
    epsilon: float
    #: The multiplier ``z_acc`` whose ``versions`` Gaussian mechanisms cost what this
    #: chain's private versions cost (``z`` while ``z`` never changed):
    #: ``versions / z_acc^2 = sum over the versions of 1 / z_v^2`` (RDP adds up).
    accounted_multiplier: float
    #: The fraction of this version's updates whose norm exceeded ``clip`` (exact: for
    #: the operator and the auditor, not part of the released model); None under secure
    #: aggregation, where each bank clips its own update before masking.
    clipped_fraction: float | None
    adaptive: bool = False
    target_quantile: float | None = None
    clip_lr: float | None = None
    #: Adaptive only: the count's noise and the noisy fraction ``b~`` of updates within.
    count_noise_std: float | None = None
    noisy_unclipped_fraction: float | None = None
    #: The accountant that computed ``epsilon`` (common.privacy.ACCOUNTANT).
    accountant: str = ACCOUNTANT

    def to_json(self) -> dict[str, Any]:
        """JSON data (the seed as an int: JSON numbers of 63 bits survive Python's json)."""
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> VersionPrivacy:
        """The inverse of :meth:`to_json`; ValueError / TypeError / KeyError if malformed."""
        names = cls.__dataclass_fields__
        unknown = set(doc) - set(names)
        if unknown:
            raise ValueError(f"unknown privacy fields: {sorted(unknown)}")
        return cls(**{k: doc[k] for k in names if k in doc})


def private_version(
    strategy: _Recompute,
    head: Tensors,
    base_of: Callable[[int], Tensors],
    lineage: Sequence[LineageEntry],
    deltas: Mapping[str, Tensors],
    *,
    settings: BankPrivacy,
    clip: float,
    seed: int,
    parent: VersionPrivacy | None,
) -> tuple[Tensors, VersionPrivacy]:
    """A private version: clip, recompute the step in float64, add noise, cast once.

    ``deltas`` are the updates' deltas as received (by update id); ``parent`` is the
    previous version's record (None: this is the chain's first private version).
    """
    clipped, norms = {}, []
    for e in lineage:
        c, n = clip_delta(deltas[e.update_id], clip)
        clipped[e.update_id] = c
        norms.append(n)
    z, adaptive = settings.noise_multiplier, settings.adaptive
    main = main_multiplier(z, adaptive)
    sens = sensitivity(clip, lineage)
    std = main * sens
    count_std = count_noise_std(z, most_updates(lineage)) if adaptive else None
    params, count_noise = noisy_step(
        strategy, head, base_of, lineage, clipped, std, seed, count_std
    )
    m = len(lineage)
    within = sum(1 for n in norms if n <= clip)
    next_clip, noisy = clip, None
    if adaptive and count_noise is not None and m > 0:
        # Clamped to [0, 1], where the true fraction lies (post-processing: free).
        noisy = min(1.0, max(0.0, (within + count_noise) / m))
        next_clip = clip * math.exp(-settings.clip_lr * (noisy - settings.target_quantile))
    versions = (parent.versions if parent is not None else 0) + 1
    accounted = accounted_multiplier(z, versions, parent)
    record = VersionPrivacy(
        seed=seed,
        clip=clip,
        next_clip=next_clip,
        noise_multiplier=z,
        main_noise_multiplier=main,
        sensitivity=sens,
        noise_std=std,
        delta=settings.delta,
        versions=versions,
        epsilon=epsilon(accounted, versions, settings.delta),
        accounted_multiplier=accounted,
        clipped_fraction=(m - within) / m if m else 0.0,
        adaptive=adaptive,
        target_quantile=settings.target_quantile if adaptive else None,
        clip_lr=settings.clip_lr if adaptive else None,
        count_noise_std=count_std,
        noisy_unclipped_fraction=noisy,
    )
    return params, record


def noisy_step(
    strategy: _Recompute,
    head: Tensors,
    base_of: Callable[[int], Tensors],
    lineage: Sequence[LineageEntry],
    clipped: Mapping[str, Tensors],
    std: float,
    seed: int,
    count_std: float | None = None,
) -> tuple[Tensors, float | None]:
    """The strategy's step from ``clipped`` deltas, in float64, plus the seed's noise,
    cast to each head tensor's dtype once; and the count's noise (with ``count_std``)."""
    head64 = {k: t.to(_F64) for k, t in head.items()}
    bases: dict[int, Tensors] = {}

    def base64(v: int) -> Tensors:
        if v not in bases:
            bases[v] = {k: t.to(_F64) for k, t in base_of(v).items()}
        return bases[v]

    step = strategy.recompute(head64, base64, lineage, clipped)
    shapes = {k: t.shape for k, t in head.items()}
    drawn, count_noise = draw(shapes, std, seed, count_std)
    params: Tensors = {}
    for name, h in head.items():
        out = step[name].to(_F64, copy=True)
        out.add_(drawn[name])
        params[name] = out.to(h.dtype)
    return params, count_noise


def check_version(
    record: VersionPrivacy,
    recomputed: VersionPrivacy,
    parent: VersionPrivacy | None,
) -> str | None:
    """What replay checks of a private version's record against its recomputation
    (same lineage, the recorded bound and seed): the noise (exactly), the next bound,
    the count of private versions and the epsilon; and, with adaptive clipping on both,
    that the bound is the one the parent chose. None when all agree."""
    exact = (
        ("sensitivity", record.sensitivity, recomputed.sensitivity),
        ("main noise multiplier", record.main_noise_multiplier, recomputed.main_noise_multiplier),
        ("noise std", record.noise_std, recomputed.noise_std),
        ("count noise std", record.count_noise_std, recomputed.count_noise_std),
        ("clipped fraction", record.clipped_fraction, recomputed.clipped_fraction),
        ("private version count", record.versions, recomputed.versions),
    )
    for what, said, found in exact:
        if said != found:
            return f"recorded {what} {said} differs from the recomputed {found}"
    close = [
        ("next clip bound", record.next_clip, recomputed.next_clip),
        ("accounted multiplier", record.accounted_multiplier, recomputed.accounted_multiplier),
    ]
    if record.accountant == recomputed.accountant:
        # Another accountant (library version, orders) computes another valid bound:
        # then the parameters are still checked bit for bit, the epsilon is not.
        close.append(("epsilon", record.epsilon, recomputed.epsilon))
    for what, said_f, found_f in close:
        if not math.isclose(said_f, found_f, rel_tol=_REL_TOL):
            return f"recorded {what} {said_f} differs from the recomputed {found_f}"
    if (
        parent is not None
        and parent.adaptive
        and record.adaptive
        and record.clip != parent.next_clip
    ):
        return (
            f"clip bound {record.clip} is not the {parent.next_clip} its parent version "
            "chose (adaptive clipping)"
        )
    return None


class BankAggregation:
    """The service's bank-level DP: the current bound and the head's record.

    :meth:`apply` computes a version from a step without changing anything;
    :meth:`advance` moves to a committed version's record (and :meth:`restore`
    starts from the head's at start), so an uncommitted step leaves nothing behind.
    """

    __slots__ = ("head", "seeds", "settings")

    def __init__(self, settings: BankPrivacy, seeds: Callable[[], int] = new_seed) -> None:
        self.settings = settings
        #: Where each version's noise seed comes from (tests may fix it).
        self.seeds = seeds
        #: The committed head's privacy record (None: no private version yet).
        self.head: VersionPrivacy | None = None

    @property
    def clip(self) -> float:
        """The bound the next version uses: the head's ``next_clip`` with adaptive
        clipping (when the head has one), else the spec's ``clip``."""
        if self.settings.adaptive and self.head is not None:
            return self.head.next_clip
        return self.settings.clip

    def restore(self, info: Mapping[str, Any]) -> None:
        """Start from a version's stored info (its ``privacy`` entry, if any)."""
        doc = info.get("privacy")
        self.head = None if doc is None else VersionPrivacy.from_json(doc)

    def apply(
        self,
        strategy: _Recompute,
        head: Tensors,
        base_of: Callable[[int], Tensors],
        lineage: Sequence[LineageEntry],
        deltas: Mapping[str, Tensors],
    ) -> tuple[Tensors, VersionPrivacy]:
        """The next version's noisy parameters and its record, with a fresh seed."""
        return private_version(
            strategy,
            head,
            base_of,
            lineage,
            deltas,
            settings=self.settings,
            clip=self.clip,
            seed=self.seeds(),
            parent=self.head,
        )

    def advance(self, record: VersionPrivacy) -> None:
        """A version was committed with ``record``."""
        self.head = record

    def secure(self, lineage: Sequence[LineageEntry]) -> VersionPrivacy:
        """Secure aggregation: the record of a version whose banks clipped their own
        updates (L2 at most ``clip``) before masking; the aggregator adds the noise to
        the unmasked sum (:func:`aggregator.secagg.secure_params`), with a fresh seed."""
        return secure_record(self.settings, self.clip, lineage, self.seeds(), self.head)


def secure_record(
    settings: BankPrivacy,
    clip: float,
    lineage: Sequence[LineageEntry],
    seed: int,
    parent: VersionPrivacy | None,
) -> VersionPrivacy:
    """The record of a secure version's noise: the same sensitivity, multiplier and
    accountant as :func:`private_version`, a fixed clip (adaptive clipping needs each
    update's norm), and no clipped fraction (each bank clipped its own update)."""
    z = settings.noise_multiplier
    main = main_multiplier(z, False)
    sens = sensitivity(clip, lineage)
    versions = (parent.versions if parent is not None else 0) + 1
    accounted = accounted_multiplier(z, versions, parent)
    return VersionPrivacy(
        seed=seed,
        clip=clip,
        next_clip=clip,
        noise_multiplier=z,
        main_noise_multiplier=main,
        sensitivity=sens,
        noise_std=main * sens,
        delta=settings.delta,
        versions=versions,
        epsilon=epsilon(accounted, versions, settings.delta),
        accounted_multiplier=accounted,
        clipped_fraction=None,
    )


def settings_of(record: VersionPrivacy) -> BankPrivacy:
    """The settings a version was made with, from its record (what replay uses)."""
    return BankPrivacy(
        clip=record.clip,
        noise_multiplier=record.noise_multiplier,
        delta=record.delta,
        adaptive=record.adaptive,
        **(
            {"target_quantile": record.target_quantile, "clip_lr": record.clip_lr}
            if record.adaptive and record.target_quantile is not None and record.clip_lr is not None
            else {}
        ),
    )
