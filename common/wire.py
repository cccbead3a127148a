"""The wire format: update and model envelopes in msgpack.

Pure functions only: bytes in, envelopes out, and back. Every failure to decode
raises :class:`~common.errors.DecodeError` with a machine-readable reason; on
arbitrary bytes nothing else escapes. Limits are checked before anything large is
allocated or decompressed. The format is specified in docs/wire-format.md.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import msgpack
import numpy as np
import torch

from common.codecs import CODECS, LOSSLESS_CODECS, Codec, get_codec
from common.dtypes import FLOAT_WIRE_DTYPES, WIRE_DTYPES, itemsize, wire_name
from common.errors import DecodeError, EncodeError, NonFiniteError
from common.hashing import HASH_SIZE, TensorHasher
from common.ids import MAX_COHORT, is_name, is_update_id
from common.msgpack_views import unpackb_views
from common.refusals import Refusal
from common.segments import Owned, Segments
from common.signing import (
    MAX_ANCESTORS,
    PublicKey,
    SigningKey,
    drift_message,
    evaluation_message,
    model_message,
    receipt_message,
    unmask_answer_message,
    unmask_request_message,
    update_message,
)

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("fedq's wire format is implemented for little-endian hosts only")

FORMAT_VERSION: Final = 1
KIND_UPDATE: Final = "u"
KIND_MODEL: Final = "m"
#: Secure aggregation (section 16): the aggregator's unmask request to a survivor and
#: the survivor's answer.
KIND_UNMASK_REQUEST: Final = "ur"
KIND_UNMASK_ANSWER: Final = "ua"
#: Monitoring (docs/drift.md): a bank's drift summary and its evaluation of a version.
KIND_DRIFT: Final = "ds"
KIND_EVALUATION: Final = "ev"
#: Kinds a bank publishes besides updates (through the same exchange, as answers are).
REPORT_KINDS: Final = frozenset({KIND_DRIFT, KIND_EVALUATION})

#: An ordered mapping of tensor name to tensor, like a module's state_dict.
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Hard limits a decoder enforces before it allocates or decompresses."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_tensor_bytes: int = 512 * 1024 * 1024
    max_tensors: int = 4096
    max_ndim: int = 8
    max_name_len: int = 256
    max_metrics: int = 64
    max_signature_bytes: int = 256
    require_finite: bool = True


DEFAULT_LIMITS: Final = DecodeLimits()


def raw_bytes(expected: Mapping[str, TensorSpec]) -> int:
    """Bytes of tensors of these shapes and dtypes, raw."""
    return sum(math.prod(t.shape) * itemsize(t.dtype) for t in expected.values())


def limits_for(
    expected: Mapping[str, TensorSpec], base: DecodeLimits = DEFAULT_LIMITS
) -> DecodeLimits:
    """``base`` raised to let a task's own messages through: an update or a model of
    ``expected`` tensors (raw, plus 1/64 and 64 KiB for the envelope and any codec's
    overhead), its tensors decoded. A model larger than the broker's message limit
    travels in chunks (docs/chunking.md) and is decoded whole; nothing larger than the
    task's model is ever accepted beyond ``base``."""
    if not expected:
        return base
    total = raw_bytes(expected)
    return replace(
        base,
        max_message_bytes=max(base.max_message_bytes, total + total // 64 + (64 << 10)),
        max_tensor_bytes=max(base.max_tensor_bytes, total),
    )


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """The name, shape and wire dtype a tensor must have (from the task's model)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, slots=True)
class UpdateEnvelope:
    """A participant's update: the delta it trained from ``base_version``."""

    task: str
    participant: str
    update_id: str
    base_version: int
    num_samples: int
    tensors: Tensors
    metrics: Mapping[str, float] = field(default_factory=dict)
    codec: str = "zstd"
    created_at: float | None = None
    signature: bytes | None = None
    #: SHA-256 over the raw tensors; set by encode and decode, ignored on input.
    content_hash: bytes = b""
    #: The hash of the task spec it was prepared under (``TaskSpec.spec_hash``); empty if absent.
    spec_hash: bytes = b""
    #: Secure aggregation (section 16): the cohort, the bank's weight and the encrypted
    #: shares; the tensors are then the masked ring values (``i64``). None otherwise.
    secagg: MaskedBlock | None = None


@dataclass(frozen=True, slots=True)
class MaskedBlock:
    """What a masked update adds (``sa``, section 16): the cohort it is masked for, the
    weight the bank multiplied in, and each member's encrypted Shamir shares."""

    cohort: int
    weight: float
    shares: Mapping[str, bytes]

    def digest(self) -> bytes:
        """SHA-256 over the block, as its signature covers it (section 16)."""
        h = hashlib.sha256(b"fedq-sa-v1\x00" + struct.pack("<Qd", self.cohort, self.weight))
        h.update(struct.pack("<H", len(self.shares)))
        for name in sorted(self.shares, key=str.encode):
            raw, blob = name.encode(), self.shares[name]
            h.update(struct.pack("<H", len(raw)) + raw + struct.pack("<I", len(blob)) + blob)
        return h.digest()


@dataclass(frozen=True, slots=True)
class ModelEnvelope:
    """A model version's parameters, as announced to participants and stored."""

    task: str
    version: int
    tensors: Tensors
    version_hash: bytes = b""
    codec: str = "zstd"
    #: SHA-256 over the raw tensors (the version's parameter hash); set by encode/decode.
    content_hash: bytes = b""
    #: Announcements only (section 15): the spec hash the version was made under, the
    #: version hashes of its ancestors (newest first) and the aggregator's signature.
    spec_hash: bytes = b""
    ancestors: tuple[bytes, ...] = ()
    signature: bytes | None = None


# --------------------------------------------------------------------------- encode


def encode_update(
    env: UpdateEnvelope,
    signing_key: SigningKey | None = None,
    *,
    encoded: EncodedTensors | None = None,
) -> tuple[bytes, bytes]:
    """Encode an update; returns ``(message bytes, content hash)``.

    With ``signing_key`` the update is signed (``sg``, section 15) after its tensors are
    encoded and hashed; ``env.signature`` is then ignored. ``encoded``: the tensors
    already encoded (:func:`encode_tensors`, e.g. with a lossy codec's encoder
    settings); ``env.tensors`` is then not read, and ``env.codec`` must be its codec.
    """
    _check_name("task", env.task)
    _check_name("participant", env.participant)
    if not is_update_id(env.update_id):
        raise EncodeError(f"invalid update id {env.update_id!r}")
    _check_count("base_version", env.base_version, minimum=0)
    _check_count("num_samples", env.num_samples, minimum=1)
    metrics = _encode_metrics(env.metrics)
    if env.created_at is not None and not math.isfinite(env.created_at):
        raise EncodeError("created_at must be a finite number")
    if env.signature is not None and len(env.signature) > DEFAULT_LIMITS.max_signature_bytes:
        raise EncodeError(f"signature longer than {DEFAULT_LIMITS.max_signature_bytes} bytes")
    if env.spec_hash and len(env.spec_hash) != HASH_SIZE:
        raise EncodeError("spec_hash must be empty or a 32-byte SHA-256 digest")
    if signing_key is not None and not env.spec_hash:
        raise EncodeError("a signed update must name its spec hash")
    tensors, digest = _update_tensors(env, encoded)
    doc: dict[str, Any] = {
        "fv": FORMAT_VERSION,
        "k": KIND_UPDATE,
        "t": env.task,
        "p": env.participant,
        "id": env.update_id,
        "bv": env.base_version,
        "n": env.num_samples,
        "m": metrics,
        "c": env.codec,
        "ts": tensors,
        "h": digest,
    }
    if env.created_at is not None:
        doc["at"] = float(env.created_at)
    if env.spec_hash:
        doc["sh"] = bytes(env.spec_hash)
    if env.secagg is not None:
        doc["sa"] = _encode_block(env.secagg)
    signature = env.signature
    if signing_key is not None:
        signature = signing_key.sign(_update_message(env, digest, metrics))
    if signature is not None:
        doc["sg"] = bytes(signature)
    return _pack(doc), digest


def _update_tensors(
    env: UpdateEnvelope, encoded: EncodedTensors | None
) -> tuple[list[dict[str, Any]], bytes]:
    """The update's tensor entries and content hash: ``encoded``'s, or ``env``'s encoded."""
    if encoded is None:
        encoded = encode_tensors(env.tensors, env.codec)
    elif encoded.codec != env.codec:
        raise EncodeError(
            f"tensors encoded with {encoded.codec!r}, the envelope names {env.codec!r}"
        )
    return encoded.entries, encoded.digest


def update_signing_message(env: UpdateEnvelope) -> bytes:
    """The bytes an update's signature covers (section 15), from a decoded envelope."""
    return _update_message(env, env.content_hash, env.metrics)


def _update_message(env: UpdateEnvelope, digest: bytes, metrics: Mapping[str, float]) -> bytes:
    try:
        return update_message(
            task=env.task,
            participant=env.participant,
            update_id=env.update_id,
            base_version=env.base_version,
            num_samples=env.num_samples,
            content_hash=digest,
            spec_hash=env.spec_hash,
            metrics=metrics,
            secagg_digest=env.secagg.digest() if env.secagg is not None else b"",
        )
    except ValueError as e:
        raise EncodeError(f"cannot build the signing message: {e}") from e


def model_signing_message(env: ModelEnvelope) -> bytes:
    """The bytes a model announcement's signature covers (section 15)."""
    try:
        return model_message(
            task=env.task,
            version=env.version,
            version_hash=env.version_hash,
            content_hash=env.content_hash,
            spec_hash=env.spec_hash,
            ancestors=env.ancestors,
        )
    except ValueError as e:
        raise EncodeError(f"cannot build the signing message: {e}") from e


def sign_model(
    blob: bytes,
    *,
    task: str,
    version: int,
    version_hash: bytes,
    content_hash: bytes,
    spec_hash: bytes,
    ancestors: Sequence[bytes],
    signing_key: SigningKey | None,
) -> bytes:
    """A stored model envelope turned into an announcement: ``sh``, ``anc`` and (with a
    key) ``sg`` appended to its map, the tensors' bytes untouched (section 15)."""
    return b"".join(
        sign_model_segments(
            (blob,),
            task=task,
            version=version,
            version_hash=version_hash,
            content_hash=content_hash,
            spec_hash=spec_hash,
            ancestors=ancestors,
            signing_key=signing_key,
        )
    )


def sign_model_segments(
    blob: Segments,
    *,
    task: str,
    version: int,
    version_hash: bytes,
    content_hash: bytes,
    spec_hash: bytes,
    ancestors: Sequence[bytes],
    signing_key: SigningKey | None,
) -> list[bytes | bytearray | memoryview]:
    """:func:`sign_model` for a blob held as segments (common/segments.py), as
    segments: the tensors' bytes are neither copied nor joined."""
    if len(ancestors) > MAX_ANCESTORS:
        raise EncodeError(f"at most {MAX_ANCESTORS} ancestors")
    extra: dict[str, Any] = {"sh": bytes(spec_hash), "anc": [bytes(a) for a in ancestors]}
    if signing_key is not None:
        env = ModelEnvelope(
            task=task,
            version=version,
            tensors={},
            version_hash=version_hash,
            content_hash=content_hash,
            spec_hash=spec_hash,
            ancestors=tuple(ancestors),
        )
        extra["sg"] = signing_key.sign(model_signing_message(env))
    return _append_entries(blob, extra)


def _append_entries(
    packed: Segments, extra: Mapping[str, Any]
) -> list[bytes | bytearray | memoryview]:
    """A packed msgpack map (as segments, its header in the first) with ``extra``
    entries added at its end (keys must be new): a new header, the rest as it was."""
    first = memoryview(packed[0]).cast("B") if packed else memoryview(b"")
    lead = first[0] if len(first) else -1
    if 0x80 <= lead <= 0x8F:
        count, skip = lead & 0x0F, 1
    elif lead == 0xDE and len(first) >= 3:
        count, skip = int.from_bytes(first[1:3], "big"), 3
    elif lead == 0xDF and len(first) >= 5:
        count, skip = int.from_bytes(first[1:5], "big"), 5
    else:
        raise EncodeError("not a packed msgpack map")
    total = count + len(extra)
    if total <= 15:
        header = bytes([0x80 | total])
    elif total <= 0xFFFF:
        header = b"\xde" + total.to_bytes(2, "big")
    else:  # pragma: no cover - envelopes have a dozen fields
        header = b"\xdf" + total.to_bytes(4, "big")
    tail = b"".join(_pack_value(k) + _pack_value(v) for k, v in extra.items())
    return [header, first[skip:], *packed[1:], tail]


def _pack_value(value: Any) -> bytes:
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise EncodeError(f"cannot encode envelope: {e}") from e
    return packed


def encode_model(env: ModelEnvelope) -> tuple[bytes, bytes]:
    """Encode a model version; returns ``(message bytes, parameter hash)``."""
    _check_exact(env.codec)
    encoded = encode_tensors(env.tensors, env.codec)
    return pack_model(env.task, env.version, env.version_hash, encoded), encoded.digest


def _check_exact(codec: str) -> None:
    """Model envelopes carry a version's exact parameters: lossless codecs only."""
    if codec not in LOSSLESS_CODECS and codec in CODECS:
        raise EncodeError(
            f"codec {codec!r} is lossy: a model envelope carries exact parameters "
            f"({' or '.join(sorted(LOSSLESS_CODECS))})"
        )


@dataclass(frozen=True, slots=True)
class EncodedTensors:
    """Tensors encoded for the wire, with their content hash: encode once, pack later."""

    entries: list[dict[str, Any]]
    digest: bytes
    codec: str
    #: Lossy codecs: the tensors as a decoder rebuilds them (what ``digest`` covers).
    #: None for a lossless codec: the tensors encoded, exactly.
    decoded: Tensors | None = None


def encode_tensors(
    tensors: Mapping[str, torch.Tensor], codec: str | Codec = "zstd", *, seed: int | None = None
) -> EncodedTensors:
    """Encode tensors and hash them in one pass (e.g. to compute a version hash first).

    ``codec``: a registered name, or an encoder (``common.codecs.lossy_codec``) with
    its encoder-only settings. A lossy codec's content hash covers the tensors its
    payloads decode to (docs/wire-format.md, section 8): they are decoded here, hashed
    and returned as ``decoded``. ``seed``: the encoder's randomness (stochastic
    rounding); None: fresh from the operating system.
    """
    try:
        chosen = get_codec(codec) if isinstance(codec, str) else codec
    except DecodeError as e:
        raise EncodeError(str(e)) from e
    entries, digest, decoded = _encode_tensors(tensors, chosen, seed)
    return EncodedTensors(entries, digest, chosen.name, decoded)


def pack_model(task: str, version: int, version_hash: bytes, encoded: EncodedTensors) -> bytes:
    """A model envelope from already encoded tensors."""
    _check_exact(encoded.codec)
    _check_name("task", task)
    _check_count("version", version, minimum=0)
    if version_hash and len(version_hash) != HASH_SIZE:
        raise EncodeError("version_hash must be empty or a 32-byte SHA-256 digest")
    doc: dict[str, Any] = {
        "fv": FORMAT_VERSION,
        "k": KIND_MODEL,
        "t": task,
        "v": version,
        "vh": bytes(version_hash),
        "c": encoded.codec,
        "ts": encoded.entries,
        "h": encoded.digest,
    }
    return _pack(doc)


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The content hash of tensors, as encode would compute it (no encoding)."""
    hasher = TensorHasher()
    for name, t in tensors.items():
        dtype = _wire_dtype(name, t)
        hasher.add(name, dtype, tuple(t.shape), _raw_view(t))
    return hasher.digest()


def _encode_tensors(
    tensors: Mapping[str, torch.Tensor], codec: Codec, seed: int | None
) -> tuple[list[dict[str, Any]], bytes, Tensors | None]:
    limits = DEFAULT_LIMITS
    lossy = not codec.lossless
    rng = np.random.default_rng(seed) if lossy else None
    decoded: Tensors = {}
    if len(tensors) > limits.max_tensors:
        raise EncodeError(f"{len(tensors)} tensors, the wire carries at most {limits.max_tensors}")
    hasher = TensorHasher()
    out: list[dict[str, Any]] = []
    for name, t in tensors.items():
        dtype, shape, raw = _checked_tensor(name, t)
        payload = codec.encode_tensor(raw, dtype, shape, rng)
        if lossy:
            # The hash covers what a decoder rebuilds: decode our own payload.
            t = _decoded(name, dtype, shape, payload, codec)
            decoded[name] = t
            raw = _raw_view(t)
        hasher.add(name, dtype, shape, raw)
        out.append({"n": name, "d": dtype, "s": list(shape), "b": payload})
    return out, hasher.digest(), decoded if lossy else None


def _checked_tensor(name: object, t: torch.Tensor) -> tuple[str, tuple[int, ...], memoryview]:
    """The encoder's checks of one tensor (name, dtype, dimensions, finite values); its
    wire dtype, shape and raw bytes (a view, no copy, when it is contiguous on CPU)."""
    limits = DEFAULT_LIMITS
    if not isinstance(name, str) or not 0 < len(name) <= limits.max_name_len:
        raise EncodeError(f"tensor names must be strings of 1-{limits.max_name_len} chars")
    try:
        name.encode()
    except UnicodeEncodeError as e:
        raise EncodeError(f"tensor name {name!r} is not valid UTF-8 text") from e
    dtype = _wire_dtype(name, t)
    if t.dim() > limits.max_ndim:
        raise EncodeError(f"tensor {name!r} has {t.dim()} dims, at most {limits.max_ndim}")
    if dtype in FLOAT_WIRE_DTYPES and not all_finite(t):
        raise NonFiniteError(name)
    return dtype, tuple(int(d) for d in t.shape), _raw_view(t)


def _decoded(
    name: str, dtype: str, shape: tuple[int, ...], payload: bytes, codec: Codec
) -> torch.Tensor:
    """What a decoder makes of ``payload``; EncodeError if it would refuse it."""
    t = torch.empty(shape, dtype=WIRE_DTYPES[dtype])
    try:
        codec.decode_tensor_into(
            payload, dtype, shape, t.reshape(-1).view(torch.uint8).numpy().data.cast("B")
        )
    except DecodeError as e:  # pragma: no cover - our encoders write what they decode
        raise EncodeError(
            f"tensor {name!r}: codec {codec.name!r} cannot decode its own payload: {e}"
        ) from e
    if dtype in FLOAT_WIRE_DTYPES and not all_finite(t):
        raise EncodeError(
            f"tensor {name!r} does not fit codec {codec.name!r}: it decodes to NaN or Inf"
        )
    return t


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN and no Inf (numpy's check where numpy has the
    dtype: about 25 times faster than torch's on one core for a million floats)."""
    if t.dtype in (torch.float32, torch.float64, torch.float16) and t.device.type == "cpu":
        return bool(np.isfinite(t.detach().numpy()).all())
    if not t.dtype.is_floating_point:
        return True
    return bool(t.isfinite().all())


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding NaN or Inf, or None."""
    for name, t in tensors.items():
        if not all_finite(t):
            return name
    return None


def _encode_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    if len(metrics) > DEFAULT_LIMITS.max_metrics:
        raise EncodeError(f"at most {DEFAULT_LIMITS.max_metrics} metrics")
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or not 0 < len(k) <= 64:
            raise EncodeError(f"metric name {k!r} must be a string of 1-64 chars")
        if not _is_real(v) or not math.isfinite(v):
            raise EncodeError(f"metric {k!r} must be a finite number, got {v!r}")
        out[k] = float(v)
    return out


def _wire_dtype(name: str, t: torch.Tensor) -> str:
    if not isinstance(t, torch.Tensor):
        raise EncodeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
    dtype = wire_name(t.dtype)
    if dtype is None:
        raise EncodeError(f"tensor {name!r} has dtype {t.dtype}, which the wire does not carry")
    return dtype


#: Dtypes numpy views directly (bfloat16 is not one of them).
_NUMPY_VIEWABLE = frozenset(
    {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int8}
)


def _raw_view(t: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, without a copy when it is contiguous on CPU."""
    if (
        t.dtype in _NUMPY_VIEWABLE
        and t.device.type == "cpu"
        and not t.requires_grad
        and t.is_contiguous()
    ):
        return t.numpy().reshape(-1).data.cast("B")  # a third of the general path's cost
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return flat.numpy().data.cast("B")


def _pack(doc: dict[str, Any]) -> bytes:
    try:
        packed: bytes = msgpack.packb(doc, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise EncodeError(f"cannot encode envelope: {e}") from e
    return packed


def _check_name(what: str, value: object) -> None:
    if not is_name(value):
        raise EncodeError(f"invalid {what} id {value!r}: letters, digits, '_' and '-', 1-64 chars")


def _check_count(what: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise EncodeError(f"{what} must be an integer >= {minimum}, got {value!r}")
    if value >= 2**63:
        raise EncodeError(f"{what} must fit in a signed 64-bit integer")


# --------------------------------------------------------------------------- decode

_UPDATE_KEYS: Final = frozenset(
    {"fv", "k", "t", "p", "id", "bv", "n", "m", "c", "ts", "h", "at", "sg", "sh", "sa"}
)
_UPDATE_REQUIRED: Final = frozenset({"fv", "k", "t", "p", "id", "bv", "n", "c", "ts", "h"})
_MODEL_KEYS: Final = frozenset({"fv", "k", "t", "v", "vh", "c", "ts", "h", "sh", "anc", "sg"})
_MODEL_REQUIRED: Final = frozenset({"fv", "k", "t", "v", "c", "ts", "h"})
_TENSOR_KEYS: Final = frozenset({"n", "d", "s", "b"})


def decode_update(
    data: bytes | Owned,
    limits: DecodeLimits = DEFAULT_LIMITS,
    expected: Mapping[str, TensorSpec] | None = None,
    *,
    codecs: Collection[str] | None = None,
) -> UpdateEnvelope:
    """Decode and validate an update envelope.

    ``expected`` (from the task's model) fixes the tensor names, order, shapes and
    dtypes; without it only the generic limits apply. ``codecs``: the codecs the
    reader accepts (the task's: ``common.codecs.accepted_codecs``); another one is
    refused ``unknown_codec`` before any payload is decoded. None: every known codec.
    """
    doc = _unpack(data, limits, KIND_UPDATE, _UPDATE_KEYS, _UPDATE_REQUIRED)
    task = _get_name(doc, "t", "task")
    participant = _get_name(doc, "p", "participant")
    update_id = doc["id"]
    if not is_update_id(update_id):
        raise DecodeError(Refusal.INVALID_FIELD, "id: not a valid update id")
    base_version = _get_count(doc, "bv", minimum=0)
    num_samples = _get_count(doc, "n", minimum=1)
    metrics = _get_metrics(doc.get("m", {}), limits)
    created_at: float | None = None
    if "at" in doc:
        at = doc["at"]
        if not _is_real(at) or not math.isfinite(at):
            raise DecodeError(Refusal.INVALID_FIELD, "at: not a finite number")
        created_at = float(at)
    signature = doc.get("sg")
    if "sg" in doc and (
        not isinstance(signature, bytes) or len(signature) > limits.max_signature_bytes
    ):
        raise DecodeError(Refusal.INVALID_FIELD, "sg: not a byte string of bounded size")
    spec_hash = _get_digest(doc, "sh")
    secagg = _decode_block(doc["sa"], limits) if "sa" in doc else None
    codec = _get_str(doc, "c")
    tensors, digest = _decode_tensors(doc, codec, limits, expected, codecs, "this task")
    return UpdateEnvelope(
        task=task,
        participant=participant,
        update_id=update_id,
        base_version=base_version,
        num_samples=num_samples,
        tensors=tensors,
        metrics=metrics,
        codec=codec,
        created_at=created_at,
        signature=signature,
        content_hash=digest,
        spec_hash=spec_hash,
        secagg=secagg,
    )


def _get_digest(doc: Mapping[str, Any], key: str) -> bytes:
    """An optional 32-byte digest field; empty when absent."""
    value = doc.get(key, b"")
    if not isinstance(value, bytes) or (key in doc and len(value) != HASH_SIZE):
        raise DecodeError(Refusal.INVALID_FIELD, f"{key}: not a 32-byte digest")
    return value


def decode_model(
    data: bytes | Owned,
    limits: DecodeLimits = DEFAULT_LIMITS,
    expected: Mapping[str, TensorSpec] | None = None,
) -> ModelEnvelope:
    """Decode and validate a model envelope."""
    doc = _unpack(data, limits, KIND_MODEL, _MODEL_KEYS, _MODEL_REQUIRED)
    task = _get_name(doc, "t", "task")
    version = _get_count(doc, "v", minimum=0)
    version_hash = doc.get("vh", b"")
    if not isinstance(version_hash, bytes) or len(version_hash) not in (0, HASH_SIZE):
        raise DecodeError(Refusal.INVALID_FIELD, "vh: not empty or a 32-byte digest")
    spec_hash = _get_digest(doc, "sh")
    ancestors = doc.get("anc", [])
    if (
        not isinstance(ancestors, list)
        or len(ancestors) > MAX_ANCESTORS
        or not all(isinstance(a, bytes) and len(a) == HASH_SIZE for a in ancestors)
    ):
        raise DecodeError(
            Refusal.INVALID_FIELD, f"anc: not an array of at most {MAX_ANCESTORS} digests"
        )
    signature = doc.get("sg")
    if "sg" in doc and (
        not isinstance(signature, bytes) or len(signature) > limits.max_signature_bytes
    ):
        raise DecodeError(Refusal.INVALID_FIELD, "sg: not a byte string of bounded size")
    codec = _get_str(doc, "c")
    tensors, digest = _decode_tensors(
        doc, codec, limits, expected, LOSSLESS_CODECS, "a model envelope"
    )
    return ModelEnvelope(
        task=task,
        version=version,
        tensors=tensors,
        version_hash=version_hash,
        codec=codec,
        content_hash=digest,
        spec_hash=spec_hash,
        ancestors=tuple(ancestors),
        signature=signature,
    )


def peek_header(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> dict[str, object]:
    """The envelope's small fields without decoding tensors (for routing and refusals)."""
    doc = _unpack_any(data, limits)
    return {k: v for k, v in doc.items() if k != "ts" and not isinstance(v, bytes | list)}


def _unpack_any(data: bytes | Owned, limits: DecodeLimits) -> dict[str, Any]:
    """The envelope's map. A body of its own (``Owned``: a reassembled chunk set, a blob
    read from the store) is read by :func:`common.msgpack_views.unpackb_views`: its large
    byte strings (tensor payloads) are views into it, not copies."""
    if not isinstance(data, bytes | bytearray | memoryview | mmap.mmap):
        raise DecodeError(Refusal.MALFORMED, f"expected bytes, got {type(data).__name__}")
    if len(data) > limits.max_message_bytes:
        raise DecodeError(
            Refusal.TOO_LARGE, f"message has {len(data)} bytes, limit {limits.max_message_bytes}"
        )
    max_bin, max_str = limits.max_message_bytes, 64 * 1024
    # One above our own limits, so the first count over them gets its own reason.
    max_array = max(limits.max_tensors, limits.max_ndim, 1024) + 1
    max_map = max(limits.max_metrics, MAX_COHORT) + 1
    try:
        if isinstance(data, bytearray | mmap.mmap):
            doc = unpackb_views(
                data,
                max_bin_len=max_bin,
                max_str_len=max_str,
                max_array_len=max_array,
                max_map_len=max_map,
                object_pairs_hook=_unique_keys,
            )
        else:
            doc = msgpack.unpackb(
                data,
                raw=False,
                use_list=True,
                strict_map_key=True,
                max_bin_len=max_bin,
                max_str_len=max_str,
                max_array_len=max_array,
                max_map_len=max_map,
                max_ext_len=0,
                object_pairs_hook=_unique_keys,
            )
    except Exception as e:  # msgpack raises many types on bad input; convert them all
        raise DecodeError(
            Refusal.MALFORMED, f"not a msgpack document: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(doc, dict):
        raise DecodeError(Refusal.MALFORMED, f"envelope is a {type(doc).__name__}, not a map")
    return doc


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    if not all(isinstance(k, str) for k, _ in pairs):
        raise ValueError("map keys must be strings")
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a map repeats a key")
    return out


def _unpack(
    data: bytes | Owned,
    limits: DecodeLimits,
    kind: str,
    allowed: frozenset[str],
    required: frozenset[str],
) -> dict[str, Any]:
    doc = _unpack_any(data, limits)
    fv = doc.get("fv")
    if type(fv) is not int or fv != FORMAT_VERSION:
        raise DecodeError(
            Refusal.UNSUPPORTED_VERSION, f"format version {fv!r}, this reader knows 1"
        )
    if doc.get("k") != kind:
        raise DecodeError(Refusal.WRONG_KIND, f"kind {doc.get('k')!r}, expected {kind!r}")
    unknown = set(doc) - allowed
    if unknown:
        raise DecodeError(
            Refusal.UNKNOWN_FIELD, f"fields {sorted(map(repr, unknown))} are not in format 1"
        )
    missing = required - set(doc)
    if missing:
        raise DecodeError(
            Refusal.MISSING_FIELD, f"fields {sorted(map(repr, missing))} are required"
        )
    return doc


def _get_str(doc: Mapping[str, Any], key: str) -> str:
    value = doc[key]
    if not isinstance(value, str):
        raise DecodeError(Refusal.INVALID_FIELD, f"{key}: not a string")
    return value


def _get_name(doc: Mapping[str, Any], key: str, what: str) -> str:
    value = doc[key]
    if not is_name(value):
        raise DecodeError(Refusal.INVALID_FIELD, f"{key}: not a valid {what} id")
    return str(value)


def _get_count(doc: Mapping[str, Any], key: str, *, minimum: int) -> int:
    value = doc[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DecodeError(Refusal.INVALID_FIELD, f"{key}: not an integer >= {minimum}")
    if value >= 2**63:
        raise DecodeError(Refusal.INVALID_FIELD, f"{key}: does not fit in int64")
    return value


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _get_metrics(value: object, limits: DecodeLimits) -> dict[str, float]:
    if not isinstance(value, dict) or len(value) > limits.max_metrics:
        raise DecodeError(
            Refusal.INVALID_FIELD, f"m: not a map of at most {limits.max_metrics} entries"
        )
    metrics: dict[str, float] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not 0 < len(k) <= 64:
            raise DecodeError(
                Refusal.INVALID_FIELD, "m: metric names must be strings of 1-64 chars"
            )
        if not _is_real(v) or not math.isfinite(v):
            raise DecodeError(Refusal.INVALID_FIELD, f"m: metric {k!r} is not a finite number")
        metrics[k] = float(v)
    return metrics


def _decode_tensors(
    doc: Mapping[str, Any],
    codec_name: str,
    limits: DecodeLimits,
    expected: Mapping[str, TensorSpec] | None,
    accepted: Collection[str] | None,
    where: str,
) -> tuple[Tensors, bytes]:
    codec = get_codec(codec_name)
    if accepted is not None and codec_name not in accepted:
        raise DecodeError(
            Refusal.UNKNOWN_CODEC,
            f"codec {codec_name!r} is not accepted in {where} "
            f"(accepted: {', '.join(sorted(accepted))})",
        )
    claimed = doc["h"]
    if not isinstance(claimed, bytes) or len(claimed) != HASH_SIZE:
        raise DecodeError(Refusal.INVALID_FIELD, "h: not a 32-byte digest")
    headers = _tensor_headers(doc["ts"], limits, expected)
    tensors, digest = _decode_payloads(headers, codec)
    if digest != claimed:
        raise DecodeError(Refusal.HASH_MISMATCH, "content hash does not match the tensors")
    # Value checks after the hash: the bytes are what the sender meant to send.
    for name, dtype, _, _ in headers:
        t = tensors[name]
        if dtype == "bool" and t.numel() and int(t.view(torch.uint8).max()) > 1:
            raise DecodeError(Refusal.INVALID_TENSOR, f"tensor {name!r}: bool bytes must be 0 or 1")
        if limits.require_finite and dtype in FLOAT_WIRE_DTYPES and not all_finite(t):
            raise DecodeError(Refusal.NON_FINITE, f"tensor {name!r} holds NaN or Inf")
    return tensors, digest


_Header = tuple[str, str, tuple[int, ...], bytes | memoryview]


def _tensor_headers(
    entries: object, limits: DecodeLimits, expected: Mapping[str, TensorSpec] | None
) -> list[_Header]:
    """First pass: every header validated and the sizes added up, nothing allocated."""
    if not isinstance(entries, list):
        raise DecodeError(Refusal.INVALID_FIELD, "ts: not an array")
    if len(entries) > limits.max_tensors:
        raise DecodeError(
            Refusal.TOO_MANY_TENSORS, f"{len(entries)} tensors, limit {limits.max_tensors}"
        )
    if expected is not None and len(entries) != len(expected):
        raise DecodeError(
            Refusal.TENSOR_MISMATCH, f"{len(entries)} tensors, the task's model has {len(expected)}"
        )
    expected_items = list(expected.items()) if expected is not None else None
    headers: list[_Header] = []
    seen: set[str] = set()
    total = 0
    for i, entry in enumerate(entries):
        name, dtype, shape, payload = _tensor_header(i, entry, limits)
        if name in seen:
            raise DecodeError(Refusal.INVALID_TENSOR, f"tensor {name!r} appears twice")
        seen.add(name)
        if expected_items is not None:
            _match_expected(i, name, dtype, shape, *expected_items[i])
        total += math.prod(shape) * itemsize(dtype)
        if total > limits.max_tensor_bytes:
            raise DecodeError(
                Refusal.TOO_LARGE,
                f"tensors need more than {limits.max_tensor_bytes} bytes once decoded",
            )
        # An empty tensor may still name huge dimensions; bound them too (strides).
        if math.prod(max(d, 1) for d in shape) * itemsize(dtype) > limits.max_tensor_bytes:
            raise DecodeError(
                Refusal.BAD_SHAPE, f"tensor {name!r}: dimensions {list(shape)} too large"
            )
        headers.append((name, dtype, shape, payload))
    return headers


def _match_expected(
    i: int, name: str, dtype: str, shape: tuple[int, ...], exp_name: str, exp: TensorSpec
) -> None:
    if name != exp_name:
        raise DecodeError(
            Refusal.TENSOR_MISMATCH, f"tensor #{i} is {name!r}, the model expects {exp_name!r}"
        )
    if shape != exp.shape or dtype != exp.dtype:
        raise DecodeError(
            Refusal.TENSOR_MISMATCH,
            f"tensor {name!r} is {dtype}{list(shape)}, "
            f"the model expects {exp.dtype}{list(exp.shape)}",
        )


def _decode_payloads(headers: list[_Header], codec: Codec) -> tuple[Tensors, bytes]:
    """Second pass: each payload decoded into its own tensor, hashed as it goes."""
    hasher = TensorHasher()
    tensors: Tensors = {}
    for name, dtype, shape, payload in headers:
        if codec.name == "raw" and isinstance(payload, memoryview) and not payload.readonly:
            # A view into a writable body of its own: the tensor is that memory.
            if len(payload) != math.prod(shape) * itemsize(dtype):
                raise DecodeError(
                    Refusal.SIZE_MISMATCH,
                    f"tensor {name!r}: raw payload has {len(payload)} bytes, "
                    f"shape needs {math.prod(shape) * itemsize(dtype)}",
                )
            hasher.add(name, dtype, shape, payload)
            tensors[name] = _view_tensor(payload, dtype, shape)
            continue
        t = torch.empty(shape, dtype=WIRE_DTYPES[dtype])
        buf = t.reshape(-1).view(torch.uint8).numpy().data.cast("B")
        try:
            codec.decode_tensor_into(payload, dtype, shape, buf)
        except DecodeError as e:
            raise DecodeError(e.reason, f"tensor {name!r}: {e.detail}") from e
        hasher.add(name, dtype, shape, buf)
        tensors[name] = t
    return tensors, hasher.digest()


def _view_tensor(payload: memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``payload``'s memory (raw little-endian bytes; any alignment)."""
    if not len(payload):
        return torch.empty(shape, dtype=WIRE_DTYPES[dtype])
    flat = torch.frombuffer(payload, dtype=torch.uint8)
    return flat.view(WIRE_DTYPES[dtype]).reshape(shape)


def _tensor_header(
    i: int, entry: object, limits: DecodeLimits
) -> tuple[str, str, tuple[int, ...], bytes | memoryview]:
    if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
        raise DecodeError(Refusal.INVALID_TENSOR, f"tensor #{i}: not a map with keys n, d, s, b")
    name, dtype, shape, payload = entry["n"], entry["d"], entry["s"], entry["b"]
    if not isinstance(name, str) or not 0 < len(name) <= limits.max_name_len:
        raise DecodeError(
            Refusal.INVALID_TENSOR, f"tensor #{i}: name must be 1-{limits.max_name_len} chars"
        )
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise DecodeError(Refusal.BAD_DTYPE, f"tensor {name!r}: dtype {dtype!r} is not allowed")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise DecodeError(
            Refusal.BAD_SHAPE,
            f"tensor {name!r}: shape must be an array of <= {limits.max_ndim} dims",
        )
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0 or d >= 2**32:
            raise DecodeError(
                Refusal.BAD_SHAPE, f"tensor {name!r}: dimension {d!r} is not an int in [0, 2^32)"
            )
    if not isinstance(payload, bytes | memoryview):
        raise DecodeError(Refusal.INVALID_TENSOR, f"tensor {name!r}: payload is not a byte string")
    return name, dtype, tuple(shape), payload


# --------------------------------------------------------------------------- receipts

KIND_RECEIPT: Final = "r"
RECEIPT_ACCEPTED: Final = "accepted"
RECEIPT_REFUSED: Final = "refused"
#: A refused receipt's ``d`` holds at most this many characters.
MAX_RECEIPT_DETAIL: Final = 1024
#: A receipt is small: anything larger is refused before it is unpacked.
RECEIPT_LIMITS: Final = DecodeLimits(max_message_bytes=64 * 1024)
_RECEIPT_KEYS: Final = frozenset({"fv", "k", "t", "p", "id", "o", "v", "w", "r", "d", "at", "sg"})
_RECEIPT_REQUIRED: Final = frozenset({"fv", "k", "t", "p", "id", "o", "at"})
_RECEIPT_SIGNATURE_BYTES: Final = 64


@dataclass(frozen=True, slots=True)
class Receipt:
    """The fate of one update, sent by the aggregator to the participant that sent it.

    Accepted: ``version`` it went into and the ``weight`` its lineage entry records.
    Refused: ``reason`` (a :class:`~common.refusals.Refusal` value) and ``detail``.
    """

    task: str
    participant: str
    update_id: str
    outcome: str
    version: int = 0
    weight: float = 0.0
    reason: str = ""
    detail: str = ""
    created_at: float = 0.0
    signature: bytes | None = None

    @property
    def accepted(self) -> bool:
        return self.outcome == RECEIPT_ACCEPTED

    def signing_message(self) -> bytes:
        """What the aggregator's signature covers (docs/wire-format.md section 15)."""
        accepted = self.accepted
        return receipt_message(
            task=self.task,
            participant=self.participant,
            update_id=self.update_id,
            outcome=self.outcome,
            version=self.version if accepted else 0,
            weight=self.weight if accepted else 0.0,
            reason="" if accepted else self.reason,
        )


def accepted_receipt(
    task: str, participant: str, update_id: str, version: int, weight: float, at: float
) -> Receipt:
    """An "accepted" receipt."""
    return Receipt(
        task, participant, update_id, RECEIPT_ACCEPTED, version, float(weight), "", "", at
    )


def refused_receipt(
    task: str, participant: str, update_id: str, reason: str, detail: str, at: float
) -> Receipt:
    """A "refused" receipt (the detail is cut to :data:`MAX_RECEIPT_DETAIL` characters)."""
    return Receipt(
        task,
        participant,
        update_id,
        RECEIPT_REFUSED,
        0,
        0.0,
        reason,
        detail[:MAX_RECEIPT_DETAIL],
        at,
    )


def encode_receipt(receipt: Receipt, signing_key: SigningKey | None = None) -> bytes:
    """Encode a receipt, signed with ``signing_key`` when given (``sg``)."""
    _check_name("task", receipt.task)
    _check_name("participant", receipt.participant)
    if not is_update_id(receipt.update_id):
        raise EncodeError(f"invalid update id {receipt.update_id!r}")
    if not math.isfinite(receipt.created_at):
        raise EncodeError("a receipt's time must be finite")
    doc: dict[str, Any] = {
        "fv": FORMAT_VERSION,
        "k": KIND_RECEIPT,
        "t": receipt.task,
        "p": receipt.participant,
        "id": receipt.update_id,
        "o": receipt.outcome,
    }
    if receipt.outcome == RECEIPT_ACCEPTED:
        _check_count("version", receipt.version, minimum=0)
        if not math.isfinite(receipt.weight):
            raise EncodeError("a receipt's weight must be finite")
        doc["v"] = receipt.version
        doc["w"] = float(receipt.weight)
    elif receipt.outcome == RECEIPT_REFUSED:
        if receipt.reason not in _REASONS:
            raise EncodeError(f"unknown refusal reason {receipt.reason!r}")
        doc["r"] = receipt.reason
        doc["d"] = receipt.detail[:MAX_RECEIPT_DETAIL]
    else:
        raise EncodeError(f"a receipt's outcome is accepted or refused, not {receipt.outcome!r}")
    doc["at"] = float(receipt.created_at)
    if signing_key is not None:
        doc["sg"] = signing_key.sign(receipt.signing_message())
    return _pack(doc)


_REASONS: Final = frozenset(r.value for r in Refusal)


def decode_receipt(data: bytes, limits: DecodeLimits = RECEIPT_LIMITS) -> Receipt:
    """Decode and validate a receipt; raises only :class:`DecodeError`.

    The signature, if any, is returned, not checked: see :func:`verify_receipt`.
    """
    doc = _unpack(data, limits, KIND_RECEIPT, _RECEIPT_KEYS, _RECEIPT_REQUIRED)
    task = _get_name(doc, "t", "task")
    participant = _get_name(doc, "p", "participant")
    update_id = doc["id"]
    if not is_update_id(update_id):
        raise DecodeError(Refusal.INVALID_FIELD, "id: not a valid update id")
    outcome = doc["o"]
    at = doc["at"]
    if not _is_real(at) or not math.isfinite(at):
        raise DecodeError(Refusal.INVALID_FIELD, "at: not a finite number")
    signature = doc.get("sg")
    if "sg" in doc and (
        not isinstance(signature, bytes) or len(signature) != _RECEIPT_SIGNATURE_BYTES
    ):
        raise DecodeError(Refusal.INVALID_FIELD, "sg: not a 64-byte signature")
    if outcome == RECEIPT_ACCEPTED:
        version, weight = _receipt_accepted_fields(doc)
        return Receipt(
            task, participant, update_id, outcome, version, weight, "", "", float(at), signature
        )
    if outcome == RECEIPT_REFUSED:
        reason, detail = _receipt_refused_fields(doc)
        return Receipt(
            task, participant, update_id, outcome, 0, 0.0, reason, detail, float(at), signature
        )
    raise DecodeError(Refusal.INVALID_FIELD, "o: not 'accepted' nor 'refused'")


def _receipt_accepted_fields(doc: Mapping[str, Any]) -> tuple[int, float]:
    if "r" in doc or "d" in doc:
        raise DecodeError(Refusal.UNKNOWN_FIELD, "an accepted receipt has no 'r' nor 'd'")
    if "v" not in doc or "w" not in doc:
        raise DecodeError(Refusal.MISSING_FIELD, "an accepted receipt needs 'v' and 'w'")
    version = _get_count(doc, "v", minimum=0)
    weight = doc["w"]
    if not isinstance(weight, float) or not math.isfinite(weight):
        raise DecodeError(Refusal.INVALID_FIELD, "w: not a finite float64")
    return version, weight


def _receipt_refused_fields(doc: Mapping[str, Any]) -> tuple[str, str]:
    if "v" in doc or "w" in doc:
        raise DecodeError(Refusal.UNKNOWN_FIELD, "a refused receipt has no 'v' nor 'w'")
    if "r" not in doc or "d" not in doc:
        raise DecodeError(Refusal.MISSING_FIELD, "a refused receipt needs 'r' and 'd'")
    reason = doc["r"]
    if not isinstance(reason, str) or reason not in _REASONS:
        raise DecodeError(Refusal.INVALID_FIELD, "r: not a known refusal reason")
    detail = doc["d"]
    if not isinstance(detail, str) or len(detail) > MAX_RECEIPT_DETAIL:
        raise DecodeError(
            Refusal.INVALID_FIELD, f"d: not a string of at most {MAX_RECEIPT_DETAIL} characters"
        )
    return reason, detail


def verify_receipt(receipt: Receipt, key: PublicKey) -> bool:
    """Whether ``receipt`` carries a valid signature of ``key`` (False when unsigned)."""
    if receipt.signature is None:
        return False
    return key.verify(receipt.signature, receipt.signing_message())


# --------------------------------------------------------------------------- secure aggregation

#: Unmask requests and answers are small: anything larger is refused before unpacking.
UNMASK_LIMITS: Final = DecodeLimits(max_message_bytes=8 * 1024 * 1024)
_SHARE_BYTES: Final = 32
_MAX_CIPHERTEXT: Final = 64 + 32 * MAX_COHORT
_REQUEST_KEYS: Final = frozenset({"fv", "k", "t", "p", "c", "u", "d", "x", "at", "sg"})
_REQUEST_REQUIRED: Final = frozenset({"fv", "k", "t", "p", "c", "u", "d", "x", "at"})
_ANSWER_KEYS: Final = frozenset({"fv", "k", "t", "p", "id", "c", "sh", "x", "b", "s", "at", "sg"})
_ANSWER_REQUIRED: Final = frozenset({"fv", "k", "t", "p", "id", "c", "sh", "x", "b", "s", "at"})


@dataclass(frozen=True, slots=True)
class UnmaskRequest:
    """The aggregator to one survivor of a closed cohort (section 16): who survived, who
    dropped, and the ciphertexts the survivors addressed to the recipient."""

    task: str
    recipient: str
    cohort: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    ciphertexts: Mapping[str, bytes]
    created_at: float
    signature: bytes | None = None

    def signing_message(self) -> bytes:
        h = hashlib.sha256()
        for name in sorted(self.ciphertexts, key=str.encode):
            raw, blob = name.encode(), self.ciphertexts[name]
            h.update(struct.pack("<H", len(raw)) + raw + struct.pack("<I", len(blob)) + blob)
        return unmask_request_message(
            task=self.task,
            recipient=self.recipient,
            cohort=self.cohort,
            survivors=self.survivors,
            dropped=self.dropped,
            body_digest=h.digest(),
        )


@dataclass(frozen=True, slots=True)
class UnmaskAnswer:
    """A survivor's answer (section 16): its Shamir x-coordinate, its share of each
    survivor's self seed (``b``) and of each survivor's seed with each dropped bank
    (``s``: survivor -> dropped -> share), 32 bytes each."""

    task: str
    participant: str
    answer_id: str
    cohort: int
    spec_hash: bytes
    x: int
    b: Mapping[str, bytes]
    s: Mapping[str, Mapping[str, bytes]]
    created_at: float
    signature: bytes | None = None

    def signing_message(self) -> bytes:
        h = hashlib.sha256(struct.pack("<Q", self.x))
        for name in sorted(self.b, key=str.encode):
            h.update(_signed_text(name) + self.b[name])
        for name in sorted(self.s, key=str.encode):
            h.update(_signed_text(name) + struct.pack("<H", len(self.s[name])))
            for other in sorted(self.s[name], key=str.encode):
                h.update(_signed_text(other) + self.s[name][other])
        return unmask_answer_message(
            task=self.task,
            participant=self.participant,
            answer_id=self.answer_id,
            cohort=self.cohort,
            spec_hash=self.spec_hash,
            body_digest=h.digest(),
        )


def peek_kind(data: bytes | Owned) -> str | None:
    """The envelope's kind (``k``) without unpacking its other values; None when the
    message is not a msgpack map with a string ``k`` (the full decoder then says why)."""
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) + 1)
        unpacker.feed(data)
        entries = unpacker.read_map_header()
        for _ in range(min(entries, 64)):
            key = unpacker.unpack()
            if key == "k":
                value = unpacker.unpack()
                return value if isinstance(value, str) else None
            unpacker.skip()
    except Exception:  # noqa: BLE001 - msgpack raises many types; the decoder reports it
        return None
    return None


def encode_unmask_request(request: UnmaskRequest, signing_key: SigningKey | None = None) -> bytes:
    """Encode an unmask request, signed with ``signing_key`` when given."""
    _check_name("task", request.task)
    _check_name("participant", request.recipient)
    _check_count("cohort", request.cohort, minimum=0)
    doc: dict[str, Any] = {
        "fv": FORMAT_VERSION,
        "k": KIND_UNMASK_REQUEST,
        "t": request.task,
        "p": request.recipient,
        "c": request.cohort,
        "u": list(request.survivors),
        "d": list(request.dropped),
        "x": {k: bytes(v) for k, v in request.ciphertexts.items()},
        "at": float(request.created_at),
    }
    if signing_key is not None:
        doc["sg"] = signing_key.sign(request.signing_message())
    return _pack(doc)


def decode_unmask_request(data: bytes, limits: DecodeLimits = UNMASK_LIMITS) -> UnmaskRequest:
    """Decode and validate an unmask request (its signature is returned, not checked)."""
    doc = _unpack(data, limits, KIND_UNMASK_REQUEST, _REQUEST_KEYS, _REQUEST_REQUIRED)
    survivors = _names(doc["u"], "u")
    dropped = _names(doc["d"], "d")
    if set(survivors) & set(dropped):
        raise DecodeError(Refusal.INVALID_FIELD, "u, d: a bank is named in both")
    ciphertexts = _byte_map(doc["x"], "x", _MAX_CIPHERTEXT)
    if sorted(ciphertexts) != sorted(survivors):
        raise DecodeError(Refusal.INVALID_FIELD, "x: not one ciphertext per survivor")
    return UnmaskRequest(
        task=_get_name(doc, "t", "task"),
        recipient=_get_name(doc, "p", "participant"),
        cohort=_get_count(doc, "c", minimum=0),
        survivors=survivors,
        dropped=dropped,
        ciphertexts=ciphertexts,
        created_at=_get_time(doc),
        signature=_get_signature(doc, limits),
    )


def encode_unmask_answer(answer: UnmaskAnswer, signing_key: SigningKey | None = None) -> bytes:
    """Encode an unmask answer, signed with ``signing_key`` when given."""
    _check_name("task", answer.task)
    _check_name("participant", answer.participant)
    if not is_update_id(answer.answer_id):
        raise EncodeError(f"invalid answer id {answer.answer_id!r}")
    _check_count("cohort", answer.cohort, minimum=0)
    _check_count("x", answer.x, minimum=1)
    shares = [*answer.b.values(), *(v for m in answer.s.values() for v in m.values())]
    if any(len(v) != _SHARE_BYTES for v in shares):
        raise EncodeError(f"a share is {_SHARE_BYTES} bytes")
    doc: dict[str, Any] = {
        "fv": FORMAT_VERSION,
        "k": KIND_UNMASK_ANSWER,
        "t": answer.task,
        "p": answer.participant,
        "id": answer.answer_id,
        "c": answer.cohort,
        "sh": bytes(answer.spec_hash),
        "x": answer.x,
        "b": {k: bytes(v) for k, v in answer.b.items()},
        "s": {k: {j: bytes(v) for j, v in m.items()} for k, m in answer.s.items()},
        "at": float(answer.created_at),
    }
    if signing_key is not None:
        doc["sg"] = signing_key.sign(answer.signing_message())
    return _pack(doc)


def decode_unmask_answer(data: bytes | Owned, limits: DecodeLimits = UNMASK_LIMITS) -> UnmaskAnswer:
    """Decode and validate an unmask answer (its signature is returned, not checked)."""
    doc = _unpack(data, limits, KIND_UNMASK_ANSWER, _ANSWER_KEYS, _ANSWER_REQUIRED)
    answer_id = doc["id"]
    if not is_update_id(answer_id):
        raise DecodeError(Refusal.INVALID_FIELD, "id: not a valid answer id")
    spec_hash = _get_digest(doc, "sh")
    s = doc["s"]
    if not isinstance(s, dict) or len(s) > MAX_COHORT:
        raise DecodeError(Refusal.INVALID_FIELD, "s: not a map of survivors")
    return UnmaskAnswer(
        task=_get_name(doc, "t", "task"),
        participant=_get_name(doc, "p", "participant"),
        answer_id=answer_id,
        cohort=_get_count(doc, "c", minimum=0),
        spec_hash=spec_hash,
        x=_get_count(doc, "x", minimum=1),
        b=_byte_map(doc["b"], "b", _SHARE_BYTES, exact=True),
        s={_name(k, "s"): _byte_map(v, "s", _SHARE_BYTES, exact=True) for k, v in s.items()},
        created_at=_get_time(doc),
        signature=_get_signature(doc, limits),
    )


def _encode_block(block: MaskedBlock) -> dict[str, Any]:
    if not math.isfinite(block.weight) or block.weight < 0:
        raise EncodeError("sa: the weight must be a finite number >= 0")
    _check_count("cohort", block.cohort, minimum=0)
    if len(block.shares) > MAX_COHORT:
        raise EncodeError(f"sa: at most {MAX_COHORT} members")
    return {
        "c": block.cohort,
        "w": float(block.weight),
        "x": {k: bytes(v) for k, v in block.shares.items()},
    }


def _decode_block(value: object, limits: DecodeLimits) -> MaskedBlock:
    if not isinstance(value, dict) or set(value) != {"c", "w", "x"}:
        raise DecodeError(Refusal.INVALID_FIELD, "sa: not a map of c, w and x")
    cohort, weight = value["c"], value["w"]
    if type(cohort) is not int or not 0 <= cohort < 2**63:
        raise DecodeError(Refusal.INVALID_FIELD, "sa.c: not a cohort number")
    if not isinstance(weight, float) or not math.isfinite(weight) or weight < 0:
        raise DecodeError(Refusal.INVALID_FIELD, "sa.w: not a finite float64 >= 0")
    return MaskedBlock(cohort, weight, _byte_map(value["x"], "sa.x", _MAX_CIPHERTEXT))


def _names(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_COHORT:
        raise DecodeError(Refusal.INVALID_FIELD, f"{key}: not an array of names")
    names = tuple(_name(v, key) for v in value)
    if list(names) != sorted(set(names)):
        raise DecodeError(Refusal.INVALID_FIELD, f"{key}: names must be sorted and distinct")
    return names


def _name(value: object, key: str) -> str:
    if not isinstance(value, str) or not is_name(value):
        raise DecodeError(Refusal.INVALID_FIELD, f"{key}: {value!r} is not a valid name")
    return value


def _byte_map(value: object, key: str, size: int, *, exact: bool = False) -> dict[str, bytes]:
    if not isinstance(value, dict) or len(value) > MAX_COHORT:
        raise DecodeError(Refusal.INVALID_FIELD, f"{key}: not a map of at most {MAX_COHORT}")
    out: dict[str, bytes] = {}
    for k, v in value.items():
        if not isinstance(v, bytes) or (len(v) != size if exact else len(v) > size):
            raise DecodeError(Refusal.INVALID_FIELD, f"{key}: entry {k!r} has the wrong size")
        out[_name(k, key)] = v
    return out


def _get_time(doc: Mapping[str, Any]) -> float:
    at = doc["at"]
    if not _is_real(at) or not math.isfinite(at):
        raise DecodeError(Refusal.INVALID_FIELD, "at: not a finite number")
    return float(at)


def _get_signature(doc: Mapping[str, Any], limits: DecodeLimits) -> bytes | None:
    signature = doc.get("sg")
    if "sg" in doc and (
        not isinstance(signature, bytes) or len(signature) > limits.max_signature_bytes
    ):
        raise DecodeError(Refusal.INVALID_FIELD, "sg: not a byte string of bounded size")
    return signature


def _signed_text(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("<H", len(raw)) + raw


# --------------------------------------------------------------------------- monitoring

_DRIFT_KEYS: Final = frozenset({"fv", "k", "t", "p", "id", "sh", "v", "n", "f", "s", "at", "sg"})
_DRIFT_REQUIRED: Final = _DRIFT_KEYS - {"sg"}
_EVAL_KEYS: Final = frozenset({"fv", "k", "t", "p", "id", "sh", "v", "vh", "n", "m", "at", "sg"})
_EVAL_REQUIRED: Final = _EVAL_KEYS - {"sg"}
#: The most features a drift summary may name.
MAX_DRIFT_FEATURES: Final = 4096
#: A drift summary or an evaluation: small documents (a few numbers per feature).
REPORT_LIMITS: Final = DecodeLimits(
    max_message_bytes=1 << 20, max_tensors=0, max_metrics=MAX_DRIFT_FEATURES
)


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    """One feature's (or the score's) drift: PSI, and a KS statistic where one exists."""

    psi: float
    ks: float | None = None


@dataclass(frozen=True, slots=True)
class DriftSummary:
    """A bank's recent rows against the task's reference (docs/drift.md): ``rows``
    recent rows, one entry per feature, and the score of the version ``version`` it
    holds on them against its own training rows. No row leaves the bank."""

    task: str
    participant: str
    summary_id: str
    spec_hash: bytes
    version: int
    rows: int
    features: Mapping[str, FeatureDrift]
    score: FeatureDrift
    created_at: float
    signature: bytes | None = None

    def body_digest(self) -> bytes:
        h = hashlib.sha256(struct.pack("<I", len(self.features)))
        for name in sorted(self.features, key=str.encode):
            h.update(_signed_text(name) + _drift_bytes(self.features[name]))
        h.update(_drift_bytes(self.score))
        return h.digest()

    def signing_message(self) -> bytes:
        return drift_message(
            task=self.task,
            participant=self.participant,
            summary_id=self.summary_id,
            version=self.version,
            spec_hash=self.spec_hash,
            rows=self.rows,
            body_digest=self.body_digest(),
        )


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A bank's metrics of version ``version`` (hash ``version_hash``) on ``rows`` of its
    own recent labelled rows (docs/drift.md). No row leaves the bank."""

    task: str
    participant: str
    evaluation_id: str
    spec_hash: bytes
    version: int
    version_hash: bytes
    rows: int
    metrics: Mapping[str, float]
    created_at: float
    signature: bytes | None = None

    def signing_message(self) -> bytes:
        return evaluation_message(
            task=self.task,
            participant=self.participant,
            evaluation_id=self.evaluation_id,
            version=self.version,
            version_hash=self.version_hash,
            spec_hash=self.spec_hash,
            rows=self.rows,
            metrics=self.metrics,
        )


def _drift_bytes(d: FeatureDrift) -> bytes:
    if d.ks is None:
        return struct.pack("<dB", d.psi, 0)
    return struct.pack("<dBd", d.psi, 1, d.ks)


def _check_drift(what: str, d: FeatureDrift) -> dict[str, float]:
    if not math.isfinite(d.psi) or d.psi < 0:
        raise EncodeError(f"{what}: psi must be a finite number >= 0")
    if d.ks is not None and not (math.isfinite(d.ks) and 0 <= d.ks <= 1):
        raise EncodeError(f"{what}: ks must be in [0, 1]")
    return {"psi": float(d.psi)} | ({} if d.ks is None else {"ks": float(d.ks)})


def _report_head(task: str, participant: str, report_id: str, version: int, rows: int) -> None:
    _check_name("task", task)
    _check_name("participant", participant)
    if not is_update_id(report_id):
        raise EncodeError(f"invalid id {report_id!r}")
    _check_count("version", version, minimum=0)
    _check_count("rows", rows, minimum=0)


def encode_drift(summary: DriftSummary, signing_key: SigningKey | None = None) -> bytes:
    """Encode a drift summary, signed with ``signing_key`` when given."""
    _report_head(
        summary.task, summary.participant, summary.summary_id, summary.version, summary.rows
    )
    if len(summary.features) > MAX_DRIFT_FEATURES:
        raise EncodeError(f"at most {MAX_DRIFT_FEATURES} features")
    doc: dict[str, Any] = {
        "fv": FORMAT_VERSION,
        "k": KIND_DRIFT,
        "t": summary.task,
        "p": summary.participant,
        "id": summary.summary_id,
        "sh": bytes(summary.spec_hash),
        "v": summary.version,
        "n": summary.rows,
        "f": {name: _check_drift(name, d) for name, d in summary.features.items()},
        "s": _check_drift("score", summary.score),
        "at": float(summary.created_at),
    }
    if signing_key is not None:
        doc["sg"] = signing_key.sign(summary.signing_message())
    return _pack(doc)


def decode_drift(data: bytes | Owned, limits: DecodeLimits = REPORT_LIMITS) -> DriftSummary:
    """Decode and validate a drift summary (its signature is returned, not checked)."""
    doc = _unpack(data, limits, KIND_DRIFT, _DRIFT_KEYS, _DRIFT_REQUIRED)
    features = doc["f"]
    if not isinstance(features, dict) or len(features) > MAX_DRIFT_FEATURES:
        raise DecodeError(Refusal.INVALID_FIELD, "f: not a map of features")
    parsed = {}
    for name, value in features.items():
        if not isinstance(name, str) or not name:
            raise DecodeError(Refusal.INVALID_FIELD, "f: a feature name is not a string")
        parsed[name] = _decode_drift(value, f"f.{name}")
    return DriftSummary(
        task=_get_name(doc, "t", "task"),
        participant=_get_name(doc, "p", "participant"),
        summary_id=_get_report_id(doc),
        spec_hash=_get_digest(doc, "sh"),
        version=_get_count(doc, "v", minimum=0),
        rows=_get_count(doc, "n", minimum=0),
        features=parsed,
        score=_decode_drift(doc["s"], "s"),
        created_at=_get_time(doc),
        signature=_get_signature(doc, limits),
    )


def encode_evaluation(evaluation: Evaluation, signing_key: SigningKey | None = None) -> bytes:
    """Encode an evaluation, signed with ``signing_key`` when given."""
    e = evaluation
    _report_head(e.task, e.participant, e.evaluation_id, e.version, e.rows)
    doc: dict[str, Any] = {
        "fv": FORMAT_VERSION,
        "k": KIND_EVALUATION,
        "t": e.task,
        "p": e.participant,
        "id": e.evaluation_id,
        "sh": bytes(e.spec_hash),
        "v": e.version,
        "vh": bytes(e.version_hash),
        "n": e.rows,
        "m": _encode_metrics(e.metrics),
        "at": float(e.created_at),
    }
    if signing_key is not None:
        doc["sg"] = signing_key.sign(e.signing_message())
    return _pack(doc)


def decode_evaluation(data: bytes | Owned, limits: DecodeLimits = REPORT_LIMITS) -> Evaluation:
    """Decode and validate an evaluation (its signature is returned, not checked)."""
    doc = _unpack(data, limits, KIND_EVALUATION, _EVAL_KEYS, _EVAL_REQUIRED)
    return Evaluation(
        task=_get_name(doc, "t", "task"),
        participant=_get_name(doc, "p", "participant"),
        evaluation_id=_get_report_id(doc),
        spec_hash=_get_digest(doc, "sh"),
        version=_get_count(doc, "v", minimum=0),
        version_hash=_get_digest(doc, "vh"),
        rows=_get_count(doc, "n", minimum=0),
        metrics=_get_metrics(doc["m"], DEFAULT_LIMITS),
        created_at=_get_time(doc),
        signature=_get_signature(doc, limits),
    )


def decode_report(data: bytes | Owned) -> DriftSummary | Evaluation:
    """A drift summary or an evaluation, by its kind (DecodeError for anything else)."""
    kind = peek_kind(data)
    if kind == KIND_DRIFT:
        return decode_drift(data)
    if kind == KIND_EVALUATION:
        return decode_evaluation(data)
    raise DecodeError(Refusal.WRONG_KIND, f"kind {kind!r} is not a report")


def _decode_drift(value: object, key: str) -> FeatureDrift:
    if not isinstance(value, dict) or "psi" not in value or not set(value) <= {"psi", "ks"}:
        raise DecodeError(Refusal.INVALID_FIELD, f"{key}: not a map of psi and ks")
    p, ks = value["psi"], value.get("ks")
    if not isinstance(p, float) or not math.isfinite(p) or p < 0:
        raise DecodeError(Refusal.INVALID_FIELD, f"{key}.psi: not a finite float64 >= 0")
    if ks is not None and (not isinstance(ks, float) or not 0 <= ks <= 1):
        raise DecodeError(Refusal.INVALID_FIELD, f"{key}.ks: not a float64 in [0, 1]")
    return FeatureDrift(p, ks)


def _get_report_id(doc: Mapping[str, Any]) -> str:
    value = doc["id"]
    if not is_update_id(value):
        raise DecodeError(Refusal.INVALID_FIELD, "id: not a valid id")
    return str(value)
