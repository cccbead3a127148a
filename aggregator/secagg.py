"""Secure aggregation at the aggregator: one open cohort, its decision and its sum. Pure.

The aggregator holds the masked updates of the open cohort (the one masked for the
head version), closes it when it is full (the sync quorum, FedBuff's buffer size) or
at its deadline with at least the minimum, decides who survived and who dropped
(:class:`Decision`, saved in the store before any request leaves, so that a restart
can never ask a second, different question), asks each survivor for its shares and,
with ``t`` answers, computes the next version from the sum alone
(:func:`secure_params`). No function here sees an individual update unmasked; replay
(aggregator/audit/replay.py) recomputes the same sum from the retained messages.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from aggregator.privacy import BankAggregation, VersionPrivacy, draw
from aggregator.strategies.base import AcceptedUpdate, Step, entry
from common.errors import SecAggError
from common.secagg import (
    Cohort,
    Ring,
    UnmaskShares,
    dequantize,
    element_of,
    norm_bound,
    quantization_bound,
    unflatten,
    unmasked_sum,
    weight_of,
)
from common.signing import PublicKey
from common.spec import TaskSpec
from common.wire import MaskedBlock, Tensors, UnmaskAnswer, UnmaskRequest

#: The masked tensors' dtype on the wire (ring elements modulo 2^64, two's complement).
MASKED_DTYPE = torch.int64

#: A decided cohort is given up (committed unchanged, its updates refused) when this
#: many rounds of unmask requests, ``cohort_deadline_s`` apart, brought fewer than ``t``
#: answers, or when after a restart its survivors' updates are not all back this many
#: ``cohort_deadline_s`` after the decision was read: nothing waits for ever.
UNMASK_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class Decision:
    """Who survived a cohort (sent a masked update in time), with the id of each
    survivor's update, and who dropped."""

    cohort: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    #: survivor -> the id of its masked update: after a restart only that update may
    #: take the survivor's place (another one carries other shares: another question).
    updates: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "cohort": self.cohort,
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
            "updates": dict(self.updates),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> Decision:
        survivors, dropped = doc["survivors"], doc["dropped"]
        cohort, updates = doc["cohort"], doc.get("updates", {})
        if not (
            isinstance(survivors, list)
            and isinstance(dropped, list)
            and isinstance(cohort, int)
            and isinstance(updates, dict)
        ):
            raise SecAggError("a stored cohort decision is malformed")
        return cls(
            cohort,
            tuple(map(str, survivors)),
            tuple(map(str, dropped)),
            {str(k): str(v) for k, v in updates.items()},
        )


@dataclass(frozen=True, slots=True)
class SecureRecord:
    """What a version made by secure aggregation records (``info["secagg"]``): enough
    for replay to recompute its sum from the retained messages, bit for bit."""

    decision: Decision
    #: (participant, answer id) of the answers used, in the order they were combined.
    answers: tuple[tuple[str, str], ...]
    threshold: int
    fraction_bits: int
    #: Each survivor's weight ``w_i`` (multiplied in before masking).
    weights: dict[str, float]
    #: The version is ``head + scale * sum / 2^fraction_bits``.
    scale: float
    #: SHA-256 of the sum's bytes (uint64 LE), hex.
    sum_hash: str

    def to_json(self) -> dict[str, object]:
        return {
            **self.decision.to_json(),
            "answers": [list(a) for a in self.answers],
            "threshold": self.threshold,
            "fraction_bits": self.fraction_bits,
            "weights": dict(self.weights),
            "scale": self.scale,
            "sum_hash": self.sum_hash,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> SecureRecord:
        try:
            answers = tuple((str(p), str(i)) for p, i in doc["answers"])  # type: ignore[attr-defined]
            weights = {str(k): float(v) for k, v in doc["weights"].items()}  # type: ignore[attr-defined]
            return cls(
                Decision.from_json(doc),
                answers,
                int(doc["threshold"]),  # type: ignore[call-overload]
                int(doc["fraction_bits"]),  # type: ignore[call-overload]
                weights,
                float(doc["scale"]),  # type: ignore[arg-type]
                str(doc["sum_hash"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SecAggError(f"a version's secure aggregation record is malformed: {e}") from None


@dataclass(slots=True)
class OpenCohort:
    """The cohort masked for version ``number``: its updates, decision and answers."""

    spec: TaskSpec
    number: int
    capacity: int
    cohort: Cohort = field(init=False)
    updates: dict[str, AcceptedUpdate] = field(default_factory=dict)
    blocks: dict[str, MaskedBlock] = field(default_factory=dict)
    decision: Decision | None = None
    answers: dict[str, UnmaskAnswer] = field(default_factory=dict)
    #: When the first update arrived, the decision was made or read, and the requests
    #: were last sent (monotonic seconds); how many rounds of requests were sent.
    opened_at: float | None = None
    decided_at: float | None = None
    asked_at: float | None = None
    asks: int = 0

    def __post_init__(self) -> None:
        self.cohort = Cohort.of(self.spec, self.number)

    @property
    def minimum(self) -> int:
        """Below this many survivors the cohort reveals nothing."""
        sa = self.spec.secure_aggregation
        assert sa is not None
        n = len(self.cohort.members)
        least = sa.resolved_min_cohort(n)
        if self.spec.mode == "sync":
            least = max(least, self.spec.sync.min_updates)
        return least

    @property
    def full(self) -> bool:
        return len(self.updates) >= self.capacity

    def refusal(self, update: AcceptedUpdate, block: MaskedBlock | None) -> tuple[str, str] | None:
        """Why a masked update cannot join this cohort, as (reason, detail); None if it can.

        Reasons are :class:`common.refusals.Refusal` values: ``not_masked``,
        ``cohort_closed``, ``invalid_update``.
        """
        if block is None:
            return "not_masked", "the task uses secure aggregation: updates must be masked"
        d = self.decision
        if block.cohort < self.number or (
            d is not None
            and block.cohort == self.number
            and (
                update.participant not in d.survivors
                or d.updates.get(update.participant, update.update_id) != update.update_id
            )
        ):
            return "cohort_closed", (
                f"masked for cohort {block.cohort}; the open cohort is {self.number}"
                + (" (closed, unmasking)" if self.decision is not None else "")
            )
        if block.cohort > self.number:
            return (
                "invalid_update",
                f"masked for cohort {block.cohort}, ahead of the head {self.number}",
            )
        if update.base_version > block.cohort:
            return (
                "invalid_update",
                f"base version {update.base_version} after its cohort {block.cohort}",
            )
        held = self.updates.get(update.participant)
        if held is not None and held.update_id != update.update_id:
            return (
                "invalid_update",
                f"{update.participant!r} already has an update in cohort {self.number}",
            )
        expected = weight_of(self.spec, update.num_samples, block.cohort - update.base_version)
        if block.weight != expected:
            return "invalid_update", f"weight {block.weight!r}, the task gives {expected!r}"
        if sorted(block.shares) != list(self.cohort.members):
            return "invalid_update", "the shares must name every member of the cohort"
        return None

    def add(self, update: AcceptedUpdate, block: MaskedBlock, now: float) -> None:
        if self.opened_at is None:
            self.opened_at = now
        self.updates[update.participant] = update
        self.blocks[update.participant] = block

    def close(self) -> Decision:
        """Decide: whoever has an update held survived; every other member dropped."""
        survivors = tuple(sorted(self.updates))
        dropped = tuple(m for m in self.cohort.members if m not in self.updates)
        ids = {n: self.updates[n].update_id for n in survivors}
        return Decision(self.number, survivors, dropped, ids)

    def requests(self, created_at: float) -> list[UnmaskRequest]:
        """One unmask request per survivor that has not answered yet."""
        d = self.decision
        if d is None:
            return []
        return [
            UnmaskRequest(
                task=self.spec.task_id,
                recipient=name,
                cohort=self.number,
                survivors=d.survivors,
                dropped=d.dropped,
                ciphertexts={s: self.blocks[s].shares[name] for s in d.survivors},
                created_at=created_at,
            )
            for name in d.survivors
            if name not in self.answers
        ]

    @property
    def complete(self) -> bool:
        """Every survivor's update is held (again, after a restart)."""
        d = self.decision
        return d is not None and all(s in self.updates for s in d.survivors)

    def answer_refusal(
        self, answer: UnmaskAnswer, spec_hash: bytes, key: PublicKey | None
    ) -> str | None:
        """Why an answer cannot be used (a detail), or None."""
        d = self.decision
        if d is None or answer.cohort != self.number:
            return (
                f"an answer for cohort {answer.cohort}, while cohort {self.number} is not unmasking"
            )
        if answer.participant not in d.survivors:
            return f"{answer.participant!r} is not a survivor of cohort {self.number}"
        if answer.spec_hash != spec_hash:
            return "made under another spec"
        if key is not None and (
            answer.signature is None or not key.verify(answer.signature, answer.signing_message())
        ):
            return "its signature does not verify"
        if answer.x != self.cohort.x(answer.participant):
            return f"x-coordinate {answer.x}, expected {self.cohort.x(answer.participant)}"
        if sorted(answer.b) != list(d.survivors) or sorted(answer.s) != list(d.survivors):
            return "its shares do not name exactly the survivors"
        if any(sorted(m) != list(d.dropped) for m in answer.s.values()):
            return "its pair shares do not name exactly the dropped members"
        try:
            shares_of(answer)
        except SecAggError as e:
            return str(e)
        return None

    @property
    def ready(self) -> bool:
        return self.complete and len(self.answers) >= self.cohort.threshold

    def chosen(self) -> list[UnmaskAnswer]:
        """The answers combined: all of them, by participant name (the first t decide,
        the others are checked against them)."""
        return [self.answers[name] for name in sorted(self.answers)]


def shares_of(answer: UnmaskAnswer) -> UnmaskShares:
    """An answer's shares as field elements."""
    return UnmaskShares(
        x=answer.x,
        b={k: element_of(v) for k, v in answer.b.items()},
        s={k: {j: element_of(v) for j, v in m.items()} for k, m in answer.s.items()},
    )


def ring_of(tensors: Mapping[str, torch.Tensor]) -> Ring:
    """Masked tensors (``i64``) as one ring vector, names sorted (:func:`common.secagg.flatten`)."""
    parts = [tensors[n].detach().reshape(-1).numpy().view(np.uint64) for n in sorted(tensors)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def scale_of(spec: TaskSpec, weights: Sequence[float]) -> float:
    """The factor that turns ``sum_i w_i delta_i`` into the step: ``1 / sum_i w_i`` for
    sync rounds (FedAvg), ``server_lr / K'`` for a FedBuff cohort of ``K'`` updates."""
    if spec.mode == "sync":
        total = sum(weights)
        if total <= 0:
            raise SecAggError("the survivors' weights sum to 0")
        return 1.0 / total
    return float(spec.async_.server_lr) / len(weights)


def secure_params(
    spec: TaskSpec,
    head: Tensors,
    cohort: Cohort,
    masked: Mapping[str, Tensors],
    weights: Mapping[str, float],
    answers: Sequence[UnmaskAnswer],
    dropped: Sequence[str],
    privacy: VersionPrivacy | None = None,
) -> tuple[Tensors, float, str]:
    """The next version from the masked updates and the answers: ``head + scale * S /
    2^fraction_bits`` in float64, plus bank-level DP's noise drawn from ``privacy``'s
    seed and standard deviation (noise at the aggregator), cast back once; also the
    scale and the sum's hash.

    Refuses (SecAggError) a sum outside what clipped inputs can give: some bank sent
    values outside ``[-clip, clip]`` or a wrong share.
    """
    sa = spec.secure_aggregation
    if sa is None:
        raise SecAggError(f"task {spec.task_id!r} does not use secure aggregation")
    survivors = sorted(masked)
    total = unmasked_sum(
        cohort, {n: ring_of(masked[n]) for n in survivors}, [shares_of(a) for a in answers], dropped
    )
    w = [weights[n] for n in survivors]
    signed = total.view(np.int64)
    limit = sum(w) * sa.clip * 2.0**sa.fraction_bits + len(survivors)
    largest = float(np.abs(signed).max()) if total.size else 0.0
    if largest > limit or np.any(signed == np.iinfo(np.int64).min):
        raise SecAggError(
            f"the unmasked sum reaches {largest:.4g}, beyond the {limit:.4g} clipped inputs "
            "can give: a bank masked values outside the clip or sent a wrong share"
        )
    bound = norm_bound(spec)
    if bound is not None:  # and its L2 norm within what bounded inputs can give
        length = float(np.linalg.norm(signed.astype(np.float64)))
        most = (sum(w) * bound * 2.0**sa.fraction_bits + len(survivors) * math.sqrt(total.size)) * (
            1 + 1e-9
        )
        if length > most:
            raise SecAggError(
                f"the unmasked sum has L2 norm {length:.4g}, beyond the {most:.4g} inputs "
                "within the norm bound can give: a bank masked an update over the bound"
            )
    scale = scale_of(spec, w)
    values = unflatten(dequantize(total, sa.fraction_bits), head)
    noise: Tensors = {}
    if privacy is not None:
        shapes = {k: t.shape for k, t in head.items()}
        noise, _ = draw(shapes, privacy.noise_std, privacy.seed)
    params = {}
    for name in head:
        out = head[name].to(torch.float64) + scale * values[name]
        if name in noise:
            out.add_(noise[name])
        params[name] = out.to(head[name].dtype)
    digest = hashlib.sha256(total.astype("<u8").tobytes()).hexdigest()
    return params, scale, digest


def secure_step(
    spec: TaskSpec,
    head: Tensors,
    open_cohort: OpenCohort,
    privacy: BankAggregation | None = None,
) -> tuple[Step, SecureRecord, VersionPrivacy | None]:
    """The step of a ready cohort, its lineage (the survivors in name order, each with
    ``scale * w_i``) and its record; with bank-level DP, noisy, and the noise's record."""
    d = open_cohort.decision
    if d is None or not open_cohort.ready:
        raise SecAggError(f"cohort {open_cohort.number} is not ready to unmask")
    sa = spec.secure_aggregation
    assert sa is not None
    answers = open_cohort.chosen()
    masked = {n: open_cohort.updates[n].delta for n in d.survivors}
    weights = {n: open_cohort.blocks[n].weight for n in d.survivors}
    scale = scale_of(spec, [weights[n] for n in d.survivors])
    lineage = tuple(entry(open_cohort.updates[n], scale * weights[n]) for n in d.survivors)
    noise = privacy.secure(lineage) if privacy is not None else None
    params, scale, digest = secure_params(
        spec, head, open_cohort.cohort, masked, weights, answers, d.dropped, noise
    )
    record = SecureRecord(
        decision=d,
        answers=tuple((a.participant, a.answer_id) for a in answers),
        threshold=open_cohort.cohort.threshold,
        fraction_bits=sa.fraction_bits,
        weights=weights,
        scale=scale,
        sum_hash=digest,
    )
    return Step(params=params, lineage=lineage), record, noise


def quantization_error(spec: TaskSpec, survivors: int, weights: Sequence[float]) -> float:
    """The largest difference rounding makes in one parameter of a version against the
    same step computed from the unmasked deltas (the clip aside):
    ``scale * survivors / 2^(fraction_bits + 1)``."""
    sa = spec.secure_aggregation
    assert sa is not None
    return scale_of(spec, weights) * quantization_bound(survivors, sa.fraction_bits)
