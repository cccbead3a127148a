"""Ed25519 identities: key files, public keys as text, and the bytes each signature covers.

Every party that signs (a participant its updates, the aggregator its models and
receipts) holds a private key in a PEM file (PKCS#8, ``fedq keys generate``); the task
spec names each party's public key as text, ``ed25519:`` + 64 lowercase hex digits of
the 32-byte raw key. What is signed is never the message as sent, but a short
**signing message** built from its identity fields and content hash
(docs/wire-format.md section 15 has them byte for byte, with test vectors), so a
signature survives re-encoding and a second implementation can check it without our
msgpack library.

Pure functions and small value types; crypto from the ``cryptography`` package.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from common.errors import ConfigError, SpecError

KEY_PREFIX: Final = "ed25519:"
KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64
#: A public key as it appears in a task spec.
KEY_PATTERN: Final = r"^ed25519:[0-9a-f]{64}$"

#: 2^255 - 19: an encoded y at or above it is not canonical.
_P: Final = 2**255 - 19
#: The points of small order (1, 2, 4, 8), as encoded y with the sign bit cleared (as
#: libsodium's ``ge25519_has_small_order`` lists them). Under such a key anyone can make
#: signatures that verify, so a spec may not name one.
_SMALL_ORDER: Final = frozenset(
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
)

DOMAIN_UPDATE: Final = b"fedq-update-sig-v1\x00"
DOMAIN_MODEL: Final = b"fedq-model-sig-v1\x00"
DOMAIN_RECEIPT: Final = b"fedq-receipt-sig-v1\x00"
DOMAIN_UNMASK_REQUEST: Final = b"fedq-unmask-request-sig-v1\x00"
DOMAIN_UNMASK_ANSWER: Final = b"fedq-unmask-answer-sig-v1\x00"
DOMAIN_DRIFT: Final = b"fedq-drift-sig-v1\x00"
DOMAIN_EVALUATION: Final = b"fedq-evaluation-sig-v1\x00"
#: The most ancestor version hashes a model announcement carries (newest first).
MAX_ANCESTORS: Final = 64


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An Ed25519 public key (32 raw bytes)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_BYTES:
            raise SpecError(f"an Ed25519 public key has {KEY_BYTES} bytes, got {len(self.raw)}")
        y = self.raw[:31] + bytes([self.raw[31] & 0x7F])
        if int.from_bytes(y, "little") >= _P:
            raise SpecError("not a canonical Ed25519 public key (y >= 2^255 - 19)")
        if y in _SMALL_ORDER:
            raise SpecError("a weak Ed25519 public key (a point of small order): anyone could sign")

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """``ed25519:<64 hex digits>`` as written in a task spec; SpecError otherwise."""
        if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
            raise SpecError(f"public key {text!r} does not start with {KEY_PREFIX!r}")
        digits = text[len(KEY_PREFIX) :]
        if len(digits) != 2 * KEY_BYTES or digits != digits.lower():
            raise SpecError(f"public key {text!r}: expected 64 lowercase hex digits")
        try:
            return cls(bytes.fromhex(digits))
        except ValueError:
            raise SpecError(f"public key {text!r}: expected 64 lowercase hex digits") from None

    @property
    def text(self) -> str:
        """The spec's form of the key."""
        return KEY_PREFIX + self.raw.hex()

    @property
    def fingerprint(self) -> str:
        """A short name for the key: the first 16 bytes of SHA-256 of its raw bytes, hex."""
        return hashlib.sha256(self.raw).digest()[:16].hex()

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is this key's signature of ``message``."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


class SigningKey:
    """An Ed25519 private key."""

    __slots__ = ("_key", "public")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public = PublicKey(raw)

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """The key of a 32-byte seed (RFC 8032's private key): test vectors, simulations."""
        if len(seed) != KEY_BYTES:
            raise ConfigError(f"an Ed25519 seed has {KEY_BYTES} bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_pem(cls, data: bytes, *, source: str = "key") -> SigningKey:
        """A PKCS#8 PEM private key (as ``to_pem`` writes it); ConfigError otherwise."""
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{source}: not an unencrypted PEM private key ({e})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{source}: a {type(key).__name__}, fedq signs with Ed25519 keys")
        return cls(key)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Read a key file; ConfigError with the reason if it cannot be used."""
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read signing key {path}: {e.strerror or e}") from None
        return cls.from_pem(data, source=str(path))

    def to_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted (protect the file: mode 0600)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self._key.sign(message)

    def raw_seed(self) -> bytes:
        """The 32-byte private seed (RFC 8032): what the agreement key derives from
        (common/agreement.py). Secret: never log or send it."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )


# --------------------------------------------------------------------------- messages


def _text(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("a signed text field is at most 65535 bytes")
    return struct.pack("<H", len(raw)) + raw


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def _digest(value: bytes, what: str) -> bytes:
    if len(value) != 32:
        raise ValueError(f"{what} must be a 32-byte digest, got {len(value)} bytes")
    return value


def metrics_digest(metrics: Mapping[str, float]) -> bytes:
    """SHA-256 over the metrics, sorted by name's UTF-8 bytes: u16 LE count, then for
    each a u16 LE name length, the name, and the value as float64 LE."""
    items = sorted((k.encode(), float(v)) for k, v in metrics.items())
    h = hashlib.sha256(struct.pack("<H", len(items)))
    for name, value in items:
        if not math.isfinite(value):
            raise ValueError(f"metric {name!r} is not finite")
        h.update(struct.pack("<H", len(name)) + name + struct.pack("<d", value))
    return h.digest()


def update_message(
    *,
    task: str,
    participant: str,
    update_id: str,
    base_version: int,
    num_samples: int,
    content_hash: bytes,
    spec_hash: bytes,
    metrics: Mapping[str, float],
    secagg_digest: bytes = b"",
) -> bytes:
    """What a participant signs for an update (docs/wire-format.md section 15); a
    masked update's block digest follows at the end (section 16)."""
    return b"".join(
        (
            DOMAIN_UPDATE,
            _text(task),
            _text(participant),
            _text(update_id),
            _u64(base_version),
            _u64(num_samples),
            _digest(content_hash, "content hash"),
            _digest(spec_hash, "spec hash"),
            metrics_digest(metrics),
            _digest(secagg_digest, "secure aggregation digest") if secagg_digest else b"",
        )
    )


def model_message(
    *,
    task: str,
    version: int,
    version_hash: bytes,
    content_hash: bytes,
    spec_hash: bytes,
    ancestors: Sequence[bytes],
) -> bytes:
    """What the aggregator signs for a model announcement (docs/wire-format.md section 15)."""
    if len(ancestors) > MAX_ANCESTORS:
        raise ValueError(f"at most {MAX_ANCESTORS} ancestors")
    return b"".join(
        (
            DOMAIN_MODEL,
            _text(task),
            _u64(version),
            _digest(version_hash, "version hash"),
            _digest(content_hash, "content hash"),
            _digest(spec_hash, "spec hash"),
            struct.pack("<H", len(ancestors)),
            *(_digest(a, "ancestor hash") for a in ancestors),
        )
    )


def receipt_message(
    *,
    task: str,
    participant: str,
    update_id: str,
    outcome: str,
    version: int,
    weight: float,
    reason: str,
) -> bytes:
    """What the aggregator signs for a receipt (docs/wire-format.md section 15).

    ``outcome`` is ``accepted`` or ``refused``; an accepted update's ``version`` and
    ``weight``; a refused one's ``reason``, with version 0, weight 0.0 and reason ``""``
    where they do not apply.
    """
    if not math.isfinite(weight):
        raise ValueError("a receipt's weight must be finite")
    return b"".join(
        (
            DOMAIN_RECEIPT,
            _text(task),
            _text(participant),
            _text(update_id),
            _text(outcome),
            _u64(version),
            struct.pack("<d", weight),
            _text(reason),
        )
    )


def unmask_request_message(
    *,
    task: str,
    recipient: str,
    cohort: int,
    survivors: Sequence[str],
    dropped: Sequence[str],
    body_digest: bytes,
) -> bytes:
    """What the aggregator signs for an unmask request (docs/wire-format.md section 16)."""
    return b"".join(
        (
            DOMAIN_UNMASK_REQUEST,
            _text(task),
            _text(recipient),
            _u64(cohort),
            struct.pack("<H", len(survivors)),
            *(_text(s) for s in survivors),
            struct.pack("<H", len(dropped)),
            *(_text(d) for d in dropped),
            _digest(body_digest, "request digest"),
        )
    )


def unmask_answer_message(
    *,
    task: str,
    participant: str,
    answer_id: str,
    cohort: int,
    spec_hash: bytes,
    body_digest: bytes,
) -> bytes:
    """What a bank signs for its unmask answer (docs/wire-format.md section 16)."""
    return b"".join(
        (
            DOMAIN_UNMASK_ANSWER,
            _text(task),
            _text(participant),
            _text(answer_id),
            _u64(cohort),
            _digest(spec_hash, "spec hash"),
            _digest(body_digest, "answer digest"),
        )
    )


def drift_message(
    *,
    task: str,
    participant: str,
    summary_id: str,
    version: int,
    spec_hash: bytes,
    rows: int,
    body_digest: bytes,
) -> bytes:
    """What a bank signs for its drift summary (docs/drift.md)."""
    return b"".join(
        (
            DOMAIN_DRIFT,
            _text(task),
            _text(participant),
            _text(summary_id),
            _u64(version),
            _digest(spec_hash, "spec hash"),
            _u64(rows),
            _digest(body_digest, "drift digest"),
        )
    )


def evaluation_message(
    *,
    task: str,
    participant: str,
    evaluation_id: str,
    version: int,
    version_hash: bytes,
    spec_hash: bytes,
    rows: int,
    metrics: Mapping[str, float],
) -> bytes:
    """What a bank signs for its evaluation of a version (docs/drift.md)."""
    return b"".join(
        (
            DOMAIN_EVALUATION,
            _text(task),
            _text(participant),
            _text(evaluation_id),
            _u64(version),
            _digest(version_hash, "version hash"),
            _digest(spec_hash, "spec hash"),
            _u64(rows),
            metrics_digest(metrics),
        )
    )
