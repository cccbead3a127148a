"""docs/wire-format.md section 16 against the code: secure aggregation's test vectors.

The values are read out of the page's ``secagg-vector`` block and recomputed twice:
with fedq's own code (common/agreement.py, common/secagg.py, common/wire.py,
participant/secagg.py) and, where the page gives a rule, from that rule alone with
the ``cryptography`` package, so that neither the page nor the code can drift.
"""

from __future__ import annotations

import hashlib
import re
import struct
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.agreement import AgreementKey, AgreementPublicKey
from common.secagg import (
    PRIME,
    Cohort,
    combine,
    element_bytes,
    expand,
    mask,
    pair_seed,
    quantize,
    reveal,
)
from common.signing import (
    DOMAIN_UNMASK_ANSWER,
    DOMAIN_UNMASK_REQUEST,
    DOMAIN_UPDATE,
    SigningKey,
    update_message,
)
from common.spec import (
    IdentitySpec,
    NumericFeature,
    SecureAggregationSpec,
    SyncSettings,
    TargetSpec,
    TaskSpec,
)
from common.wire import MaskedBlock, UnmaskAnswer, UnmaskRequest, UpdateEnvelope
from common.wire import update_signing_message as wire_update_message
from participant.secagg import Revealer

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"
TEXT = DOC.read_text()

#: The parties of the vectors: bank-a has the key of section 15's vectors.
SEED_A, SEED_B, SEED_C = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))
TASK, COHORT = "credit", 7
#: Section 13's content hash and section 15's spec hash.
CONTENT = bytes.fromhex("a6b6b38708f6291193d0661a60e7dc46285995a5fb53c7283678ebb11182af20")
SPEC_HASH = b"\x33" * 32


def _vectors() -> dict[str, str]:
    """``label: value`` lines of the block; a label ending in ``:`` has its value on
    the next line; a parenthesised note after a label is dropped."""
    found = re.findall(r"^```secagg-vector\n(.*?)^```$", TEXT, re.M | re.S)
    assert len(found) == 1, "docs/wire-format.md needs exactly one secagg-vector block"
    lines = found[0].strip().splitlines()
    out: dict[str, str] = {}
    i = 0
    while i < len(lines):
        label, _, value = lines[i].partition(": ")
        if not value:
            label, value = lines[i].rstrip(":"), lines[i + 1]
            i += 1
        i += 1
        key = label.split(" (")[0].strip()
        assert key not in out, f"{key!r} appears twice"
        out[key] = value.strip()
    return out


V = _vectors()


def _hex(label: str) -> bytes:
    return bytes.fromhex(V[label])


def _element(label: str) -> int:
    return int.from_bytes(_hex(label), "little")


def _ring(label: str) -> list[int]:
    return [int(word, 16) for word in V[label].split()]


def _text(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("<H", len(raw)) + raw


def _hkdf(material: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(material)


def _agreement(seed: bytes) -> AgreementKey:
    return AgreementKey.from_signing_key(SigningKey.from_seed(seed))


def _public(label: str) -> AgreementPublicKey:
    return AgreementPublicKey.parse(V[label])


COHORT_AB = Cohort(TASK, COHORT, ("bank-a", "bank-b"), 2)


def _context(purpose: bytes) -> bytes:
    """Section 16.3's context for bank-a and bank-b, from the page's rule."""
    return purpose + _text(TASK) + _text("bank-a") + _text("bank-b") + struct.pack("<Q", COHORT)


# ------------------------------------------------------------------ keys and seeds


def test_the_agreement_keys_derive_from_the_signing_keys() -> None:
    private = _hkdf(SEED_A, b"fedq", b"fedq x25519 agreement key v1")
    assert private.hex() == V["bank-a agreement private key"]
    public = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    assert "x25519:" + public.hex() == V["bank-a agreement key"]
    assert _agreement(SEED_A).public.text == V["bank-a agreement key"]
    assert _agreement(SEED_B).public.text == V["bank-b agreement key"]


def test_the_pair_seed_is_the_hkdf_of_the_exchange_reduced_mod_p() -> None:
    a, b = _agreement(SEED_A), _agreement(SEED_B)
    exchanged = X25519PrivateKey.from_private_bytes(_hex("bank-a agreement private key")).exchange(
        X25519PublicKey.from_public_bytes(_public("bank-b agreement key").raw)
    )
    assert exchanged.hex() == V["X25519 shared secret"]
    context = _context(b"fedq mask seed v1")
    assert context.hex() == V["mask seed context"]
    # the same context from both ends, whichever name comes first
    assert COHORT_AB.context(b"fedq mask seed v1", "bank-b", "bank-a") == context
    assert COHORT_AB.context(b"fedq mask seed v1", "bank-a", "bank-b") == context
    derived = _hkdf(exchanged, None, b"fedq pairwise v1" + context)
    assert derived.hex() == V["mask seed HKDF output"]
    assert a.shared(b.public, context) == derived == b.shared(a.public, context)
    seed = _element("pair seed")
    assert int.from_bytes(derived, "little") >= PRIME  # the vector shows the reduction
    assert seed == int.from_bytes(derived, "little") % PRIME
    assert pair_seed(COHORT_AB, "bank-a", a, "bank-b", b.public) == seed
    assert pair_seed(COHORT_AB, "bank-b", b, "bank-a", a.public) == seed
    assert element_bytes(seed).hex() == V["pair seed"]


def test_the_mask_is_the_chacha20_keystream_of_the_seed() -> None:
    seed = _element("pair seed")
    key = hashlib.sha256(b"fedq mask v1" + _hex("pair seed")).digest()
    assert key.hex() == V["ChaCha20 key"]
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(32))
    words = list(struct.unpack("<4Q", stream))
    assert words == _ring("expand first 4")
    assert [int(v) for v in expand(seed, 4)] == words
    # a longer mask starts with the same words: one stream for the whole vector
    assert [int(v) for v in expand(seed, 9)[:4]] == words


# ------------------------------------------------------------------ fixed point


def test_quantize_flattens_by_name_clips_and_rounds_half_to_even() -> None:
    defaults = SecureAggregationSpec()
    assert (defaults.fraction_bits, defaults.clip) == (24, 8.0)
    delta = {
        "w": torch.tensor([[0.5, -0.25], [2.0**-25, 3 * 2.0**-25]], dtype=torch.float64),
        "b": torch.tensor([-10.0], dtype=torch.float64),
    }
    got = quantize(delta, 1.0, defaults)
    assert got.dtype == np.uint64
    assert [int(v) for v in got] == _ring("quantize 1")
    # the same from the rule: sorted names, clip, round(v * w * 2^f), two's complement
    flat = [-8.0, 0.5, -0.25, 2.0**-25, 3 * 2.0**-25]
    assert [round(v * 2.0**24) % 2**64 for v in flat] == _ring("quantize 1")
    bounded = SecureAggregationSpec(norm_bound=1.0)
    got = quantize({"w": torch.tensor([3.0, 4.0], dtype=torch.float64)}, 2.0, bounded)
    assert [int(v) for v in got] == _ring("quantize 2")


# ------------------------------------------------------------------ Shamir and shares


def test_any_three_of_the_shamir_points_give_the_secret() -> None:
    points = [(x, _element(f"shamir x={x}")) for x in (1, 2, 3, 4)]
    assert all(y < PRIME for _, y in points)
    secret = _element("pair seed")
    for three in combinations(points, 3):
        assert combine(list(three)) == secret
    assert combine(points[:3], 4) == points[3][1]  # the fourth lies on the same polynomial
    assert combine(points[:2]) != secret  # two points of a degree-2 polynomial are not enough


def test_shares_are_encrypted_under_the_documented_key_and_associated_data() -> None:
    a, b, c = _agreement(SEED_A), _agreement(SEED_B), _agreement(SEED_C)
    key = _hex("shares key bank-a to bank-b")
    context = _context(b"fedq shares v1")
    assert a.shared(b.public, context) == key == b.shared(a.public, context)
    aad = b"fedq shares v1" + _text(TASK) + _text("bank-a") + _text("bank-b")
    aad += struct.pack("<Q", COHORT)
    assert aad.hex() == V["shares AAD bank-a to bank-b"]
    # A blob bank-a addresses to bank-b, made from the page alone, in a cohort of three:
    # its plaintext is b_a, s_ab, s_ac. bank-b decrypts it with fedq's own code.
    trio = Cohort(TASK, COHORT, ("bank-a", "bank-b", "bank-c"), 2)
    keys = {"bank-a": a.public, "bank-b": b.public, "bank-c": c.public}
    plain = b"".join(element_bytes(v) for v in (5, 6, 7))
    nonce = bytes(range(12))
    blob = nonce + AESGCM(key).encrypt(nonce, plain, aad)
    assert len(blob) == 32 * 3 + 28
    own = mask(trio, "bank-b", b, keys, np.zeros(4, dtype=np.uint64)).shares["bank-b"]
    shares = reveal(trio, "bank-b", b, keys, {"bank-a": blob, "bank-b": own}, ["bank-c"])
    assert shares.x == 2
    assert shares.b["bank-a"] == 5
    assert shares.s["bank-a"] == {"bank-c": 7}
    # the associated data names the sender first: the same blob read as bank-b's fails
    swapped = b"fedq shares v1" + _text(TASK) + _text("bank-b") + _text("bank-a")
    swapped += struct.pack("<Q", COHORT)
    with pytest.raises(InvalidTag):
        AESGCM(key).decrypt(nonce, blob[12:], swapped)


# ------------------------------------------------------------------ messages


def test_the_sa_digest_and_the_masked_update_message() -> None:
    block = MaskedBlock(COHORT, 2.0, {"bank-b": b"\x02" * 3, "bank-a": b"\x01" * 4})
    rule = hashlib.sha256(b"fedq-sa-v1\x00" + struct.pack("<Qd", COHORT, 2.0))
    rule.update(struct.pack("<H", 2))
    for name, blob in (("bank-a", b"\x01" * 4), ("bank-b", b"\x02" * 3)):
        rule.update(_text(name) + struct.pack("<I", len(blob)) + blob)
    assert block.digest().hex() == rule.hexdigest() == V["sa digest"]
    message = update_message(
        task=TASK,
        participant="bank-a",
        update_id="u-0001",
        base_version=3,
        num_samples=100,
        content_hash=CONTENT,
        spec_hash=SPEC_HASH,
        metrics={},
        secagg_digest=block.digest(),
    )
    assert message.hex() == V["masked update message"]
    assert message.startswith(DOMAIN_UPDATE) and message.endswith(block.digest())
    env = UpdateEnvelope(
        task=TASK,
        participant="bank-a",
        update_id="u-0001",
        base_version=3,
        num_samples=100,
        tensors={},
        content_hash=CONTENT,
        spec_hash=SPEC_HASH,
        secagg=block,
    )
    assert wire_update_message(env) == message
    key = SigningKey.from_seed(SEED_A)
    assert key.sign(message).hex() == V["masked update signature"]


def test_the_unmask_request_message() -> None:
    request = UnmaskRequest(
        TASK,
        "bank-a",
        COHORT,
        ("bank-a", "bank-b"),
        ("bank-c",),
        {"bank-b": b"\xbb" * 4, "bank-a": b"\xaa" * 4},
        0.0,
    )
    body = hashlib.sha256()
    for name, blob in (("bank-a", b"\xaa" * 4), ("bank-b", b"\xbb" * 4)):
        body.update(_text(name) + struct.pack("<I", len(blob)) + blob)
    assert body.hexdigest() == V["unmask request body digest"]
    rule = b"".join(
        (
            b"fedq-unmask-request-sig-v1\x00",
            _text(TASK),
            _text("bank-a"),
            struct.pack("<Q", COHORT),
            struct.pack("<H", 2),
            _text("bank-a"),
            _text("bank-b"),
            struct.pack("<H", 1),
            _text("bank-c"),
            body.digest(),
        )
    )
    message = request.signing_message()
    assert message == rule
    assert message.hex() == V["unmask request message"]
    assert SigningKey.from_seed(SEED_A).sign(message).hex() == V["unmask request signature"]


def _secure_spec() -> TaskSpec:
    banks = {"bank-a": SEED_A, "bank-b": SEED_B, "bank-c": SEED_C}
    return TaskSpec(
        task_id=TASK,
        features=(NumericFeature(name="x0"),),
        target=TargetSpec(name="y"),
        participants=tuple(banks),
        mode="sync",
        sync=SyncSettings(min_updates=2),
        identity=IdentitySpec(
            require_signatures=True,
            aggregator_key=SigningKey.from_seed(bytes(range(3, 35))).public.text,
            participant_keys={n: SigningKey.from_seed(s).public.text for n, s in banks.items()},
            agreement_keys={n: _agreement(s).public.text for n, s in banks.items()},
        ),
        secure_aggregation=SecureAggregationSpec(),
    )


def test_the_answer_id_and_the_unmask_answer_message() -> None:
    rule = "ua-" + hashlib.sha256(f"{TASK}\x00{COHORT}\x00bank-a".encode()).hexdigest()[:40]
    assert rule == V["answer id"]
    revealer = Revealer(_secure_spec(), "bank-a", SigningKey.from_seed(SEED_A), None)
    assert revealer.answer_id(COHORT) == V["answer id"]
    answer = UnmaskAnswer(
        TASK,
        "bank-a",
        V["answer id"],
        COHORT,
        SPEC_HASH,
        1,
        {"bank-b": b"\x02" * 32, "bank-a": b"\x01" * 32},
        {"bank-b": {"bank-c": b"\x04" * 32}, "bank-a": {"bank-c": b"\x03" * 32}},
        0.0,
    )
    body = hashlib.sha256(struct.pack("<Q", 1))
    body.update(_text("bank-a") + b"\x01" * 32 + _text("bank-b") + b"\x02" * 32)
    for name, share in (("bank-a", b"\x03" * 32), ("bank-b", b"\x04" * 32)):
        body.update(_text(name) + struct.pack("<H", 1) + _text("bank-c") + share)
    assert body.hexdigest() == V["unmask answer body digest"]
    rule_message = b"".join(
        (
            b"fedq-unmask-answer-sig-v1\x00",
            _text(TASK),
            _text("bank-a"),
            _text(V["answer id"]),
            struct.pack("<Q", COHORT),
            SPEC_HASH,
            body.digest(),
        )
    )
    message = answer.signing_message()
    assert message == rule_message
    assert message.hex() == V["unmask answer message"]
    assert SigningKey.from_seed(SEED_A).sign(message).hex() == V["unmask answer signature"]


def test_the_documented_lengths_of_the_domains_are_the_code_s() -> None:
    section = TEXT[TEXT.index("## 16. Secure aggregation") :]
    rows = {
        name.replace("\\0", "\x00").encode(): int(size)
        for size, name in re.findall(r"^\| (\d+) \| domain `([^`]+)` \|$", section, re.M)
    }
    assert rows == {
        b"fedq-sa-v1\x00": 11,
        DOMAIN_UNMASK_REQUEST: len(DOMAIN_UNMASK_REQUEST),
        DOMAIN_UNMASK_ANSWER: len(DOMAIN_UNMASK_ANSWER),
    }
    assert all(len(domain) == size for domain, size in rows.items())
