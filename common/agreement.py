"""X25519 agreement keys: the pairwise secrets of secure aggregation.

Secure aggregation (Bonawitz et al. 2017) masks each bank's update with pairwise masks
that cancel in the sum; every pair of banks agrees on the seed of its mask by an X25519
exchange (RFC 7748). A bank's agreement key is not a second key file: it is derived
from its Ed25519 signing key (:meth:`AgreementKey.from_signing_key`), so the key the
task spec names for it (``identity.agreement_keys.<participant>``, ``x25519:`` + 64
hex digits) is bound to the same secret as its signing identity.

Crypto from the ``cryptography`` package; nothing here is hand-rolled.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import ConfigError, SpecError
from common.signing import SigningKey

AGREEMENT_PREFIX: Final = "x25519:"
AGREEMENT_KEY_BYTES: Final = 32
#: What follows the prefix: 64 hex digits, either case (the spec keeps lowercase).
_HEX: Final = re.compile(r"[0-9a-fA-F]{64}")
#: 2^255 - 19: an encoded u at or above it is not canonical.
_P: Final = 2**255 - 19

#: HKDF parameters of :meth:`AgreementKey.from_signing_key` (changing them changes every
#: bank's agreement key: tests/test_agreement.py pins a test vector).
_DERIVE_SALT: Final = b"fedq"
_DERIVE_INFO: Final = b"fedq x25519 agreement key v1"
#: HKDF info prefix of :meth:`AgreementKey.shared`; the caller's context follows it.
_SHARED_INFO: Final = b"fedq pairwise v1"


def _hkdf(key_material: bytes, *, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key_material)


@dataclass(frozen=True, slots=True)
class AgreementPublicKey:
    """An X25519 public key (32 raw bytes, canonical, not of low order)."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != AGREEMENT_KEY_BYTES:
            size = len(self.raw) if isinstance(self.raw, bytes) else type(self.raw).__name__
            raise SpecError(f"an X25519 public key has {AGREEMENT_KEY_BYTES} bytes, got {size}")
        if self.raw == bytes(AGREEMENT_KEY_BYTES):
            raise SpecError("the all-zero X25519 public key is not a key: anyone knows its secrets")
        # RFC 7748 ignores the top bit and reduces u mod p: two spellings of one key
        # would get past the spec's "each party its own key" check, so only one is valid.
        if self.raw[31] & 0x80 or int.from_bytes(self.raw, "little") >= _P:
            raise SpecError("not a canonical X25519 public key (u >= 2^255 - 19 or top bit set)")
        # A point of low order makes every shared secret all-zero, whatever the other
        # private key: the exchange with a fresh key detects each of them.
        try:
            X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(self.raw))
        except ValueError:
            raise SpecError(
                "a weak X25519 public key (a point of low order): its shared secrets are all-zero"
            ) from None

    @classmethod
    def parse(cls, text: str) -> AgreementPublicKey:
        """``x25519:<64 hex digits>`` as written in a task spec; SpecError otherwise."""
        if not isinstance(text, str) or not text.startswith(AGREEMENT_PREFIX):
            raise SpecError(f"agreement key {text!r} does not start with {AGREEMENT_PREFIX!r}")
        digits = text[len(AGREEMENT_PREFIX) :]
        if not _HEX.fullmatch(digits):
            raise SpecError(f"agreement key {text!r}: expected 64 hex digits")
        return cls(bytes.fromhex(digits))

    @property
    def text(self) -> str:
        """The spec's form of the key (lowercase hex)."""
        return AGREEMENT_PREFIX + self.raw.hex()

    @property
    def fingerprint(self) -> str:
        """A short name for the key: the first 16 bytes of SHA-256 of its raw bytes, hex."""
        return hashlib.sha256(self.raw).digest()[:16].hex()


class AgreementKey:
    """An X25519 private key: a bank's half of every pairwise secret."""

    __slots__ = ("_key", "public")

    def __init__(self, key: X25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public = AgreementPublicKey(raw)

    @classmethod
    def generate(cls) -> AgreementKey:
        """A fresh random key (tests; a bank derives its key from its signing key)."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_signing_key(cls, key: SigningKey) -> AgreementKey:
        """The agreement key bound to a signing key: HKDF-SHA256 of its 32-byte Ed25519
        seed (salt ``b"fedq"``, info ``b"fedq x25519 agreement key v1"``) as the X25519
        private key. Deterministic, so a bank keeps one key file."""
        seed = _hkdf(key.raw_seed(), salt=_DERIVE_SALT, info=_DERIVE_INFO)
        return cls(X25519PrivateKey.from_private_bytes(seed))

    def shared(self, other: AgreementPublicKey, context: bytes) -> bytes:
        """The 32-byte secret this key shares with ``other``'s owner under ``context``.

        The X25519 exchange, then HKDF-SHA256 (no salt, info ``b"fedq pairwise v1" +
        context``). Both ends must pass the same ``context`` (e.g. task, round and the
        pair's names in a fixed order), or their secrets differ. ConfigError where the
        exchange fails (a peer key of low order).
        """
        try:
            secret = self._key.exchange(X25519PublicKey.from_public_bytes(other.raw))
        except ValueError:
            raise ConfigError(
                f"no shared secret with agreement key {other.fingerprint}: a point of low order"
            ) from None
        return _hkdf(secret, salt=None, info=_SHARED_INFO + bytes(context))
