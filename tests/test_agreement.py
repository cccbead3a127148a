"""X25519 agreement keys (common/agreement.py): derivation, exchange, parsing."""

from __future__ import annotations

import pytest

from common.agreement import AGREEMENT_PREFIX, AgreementKey, AgreementPublicKey
from common.errors import ConfigError, SpecError
from common.signing import SigningKey

#: The agreement key of ``SigningKey.from_seed(bytes(range(32)))``: pins the derivation
#: (HKDF-SHA256, salt b"fedq", info b"fedq x25519 agreement key v1"), so that no change
#: moves every bank's agreement key silently.
VECTOR_KEY = "x25519:cbafcd216d84913046c805a87fbd4654ab16acd2a0db6d2ddec6bff329f68665"

#: Points of low order on Curve25519 (canonical encodings).
LOW_ORDER = (
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
)


def test_both_ends_derive_the_same_secret() -> None:
    a, b = AgreementKey.generate(), AgreementKey.generate()
    ab = a.shared(b.public, b"task:t1|round:3|bank-a|bank-b")
    ba = b.shared(a.public, b"task:t1|round:3|bank-a|bank-b")
    assert ab == ba and len(ab) == 32
    assert ab != a.shared(AgreementKey.generate().public, b"task:t1|round:3|bank-a|bank-b")


def test_different_contexts_give_different_secrets() -> None:
    a, b = AgreementKey.generate(), AgreementKey.generate()
    assert a.shared(b.public, b"round:1") != a.shared(b.public, b"round:2")
    assert a.shared(b.public, b"") != a.shared(b.public, b"round:1")


def test_derivation_from_a_signing_key_is_deterministic_and_per_key() -> None:
    seed = bytes(range(32))
    first = AgreementKey.from_signing_key(SigningKey.from_seed(seed))
    again = AgreementKey.from_signing_key(SigningKey.from_seed(seed))
    other = AgreementKey.from_signing_key(SigningKey.from_seed(bytes(32)))
    assert first.public == again.public
    assert first.public != other.public
    assert first.public.text == VECTOR_KEY
    # The pair agrees whichever end derived its key from a signing key.
    assert first.shared(other.public, b"c") == other.shared(again.public, b"c")


def test_a_signing_key_exposes_its_seed() -> None:
    seed = bytes(range(32))
    assert SigningKey.from_seed(seed).raw_seed() == seed


def test_parse_round_trips_and_normalises_case() -> None:
    key = AgreementKey.generate().public
    assert AgreementPublicKey.parse(key.text) == key
    assert key.text.startswith(AGREEMENT_PREFIX) and key.text == key.text.lower()
    upper = AGREEMENT_PREFIX + key.raw.hex().upper()
    assert AgreementPublicKey.parse(upper).text == key.text
    assert len(key.fingerprint) == 32 and key.fingerprint == key.fingerprint.lower()
    assert key.fingerprint != AgreementKey.generate().public.fingerprint


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("ed25519:" + "11" * 32, "does not start with 'x25519:'"),
        ("X25519:" + "11" * 32, "does not start with 'x25519:'"),
        ("x25519:" + "11" * 31, "expected 64 hex digits"),
        ("x25519:" + "11" * 33, "expected 64 hex digits"),
        ("x25519:" + "zz" * 32, "expected 64 hex digits"),
        ("x25519:" + "11 " * 21 + "1", "expected 64 hex digits"),
        ("x25519:" + "11" * 32 + "\n", "expected 64 hex digits"),
        ("x25519:" + "00" * 32, "all-zero"),
        ("x25519:" + "ff" * 32, "not a canonical X25519 public key"),
        ("x25519:" + "ed" + "ff" * 30 + "7f", "not a canonical X25519 public key"),
        *(("x25519:" + h, "low order") for h in LOW_ORDER[1:]),
    ],
)
def test_parse_refuses_what_is_not_a_usable_key(text: str, reason: str) -> None:
    with pytest.raises(SpecError, match=reason) as err:
        AgreementPublicKey.parse(text)
    assert "\n" not in str(err.value).replace(repr(text), "")


def test_parse_refuses_what_is_not_text() -> None:
    with pytest.raises(SpecError, match="does not start with"):
        AgreementPublicKey.parse(b"x25519:" + b"11" * 32)  # type: ignore[arg-type]


def test_a_low_order_peer_is_a_config_error() -> None:
    # A key object built past parse's checks (object.__setattr__ on the frozen dataclass).
    weak = AgreementPublicKey.parse(AgreementKey.generate().public.text)
    object.__setattr__(weak, "raw", bytes.fromhex(LOW_ORDER[1]))
    with pytest.raises(ConfigError, match="low order"):
        AgreementKey.generate().shared(weak, b"c")
