"""A participant's checks of who it is and of the models it is sent.

A model announcement is trusted only when the task's aggregator key signed it, it
was made under the spec this worker runs, and it descends from the last version the
worker saw: the signed ancestor list (docs/wire-format.md section 15) must name that
version's hash. A model that fails is refused with a :class:`~common.refusals.Refusal`
reason and never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError, EncodeError
from common.refusals import Refusal
from common.signing import SIGNATURE_BYTES, PublicKey, SigningKey
from common.spec import TaskSpec
from common.wire import ModelEnvelope, model_signing_message


def check_participant_key(spec: TaskSpec, participant: str, key: SigningKey | None) -> None:
    """Refuse to start where the key cannot be the one the task registered."""
    named = spec.identity.participant_keys.get(participant)
    if key is None:
        if named is not None or spec.identity.require_signatures:
            raise ConfigError(
                f"task {spec.task_id!r} expects {participant!r} to sign its updates: "
                "give its private key (--signing-key)"
            )
        return
    if named is None:
        raise ConfigError(
            f"task {spec.task_id!r} names no public key for {participant!r}; register "
            f"{key.public.text} (fingerprint {key.public.fingerprint}) in identity.participant_keys"
        )
    if PublicKey.parse(named) != key.public:
        raise ConfigError(
            f"the signing key given (fingerprint {key.public.fingerprint}) is not the key "
            f"task {spec.task_id!r} registered for {participant!r} "
            f"({PublicKey.parse(named).fingerprint})"
        )


@dataclass(slots=True)
class ModelChecker:
    """Checks each announced model against the spec and the versions seen before."""

    key: PublicKey | None
    spec_hash: bytes
    #: The newest version accepted so far and its version hash.
    previous: int = -1
    previous_hash: bytes = b""
    #: Whether the last model checked was accepted without a descent check (too far).
    unchecked: bool = False

    def __init__(self, spec: TaskSpec) -> None:
        named = spec.identity.aggregator_key
        self.key = None if named is None else PublicKey.parse(named)
        self.spec_hash = spec.spec_hash()
        self.previous, self.previous_hash, self.unchecked = -1, b"", False

    def check(self, model: ModelEnvelope) -> tuple[Refusal, str] | None:
        """None if the model may be trained on (and remember it), else the reason."""
        self.unchecked = False
        if self.key is not None:
            refused = self._signature(model, self.key)
            if refused is not None:
                return refused
        if model.spec_hash and model.spec_hash != self.spec_hash:
            return (
                Refusal.SPEC_MISMATCH,
                f"model made under spec {model.spec_hash.hex()[:16]}, "
                f"this worker's is {self.spec_hash.hex()[:16]}",
            )
        if self.key is not None:
            refused = self._descent(model)
            if refused is not None:
                return refused
        if model.version >= self.previous:
            self.previous, self.previous_hash = model.version, model.version_hash
        return None

    def _signature(self, model: ModelEnvelope, key: PublicKey) -> tuple[Refusal, str] | None:
        if model.signature is None:
            return (
                Refusal.UNSIGNED,
                f"the task's models are signed by {key.fingerprint}; this one is not",
            )
        try:
            message = model_signing_message(model)
        except EncodeError:  # no spec hash or version hash: nothing valid was signed
            message = b""
        if (
            not message
            or len(model.signature) != SIGNATURE_BYTES
            or not key.verify(model.signature, message)
        ):
            return (
                Refusal.BAD_SIGNATURE,
                f"signature does not verify under the aggregator key {key.fingerprint}",
            )
        return None

    def _descent(self, model: ModelEnvelope) -> tuple[Refusal, str] | None:
        if self.previous < 0 or model.version < self.previous:
            return None  # the first model, or an older one (the worker skips it)
        if model.version == self.previous:
            if model.version_hash != self.previous_hash:
                return (
                    Refusal.NOT_DESCENDANT,
                    f"version {model.version} is not the version {model.version} seen before "
                    f"(hash {model.version_hash.hex()[:16]}, seen {self.previous_hash.hex()[:16]})",
                )
            return None
        gap = model.version - self.previous
        if gap > len(model.ancestors):
            self.unchecked = True
            return None
        if model.ancestors[gap - 1] != self.previous_hash:
            return (
                Refusal.NOT_DESCENDANT,
                f"version {model.version} does not descend from version {self.previous} "
                f"(hash {self.previous_hash.hex()[:16]}) seen before",
            )
        return None
