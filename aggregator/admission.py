"""Admission: every rule that decides whether an update may reach the strategy.

One place, one order (docs/wire-format.md, sections 10 and 11): decode with hard
limits, the task's shapes and codecs; a copy of an update already held; the task, the
participant, the sender, the signature, the spec hash, the claimed sample count;
the base version (from the future, an older round, a second update in the round, too
stale); already applied;
the base's parameters still kept. Each rule yields a typed :class:`Refused` with a
:class:`~common.refusals.Refusal`; strategies trust what is admitted.

The rules read the service's state through :class:`AdmissionState`, so they can be
tested without a broker or a store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from aggregator.strategies import AcceptedUpdate
from common.codecs import accepted_codecs
from common.errors import DecodeError, EncodeError
from common.refusals import Refusal
from common.segments import Owned
from common.signing import SIGNATURE_BYTES, PublicKey
from common.spec import StalenessUnit, TaskSpec
from common.staleness import exceeds, in_unit, versions_within
from common.wire import (
    DecodeLimits,
    MaskedBlock,
    Tensors,
    TensorSpec,
    UpdateEnvelope,
    decode_update,
    update_signing_message,
)

log = structlog.get_logger("fedq.aggregator")


@dataclass(frozen=True, slots=True)
class Refused:
    """An update refused, with its reason and a detail for humans."""

    reason: Refusal
    detail: str
    participant: str | None = None
    update_id: str | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    """An update that passed every rule, ready to offer to the strategy."""

    update: AcceptedUpdate
    #: The parameters of its base version (the head when the strategy does not use them).
    base: Tensors
    #: Secure aggregation: the masked update's block (cohort, weight, shares); else None.
    secagg: MaskedBlock | None = None


@dataclass(frozen=True, slots=True)
class Redelivered:
    """An update the service already holds, delivered again after its channel was lost."""

    update_id: str


Outcome = Admitted | Refused | Redelivered


class AdmissionState(Protocol):
    """What admission reads from the service."""

    @property
    def head_version(self) -> int: ...
    def held(self, update_id: str) -> bool | None:
        """None if not held; else whether its first delivery can still be settled."""
        ...

    def pending(self) -> Sequence[AcceptedUpdate]:
        """Updates offered to the strategy and not yet in a version."""
        ...

    async def applied_in(self, update_id: str, base_version: int, participant: str) -> int | None:
        """The version the update went into, or None. An update can only have gone into
        a version after its base: the service answers from the ids it keeps in memory
        when they cover every version after ``base_version``, else from the store."""
        ...

    async def base(self, version: int) -> Tensors | None:
        """The parameters of ``version``, or None if they are no longer kept."""
        ...


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """How strictly updates are admitted."""

    limits: DecodeLimits
    #: Refuse an update whose broker-validated sender is not the participant it names.
    require_sender_match: bool = True
    #: Bodies smaller than this are decoded and verified on the event loop: for them a
    #: worker thread costs more than the work (about 0.1 ms for a 10 KB update).
    inline_below: int = 256 * 1024


class Admission:
    """The refusal rules of one task."""

    def __init__(
        self,
        spec: TaskSpec,
        config: AdmissionConfig,
        expected: Mapping[str, TensorSpec],
        *,
        uses_base: bool,
        updates_per_version: int = 1,
    ) -> None:
        self.spec = spec
        self.config = config
        self.expected = dict(expected)
        self.uses_base = uses_base
        self.sync = spec.mode == "sync"
        self.max_staleness = spec.sync.max_staleness if self.sync else spec.async_.max_staleness
        #: The unit ``max_staleness`` is in: a sync version is a round already.
        self.unit: StalenessUnit = "versions" if self.sync else spec.async_.staleness_unit
        self.spec_hash = spec.spec_hash()
        #: The lossless codecs, and the task's lossy one (``compression``): any other
        #: codec is refused ``unknown_codec`` before a payload is decoded.
        self.codecs = accepted_codecs(
            spec.compression.wire_codec if spec.compression is not None else None
        )
        self.keys = {p: PublicKey.parse(text) for p, text in spec.identity.participant_keys.items()}
        self.updates_per_version = max(1, updates_per_version)
        self.participants = max(1, len(spec.participants))
        #: The largest ``t - v`` admitted, in versions (how many old bases may be read).
        self.max_versions_behind = versions_within(
            self.max_staleness, self.unit, self.updates_per_version, self.participants
        )

    async def admit(
        self, body: bytes | Owned, sender: str | None, state: AdmissionState
    ) -> Outcome:
        """Every rule, in order; the first that fails refuses the update."""
        try:
            # The signature is verified with the decode (off the event loop for large
            # bodies); check() applies the verdict in its place in the order.
            if len(body) < self.config.inline_below:
                env, verified = self._decode(body)
            else:
                env, verified = await asyncio.to_thread(self._decode, body)
        except DecodeError as e:
            return Refused(e.reason, e.detail)
        except Exception as e:  # a decoder bug must not take the service down
            log.exception("decoder failed unexpectedly")
            return Refused(Refusal.MALFORMED, f"decoder failed: {type(e).__name__}")
        held = state.held(env.update_id)
        if held is not None:
            if not held:
                return Redelivered(env.update_id)
            # Another copy under an id we hold: it is refused at once, or it would sit
            # unacked for good and, repeated, fill the prefetch and stall every bank.
            return self._refused(
                env,
                Refusal.DUPLICATE,
                f"update id {env.update_id!r} is already buffered for the next version",
            )
        refused = self.check(env, sender, state.head_version, state.pending(), verified)
        if refused is not None:
            return refused
        version = await state.applied_in(env.update_id, env.base_version, env.participant)
        if version is not None:
            return self._refused(env, Refusal.DUPLICATE, f"already applied in version {version}")
        base = await state.base(env.base_version)
        if base is None:
            return self._refused(
                env,
                Refusal.BASE_UNAVAILABLE,
                f"parameters of base version {env.base_version} are no longer kept",
            )
        update = AcceptedUpdate(
            update_id=env.update_id,
            participant=env.participant,
            base_version=env.base_version,
            staleness=state.head_version - env.base_version,
            num_samples=env.num_samples,
            delta=env.tensors,
            content_hash=env.content_hash,
        )
        return Admitted(update, base, env.secagg)

    def check(
        self,
        env: UpdateEnvelope,
        sender: str | None,
        head: int,
        pending: Sequence[AcceptedUpdate],
        verified: bool | None = None,
    ) -> Refused | None:
        """The rules that need no store: identity, sample count, base version.
        ``verified``: whether ``env``'s signature verifies, if already known."""
        spec = self.spec
        if env.task != spec.task_id:
            return self._refused(env, Refusal.UNKNOWN_TASK, f"update names task {env.task!r}")
        if spec.participants and env.participant not in spec.participants:
            return self._refused(
                env,
                Refusal.UNKNOWN_PARTICIPANT,
                f"{env.participant!r} is not a participant of the task",
            )
        if self.config.require_sender_match and sender != env.participant:
            return self._refused(
                env,
                Refusal.SENDER_MISMATCH,
                f"sent by broker user {sender!r}, names participant {env.participant!r}",
            )
        refused = self._check_signature(env, verified)
        if refused is not None:
            return refused
        if env.spec_hash != self.spec_hash:
            named = env.spec_hash.hex()[:16] if env.spec_hash else "no spec hash"
            return self._refused(
                env,
                Refusal.SPEC_MISMATCH,
                f"prepared under spec {named}, the task runs under {self.spec_hash.hex()[:16]}",
            )
        bound = spec.sample_bound(env.participant)
        if env.num_samples > bound:
            return self._refused(
                env,
                Refusal.TOO_MANY_SAMPLES,
                f"claims {env.num_samples} samples; {env.participant!r} may claim at most {bound}",
            )
        if env.base_version > head:
            return self._refused(
                env,
                Refusal.FUTURE_BASE,
                f"base version {env.base_version} is ahead of the head {head}",
            )
        staleness = head - env.base_version
        if self.sync:
            if staleness > 0 and spec.sync.late == "refuse":
                return self._refused(
                    env,
                    Refusal.STALE_ROUND,
                    f"trained on round {env.base_version}, the current round is {head}",
                )
            if any(u.participant == env.participant for u in pending):
                return self._refused(
                    env,
                    Refusal.DUPLICATE_IN_ROUND,
                    f"{env.participant!r} already has an update in round {head}",
                )
        if exceeds(
            staleness,
            self.max_staleness,
            self.unit,
            self.updates_per_version,
            self.participants,
        ):
            return self._refused(env, Refusal.TOO_STALE, self._too_stale(staleness))
        return None

    def _decode(self, body: bytes | Owned) -> tuple[UpdateEnvelope, bool | None]:
        """Decode, and verify the signature when there is one and a key to check it."""
        env = decode_update(body, self.config.limits, self.expected, codecs=self.codecs)
        key = self.keys.get(env.participant)
        verified = None if env.signature is None or key is None else _verifies(env, key)
        return env, verified

    def _check_signature(self, env: UpdateEnvelope, verified: bool | None) -> Refused | None:
        """``unsigned`` / ``bad_signature`` when the task requires signatures; a signature
        is checked whenever the participant has a key, so a forged one never passes."""
        key = self.keys.get(env.participant)
        required = self.spec.identity.require_signatures
        if env.signature is None:
            if required:
                return self._refused(
                    env, Refusal.UNSIGNED, "the task requires signed updates; this one has no sg"
                )
            return None
        if key is None:
            if required:
                return self._refused(
                    env,
                    Refusal.BAD_SIGNATURE,
                    f"the task spec has no public key for {env.participant!r} (revoked?)",
                )
            return None
        if not (_verifies(env, key) if verified is None else verified):
            return self._refused(
                env,
                Refusal.BAD_SIGNATURE,
                f"signature does not verify under {env.participant!r}'s key {key.fingerprint}",
            )
        return None

    def _too_stale(self, staleness: int) -> str:
        if self.unit == "versions":
            return f"staleness {staleness} exceeds the maximum {self.max_staleness}"
        rounds = in_unit(staleness, self.unit, self.updates_per_version, self.participants)
        return (
            f"staleness {staleness} versions ({rounds:g} rounds) exceeds the maximum "
            f"{self.max_staleness} rounds ({self.max_versions_behind} versions)"
        )

    @staticmethod
    def _refused(env: UpdateEnvelope, reason: Refusal, detail: str) -> Refused:
        return Refused(reason, detail, env.participant, env.update_id)


def _verifies(env: UpdateEnvelope, key: PublicKey) -> bool:
    """Whether ``env``'s signature is ``key``'s over its signing message (section 15)."""
    if env.signature is None or len(env.signature) != SIGNATURE_BYTES:
        return False
    try:
        message = update_signing_message(env)
    except EncodeError:  # no spec hash: nothing a valid signature could cover
        return False
    return key.verify(env.signature, message)
