"""What each bank contributed: leave-one-out and Shapley values over replayed coalitions.

**The value function.** ``v(S)``, for a coalition ``S`` of banks, is a metric (higher
is better: ROC AUC, or the negative log loss) on a holdout set of the final model
*replayed from the recorded updates of the banks in S only*:
:func:`aggregator.audit.replay.replay` with ``exclude`` = the other banks, which
leaves their updates out of every version and reweights the rest as each version's
strategy would have (:meth:`aggregator.strategies.base.Strategy.without`). ``v`` of
every bank is the real model (that replay is also checked against the store, bit for
bit); ``v`` of no bank is the start model, version 0's parameters.

**Leave-one-out** of bank ``i``: ``v(N) - v(N minus i)``, ``N`` every bank.

**Shapley value** of bank ``i``: its marginal gain ``v(S + i) - v(S)`` averaged over
every order in which the banks may join, ``S`` the banks before ``i``. It is the one
split of ``v(N) - v(empty)`` that is efficient (the values sum to the whole gain),
symmetric (two banks that add the same to every coalition get the same), gives zero
to a bank that never changes the value, and is additive over value functions.

**The estimator.** Exact, with ``exact=True``: every one of the ``n!`` orders (at most
:data:`EXACT_MAX` banks; ``2^n`` coalitions replayed); the values then sum to
``v(N) - v(empty)`` up to float rounding. Otherwise truncated Monte Carlo Shapley
(TMC-Shapley, Ghorbani & Zou, "Data Shapley", ICML 2019): ``permutations`` orders
drawn with a seeded ``numpy.random.Generator`` (the same seed gives the same values);
along each order, once the running value is within ``truncation`` of ``v(N)`` the
remaining banks' marginal gains are taken as 0 instead of replayed. The value of a
bank is the mean of its marginal gains over the orders, its uncertainty their Monte
Carlo standard error (sample standard deviation over ``sqrt(permutations)``). Each
order's marginal gains telescope to ``v(S_last) - v(empty)``, with ``S_last`` the
coalition at which it was truncated, so the estimated values sum to ``v(N) -
v(empty)`` within ``truncation`` (exactly, without truncation): the report gives that
gap. The standard errors measure the sampling of orders only, not the approximation
of the value function described below.

*Why TMC over GTG-Shapley* (Liu et al., "GTG-Shapley", ACM TIST 2022): GTG-Shapley
values each round separately (the models a round's updates make, with the earlier
rounds as recorded) and sums the rounds; that needs rounds in which every bank takes
part, which FedAsync (one update per version) and FedBuff (a buffer of whichever banks
came) do not have, and its round-by-round values answer another question than
``fedq replay --exclude``. Replaying the whole chain for a coalition is the same
counterfactual as ``--exclude`` for every strategy, and it is cheap (no training: the
recorded deltas are re-added), so every coalition is valued on the final model and
leave-one-out and Shapley share one value function. Coalitions are memoised: an
order's prefix is replayed once whichever order reaches it.

**What replaying recorded updates cannot say.** The updates kept in a counterfactual
were trained by their banks on the models that *did* include the left-out banks; had
those banks been absent, the others would have trained on other models and sent other
updates. ``v(S)`` is therefore the recorded updates of ``S`` recombined without the
others, a first-order approximation of the model ``S`` would have trained alone, not
a retraining; the values inherit that limit (:data:`CAVEAT`). With bank-level DP a
counterfactual reuses each version's recorded noise (another noisy model, see
:class:`aggregator.audit.replay.ReplayReport.note`). A version made by secure
aggregation has no counterfactual without any of its survivors (the aggregator saw
only the masked sum), so the contributions of such a chain are refused with the
replay's own one-line reason (:func:`aggregator.audit.replay.refuse_secure_exclusion`).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

from aggregator.audit.replay import ReplayReport, refuse_secure_exclusion, replay
from aggregator.store import RedisModelStore, VersionRecord
from common.errors import FedqError
from common.evaluation import evaluate
from common.spec import TaskSpec
from common.wire import Tensors

#: The most banks :func:`contributions` enumerates every order of (6! = 720 orders,
#: 2^6 = 64 coalitions).
EXACT_MAX = 6

#: What every contribution report must say about its value function.
CAVEAT = (
    "each coalition's model is replayed from the recorded updates of its banks, which "
    "were trained on models that included the banks left out: a counterfactual "
    "recombination (an approximation of what those banks would have trained alone), "
    "not a retraining"
)

Metric = Literal["auc", "loss"]

#: Versions read per round trip.
_BATCH = 512


class ContributionError(FedqError):
    """Contributions cannot be computed (no holdout, one class, a chain that does not replay)."""


@dataclass(frozen=True, slots=True)
class ContributionReport:
    """Leave-one-out and Shapley values of each bank, with their uncertainty."""

    #: The banks, in name order.
    banks: tuple[str, ...]
    #: ``v(N)``: the value of the real model (every bank).
    value_all: float
    #: ``v(empty)``: the value of the start model (no bank).
    value_empty: float
    #: ``v(N) - v(N minus i)`` per bank.
    leave_one_out: Mapping[str, float]
    #: The Shapley value per bank (exact, or the TMC estimate).
    shapley: Mapping[str, float]
    #: The Monte Carlo standard error of each Shapley value (0 when exact).
    stderr: Mapping[str, float]
    #: The orders averaged over (``n!`` when exact).
    permutations: int
    exact: bool
    #: The truncation tolerance, in the metric's units (0 when exact: none).
    truncation: float
    seed: int
    #: Distinct coalitions valued (over the store: replayed; ``v(N)`` and ``v(empty)``
    #: included).
    evaluations: int
    #: Marginal gains taken as 0 by truncation, over all orders.
    truncated: int
    #: What the value is (e.g. "ROC AUC on 250 holdout rows (75 positives)").
    metric: str = ""
    task: str = ""
    #: The version whose replays are valued.
    to_version: int | None = None
    #: Each bank's updates in the replayed versions.
    updates: Mapping[str, int] = field(default_factory=dict)
    #: What a reader must know beyond :data:`CAVEAT` (bank-level DP, ...).
    notes: tuple[str, ...] = ()

    @property
    def gain(self) -> float:
        """``v(N) - v(empty)``: what the Shapley values split."""
        return self.value_all - self.value_empty

    @property
    def shapley_sum(self) -> float:
        return math.fsum(self.shapley.values())

    @property
    def efficiency_gap(self) -> float:
        """``sum_i phi_i - (v(N) - v(empty))``: float rounding when exact or untruncated,
        at most ``truncation`` in absolute value otherwise."""
        return self.shapley_sum - self.gain

    @property
    def efficiency_bound(self) -> float:
        """The most ``|efficiency_gap|`` may be by construction (plus float rounding):
        the truncation tolerance when some marginal gain was truncated, else 0."""
        return self.truncation if self.truncated else 0.0

    def to_json(self) -> dict[str, Any]:
        """The report as JSON data (``fedq audit contributions --json``)."""
        return {
            "task": self.task,
            "to_version": self.to_version,
            "metric": self.metric,
            "value_all": self.value_all,
            "value_empty": self.value_empty,
            "gain": self.gain,
            "estimator": {
                "method": "exact" if self.exact else "tmc-shapley",
                "permutations": self.permutations,
                "truncation": self.truncation,
                "seed": self.seed,
                "truncated_marginals": self.truncated,
                "coalitions_replayed": self.evaluations,
            },
            "banks": [
                {
                    "bank": b,
                    "updates": self.updates.get(b, 0),
                    "leave_one_out": self.leave_one_out[b],
                    "shapley": self.shapley[b],
                    "stderr": self.stderr[b],
                }
                for b in self.banks
            ],
            "efficiency": {
                "shapley_sum": self.shapley_sum,
                "gain": self.gain,
                "gap": self.efficiency_gap,
                "bound": self.efficiency_bound,
            },
            "caveat": CAVEAT,
            "notes": list(self.notes),
        }


def contributions(
    value_of: Callable[[frozenset[str]], float],
    banks: Sequence[str],
    *,
    permutations: int = 50,
    truncation: float = 0.001,
    seed: int = 0,
    exact: bool = False,
) -> ContributionReport:
    """Leave-one-out and Shapley values of ``banks`` under ``value_of`` (see the module).

    ``value_of(S)`` is called at most once per coalition (memoised). ``exact``
    averages over every order (at most :data:`EXACT_MAX` banks; ``permutations``,
    ``truncation`` and ``seed`` are then unused); otherwise TMC-Shapley over
    ``permutations`` orders drawn from ``numpy.random.default_rng(seed)`` over the
    banks in name order, truncated within ``truncation`` of ``v(N)``. ValueError for
    no bank, a bank named twice, fewer than 2 permutations, a negative or non-finite
    truncation, or ``exact`` with more than :data:`EXACT_MAX` banks.
    """
    names = tuple(sorted(banks))
    if not names:
        raise ValueError("no bank to value")
    if len(set(names)) != len(names):
        raise ValueError("a bank is named twice")
    if exact and len(names) > EXACT_MAX:
        raise ValueError(
            f"exact Shapley values enumerate every order of the banks: at most {EXACT_MAX} "
            f"banks, not {len(names)}; estimate them from sampled permutations instead"
        )
    if not exact and permutations < 2:
        raise ValueError("at least 2 permutations are needed for a standard error")
    if not (math.isfinite(truncation) and truncation >= 0.0):
        raise ValueError(f"truncation must be a finite number >= 0, not {truncation!r}")
    memo: dict[frozenset[str], float] = {}

    def v(s: frozenset[str]) -> float:
        if s not in memo:
            memo[s] = float(value_of(s))
        return memo[s]

    everyone = frozenset(names)
    v_all, v_empty = v(everyone), v(frozenset())
    loo = {b: v_all - v(everyone - {b}) for b in names}
    tol = None if exact else truncation
    marginals: dict[str, list[float]] = {b: [] for b in names}
    truncated = 0
    for order in _orders(names, exact, permutations, seed):
        coalition, prev = frozenset[str](), v_empty
        for bank in order:
            if tol is not None and abs(v_all - prev) < tol:
                marginals[bank].append(0.0)
                truncated += 1
                continue
            coalition = coalition | {bank}
            value = v(coalition)
            marginals[bank].append(value - prev)
            prev = value
    count = len(marginals[names[0]])
    shapley = {b: math.fsum(m) / count for b, m in marginals.items()}
    stderr = {
        b: 0.0 if exact else float(np.std(m, ddof=1)) / math.sqrt(count)
        for b, m in marginals.items()
    }
    return ContributionReport(
        banks=names,
        value_all=v_all,
        value_empty=v_empty,
        leave_one_out=loo,
        shapley=shapley,
        stderr=stderr,
        permutations=count,
        exact=exact,
        truncation=0.0 if exact else truncation,
        seed=seed,
        evaluations=len(memo),
        truncated=truncated,
    )


def _orders(
    names: tuple[str, ...], exact: bool, permutations: int, seed: int
) -> Iterator[tuple[str, ...]]:
    if exact:
        yield from itertools.permutations(names)
        return
    rng = np.random.default_rng(seed)
    for _ in range(permutations):
        yield tuple(names[int(i)] for i in rng.permutation(len(names)))


@dataclass(frozen=True, slots=True)
class Holdout:
    """The metric models are valued by: ``metric`` of :func:`common.evaluation.evaluate`
    on encoded holdout rows, higher is better (``auc``: ROC AUC; ``loss``: the negative
    log loss)."""

    spec: TaskSpec
    x: torch.Tensor
    y: torch.Tensor
    metric: Metric = "auc"

    def __post_init__(self) -> None:
        if self.metric not in ("auc", "loss"):
            raise ContributionError(f"unknown metric {self.metric!r}; expected auc or loss")
        if self.rows == 0:
            raise ContributionError("the holdout set has no rows")
        if self.metric == "auc" and self.positives in (0, self.rows):
            raise ContributionError(
                f"the holdout set has one class only ({self.positives} positives of "
                f"{self.rows} rows): AUC needs both; use another holdout set or --metric loss"
            )

    @property
    def rows(self) -> int:
        return len(self.y)

    @property
    def positives(self) -> int:
        return int(self.y.sum())

    @property
    def description(self) -> str:
        what = (
            "ROC AUC"
            if self.metric == "auc"
            else "negative log loss (the log loss with its sign flipped: higher is better)"
        )
        return f"{what} on {self.rows} holdout rows ({self.positives} positives)"

    def __call__(self, params: Tensors) -> float:
        scores = evaluate(self.spec, params, self.x, self.y)
        return scores["auc"] if self.metric == "auc" else -scores["loss"]


async def replay_contributions(
    store: RedisModelStore,
    updates: Mapping[str, bytes],
    task: str,
    score: Callable[[Tensors], float],
    *,
    answers: Mapping[str, Sequence[bytes]] | None = None,
    to_version: int | None = None,
    permutations: int = 50,
    truncation: float = 0.001,
    seed: int = 0,
    exact: bool = False,
    metric: str = "",
    on_replay: Callable[[int], None] | None = None,
) -> ContributionReport:
    """:func:`contributions` of every bank of ``task`` (the spec's participants and
    whoever has an update in versions ``1..to_version``), ``v(S)`` being ``score`` of
    the parameters of ``to_version`` (default: the head) replayed from the updates of
    the banks of ``S`` (``updates`` and ``answers``: :func:`~aggregator.audit.replay.
    index_updates` and :func:`~aggregator.audit.replay.index_answers` of the audit
    stream). ``metric`` describes ``score`` in the report; ``on_replay`` is called with
    the number of coalitions replayed so far after each replay.

    Raises ReplayError (one line) when a bank is a survivor of a version made by
    secure aggregation (no coalition without it can be replayed) or the task has no
    versions, and ContributionError when the recorded chain does not replay bit for bit
    or a coalition's replay fails.
    """
    head = await store.head(task)
    if head is None:
        raise ContributionError(f"task {task!r} has no versions")
    last = head if to_version is None else to_version
    if not 0 <= last <= head:
        raise ContributionError(f"--to-version {last} is not in 0..{head} (the head)")
    spec = await store.get_spec(task)
    records = await _records(store, task, last)
    counts: dict[str, int] = dict.fromkeys(spec.participants, 0)
    for rec in records:
        for e in rec.lineage:
            counts[e.participant] = counts.get(e.participant, 0) + 1
    banks = tuple(sorted(counts))
    refuse_secure_exclusion(records, banks)
    values = _ReplayedValues(
        store, updates, answers or {}, task, last, score, banks, counts, on_replay
    )
    loop = asyncio.get_running_loop()

    def value_of(s: frozenset[str]) -> float:
        return asyncio.run_coroutine_threadsafe(values.value(s), loop).result()

    try:
        report = await asyncio.to_thread(
            contributions,
            value_of,
            banks,
            permutations=permutations,
            truncation=truncation,
            seed=seed,
            exact=exact,
        )
    except ValueError as err:
        raise ContributionError(str(err)) from err
    return replace(
        report,
        metric=metric,
        task=task,
        to_version=last,
        evaluations=len(values.memo),
        updates={b: counts[b] for b in banks},
        notes=tuple(dict.fromkeys(values.notes)),
    )


async def _records(store: RedisModelStore, task: str, last: int) -> list[VersionRecord]:
    out: list[VersionRecord] = []
    for at in range(1, last + 1, _BATCH):
        out += await store.get_versions(task, list(range(at, min(at + _BATCH, last + 1))))
    return out


class _ReplayedValues:
    """``v(S)`` over the store: ``score`` of the chain replayed without the other banks,
    memoised by the coalition's banks that have updates (a bank without any changes
    no replay)."""

    def __init__(
        self,
        store: RedisModelStore,
        updates: Mapping[str, bytes],
        answers: Mapping[str, Sequence[bytes]],
        task: str,
        last: int,
        score: Callable[[Tensors], float],
        banks: Iterable[str],
        counts: Mapping[str, int],
        on_replay: Callable[[int], None] | None,
    ) -> None:
        self.store, self.updates, self.answers = store, updates, answers
        self.task, self.last, self.score = task, last, score
        self.contributors = frozenset(b for b in banks if counts.get(b, 0) > 0)
        self.on_replay = on_replay
        self.memo: dict[frozenset[str], float] = {}
        self.notes: list[str] = []

    async def value(self, coalition: frozenset[str]) -> float:
        key = coalition & self.contributors
        if key not in self.memo:
            params = await self._params(key)
            self.memo[key] = float(await asyncio.to_thread(self.score, params))
            if self.on_replay is not None:
                self.on_replay(len(self.memo))
        return self.memo[key]

    async def _params(self, key: frozenset[str]) -> Tensors:
        if not key:
            # No bank: every version keeps its parent's parameters (each strategy's
            # ``without`` leaves an empty lineage), i.e. the start model.
            return (await self.store.get_params(self.task, 0)).tensors
        left_out = self.contributors - key
        report = await replay(
            self.store,
            self.updates,
            self.task,
            to_version=self.last,
            exclude=left_out,
            answers=self.answers,
        )
        if not report.ok:
            raise ContributionError(_failure(report, left_out))
        if left_out and report.private_versions:
            self.notes.append(
                f"{report.private_versions} versions were made with bank-level DP: each "
                "coalition's replay reuses their recorded noise seeds, bounds and noise, so "
                "it is another noisy model, not the noiseless model of that coalition"
            )
        return report.params


def _failure(report: ReplayReport, left_out: frozenset[str]) -> str:
    where = (
        "the recorded chain does not replay"
        if not left_out
        else f"the chain without {', '.join(sorted(left_out))} does not replay"
    )
    if report.first_bad_version is not None:
        return f"{where}: version {report.first_bad_version}: {report.reason}"
    problems = [*report.individually_unmasked, *report.cohort_problems]
    return f"{where}: {'; '.join(problems)}"
