"""Secure aggregation: pairwise masks that cancel in a cohort's sum. Pure, no I/O.

After Bonawitz et al. (2017): each bank of a cohort turns its clipped, weighted delta
into integers modulo 2^64 (fixed point, ``fraction_bits``), adds a self mask expanded
from a fresh seed ``b_i`` and, for every other member ``j``, plus or minus a pairwise
mask expanded from a seed ``s_ij`` that only ``i`` and ``j`` can compute (X25519 between
their agreement keys in the task spec, :mod:`common.agreement`). In the sum of the
masked updates of every member the pairwise masks cancel; each masked update on its
own is uniformly random to whoever does not know the seeds.

Each bank also splits ``b_i`` and every ``s_ij`` into Shamir shares (threshold ``t``,
over the prime field of 2^255 - 19) and sends member ``k`` its shares, encrypted
(AES-GCM under a key only ``i`` and ``k`` share), inside its masked update. When the
cohort closes with survivors ``U`` and dropped members ``D`` (no update), each
survivor that answers reveals its shares of ``b_i`` for ``i`` in ``U`` and of ``s_ij``
for ``i`` in ``U``, ``j`` in ``D``, never both kinds for one bank: from any ``t``
answers the aggregator removes the self masks of ``U`` and the masks shared with
``D``, and learns the sum of ``U`` and nothing else. Everything here is deterministic
given the seeds, so an auditor recomputes the sum bit for bit from the retained
messages (the fresh randomness, seeds and polynomial coefficients, comes from the
operating system and is never needed again).

Exact byte layouts: docs/wire-format.md section 16.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.agreement import AgreementKey, AgreementPublicKey
from common.errors import SecAggError
from common.spec import SecureAggregationSpec, TaskSpec
from common.staleness import in_unit, staleness_weight

#: The Shamir field: integers modulo this prime (2^255 - 19); a field element is
#: 32 bytes little-endian.
PRIME = 2**255 - 19
FIELD_BYTES = 32
#: AES-GCM nonce bytes, prefixed to each ciphertext.
NONCE_BYTES = 12

Ring = npt.NDArray[np.uint64]


@dataclass(frozen=True, slots=True)
class Cohort:
    """The banks whose masked updates may sum together.

    ``number`` is the version the cohort's updates are masked for: its sum makes
    version ``number + 1``. ``members`` are every participant of the task spec, in
    sorted order; member ``k``'s Shamir x-coordinate is its position plus one.
    """

    task: str
    number: int
    members: tuple[str, ...]
    threshold: int

    @classmethod
    def of(cls, spec: TaskSpec, number: int) -> Cohort:
        """The cohort of ``spec``'s participants for version ``number``."""
        sa = _secagg(spec)
        members = tuple(sorted(spec.participants))
        return cls(spec.task_id, number, members, sa.resolved_threshold(len(members)))

    def x(self, member: str) -> int:
        """``member``'s Shamir x-coordinate (1-based position)."""
        try:
            return self.members.index(member) + 1
        except ValueError:
            raise SecAggError(f"{member!r} is not a member of cohort {self.number}") from None

    def others(self, member: str) -> tuple[str, ...]:
        """The members but ``member``, in order: the order of its pairwise seeds."""
        return tuple(m for m in self.members if m != member)

    def context(self, purpose: bytes, a: str, b: str) -> bytes:
        """What a key derived between ``a`` and ``b`` is bound to; the same from both ends."""
        lo, hi = sorted((a, b))
        return purpose + b"".join(_text(s) for s in (self.task, lo, hi)) + _u64(self.number)


@dataclass(frozen=True, slots=True)
class MaskedInput:
    """What one bank sends: its masked vector and each member's encrypted shares."""

    masked: Ring
    #: Recipient -> nonce + AES-GCM ciphertext of its shares (section 16).
    shares: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class UnmaskShares:
    """One survivor's answer to an unmask request: its x-coordinate and its shares of
    ``b_i`` for each survivor ``i`` and of ``s_ij`` for each survivor ``i`` and dropped ``j``."""

    x: int
    b: dict[str, int]
    s: dict[str, dict[str, int]]


# --------------------------------------------------------------------------- keys and weights


def agreement_keys(spec: TaskSpec) -> dict[str, AgreementPublicKey]:
    """Every participant's agreement public key, as the task spec names them."""
    return {n: AgreementPublicKey.parse(t) for n, t in spec.identity.agreement_keys.items()}


def weight_of(spec: TaskSpec, num_samples: int, staleness: int) -> float:
    """A bank's weight ``w_i``, which it multiplies into its delta before masking.

    Sync rounds: ``min(n_i, max_weight)`` (1 when ``sync.weighted`` is off). FedBuff:
    ``s(t - v)`` of the task's staleness function in its unit, ``t - v`` measured from
    the update's base version to the cohort's. The aggregator recomputes it from the
    update's public fields and refuses an update that claims another.
    """
    sa = _secagg(spec)
    if spec.mode == "sync":
        return float(min(num_samples, sa.max_weight)) if spec.sync.weighted else 1.0
    a = spec.async_
    n = max(len(spec.participants), 1)
    return staleness_weight(a.staleness, in_unit(staleness, a.staleness_unit, a.buffer_size, n))


# --------------------------------------------------------------------------- fixed point


def flatten(tensors: Mapping[str, torch.Tensor]) -> npt.NDArray[np.float64]:
    """The tensors' values as one float64 vector, names in sorted order, each row-major."""
    parts = [
        tensors[name].detach().reshape(-1).to(torch.float64).numpy() for name in sorted(tensors)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)


def unflatten(
    vector: npt.NDArray[np.float64], like: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``vector`` cut back into float64 tensors with ``like``'s names and shapes."""
    out: dict[str, torch.Tensor] = {}
    at = 0
    for name in sorted(like):
        n = like[name].numel()
        out[name] = torch.from_numpy(vector[at : at + n].copy()).reshape(like[name].shape)
        at += n
    if at != vector.size:
        raise SecAggError(f"a vector of {vector.size} values for {at} parameters")
    return {name: out[name] for name in like}


def norm_bound(spec: TaskSpec) -> float | None:
    """The L2 bound a bank scales its delta to before masking: ``norm_bound``, and with
    bank-level DP its clip (the smaller of the two), which the sensitivity assumes."""
    sa = _secagg(spec)
    bounds = [b for b in (sa.norm_bound, spec.privacy.bank and spec.privacy.bank.clip) if b]
    return min(bounds) if bounds else None


def quantize(
    delta: Mapping[str, torch.Tensor],
    weight: float,
    sa: SecureAggregationSpec,
    bound: float | None = None,
) -> Ring:
    """``round(w * clip(delta) * 2^fraction_bits)`` modulo 2^64 (two's complement).

    The delta is scaled to L2 norm ``bound`` (default ``sa.norm_bound``; see
    :func:`norm_bound`) if it is longer, then every value clipped to ``[-clip, clip]``;
    rounding is half to even. Refuses a weight outside ``[0, max_weight]`` or a
    non-finite delta.
    """
    if not (math.isfinite(weight) and 0.0 <= weight <= sa.max_weight):
        raise SecAggError(f"weight {weight!r} is outside [0, {sa.max_weight}]")
    v = flatten(delta)
    if not np.isfinite(v).all():
        raise SecAggError("the delta holds NaN or Inf")
    bound = sa.norm_bound if bound is None else bound
    if bound is not None:
        norm = float(np.linalg.norm(v))
        if norm > bound:
            v = v * (bound / norm)
    v = np.clip(v, -sa.clip, sa.clip)
    q = np.rint(v * (weight * 2.0**sa.fraction_bits)).astype(np.int64)
    return q.view(np.uint64)


def dequantize(total: Ring, fraction_bits: int) -> npt.NDArray[np.float64]:
    """A ring vector read as signed fixed point: ``int64(total) / 2^fraction_bits``."""
    return total.view(np.int64).astype(np.float64) / 2.0**fraction_bits


def quantization_bound(survivors: int, fraction_bits: int) -> float:
    """The largest error rounding puts in one coordinate of ``sum_i w_i delta_i``:
    ``survivors / 2^(fraction_bits + 1)`` (each bank's rounding is at most half a unit)."""
    return survivors / 2.0 ** (fraction_bits + 1)


# --------------------------------------------------------------------------- masks


def expand(seed: int, length: int) -> Ring:
    """The mask of a seed: ``length`` little-endian uint64 from the ChaCha20 keystream
    keyed by ``SHA-256("fedq mask v1" || seed as 32 bytes LE)``, nonce and counter 0."""
    key = hashlib.sha256(b"fedq mask v1" + _element(seed)).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)


def pair_seed(
    cohort: Cohort, me: str, key: AgreementKey, peer: str, peer_key: AgreementPublicKey
) -> int:
    """``s_ij``: the X25519 secret of ``me`` and ``peer`` for the cohort, a field element."""
    raw = key.shared(peer_key, cohort.context(b"fedq mask seed v1", me, peer))
    return int.from_bytes(raw, "little") % PRIME


def _sign(me: str, other: str) -> bool:
    """Whether ``me`` adds (True) or subtracts the pairwise mask it shares with ``other``."""
    return me < other


def mask(
    cohort: Cohort,
    me: str,
    key: AgreementKey,
    keys: Mapping[str, AgreementPublicKey],
    x: Ring,
) -> MaskedInput:
    """Mask ``x`` (from :func:`quantize`) for ``cohort`` and share the seeds.

    ``keys`` holds every member's agreement public key (the task spec's). The self
    seed and the sharing polynomials are fresh secrets from the operating system.
    """
    if me not in cohort.members:
        raise SecAggError(f"{me!r} is not a member of cohort {cohort.number}")
    missing = [m for m in cohort.members if m not in keys]
    if missing:
        raise SecAggError(f"no agreement key for {missing}")
    b = secrets.randbelow(PRIME)
    y = x + expand(b, x.size)
    seeds: list[int] = []
    for other in cohort.others(me):
        s = pair_seed(cohort, me, key, other, keys[other])
        seeds.append(s)
        m = expand(s, x.size)
        y = y + m if _sign(me, other) else y - m
    xs = [cohort.x(m) for m in cohort.members]
    split = share([b, *seeds], xs, cohort.threshold)
    shares = {
        member: _encrypt(cohort, key, me, member, keys[member], split[cohort.x(member)])
        for member in cohort.members
    }
    return MaskedInput(masked=y, shares=shares)


def reveal(
    cohort: Cohort,
    me: str,
    key: AgreementKey,
    keys: Mapping[str, AgreementPublicKey],
    ciphertexts: Mapping[str, bytes],
    dropped: Sequence[str],
) -> UnmaskShares:
    """A survivor's answer: decrypt the shares each survivor sent it (``ciphertexts``,
    sender -> the ciphertext addressed to ``me``) and return its shares of each
    survivor's ``b_i`` and of each ``s_ij`` with ``j`` dropped.

    Refuses a request that names ``me`` dropped, a bank both survived and dropped, or a
    stranger, or whose ciphertexts do not decrypt: honest banks never reveal both kinds
    of share for one bank.
    """
    survivors = sorted(ciphertexts)
    gone = sorted(set(dropped))
    if me not in survivors:
        raise SecAggError(f"{me!r} is not named a survivor of cohort {cohort.number}")
    both = set(survivors) & set(gone)
    if both:
        raise SecAggError(f"{sorted(both)} named both survivor and dropped")
    strangers = (set(survivors) | set(gone)) - set(cohort.members)
    if strangers:
        raise SecAggError(f"{sorted(strangers)} are not members of cohort {cohort.number}")
    b: dict[str, int] = {}
    s: dict[str, dict[str, int]] = {}
    for sender in survivors:
        values = _decrypt(cohort, key, sender, me, keys[sender], ciphertexts[sender])
        b[sender] = values[0]
        order = cohort.others(sender)
        s[sender] = {j: values[1 + order.index(j)] for j in gone}
    return UnmaskShares(x=cohort.x(me), b=b, s=s)


def unmasked_sum(
    cohort: Cohort,
    masked: Mapping[str, Ring],
    answers: Sequence[UnmaskShares],
    dropped: Sequence[str],
) -> Ring:
    """The sum of the survivors' quantized inputs: ``sum_U y_i - sum_U PRG(b_i) -
    sum_{i in U, j in D} (+/-) PRG(s_ij)`` modulo 2^64.

    Uses the first ``t`` answers as given; every further answer must lie on the same
    polynomials, else a share is wrong and SecAggError names the answer.
    """
    survivors = sorted(masked)
    if len(survivors) < cohort.threshold:
        raise SecAggError(f"{len(survivors)} survivors, below the threshold {cohort.threshold}")
    if len(answers) < cohort.threshold:
        raise SecAggError(f"{len(answers)} answers, below the threshold {cohort.threshold}")
    if set(survivors) & set(dropped):
        raise SecAggError("a member is both survivor and dropped")
    length = {v.size for v in masked.values()}
    if len(length) != 1:
        raise SecAggError("the masked vectors differ in length")
    (size,) = length
    total = np.zeros(size, dtype=np.uint64)
    for name in survivors:
        total += masked[name]
    for i in survivors:
        b_i = _combine(cohort, [(a.x, a.b.get(i)) for a in answers], f"b of {i}")
        total -= expand(b_i, size)
        for j in dropped:
            s_ij = _combine(
                cohort, [(a.x, a.s.get(i, {}).get(j)) for a in answers], f"s of {i},{j}"
            )
            m = expand(s_ij, size)
            total = total - m if _sign(i, j) else total + m
    return total


# --------------------------------------------------------------------------- Shamir


def share(values: Sequence[int], xs: Sequence[int], threshold: int) -> dict[int, list[int]]:
    """Shamir shares of each value (a degree ``threshold - 1`` polynomial each, random
    coefficients) at each x: ``{x: [share of values[0], share of values[1], ...]}``."""
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold {threshold} for {len(xs)} shares")
    out: dict[int, list[int]] = {x: [] for x in xs}
    for value in values:
        coefficients = [value % PRIME, *(secrets.randbelow(PRIME) for _ in range(threshold - 1))]
        for x in xs:
            acc = 0
            for c in reversed(coefficients):
                acc = (acc * x + c) % PRIME
            out[x].append(acc)
    return out


def combine(points: Sequence[tuple[int, int]], at: int = 0) -> int:
    """The polynomial through ``points`` (distinct x) evaluated at ``at`` (Lagrange)."""
    coefficients = lagrange(tuple(x for x, _ in points), at)
    total = 0
    for c, (_, y) in zip(coefficients, points, strict=True):
        total = (total + c * y) % PRIME
    return total


@functools.lru_cache(maxsize=256)
def lagrange(xs: tuple[int, ...], at: int = 0) -> tuple[int, ...]:
    """The Lagrange coefficients at ``at`` for the distinct x-coordinates ``xs``: the
    same for every secret of one set of answers, so computed once (cached)."""
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (at - xm) % PRIME
                den = den * (xj - xm) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def _combine(cohort: Cohort, points: Sequence[tuple[int, int | None]], what: str) -> int:
    given = [(x, y) for x, y in points if y is not None]
    if len(given) < len(points):
        raise SecAggError(f"an answer lacks its share of {what}")
    if any(not 1 <= x <= len(cohort.members) for x, _ in given):
        raise SecAggError(f"an answer's x-coordinate for {what} is not a member's")
    if len({x for x, _ in given}) != len(given):
        raise SecAggError(f"two answers from one member for {what}")
    first = given[: cohort.threshold]
    value = combine(first)
    for x, y in given[cohort.threshold :]:
        if combine(first, x) != y % PRIME:
            # Which share is wrong cannot be told from here: any of the first t, or this.
            raise SecAggError(f"the answers' shares of {what} are inconsistent")
    return value


# --------------------------------------------------------------------------- shares on the wire


def _encrypt(
    cohort: Cohort,
    key: AgreementKey,
    sender: str,
    recipient: str,
    recipient_key: AgreementPublicKey,
    values: Sequence[int],
) -> bytes:
    secret = key.shared(recipient_key, cohort.context(b"fedq shares v1", sender, recipient))
    nonce = os.urandom(NONCE_BYTES)
    plain = b"".join(_element(v) for v in values)
    return nonce + AESGCM(secret).encrypt(nonce, plain, _aad(cohort, sender, recipient))


def _decrypt(
    cohort: Cohort,
    key: AgreementKey,
    sender: str,
    recipient: str,
    sender_key: AgreementPublicKey,
    blob: bytes,
) -> list[int]:
    secret = key.shared(sender_key, cohort.context(b"fedq shares v1", sender, recipient))
    try:
        plain = AESGCM(secret).decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(cohort, sender, recipient)
        )
    except (InvalidTag, ValueError):
        raise SecAggError(f"the shares {sender!r} sent to {recipient!r} do not decrypt") from None
    if len(plain) != FIELD_BYTES * len(cohort.members):
        raise SecAggError(f"the shares {sender!r} sent hold {len(plain)} bytes")
    values = [
        int.from_bytes(plain[i : i + FIELD_BYTES], "little")
        for i in range(0, len(plain), FIELD_BYTES)
    ]
    if any(v >= PRIME for v in values):
        raise SecAggError(f"the shares {sender!r} sent are not field elements")
    return values


def _aad(cohort: Cohort, sender: str, recipient: str) -> bytes:
    return (
        b"fedq shares v1"
        + b"".join(_text(s) for s in (cohort.task, sender, recipient))
        + _u64(cohort.number)
    )


def element_bytes(value: int) -> bytes:
    """A field element as 32 bytes little-endian."""
    return _element(value)


def element_of(raw: bytes) -> int:
    """A field element from 32 bytes little-endian (refuses other lengths and values >= p)."""
    if len(raw) != FIELD_BYTES:
        raise SecAggError(f"a field element is {FIELD_BYTES} bytes, not {len(raw)}")
    value = int.from_bytes(raw, "little")
    if value >= PRIME:
        raise SecAggError("a field element must be below 2^255 - 19")
    return value


def _element(value: int) -> bytes:
    return (value % PRIME).to_bytes(FIELD_BYTES, "little")


def _text(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("<H", len(raw)) + raw


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def _secagg(spec: TaskSpec) -> SecureAggregationSpec:
    if spec.secure_aggregation is None:
        raise SecAggError(f"task {spec.task_id!r} does not use secure aggregation")
    return spec.secure_aggregation
