"""A second implementation of docs/wire-format.md, checked against fedq's.

Everything above the tests is written from the document alone, with msgpack,
zstandard, hashlib and struct (never fedq's encoders, never common.codecs); torch only
compares values. If the code and the document drift apart, these tests fail.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack
import pytest
import torch
import zstandard

from common.errors import DecodeError
from common.hashing import LineageEntry, lineage_bytes, version_hash
from common.spec import CompressionSpec
from common.wire import (
    EncodedTensors,
    ModelEnvelope,
    UpdateEnvelope,
    decode_model,
    decode_update,
    encode_model,
)
from common.wire import encode_update as fedq_encode_update
from participant.compression import Compressor

DOC: Final = Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"

# ----------------------------------------------------------------- from the document

TENSORS_DOMAIN: Final = b"fedq-tensors-v1\x00"
VERSION_DOMAIN: Final = b"fedq-version-v1\x00"
MAX_ZSTD_WINDOW: Final = 1 << 27

#: wire dtype -> (element size in bytes, struct code of one little-endian element)
DTYPES: Final[dict[str, tuple[int, str]]] = {
    "f16": (2, "e"),
    "bf16": (2, "H"),  # the upper 16 bits of a float32, handled below
    "f32": (4, "f"),
    "f64": (8, "d"),
    "i8": (1, "b"),
    "u8": (1, "B"),
    "i16": (2, "h"),
    "i32": (4, "i"),
    "i64": (8, "q"),
    "bool": (1, "B"),
}
FLOATS: Final = frozenset({"f16", "bf16", "f32", "f64"})
UPDATE_KEYS: Final = frozenset(
    {"fv", "k", "t", "p", "id", "bv", "n", "m", "c", "ts", "h", "at", "sg"}
)
UPDATE_REQUIRED: Final = frozenset({"fv", "k", "t", "p", "id", "bv", "n", "c", "ts", "h"})
MODEL_KEYS: Final = frozenset({"fv", "k", "t", "v", "vh", "c", "ts", "h"})
MODEL_REQUIRED: Final = frozenset({"fv", "k", "t", "v", "c", "ts", "h"})

Value = float | int | bool


class Refused(Exception):
    """The independent decoder refuses the bytes, with the document's reason code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Tensor:
    """One tensor entry with its raw bytes (row-major, little-endian)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    raw: bytes


@dataclass(frozen=True)
class Envelope:
    """Either kind of envelope, decoded: the fields as they were on the wire."""

    fields: dict[str, Any]
    tensors: list[Tensor]
    content_hash: bytes


def to_raw(dtype: str, values: Sequence[Value]) -> bytes:
    """Raw little-endian bytes of ``values`` as wire ``dtype``."""
    if dtype == "bool":
        return bytes(1 if v else 0 for v in values)
    if dtype == "bf16":
        # The upper 16 bits of the float32 are its bytes 2 and 3 in little-endian order.
        return b"".join(struct.pack("<f", float(v))[2:4] for v in values)
    return struct.pack(f"<{len(values)}{DTYPES[dtype][1]}", *values)


def from_raw(dtype: str, raw: bytes) -> list[Value]:
    """The values held in raw little-endian bytes of wire ``dtype``."""
    size, code = DTYPES[dtype]
    if len(raw) % size:
        raise Refused("size_mismatch")
    count = len(raw) // size
    if dtype == "bool":
        if any(b > 1 for b in raw):
            raise Refused("invalid_tensor")
        return [b == 1 for b in raw]
    if dtype == "bf16":
        halves = struct.unpack(f"<{count}H", raw)
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]
    return list(struct.unpack(f"<{count}{code}", raw))


def nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes the raw form of a tensor of ``dtype`` and ``shape`` takes."""
    return math.prod(shape) * DTYPES[dtype][0]


def content_hash(tensors: Sequence[Tensor]) -> bytes:
    """Section 8: SHA-256 over the domain and each tensor's name, dtype, shape, raw bytes."""
    h = hashlib.sha256(TENSORS_DOMAIN)
    for t in tensors:
        name, dtype = t.name.encode("utf-8"), t.dtype.encode("ascii")
        h.update(struct.pack("<I", len(name)) + name)
        h.update(struct.pack("<B", len(dtype)) + dtype)
        h.update(struct.pack("<B", len(t.shape)))
        for d in t.shape:
            h.update(struct.pack("<Q", d))
        h.update(struct.pack("<Q", len(t.raw)) + t.raw)
    return h.digest()


def encode_payload(raw: bytes, codec: str, *, content_size: bool = True) -> bytes:
    """Section 6: ``raw`` as is, or one zstd frame."""
    if codec == "raw":
        return raw
    compressor = zstandard.ZstdCompressor(write_content_size=content_size)
    frame: bytes = compressor.compress(raw)
    return frame


def decode_payload(payload: bytes, codec: str, expected: int) -> bytes:
    """Section 6, strictly: exactly ``expected`` bytes from one frame, nothing after it."""
    if codec == "raw":
        if len(payload) != expected:
            raise Refused("size_mismatch")
        return payload
    if codec != "zstd":
        raise Refused("unknown_codec")
    try:
        declared = int(zstandard.frame_content_size(payload))
    except zstandard.ZstdError as e:
        raise Refused("codec_error") from e
    if declared not in (-1, expected):
        raise Refused("size_mismatch")
    dobj = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).decompressobj()
    try:
        out = bytes(dobj.decompress(payload))
    except zstandard.ZstdError as e:
        raise Refused("codec_error") from e
    if not dobj.eof or dobj.unused_data:
        raise Refused("codec_error")
    if len(out) != expected:
        raise Refused("size_mismatch")
    return out


def encode_envelope(
    head: dict[str, Any],
    tensors: Sequence[Tensor],
    codec: str,
    tail: dict[str, Any] | None = None,
    *,
    content_size: bool = True,
) -> bytes:
    """An envelope: ``head`` fields, then ``c``, ``ts``, ``h``, then ``tail`` fields."""
    entries = [
        {
            "n": t.name,
            "d": t.dtype,
            "s": list(t.shape),
            "b": encode_payload(t.raw, codec, content_size=content_size),
        }
        for t in tensors
    ]
    doc = {**head, "c": codec, "ts": entries, "h": content_hash(tensors), **(tail or {})}
    packed: bytes = msgpack.packb(doc, use_bin_type=True)
    return packed


def encode_update(
    *,
    task: str,
    participant: str,
    update_id: str,
    base_version: int,
    num_samples: int,
    tensors: Sequence[Tensor],
    codec: str,
    metrics: dict[str, float] | None = None,
    created_at: float | None = None,
    signature: bytes | None = None,
    content_size: bool = True,
) -> bytes:
    """Section 3, keys in the document's order."""
    head: dict[str, Any] = {
        "fv": 1,
        "k": "u",
        "t": task,
        "p": participant,
        "id": update_id,
        "bv": base_version,
        "n": num_samples,
        "m": {k: float(v) for k, v in (metrics or {}).items()},
    }
    tail: dict[str, Any] = {}
    if created_at is not None:
        tail["at"] = float(created_at)
    if signature is not None:
        tail["sg"] = signature
    return encode_envelope(head, tensors, codec, tail, content_size=content_size)


# ----------------------------------------------------------------- lossy codecs (6.1)

LOSSY_BASES: Final = ("f16", "bf16", "int8", "int8c", "topk", "topk8")
TOPK_BASES: Final = ("topk", "topk8")
LOSSY: Final = tuple(b + z for z in ("", "+zstd") for b in LOSSY_BASES)


def split_codec(codec: str) -> tuple[str, bool]:
    """A lossy codec's base name and whether its payload is one zstd frame."""
    if codec not in LOSSY:
        raise Refused("unknown_codec")
    base, _, zstd = codec.partition("+")
    return base, zstd == "zstd"


def to_f32(x: float) -> float:
    """``x`` rounded once to binary32 (round to nearest, ties to even)."""
    value: float = struct.unpack("<f", struct.pack("<f", x))[0]
    return value


def int8c_rows(base: str, shape: Sequence[int]) -> int:
    n = math.prod(shape)
    return shape[0] if base == "int8c" and len(shape) >= 2 and n > 0 else 1


def payload_size(base: str, shape: Sequence[int]) -> int | None:
    """The exact size of ``P``, or None for topk and topk8."""
    n = math.prod(shape)
    if base in ("f16", "bf16"):
        return 2 * n
    if base in ("int8", "int8c"):
        return 4 * int8c_rows(base, shape) + n
    return None


def read_varints(data: bytes, count: int) -> list[int]:
    """Exactly ``count`` shortest-form LEB128 varints of at most 5 bytes, < 2^32."""
    out: list[int] = []
    value = shift = used = 0
    for byte in data:
        used += 1
        if used > 5:
            raise Refused("codec_error")
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            if (used > 1 and byte == 0) or value >= 2**32:
                raise Refused("codec_error")
            out.append(value)
            value = shift = used = 0
    if used or len(out) != count:
        raise Refused("codec_error")
    return out


def write_varints(values: Sequence[int]) -> bytes:
    out = bytearray()
    for v in values:
        while v >= 0x80:
            out.append(0x80 | (v & 0x7F))
            v >>= 7
        out.append(v)
    return bytes(out)


def zstd_content(payload: bytes, bound: int) -> bytes:
    """Section 6.1: one zstd frame of at most ``bound`` bytes (topk+zstd, topk8+zstd)."""
    try:
        declared = int(zstandard.frame_content_size(payload))
    except zstandard.ZstdError as e:
        raise Refused("codec_error") from e
    if declared > bound:
        raise Refused("size_mismatch")
    dobj = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).decompressobj()
    try:
        out = bytes(dobj.decompress(payload))
    except zstandard.ZstdError as e:
        raise Refused("codec_error") from e
    if not dobj.eof or dobj.unused_data:
        raise Refused("codec_error")
    if len(out) > bound or (declared != -1 and len(out) != declared):
        raise Refused("size_mismatch")
    return out


def decode_lossy(payload: bytes, codec: str, dtype: str, shape: Sequence[int]) -> bytes:
    """Section 6.1: the decoded tensor's raw bytes."""
    base, zstd = split_codec(codec)
    if dtype != "f32":  # carried exactly by the lossless stage
        return decode_payload(payload, "zstd" if zstd else "raw", nbytes(dtype, shape))
    n, size = math.prod(shape), payload_size(base, shape)
    if not zstd:
        if size is not None and len(payload) != size:
            raise Refused("size_mismatch")
        p = payload
    elif size is None:
        p = zstd_content(payload, 4 + 5 * n if base == "topk" else 8 + 2 * n)
    else:
        p = decode_payload(payload, "zstd", size)
        if base in ("f16", "bf16"):  # the byte planes back in place
            p = bytes(b for pair in zip(p[:n], p[n:], strict=True) for b in pair)
    values = decode_values(base, p, shape)
    return struct.pack(f"<{n}f", *values)


def decode_values(base: str, p: bytes, shape: Sequence[int]) -> list[float]:
    n = math.prod(shape)
    if base == "f16":
        return list(struct.unpack(f"<{n}e", p))
    if base == "bf16":
        halves = struct.unpack(f"<{n}H", p)
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]
    if base in ("int8", "int8c"):
        r = int8c_rows(base, shape)
        scales = struct.unpack(f"<{r}f", p[: 4 * r])
        if any(not math.isfinite(s) or math.copysign(1.0, s) < 0 for s in scales):
            raise Refused("codec_error")
        q = struct.unpack(f"<{n}b", p[4 * r :])
        if -128 in q:
            raise Refused("codec_error")
        per_row = n // r if n else 1
        return [to_f32(q[i] * scales[i // per_row]) for i in range(n)]
    if base == "topk8":
        return decode_topk8(p, n)
    # topk
    if len(p) < 4:
        raise Refused("size_mismatch")
    (k,) = struct.unpack("<I", p[:4])
    if k > n:
        raise Refused("codec_error")
    if len(p) < 4 + 4 * k:
        raise Refused("size_mismatch")
    kept = struct.unpack(f"<{k}f", p[4 : 4 + 4 * k])
    return scatter(kept, p[4 + 4 * k :], n)


def scatter(kept: Sequence[float], varints: bytes, n: int) -> list[float]:
    """``kept[j]`` at index ``x[j]``: ``x[0] = g[0]``, ``x[j] = x[j-1] + 1 + g[j]``; 0
    (+0.0) everywhere else."""
    out = [0.0] * n
    index = -1
    for value, gap in zip(kept, read_varints(varints, len(kept)), strict=True):
        index += 1 + gap
        if index >= n:
            raise Refused("codec_error")
        out[index] = value
    return out


def decode_topk8(p: bytes, n: int) -> list[float]:
    """``k`` (u32), ``S`` (binary32), ``k`` values ``q`` (i8), ``k`` varints; the
    refusals in the document's order."""
    if len(p) < 8:
        raise Refused("size_mismatch")
    k, scale = struct.unpack("<If", p[:8])
    if k > n:
        raise Refused("codec_error")
    if len(p) < 8 + k:
        raise Refused("size_mismatch")
    if not math.isfinite(scale) or math.copysign(1.0, scale) < 0:
        raise Refused("codec_error")
    q = struct.unpack(f"<{k}b", p[8 : 8 + k])
    if -128 in q:
        raise Refused("codec_error")
    return scatter([to_f32(level * scale) for level in q], p[8 + k :], n)


def encode_lossy(raw: bytes, base: str, shape: Sequence[int], fraction: float = 0.5) -> bytes:
    """The document's table of what fedq's encoder chooses, for an ``f32`` tensor."""
    n = math.prod(shape)
    x = list(struct.unpack(f"<{n}f", raw))
    if base == "f16":
        return struct.pack(f"<{n}e", *(min(max(v, -65504.0), 65504.0) for v in x))
    if base == "bf16":
        out = []
        for (u,) in struct.iter_unpack("<I", raw):
            h = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            out.append(((h & 0x8000) | 0x7F7F) if (h & 0x7FFF) == 0x7F80 else h)
        return struct.pack(f"<{n}H", *out)
    if base in ("int8", "int8c"):
        r = int8c_rows(base, shape)
        per_row = n // r if n else 0
        scales, q = [], []
        for row in range(r):
            values = x[row * per_row : (row + 1) * per_row]
            s = to_f32(max((abs(v) for v in values), default=0.0) / 127)
            scales.append(s)
            q += [0 if s == 0 else max(-127, min(127, round(to_f32(v / s)))) for v in values]
        return struct.pack(f"<{r}f", *scales) + struct.pack(f"<{n}b", *q)
    k = min(n, max(1, round(fraction * n))) if n else 0
    index = sorted(sorted(range(n), key=lambda i: (-abs(x[i]), i))[:k])
    gaps = write_varints([i - prev - 1 for prev, i in zip([-1, *index], index, strict=False)])
    kept = [x[i] for i in index]
    if base == "topk":
        return struct.pack(f"<I{k}f", k, *kept) + gaps
    # topk8: int8's rule over the kept values
    s = to_f32(max((abs(v) for v in kept), default=0.0) / 127)
    q = [0 if s == 0 else max(-127, min(127, round(to_f32(v / s)))) for v in kept]
    return struct.pack("<If", k, s) + struct.pack(f"<{k}b", *q) + gaps


def encode_lossy_payload(raw: bytes, codec: str, dtype: str, shape: Sequence[int]) -> bytes:
    """``b`` of one tensor under a lossy codec (zstd frames by this module's zstd)."""
    base, zstd = split_codec(codec)
    if dtype != "f32":
        return encode_payload(raw, "zstd" if zstd else "raw")
    p = encode_lossy(raw, base, shape)
    if zstd and base in ("f16", "bf16"):
        p = p[0::2] + p[1::2]
    return encode_payload(p, "zstd") if zstd else p


def decode_tensor(entry: object, codec: str) -> Tensor:
    """Section 5: one tensor entry, checked field by field, its payload decoded."""
    if not isinstance(entry, dict) or set(entry) != {"n", "d", "s", "b"}:
        raise Refused("invalid_tensor")
    name, dtype, shape, payload = entry["n"], entry["d"], entry["s"], entry["b"]
    if not isinstance(name, str) or not 0 < len(name) <= 256:
        raise Refused("invalid_tensor")
    if dtype not in DTYPES:
        raise Refused("bad_dtype")
    if not isinstance(shape, list) or len(shape) > 8:
        raise Refused("bad_shape")
    if any(type(d) is not int or not 0 <= d < 2**32 for d in shape):
        raise Refused("bad_shape")
    if not isinstance(payload, bytes):
        raise Refused("invalid_tensor")
    if codec in LOSSY:
        return Tensor(name, dtype, tuple(shape), decode_lossy(payload, codec, dtype, shape))
    raw = decode_payload(payload, codec, nbytes(dtype, shape))
    return Tensor(name, dtype, tuple(shape), raw)


def check_header(doc: object, kind: str) -> None:
    """Sections 3 and 4: a map of the right format version, kind and keys."""
    if not isinstance(doc, dict):
        raise Refused("malformed")
    fv = doc.get("fv")
    if type(fv) is not int or fv != 1:
        raise Refused("unsupported_version")
    if doc.get("k") != kind:
        raise Refused("wrong_kind")
    allowed, required = (
        (UPDATE_KEYS, UPDATE_REQUIRED) if kind == "u" else (MODEL_KEYS, MODEL_REQUIRED)
    )
    if set(doc) - allowed:
        raise Refused("unknown_field")
    if required - set(doc):
        raise Refused("missing_field")


def decode(data: bytes, kind: str) -> Envelope:
    """Sections 2-6 and 8: decode and check an envelope of ``kind`` ("u" or "m")."""
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:
        raise Refused("malformed") from e
    check_header(doc, kind)
    codec, claimed, entries = doc["c"], doc["h"], doc["ts"]
    if not isinstance(codec, str) or not isinstance(claimed, bytes) or len(claimed) != 32:
        raise Refused("invalid_field")
    if codec not in ("raw", "zstd") and (kind == "m" or codec not in LOSSY):
        raise Refused("unknown_codec")  # lossy codecs: updates only (section 6.1)
    if not isinstance(entries, list):
        raise Refused("invalid_field")
    tensors = [decode_tensor(entry, codec) for entry in entries]
    digest = content_hash(tensors)
    if digest != claimed:
        raise Refused("hash_mismatch")
    for t in tensors:
        values = from_raw(t.dtype, t.raw)
        if t.dtype in FLOATS and not all(math.isfinite(v) for v in values):
            raise Refused("non_finite")
    fields = {k: v for k, v in doc.items() if k not in ("ts", "h")}
    return Envelope(fields=fields, tensors=tensors, content_hash=digest)


def pack_int(x: int) -> bytes:
    """Section 9: an integer in its smallest msgpack form (unsigned forms when x >= 0)."""
    if x >= 0:
        if x <= 0x7F:
            return bytes([x])
        for code, fmt, top in ((0xCC, ">B", 0xFF), (0xCD, ">H", 0xFFFF), (0xCE, ">I", 2**32 - 1)):
            if x <= top:
                return bytes([code]) + struct.pack(fmt, x)
        return b"\xcf" + struct.pack(">Q", x)
    if x >= -32:
        return struct.pack(">b", x)
    for code, fmt, low in ((0xD0, ">b", -(2**7)), (0xD1, ">h", -(2**15)), (0xD2, ">i", -(2**31))):
        if x >= low:
            return bytes([code]) + struct.pack(fmt, x)
    return b"\xd3" + struct.pack(">q", x)


def pack_len(n: int, fix: int, fix_max: int, codes: tuple[int, int, int]) -> bytes:
    """A str, bin or array header: fix form when it fits, then 8/16/32-bit lengths."""
    if fix and n <= fix_max:
        return bytes([fix | n])
    c8, c16, c32 = codes
    if c8 and n <= 0xFF:
        return bytes([c8, n])
    if n <= 0xFFFF:
        return bytes([c16]) + struct.pack(">H", n)
    return bytes([c32]) + struct.pack(">I", n)


def pack_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return pack_len(len(b), 0xA0, 31, (0xD9, 0xDA, 0xDB)) + b


def pack_bin(b: bytes) -> bytes:
    return pack_len(len(b), 0, 0, (0xC4, 0xC5, 0xC6)) + b


def pack_array_header(n: int) -> bytes:
    return pack_len(n, 0x90, 15, (0, 0xDC, 0xDD))


@dataclass(frozen=True)
class Input:
    """One lineage entry, as section 9 lists its fields."""

    update_id: str
    participant: str
    base_version: int
    staleness: int
    weight: float
    content_hash: bytes


def lineage_msgpack(lineage: Sequence[Input]) -> bytes:
    """Section 9: canonical msgpack of the lineage, written byte by byte."""
    out = pack_array_header(len(lineage))
    for e in lineage:
        out += pack_array_header(6)
        out += pack_str(e.update_id) + pack_str(e.participant)
        out += pack_int(e.base_version) + pack_int(e.staleness)
        out += b"\xcb" + struct.pack(">d", float(e.weight))
        out += pack_bin(e.content_hash)
    return out


def chained_hash(task: str, version: int, parent: bytes, params: bytes, lineage: bytes) -> bytes:
    """Section 9: the version hash."""
    task_b = task.encode("utf-8")
    preimage = (
        VERSION_DOMAIN
        + struct.pack("<I", len(task_b))
        + task_b
        + struct.pack("<Q", version)
        + parent
        + params
        + struct.pack("<Q", len(lineage))
        + lineage
    )
    return hashlib.sha256(preimage).digest()


# ----------------------------------------------------------------- values to compare

TORCH_DTYPES: Final[dict[str, torch.dtype]] = {
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f32": torch.float32,
    "f64": torch.float64,
    "i8": torch.int8,
    "u8": torch.uint8,
    "i16": torch.int16,
    "i32": torch.int32,
    "i64": torch.int64,
    "bool": torch.bool,
}

#: name -> (wire dtype, shape, values); every dtype, a scalar, an empty tensor, limits.
SAMPLES: Final[dict[str, tuple[str, tuple[int, ...], list[Value]]]] = {
    "net.0.weight": ("f32", (2, 3), [0.5, -1.25, 3.0, 1e-3, -0.0, 7.5]),
    "half": ("f16", (3,), [0.5, -2.0, 65504.0]),
    "brain": ("bf16", (2, 2), [1.0, -2.5, 0.15625, 256.0]),
    "double": ("f64", (2,), [math.pi, -1e300]),
    "i8": ("i8", (2,), [-128, 127]),
    "u8": ("u8", (2,), [0, 255]),
    "i16": ("i16", (2,), [-(2**15), 2**15 - 1]),
    "i32": ("i32", (2,), [-(2**31), 2**31 - 1]),
    "i64": ("i64", (2,), [-(2**63), 2**63 - 1]),
    "mask": ("bool", (2, 2), [True, False, False, True]),
    "scalar": ("f32", (), [42.0]),
    "empty": ("f32", (0, 3), []),
    "ünï-名": ("f32", (1,), [1.0]),
}


def sample_tensors() -> list[Tensor]:
    return [Tensor(n, d, s, to_raw(d, v)) for n, (d, s, v) in SAMPLES.items()]


def sample_torch() -> dict[str, torch.Tensor]:
    return {
        n: torch.tensor(v, dtype=TORCH_DTYPES[d]).reshape(s) for n, (d, s, v) in SAMPLES.items()
    }


def flat_values(t: torch.Tensor) -> list[Value]:
    values: list[Value] = t.reshape(-1).tolist()
    return values


def raw_of(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def assert_same_values(mine: Sequence[Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert [t.name for t in mine] == list(theirs)
    for t in mine:
        other = theirs[t.name]
        assert other.dtype == TORCH_DTYPES[t.dtype], t.name
        assert tuple(other.shape) == t.shape, t.name
        assert from_raw(t.dtype, t.raw) == flat_values(other), t.name
        assert t.raw == raw_of(other), t.name  # bit for bit, -0.0 included


# ----------------------------------------------------------------- the document's example

EXAMPLE_HEX: Final = (
    "8ba2667601a16ba175a174a6637265646974a170a662616e6b2d61a26964a6752d30303031a2627603"
    "a16e64a16d80a163a3726177a274739184a16ea177a164a3663332a1739102a162c4080000803f000000c0"
    "a168c420a6b6b38708f6291193d0661a60e7dc46285995a5fb53c7283678ebb11182af20"
)
EXAMPLE_HASH: Final = "a6b6b38708f6291193d0661a60e7dc46285995a5fb53c7283678ebb11182af20"
EXAMPLE_LINEAGE_HEX: Final = (
    "9196a6752d30303031a662616e6b2d610300cb4059000000000000c420" + EXAMPLE_HASH
)
EXAMPLE_V4_HASH: Final = "0dac4b3f592b9f2c91cb0a71d3e37c544953a6337cb775158e2f46e9b30579d1"
EXAMPLE_V0_HASH: Final = "11e607f17699592b0fb3edaf47407cb8940fa5bb59964d84ab7157ccac7b836a"

EXAMPLE_FIELDS: Final[dict[str, Any]] = {
    "task": "credit",
    "participant": "bank-a",
    "update_id": "u-0001",
    "base_version": 3,
    "num_samples": 100,
}


def _doc_hex_blocks() -> str:
    """The document's text with whitespace removed, to find hex dumps in it."""
    return "".join(DOC.read_text(encoding="utf-8").split())


# ----------------------------------------------------------------- tests


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_independent_encoder_decodes_with_fedq(codec: str) -> None:
    tensors = sample_tensors()
    data = encode_update(
        task="credit",
        participant="bank-b",
        update_id="01HX:abc.def-1",
        base_version=2**40,
        num_samples=12_345,
        tensors=tensors,
        codec=codec,
        metrics={"loss": 0.25, "auc": 0.75},
        created_at=1_700_000_000.5,
        signature=b"\x01" * 64,
    )
    env = decode_update(data)
    assert (env.task, env.participant, env.update_id) == ("credit", "bank-b", "01HX:abc.def-1")
    assert (env.base_version, env.num_samples, env.codec) == (2**40, 12_345, codec)
    assert env.metrics == {"loss": 0.25, "auc": 0.75}
    assert env.created_at == 1_700_000_000.5
    assert env.signature == b"\x01" * 64
    assert env.content_hash == content_hash(tensors)
    assert_same_values(tensors, env.tensors)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_fedq_update_decodes_with_independent_decoder(codec: str) -> None:
    params = sample_torch()
    data, digest = fedq_encode_update(
        UpdateEnvelope(
            task="fraud",
            participant="bank-c",
            update_id="u-2",
            base_version=7,
            num_samples=300,
            tensors=params,
            metrics={"loss": 0.5},
            codec=codec,
            created_at=12.25,
        )
    )
    env = decode(data, "u")
    assert env.fields == {
        "fv": 1,
        "k": "u",
        "t": "fraud",
        "p": "bank-c",
        "id": "u-2",
        "bv": 7,
        "n": 300,
        "m": {"loss": 0.5},
        "c": codec,
        "at": 12.25,
    }
    assert env.content_hash == digest
    assert_same_values(env.tensors, params)


@pytest.mark.parametrize(("codec", "vh"), [("raw", bytes(range(32))), ("zstd", b"")])
def test_fedq_model_decodes_with_independent_decoder(codec: str, vh: bytes) -> None:
    params = sample_torch()
    data, digest = encode_model(
        ModelEnvelope(task="credit", version=2**33, tensors=params, version_hash=vh, codec=codec)
    )
    env = decode(data, "m")
    assert env.fields == {"fv": 1, "k": "m", "t": "credit", "v": 2**33, "vh": vh, "c": codec}
    assert env.content_hash == digest
    assert_same_values(env.tensors, params)
    # And the other way: a model envelope from the independent encoder.
    tensors = sample_tensors()
    head = {"fv": 1, "k": "m", "t": "credit", "v": 5, "vh": vh}
    model = decode_model(encode_envelope(head, tensors, codec))
    assert (model.version, model.version_hash, model.content_hash) == (5, vh, content_hash(tensors))
    assert_same_values(tensors, model.tensors)


def test_documented_example_decodes_to_its_stated_values() -> None:
    data = bytes.fromhex(EXAMPLE_HEX)
    assert len(data) == 120
    assert EXAMPLE_HEX in _doc_hex_blocks()
    env = decode_update(data)
    assert (env.task, env.participant, env.update_id) == ("credit", "bank-a", "u-0001")
    assert (env.base_version, env.num_samples, env.codec) == (3, 100, "raw")
    assert (env.metrics, env.created_at, env.signature) == ({}, None, None)
    assert list(env.tensors) == ["w"]
    w = env.tensors["w"]
    assert w.dtype == torch.float32
    assert w.shape == (2,)
    assert w.tolist() == [1.0, -2.0]
    assert env.content_hash.hex() == EXAMPLE_HASH

    mine = decode(data, "u")
    assert mine.tensors == [Tensor("w", "f32", (2,), to_raw("f32", [1.0, -2.0]))]
    assert mine.content_hash.hex() == EXAMPLE_HASH
    # Both encoders write the document's key order, so both reproduce the bytes exactly.
    w_in = Tensor("w", "f32", (2,), to_raw("f32", [1.0, -2.0]))
    assert encode_update(**EXAMPLE_FIELDS, tensors=[w_in], codec="raw") == data
    w_t = torch.tensor([1.0, -2.0], dtype=torch.float32)
    fedq = fedq_encode_update(
        UpdateEnvelope(**EXAMPLE_FIELDS, tensors={"w": w_t}, metrics={}, codec="raw")
    )
    assert fedq == (data, bytes.fromhex(EXAMPLE_HASH))


def test_documented_version_hash_vectors() -> None:
    h = bytes.fromhex(EXAMPLE_HASH)
    entry = Input("u-0001", "bank-a", 3, 0, 100.0, h)
    lineage = lineage_msgpack([entry])
    assert lineage.hex() == EXAMPLE_LINEAGE_HEX
    assert lineage == lineage_bytes([LineageEntry("u-0001", "bank-a", 3, 0, 100.0, h)])
    v4 = chained_hash("credit", 4, b"\x11" * 32, h, lineage)
    v0 = chained_hash("credit", 0, bytes(32), h, lineage_msgpack([]))
    assert lineage_msgpack([]) == b"\x90"
    assert (v4.hex(), v0.hex()) == (EXAMPLE_V4_HASH, EXAMPLE_V0_HASH)
    doc = _doc_hex_blocks()
    for vector in (EXAMPLE_V4_HASH, EXAMPLE_V0_HASH, EXAMPLE_HASH):
        assert vector in doc


def test_independent_version_hash_matches_fedq() -> None:
    h1, h2, h3 = (hashlib.sha256(bytes([i])).digest() for i in range(3))
    inputs = [
        Input("u-0001", "bank-a", 5, 0, 0.1, h1),
        Input("01HXAMPLE:ulid.with-dots-longer-than-31-bytes", "bank-b", 200, 300, 1 / 3, h2),
        Input("u" * 128, "p" * 64, 2**33, 70_000, 2.0, h3),
    ]
    entries = [
        LineageEntry(
            e.update_id, e.participant, e.base_version, e.staleness, e.weight, e.content_hash
        )
        for e in inputs
    ]
    mine = lineage_msgpack(inputs)
    assert mine == lineage_bytes(entries)
    # staleness 0, 300 and 70000 as the document writes them
    assert (
        b"\x00\xcb" in mine and b"\xcd\x01\x2c\xcb" in mine and b"\xce\x00\x01\x11\x70\xcb" in mine
    )
    parent, params = hashlib.sha256(b"parent").digest(), hashlib.sha256(b"params").digest()
    expected = version_hash(
        task="credit", version=3, parent_hash=parent, param_hash=params, lineage=mine
    )
    assert chained_hash("credit", 3, parent, params, mine) == expected


@pytest.mark.parametrize(
    "x",
    [
        *(0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1),
        *(-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)),
    ],
)
def test_documented_int_forms_are_msgpack_pythons(x: int) -> None:
    assert pack_int(x) == msgpack.packb(x)


@pytest.mark.parametrize("length", [0, 31, 32, 255, 256, 65535, 65536])
def test_documented_str_bin_array_forms_are_msgpack_pythons(length: int) -> None:
    assert pack_str("x" * length) == msgpack.packb("x" * length, use_bin_type=True)
    assert pack_bin(b"x" * length) == msgpack.packb(b"x" * length, use_bin_type=True)
    assert pack_array_header(length) == msgpack.packb([0] * length)[: -length or None]


def test_zstd_frames_without_content_size_decode_with_fedq() -> None:
    tensors = sample_tensors()
    data = encode_update(**EXAMPLE_FIELDS, tensors=tensors, codec="zstd", content_size=False)
    payloads = [e["b"] for e in msgpack.unpackb(data)["ts"]]
    assert all(zstandard.frame_content_size(p) == -1 for p in payloads)
    env = decode_update(data)
    assert env.content_hash == content_hash(tensors)
    assert_same_values(tensors, env.tensors)


def _with_payload(raw: bytes, payload: bytes) -> bytes:
    """The example update with tensor ``w`` (f32[2], ``raw``) carried as ``payload``."""
    t = Tensor("w", "f32", (2,), raw)
    doc = msgpack.unpackb(encode_update(**EXAMPLE_FIELDS, tensors=[t], codec="zstd"))
    doc["ts"][0]["b"] = payload
    packed: bytes = msgpack.packb(doc, use_bin_type=True)
    return packed


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (encode_payload(b"\x00" * 4, "zstd"), "size_mismatch"),  # declares 4, needs 8
        (encode_payload(b"\x00" * 8, "zstd") * 2, "codec_error"),  # a second frame
        (encode_payload(b"\x00" * 12, "zstd", content_size=False), "size_mismatch"),
        (encode_payload(b"\x00" * 8, "zstd") + b"\x00", "codec_error"),  # trailing junk
        (b"", "codec_error"),
        (b"not zstd", "codec_error"),
    ],
)
def test_documented_zstd_refusals(payload: bytes, reason: str) -> None:
    data = _with_payload(b"\x00" * 8, payload)
    with pytest.raises(DecodeError) as info:
        decode_update(data)
    assert info.value.reason == reason
    with pytest.raises(Refused):
        decode(data, "u")


# ----------------------------------------------------------------- lossy codecs (section 6.1)


def _codec_vectors() -> dict[str, str]:
    found = re.findall(
        r"^```codec-vector\n(.*?)^```$", DOC.read_text(encoding="utf-8"), re.M | re.S
    )
    assert len(found) == 1, "docs/wire-format.md needs exactly one codec-vector block"
    lines = found[0].strip().splitlines()
    return {label: value for label, _, value in (line.partition(": ") for line in lines)}


CODEC_VECTORS: Final = _codec_vectors()
W_VALUES: Final = [0.5, -1.25, 3.0, 0.001, -0.0, 7.5]


def _fedq_encoded(
    tensors: dict[str, torch.Tensor], codec: str, *, fraction: float = 0.5, stochastic: bool = False
) -> EncodedTensors:
    """fedq's encoding, through the participant's own path (no residual)."""
    base, zstd = split_codec(codec)
    spec = CompressionSpec(
        codec=base,
        lossless="zstd" if zstd else None,
        topk_fraction=fraction if base in TOPK_BASES else None,
        stochastic_rounding=stochastic,
        error_feedback=False,
    )
    encoded, residual = Compressor(spec).compress(tensors, seed=7)
    assert residual == {}
    return encoded


def _v_tensor() -> torch.Tensor:
    v = torch.zeros(300)
    v[0], v[200], v[299] = 1.0, -2.0, 0.5
    return v


@pytest.mark.parametrize("base", LOSSY_BASES)
def test_documented_codec_vectors(base: str) -> None:
    w_raw = to_raw("f32", W_VALUES)
    assert content_hash([Tensor("w", "f32", (2, 3), w_raw)]).hex() == CODEC_VECTORS["w raw hash"]
    payload = bytes.fromhex(CODEC_VECTORS[f"w {base} payload"])
    # This module, from the document alone: the encoder's table, then the decoding.
    assert encode_lossy(w_raw, base, (2, 3)) == payload
    decoded = decode_lossy(payload, base, "f32", (2, 3))
    expected = [float(x) for x in CODEC_VECTORS[f"w {base} decoded"].split()]
    assert from_raw("f32", decoded) == expected
    assert decoded == to_raw("f32", expected)  # -0.0 included
    digest = content_hash([Tensor("w", "f32", (2, 3), decoded)])
    assert digest.hex() == CODEC_VECTORS[f"w {base} hash"]
    # fedq's encoder writes the same bytes and hash.
    w = torch.tensor(W_VALUES, dtype=torch.float32).reshape(2, 3)
    encoded = _fedq_encoded({"w": w}, base)
    assert encoded.entries[0]["b"] == payload
    assert encoded.digest == digest


def test_documented_topk_vector_with_a_two_byte_varint() -> None:
    v = _v_tensor()
    payload = bytes.fromhex(CODEC_VECTORS["v topk payload"])
    assert payload.endswith(bytes.fromhex("00c70162"))  # gaps 0, 199, 98
    assert encode_lossy(raw_of(v), "topk", (300,), fraction=0.01) == payload
    decoded = decode_lossy(payload, "topk", "f32", (300,))
    assert decoded == raw_of(v)
    assert content_hash([Tensor("v", "f32", (300,), decoded)]).hex() == CODEC_VECTORS["v topk hash"]
    encoded = _fedq_encoded({"v": v}, "topk", fraction=0.01)
    assert (encoded.entries[0]["b"], encoded.digest.hex()) == (
        payload,
        CODEC_VECTORS["v topk hash"],
    )


def test_documented_topk8_vector_rounds_a_tie_to_even() -> None:
    v = _v_tensor()
    payload = bytes.fromhex(CODEC_VECTORS["v topk8 payload"])
    assert payload[8:].hex() == "408120" + "00c70162"  # q 64, -127, 32; gaps 0, 199, 98
    assert encode_lossy(raw_of(v), "topk8", (300,), fraction=0.01) == payload
    decoded = from_raw("f32", decode_lossy(payload, "topk8", "f32", (300,)))
    stated = [float(x) for x in CODEC_VECTORS["v topk8 decoded at 0, 200, 299"].split()]
    assert [decoded[0], decoded[200], decoded[299]] == stated
    assert sum(1 for x in decoded if x != 0) == 3
    digest = content_hash([Tensor("v", "f32", (300,), to_raw("f32", decoded))])
    assert digest.hex() == CODEC_VECTORS["v topk8 hash"]
    encoded = _fedq_encoded({"v": v}, "topk8", fraction=0.01)
    assert (encoded.entries[0]["b"], encoded.digest) == (payload, digest)


def _lossy_sample() -> dict[str, torch.Tensor]:
    """float32 tensors of several shapes (ties, zeros, a scalar, an empty one, a large
    value) and tensors of other dtypes, which lossy codecs carry exactly."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 50, generator=g) * 0.01
    w[2] = 0.0  # a row of zeros: scale 0
    w[4, :5] = torch.tensor([0.25, -0.25, 0.25, -0.25, 0.125])  # ties in magnitude
    sparse = torch.zeros(700)
    sparse[[3, 150, 151, 699]] = torch.tensor([1.0, -3.0, 2.0, 1e-3])
    return {
        "net.0.weight": w,
        "net.0.bias": torch.randn(6, generator=g),
        "big": torch.tensor([70000.0, -1e6, 1.5]),
        "sparse": sparse,
        "scalar": torch.tensor(0.375),
        "zeros": torch.zeros(3),  # topk8: a kept 0.0 and a scale of 0
        "empty": torch.zeros(0, 4),
        "double": torch.tensor([math.pi, -1e300], dtype=torch.float64),
        "steps": torch.tensor([-(2**63), 2**63 - 1], dtype=torch.int64),
        "half": torch.tensor([0.5, -2.0], dtype=torch.float16),
    }


@pytest.mark.parametrize(
    ("codec", "stochastic"),
    [(c, False) for c in LOSSY] + [(c, True) for c in LOSSY if c.startswith(("int8", "topk8"))],
)
def test_fedq_lossy_update_decodes_with_independent_decoder(codec: str, stochastic: bool) -> None:
    params = _lossy_sample()
    encoded = _fedq_encoded(params, codec, fraction=0.3, stochastic=stochastic)
    assert encoded.decoded is not None
    data, digest = fedq_encode_update(
        UpdateEnvelope(
            task="credit",
            participant="bank-a",
            update_id="u-9",
            base_version=1,
            num_samples=10,
            tensors=params,
            codec=codec,
        ),
        encoded=encoded,
    )
    env = decode(data, "u")
    assert env.fields["c"] == codec
    assert env.content_hash == digest == encoded.digest  # the hash of the decoded values
    assert_same_values(env.tensors, encoded.decoded)
    for t in env.tensors:
        if t.dtype != "f32":  # carried exactly
            assert t.raw == raw_of(params[t.name]), t.name
    # fedq's own decoder agrees, and refuses the codec in a model envelope, as this one does.
    assert decode_update(data).content_hash == digest
    doc = msgpack.unpackb(data)
    model = {"fv": 1, "k": "m", "t": "credit", "v": 1, "c": codec, "ts": doc["ts"], "h": digest}
    body = msgpack.packb(model, use_bin_type=True)
    with pytest.raises(DecodeError) as info:
        decode_model(body)
    assert info.value.reason == "unknown_codec"
    with pytest.raises(Refused, match="unknown_codec"):
        decode(body, "m")


@pytest.mark.parametrize("codec", LOSSY)
def test_independent_lossy_encoder_is_fedqs(codec: str) -> None:
    params = _lossy_sample()
    zstd = split_codec(codec)[1]
    fedq = _fedq_encoded(params, codec)
    tensors = []
    entries = []
    for entry, (name, t) in zip(fedq.entries, params.items(), strict=True):
        dtype, shape = entry["d"], tuple(entry["s"])
        payload = encode_lossy_payload(raw_of(t), codec, dtype, shape)
        if not zstd:  # the same bytes; zstd frames differ between encoders
            assert payload == entry["b"], name
        entries.append({"n": name, "d": dtype, "s": list(shape), "b": payload})
        tensors.append(Tensor(name, dtype, shape, decode_lossy(payload, codec, dtype, shape)))
    doc = {
        "fv": 1,
        "k": "u",
        "t": "credit",
        "p": "bank-a",
        "id": "u-10",
        "bv": 0,
        "n": 1,
        "c": codec,
        "ts": entries,
        "h": content_hash(tensors),
    }
    env = decode_update(msgpack.packb(doc, use_bin_type=True))
    assert env.content_hash == content_hash(tensors) == fedq.digest
    assert_same_values(tensors, env.tensors)


def _w_payload(codec: str) -> bytes:
    """The vector tensor ``w`` under ``codec`` (this module's encoder)."""
    return encode_lossy_payload(to_raw("f32", W_VALUES), codec, "f32", (2, 3))


def _zstd_frame(content: bytes) -> bytes:
    return encode_payload(content, "zstd")


_TOPK_W = _w_payload("topk")  # k 3, values -1.25 3.0 7.5, gaps 01 00 02
_TOPK_HEAD = _TOPK_W[:16]
_TOPK8_W = _w_payload("topk8")  # k 3, S 7.5/127, q -21 51 127, gaps 01 00 02
_TOPK8_HEAD = _TOPK8_W[:11]


@pytest.mark.parametrize(
    ("codec", "payload", "reason"),
    [
        ("f16", _w_payload("f16")[:-2], "size_mismatch"),
        ("bf16", _w_payload("bf16") + b"\x00\x00", "size_mismatch"),
        ("int8", _w_payload("int8")[:-1], "size_mismatch"),
        ("int8", struct.pack("<f", math.nan) + bytes(6), "codec_error"),
        ("int8", struct.pack("<f", math.inf) + bytes(6), "codec_error"),
        ("int8", struct.pack("<f", -0.5) + bytes(6), "codec_error"),
        ("int8", struct.pack("<f", 0.5) + b"\x80" + bytes(5), "codec_error"),
        ("int8c", _w_payload("int8")[:-1] + b"\x00", "size_mismatch"),  # needs 2 scales
        ("int8c", struct.pack("<2f", 0.5, math.nan) + bytes(6), "codec_error"),
        ("topk", b"\x03\x00", "size_mismatch"),
        ("topk", struct.pack("<I", 7) + bytes(40), "codec_error"),  # k above n = 6
        ("topk", _TOPK_W[:12], "size_mismatch"),  # 3 values need 12 bytes after k
        ("topk", _TOPK_HEAD + b"\x01\x00", "codec_error"),  # 2 varints, not 3
        ("topk", _TOPK_HEAD + b"\x01\x00\x02\x00", "codec_error"),  # one left over
        ("topk", _TOPK_HEAD + b"\x01\x00\x82", "codec_error"),  # cut short
        ("topk", _TOPK_HEAD + b"\x01\x00\x82\x00", "codec_error"),  # not the shortest
        ("topk", _TOPK_HEAD + b"\x01\x00\x80\x80\x80\x80\x80\x01", "codec_error"),
        ("topk", _TOPK_HEAD + b"\x01\x00\xff\xff\xff\xff\x1f", "codec_error"),  # >= 2^32
        ("topk", _TOPK_HEAD + b"\x01\x00\x03", "codec_error"),  # index 6 of 6
        ("topk8", _TOPK8_W[:7], "size_mismatch"),  # no whole scale
        ("topk8", struct.pack("<If", 7, 1.0) + bytes(20), "codec_error"),  # k above n = 6
        ("topk8", _TOPK8_W[:10], "size_mismatch"),  # 3 values need 3 bytes after S
        ("topk8", struct.pack("<If", 3, math.nan) + _TOPK8_W[8:], "codec_error"),
        ("topk8", struct.pack("<If", 3, math.inf) + _TOPK8_W[8:], "codec_error"),
        ("topk8", struct.pack("<If", 3, -0.0) + _TOPK8_W[8:], "codec_error"),  # sign bit
        ("topk8", _TOPK8_W[:8] + b"\x80" + _TOPK8_W[9:], "codec_error"),  # q = -128
        ("topk8", _TOPK8_HEAD + b"\x01\x00", "codec_error"),  # 2 varints, not 3
        ("topk8", _TOPK8_HEAD + b"\x01\x00\x02\x00", "codec_error"),  # one left over
        ("topk8", _TOPK8_HEAD + b"\x01\x00\x82\x00", "codec_error"),  # not the shortest
        ("topk8", _TOPK8_HEAD + b"\x01\x00\x03", "codec_error"),  # index 6 of 6
        ("int8+zstd", _zstd_frame(_w_payload("int8")[:-1]), "size_mismatch"),
        ("f16+zstd", _zstd_frame(bytes(14)), "size_mismatch"),
        ("topk+zstd", _zstd_frame(bytes(4 + 5 * 6 + 1)), "size_mismatch"),  # over 4 + 5n
        ("topk+zstd", _zstd_frame(_TOPK_W) + b"\x00", "codec_error"),
        ("topk8+zstd", _zstd_frame(bytes(8 + 2 * 6 + 1)), "size_mismatch"),  # over 8 + 2n
        ("topk8+zstd", _zstd_frame(_TOPK8_W[:10]), "size_mismatch"),
        ("int8+zstd", _w_payload("int8"), "codec_error"),  # not a frame
    ],
)
def test_documented_lossy_refusals(codec: str, payload: bytes, reason: str) -> None:
    t = Tensor("w", "f32", (2, 3), to_raw("f32", W_VALUES))
    doc = msgpack.unpackb(encode_update(**EXAMPLE_FIELDS, tensors=[t], codec="raw"))
    doc["c"] = codec
    doc["ts"][0] = {"n": "w", "d": "f32", "s": [2, 3], "b": payload}
    data = msgpack.packb(doc, use_bin_type=True)
    with pytest.raises(DecodeError) as info:
        decode_update(data)
    assert info.value.reason == reason, info.value.detail
    with pytest.raises(Refused) as mine:
        decode(data, "u")
    assert mine.value.reason == reason
