"""The aggregator's identity: its signing key must be the one the task spec names."""

from __future__ import annotations

from common.errors import ConfigError
from common.signing import PublicKey, SigningKey
from common.spec import TaskSpec


def check_signing_key(spec: TaskSpec, key: SigningKey | None) -> None:
    """Refuse to run with no key where the spec names one, or with another key.

    Participants refuse models the task's aggregator key did not sign: an aggregator
    started with the wrong key, or none, would announce models nobody trains on.
    """
    named = spec.identity.aggregator_key
    if named is None:
        if key is not None:
            raise ConfigError(
                f"task {spec.task_id!r} names no aggregator key, but a signing key was given "
                f"(fingerprint {key.public.fingerprint}): add it to identity.aggregator_key"
            )
        return
    expected = PublicKey.parse(named)
    if key is None:
        raise ConfigError(
            f"task {spec.task_id!r} names the aggregator key {expected.fingerprint}: "
            "give its private key (--signing-key)"
        )
    if key.public != expected:
        raise ConfigError(
            f"the signing key given (fingerprint {key.public.fingerprint}) is not the "
            f"aggregator key of task {spec.task_id!r} ({expected.fingerprint})"
        )
