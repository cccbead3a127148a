"""Codecs for tensor payloads.

A codec turns one tensor into the bytes carried in the envelope (``b``) and back.
The decoder is told the tensor's wire dtype and shape, hence the exact size it must
have, so it can refuse a payload before it expands it (decompression bombs).

``raw`` carries the raw little-endian bytes as they are; ``zstd`` compresses them
(lossless). The lossy codecs (``f16``, ``bf16``, ``int8``, ``int8c``, ``topk``,
``topk8``, each also ``+zstd``) quantize or sparsify ``f32`` tensors; the envelope's dtype stays
``f32`` and the decoded tensor is the dequantized float32 tensor, computed with
single float32 operations so every decoder gets the same bits. A tensor of any other
dtype is carried exactly under a lossy codec, by its lossless stage (``raw``, or
``zstd`` for ``+zstd``). Each name fully determines the decoding; what an encoder
may choose (the top-k fraction, stochastic rounding) is not in the name. Layouts:
docs/wire-format.md, section 6.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import numpy as np
import numpy.typing as npt
import zstandard

from common.errors import DecodeError, EncodeError
from common.refusals import Refusal

Shape = tuple[int, ...]


class Codec(Protocol):
    """Encodes one tensor for the wire and decodes it into a buffer."""

    @property
    def name(self) -> str:
        """The codec's name in the envelope."""
        ...

    @property
    def lossless(self) -> bool:
        """Whether decoding gives back exactly the bytes encoded."""
        ...

    def encode_tensor(
        self,
        raw: bytes | memoryview,
        dtype: str,
        shape: Shape,
        rng: np.random.Generator | None = None,
    ) -> bytes:
        """Encode one tensor's raw bytes (wire ``dtype``, ``shape``). ``rng``: the
        encoder's own randomness (stochastic rounding); decoding never needs it."""
        ...

    def decode_tensor_into(
        self, data: bytes | memoryview, dtype: str, shape: Shape, out: memoryview
    ) -> None:
        """Decode ``data`` into ``out``, the tensor's raw bytes (exactly the size the
        dtype and shape need).

        Raises DecodeError when ``data`` is not a valid payload for that tensor; never
        writes past ``out``, and its working memory is bounded by the tensor's size.
        """
        ...


@dataclass(frozen=True)
class RawCodec:
    """No transformation: the payload is the raw bytes."""

    name: str = "raw"

    @property
    def lossless(self) -> bool:
        return True

    def encode(self, raw: bytes | memoryview) -> bytes:
        return bytes(raw)

    def decode_into(self, data: bytes | memoryview, out: memoryview) -> None:
        if len(data) != len(out):
            raise DecodeError(
                Refusal.SIZE_MISMATCH, f"raw payload has {len(data)} bytes, shape needs {len(out)}"
            )
        out[:] = data

    def encode_tensor(
        self,
        raw: bytes | memoryview,
        dtype: str,
        shape: Shape,
        rng: np.random.Generator | None = None,
    ) -> bytes:
        return self.encode(raw)

    def decode_tensor_into(
        self, data: bytes | memoryview, dtype: str, shape: Shape, out: memoryview
    ) -> None:
        self.decode_into(data, out)


#: Largest zstd window a decoder accepts (bounds the decoder's own memory).
MAX_ZSTD_WINDOW: Final[int] = 1 << 27


@dataclass(frozen=True)
class ZstdCodec:
    """Lossless Zstandard, one frame per tensor, content size in the frame header."""

    #: Level 1: float32 weights barely compress (about 7%), so speed matters more.
    level: int = 1
    name: str = "zstd"

    @property
    def lossless(self) -> bool:
        return True

    def encode(self, raw: bytes | memoryview) -> bytes:
        try:
            return zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(raw)
        except zstandard.ZstdError as e:  # pragma: no cover - zstd does not fail on bytes
            raise EncodeError(f"zstd compression failed: {e}") from e

    def decode_into(self, data: bytes | memoryview, out: memoryview) -> None:
        expected = len(out)
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as e:
            raise DecodeError(Refusal.CODEC_ERROR, f"not a zstd frame: {e}") from e
        # Refuse before expanding: a frame that declares another size is wrong or a bomb.
        if declared not in (-1, expected):
            raise DecodeError(
                Refusal.SIZE_MISMATCH,
                f"zstd frame declares {declared} bytes, shape needs {expected}",
            )
        _check_one_frame(data)
        got, extra = _read_frame(data, out)
        if got != expected or extra:
            more = "more than " if extra else ""
            raise DecodeError(
                Refusal.SIZE_MISMATCH,
                f"zstd payload decodes to {more}{got} bytes, shape needs {expected}",
            )

    def encode_tensor(
        self,
        raw: bytes | memoryview,
        dtype: str,
        shape: Shape,
        rng: np.random.Generator | None = None,
    ) -> bytes:
        return self.encode(raw)

    def decode_tensor_into(
        self, data: bytes | memoryview, dtype: str, shape: Shape, out: memoryview
    ) -> None:
        self.decode_into(data, out)


def _check_one_frame(data: bytes | memoryview) -> None:
    """CODEC_ERROR unless ``data`` is exactly one whole zstd frame."""
    size = _frame_size(data)
    if size != len(data):
        raise DecodeError(
            Refusal.CODEC_ERROR,
            "payload is not exactly one zstd frame"
            + (f" ({len(data) - size} bytes after it)" if size >= 0 else " (truncated)"),
        )


def _read_frame(data: bytes | memoryview, out: memoryview) -> tuple[int, bool]:
    """Decompress one frame into ``out``, never more than it holds; returns the bytes
    written and whether the frame holds more than that."""
    got = 0
    extra = b""
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
        # Read straight into the tensor's memory, never more than it holds; then
        # one more byte: a frame that expands past the shape is refused.
        with dctx.stream_reader(data, read_across_frames=False) as reader:
            while got < len(out):
                n = reader.readinto(out[got:])
                if n == 0:
                    break
                got += n
            if got == len(out):
                extra = reader.read(1)
    except zstandard.ZstdError as e:
        raise DecodeError(Refusal.CODEC_ERROR, f"zstd payload does not decode: {e}") from e
    return got, bool(extra)


def _frame_size(data: bytes | memoryview) -> int:
    """Compressed size of the zstd frame at the start of ``data``; -1 if it is cut short.

    Walks the block headers (RFC 8878, 3.1.1.2): 3 bytes each, last-block bit,
    type (raw, RLE, compressed) and size; then the optional 4-byte checksum.
    """
    try:
        pos = zstandard.frame_header_size(data)
    except zstandard.ZstdError:
        return -1
    while pos + 3 <= len(data):
        header = int.from_bytes(data[pos : pos + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        pos += 3 + (1 if kind == 1 else size)
        if last:
            if data[4] & 0x04:  # Content_Checksum_flag in the frame header descriptor
                pos += 4
            return pos if pos <= len(data) else -1
    return -1


_RAW: Final = RawCodec()
_ZSTD: Final = ZstdCodec()

F32 = npt.NDArray[np.float32]


# --------------------------------------------------------------------------- lossy


class _Lossy:
    """What every lossy codec shares: only ``f32`` tensors are quantized; any other
    dtype is carried exactly by the lossless stage (``raw``, or ``zstd`` with
    ``+zstd``); with ``+zstd`` the quantized payload is one zstd frame."""

    zstd: bool

    @property
    def base(self) -> str:
        """The name without ``+zstd``."""
        raise NotImplementedError  # pragma: no cover

    @property
    def name(self) -> str:
        return self.base + ("+zstd" if self.zstd else "")

    @property
    def lossless(self) -> bool:
        return False

    def encode_tensor(
        self,
        raw: bytes | memoryview,
        dtype: str,
        shape: Shape,
        rng: np.random.Generator | None = None,
    ) -> bytes:
        if dtype != "f32":
            return (_ZSTD if self.zstd else _RAW).encode(raw)
        x = np.frombuffer(raw, dtype="<f4")
        payload = self._encode_f32(x, shape, rng)
        if not self.zstd:
            return payload
        return _ZSTD.encode(self._shuffle(payload))

    def decode_tensor_into(
        self, data: bytes | memoryview, dtype: str, shape: Shape, out: memoryview
    ) -> None:
        if dtype != "f32":
            (_ZSTD if self.zstd else _RAW).decode_into(data, out)
            return
        n = math.prod(shape)
        payload = self._unwrap(data, shape, n)
        self._decode_f32(payload, shape, n, np.frombuffer(out, dtype=np.float32))

    def _unwrap(
        self, data: bytes | memoryview, shape: Shape, n: int
    ) -> bytes | bytearray | memoryview:
        """The quantized payload: ``data`` itself, or the content of its zstd frame."""
        size = self._payload_size(shape, n)
        if not self.zstd:
            if size is not None and len(data) != size:
                raise DecodeError(
                    Refusal.SIZE_MISMATCH,
                    f"{self.name} payload has {len(data)} bytes, the shape needs {size}",
                )
            return data
        if size is not None:
            buf = bytearray(size)
            _ZSTD.decode_into(data, memoryview(buf))
            return self._unshuffle(buf)
        return _zstd_upto(data, self._payload_bound(n))

    # Subclasses fill these in.
    def _encode_f32(self, x: F32, shape: Shape, rng: np.random.Generator | None) -> bytes:
        raise NotImplementedError  # pragma: no cover

    def _decode_f32(
        self, payload: bytes | bytearray | memoryview, shape: Shape, n: int, out: F32
    ) -> None:
        raise NotImplementedError  # pragma: no cover

    def _payload_size(self, shape: Shape, n: int) -> int | None:
        """The exact payload size for ``shape``; None when it varies (topk)."""
        raise NotImplementedError  # pragma: no cover

    def _payload_bound(self, n: int) -> int:
        """The largest valid payload for ``n`` elements (codecs of varying size)."""
        raise NotImplementedError  # pragma: no cover

    def _shuffle(self, payload: bytes) -> bytes:
        return payload

    def _unshuffle(self, payload: bytearray) -> bytes | bytearray:
        return payload


def _zstd_upto(data: bytes | memoryview, bound: int) -> bytes:
    """The content of one zstd frame of at most ``bound`` bytes (CODEC_ERROR or
    SIZE_MISMATCH otherwise, checked before and while decompressing)."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise DecodeError(Refusal.CODEC_ERROR, f"not a zstd frame: {e}") from e
    if declared > bound:
        raise DecodeError(
            Refusal.SIZE_MISMATCH,
            f"zstd frame declares {declared} bytes, at most {bound} are possible",
        )
    _check_one_frame(data)
    buf = bytearray(bound if declared == -1 else declared)
    got, extra = _read_frame(data, memoryview(buf))
    if extra or (declared != -1 and got != declared):
        raise DecodeError(
            Refusal.SIZE_MISMATCH,
            f"zstd payload decodes to {'more than ' if extra else ''}{got} bytes, "
            + (f"at most {bound} are possible" if extra else f"its frame declares {declared}"),
        )
    return bytes(buf[:got])


HalfKind = Literal["f16", "bf16"]

#: The largest finite binary16 value; the f16 encoder saturates to it.
F16_MAX: Final = 65504.0


@dataclass(frozen=True)
class HalfCodec(_Lossy):
    """``f16`` (IEEE binary16) or ``bf16`` (bfloat16), round to nearest even,
    saturating at the largest finite value; ``+zstd`` compresses the byte planes
    (every element's low byte, then every high byte)."""

    kind: HalfKind = "f16"
    zstd: bool = False

    @property
    def base(self) -> str:
        return self.kind

    def _payload_size(self, shape: Shape, n: int) -> int | None:
        return 2 * n

    def _encode_f32(self, x: F32, shape: Shape, rng: np.random.Generator | None) -> bytes:
        if self.kind == "f16":
            return np.clip(x, -F16_MAX, F16_MAX).astype("<f2").tobytes()
        u = x.view(np.uint32)
        half = (
            (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        ).astype(np.uint16)
        # Rounding up from the largest finite values gives infinity: saturate instead.
        over = (half & np.uint16(0x7FFF)) == np.uint16(0x7F80)
        half[over] = (half[over] & np.uint16(0x8000)) | np.uint16(0x7F7F)
        return half.astype("<u2").tobytes()

    def _decode_f32(
        self, payload: bytes | bytearray | memoryview, shape: Shape, n: int, out: F32
    ) -> None:
        if self.kind == "f16":
            out[:] = np.frombuffer(payload, dtype="<f2")
        else:
            bits = np.frombuffer(payload, dtype="<u2").astype(np.uint32) << np.uint32(16)
            out.view(np.uint32)[:] = bits

    def _shuffle(self, payload: bytes) -> bytes:
        return np.frombuffer(payload, dtype=np.uint8).reshape(-1, 2).T.tobytes()

    def _unshuffle(self, payload: bytearray) -> bytes:
        return np.frombuffer(payload, dtype=np.uint8).reshape(2, -1).T.tobytes()


#: int8 codecs carry values in [-INT8_LEVELS, INT8_LEVELS] (symmetric: -128 is refused).
INT8_LEVELS: Final = 127


def _int8_levels(
    y: F32, scale: F32, stochastic: bool, rng: np.random.Generator | None
) -> npt.NDArray[np.int8]:
    """``y / scale`` (``scale`` broadcast against ``y``) as int8 levels in [-127, 127]:
    rounded to nearest, ties to even, or with ``stochastic`` ``floor(y / scale + u)``,
    ``u`` uniform in [0, 1) from ``rng``; 0 where the scale is 0."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        levels = np.where(scale > 0, y / scale, np.float32(0))
    if stochastic:
        rng = rng if rng is not None else np.random.default_rng()
        q = np.floor(levels + rng.random(levels.shape, dtype=np.float32))
    else:
        q = np.rint(levels)
    return np.clip(q, -INT8_LEVELS, INT8_LEVELS).astype(np.int8)


def _check_scales(name: str, scale: F32) -> None:
    """CODEC_ERROR unless every scale is a finite binary32 without its sign bit."""
    bad = ~np.isfinite(scale) | ((scale.view(np.uint32) >> np.uint32(31)) == 1)
    if bad.any():
        raise DecodeError(
            Refusal.CODEC_ERROR,
            f"{name} scale {float(scale[bad][0])!r} is not a finite number >= 0",
        )


def _check_levels(name: str, q: npt.NDArray[np.int8]) -> None:
    """CODEC_ERROR if a level is -128 (the int8 codecs are symmetric)."""
    if q.size and int(q.min()) < -INT8_LEVELS:
        raise DecodeError(Refusal.CODEC_ERROR, f"{name} value -128 is not allowed")


@dataclass(frozen=True)
class Int8Codec(_Lossy):
    """Symmetric 8-bit quantization: float32 scales, then one int8 per element.

    ``int8``: one scale per tensor; ``int8c``: one scale per row (the first
    dimension) of a tensor of two or more dimensions. The encoder's scale is
    ``max |x| / 127`` and it rounds ``x / scale`` to the nearest integer (ties to
    even), or, with ``stochastic``, down or up with the probabilities that make the
    rounding unbiased (from the ``rng`` it is given). Decoding: ``q * scale``.
    """

    per_channel: bool = False
    zstd: bool = False
    #: Encoder only: stochastic rounding (the payload decodes the same way).
    stochastic: bool = False

    @property
    def base(self) -> str:
        return "int8c" if self.per_channel else "int8"

    def rows(self, shape: Shape, n: int) -> int:
        """How many scales a tensor of ``shape`` (``n`` elements) has."""
        if self.per_channel and len(shape) >= 2 and n > 0:
            return shape[0]
        return 1

    def _payload_size(self, shape: Shape, n: int) -> int | None:
        return 4 * self.rows(shape, n) + n

    def _encode_f32(self, x: F32, shape: Shape, rng: np.random.Generator | None) -> bytes:
        rows = self.rows(shape, x.size)
        grid = x.reshape(rows, -1)
        top = np.abs(grid).max(axis=1) if x.size else np.zeros(rows, dtype=np.float32)
        scale = (top / np.float32(INT8_LEVELS)).astype(np.float32)
        q = _int8_levels(grid, scale[:, None], self.stochastic, rng)
        return scale.astype("<f4").tobytes() + q.tobytes()

    def _decode_f32(
        self, payload: bytes | bytearray | memoryview, shape: Shape, n: int, out: F32
    ) -> None:
        rows = self.rows(shape, n)
        scale = np.frombuffer(payload, dtype="<f4", count=rows)
        _check_scales(self.name, scale)
        q = np.frombuffer(payload, dtype=np.int8, offset=4 * rows)
        _check_levels(self.name, q)
        with np.errstate(over="ignore"):  # a product past float32: non_finite, after the hash
            np.multiply(
                q.reshape(rows, -1).astype(np.float32), scale[:, None], out=out.reshape(rows, -1)
            )


@dataclass(frozen=True)
class TopKCodec(_Lossy):
    """The ``k`` entries of largest magnitude, zeros elsewhere: ``k`` (u32), their
    float32 values in index order, then their indices as LEB128 varints of the gaps
    (the first index, then each index minus the previous one minus 1).

    The encoder keeps ``k = round(fraction * n)`` entries (at least 1, at most ``n``)
    of each ``f32`` tensor, ties broken by the lower index.
    """

    #: Encoder only: the share of each tensor's entries kept, in (0, 1].
    fraction: float | None = None
    zstd: bool = False

    @property
    def base(self) -> str:
        return "topk"

    def _payload_size(self, shape: Shape, n: int) -> int | None:
        return None

    def _payload_bound(self, n: int) -> int:
        # k <= n values of 4 bytes; the gaps add up to at most n - k, so their varints
        # take fewer than k + (n - k) / 127 bytes: no valid payload is longer than this.
        return 4 + 5 * n

    def keep(self, n: int) -> int:
        """How many entries of a tensor of ``n`` elements the encoder keeps."""
        if self.fraction is None or not 0.0 < self.fraction <= 1.0:
            raise EncodeError(f"codec {self.name!r} needs a fraction in (0, 1] to encode")
        return min(n, max(1, round(self.fraction * n))) if n else 0

    def _encode_f32(self, x: F32, shape: Shape, rng: np.random.Generator | None) -> bytes:
        index = self._select(x)
        return struct.pack("<I", index.size) + x[index].astype("<f4").tobytes() + _gaps(index)

    def _select(self, x: F32) -> npt.NDArray[np.int64]:
        """The indices, increasing, of the ``keep(n)`` entries of largest magnitude,
        ties broken by the lower index."""
        n = x.size
        if n >= 2**32:
            raise EncodeError(f"codec {self.name!r} takes tensors of fewer than 2^32 elements")
        k = self.keep(n)
        magnitude = np.abs(x)
        if k == n:
            return np.arange(n, dtype=np.int64)
        threshold = np.partition(magnitude, n - k)[n - k]
        above = np.flatnonzero(magnitude > threshold)
        ties = np.flatnonzero(magnitude == threshold)[: k - above.size]
        return np.sort(np.concatenate((above, ties))).astype(np.int64)

    def _indices(
        self, payload: bytes | bytearray | memoryview, offset: int, k: int, n: int
    ) -> npt.NDArray[np.int64]:
        """The ``k`` indices the varints from ``offset`` to the end give (CODEC_ERROR
        unless exactly ``k`` varints whose last index is below ``n``)."""
        gaps = read_varints(np.frombuffer(payload, dtype=np.uint8, offset=offset), k)
        if k and int(gaps.sum(dtype=np.uint64)) + k > n:
            raise DecodeError(
                Refusal.CODEC_ERROR, f"{self.name} index out of range for {n} entries"
            )
        index: npt.NDArray[np.int64] = np.cumsum(gaps.astype(np.int64) + 1) - 1
        return index

    def _decode_f32(
        self, payload: bytes | bytearray | memoryview, shape: Shape, n: int, out: F32
    ) -> None:
        if len(payload) < 4:
            raise DecodeError(Refusal.SIZE_MISMATCH, f"{self.name} payload has no count")
        (k,) = struct.unpack_from("<I", payload)
        if k > n:
            raise DecodeError(
                Refusal.CODEC_ERROR, f"{self.name} keeps {k} entries of a tensor of {n}"
            )
        if len(payload) < 4 + 4 * k:
            raise DecodeError(
                Refusal.SIZE_MISMATCH,
                f"{self.name} payload has {len(payload)} bytes, {k} values need {4 + 4 * k}",
            )
        values = np.frombuffer(payload, dtype="<f4", count=k, offset=4)
        index = self._indices(payload, 4 + 4 * k, k, n)
        out[:] = 0
        out[index] = values


@dataclass(frozen=True)
class TopK8Codec(TopKCodec):
    """``topk`` with int8 values: ``k`` (u32), a float32 scale ``S``, the ``k`` kept
    entries as int8 levels ``q`` in [-127, 127] in index order, then their indices as
    ``topk``'s gap varints. Decoding: ``q * S`` at each index, zeros elsewhere.

    The encoder keeps the entries ``topk`` keeps, then quantizes them as ``int8``
    does: ``S = max |kept| / 127``, levels rounded to nearest (ties to even) or, with
    ``stochastic``, down or up at random, unbiased.
    """

    #: Encoder only: stochastic rounding (the payload decodes the same way).
    stochastic: bool = False

    @property
    def base(self) -> str:
        return "topk8"

    def _payload_bound(self, n: int) -> int:
        # 8 bytes of count and scale, k <= n levels of one byte, and fewer than
        # k + (n - k) / 127 bytes of varints (as for topk): at most 8 + 2n.
        return 8 + 2 * n

    def _encode_f32(self, x: F32, shape: Shape, rng: np.random.Generator | None) -> bytes:
        index = self._select(x)
        kept = x[index]
        top = np.abs(kept).max() if kept.size else np.float32(0)
        scale = np.array([top], dtype=np.float32) / np.float32(INT8_LEVELS)
        q = _int8_levels(kept, scale, self.stochastic, rng)
        return (
            struct.pack("<I", index.size)
            + scale.astype("<f4").tobytes()
            + q.tobytes()
            + _gaps(index)
        )

    def _decode_f32(
        self, payload: bytes | bytearray | memoryview, shape: Shape, n: int, out: F32
    ) -> None:
        if len(payload) < 8:
            raise DecodeError(Refusal.SIZE_MISMATCH, f"{self.name} payload has no count and scale")
        (k,) = struct.unpack_from("<I", payload)
        if k > n:
            raise DecodeError(
                Refusal.CODEC_ERROR, f"{self.name} keeps {k} entries of a tensor of {n}"
            )
        if len(payload) < 8 + k:
            raise DecodeError(
                Refusal.SIZE_MISMATCH,
                f"{self.name} payload has {len(payload)} bytes, {k} values need {8 + k}",
            )
        scale = np.frombuffer(payload, dtype="<f4", count=1, offset=4)
        _check_scales(self.name, scale)
        q = np.frombuffer(payload, dtype=np.int8, count=k, offset=8)
        _check_levels(self.name, q)
        index = self._indices(payload, 8 + k, k, n)
        out[:] = 0
        with np.errstate(over="ignore"):  # a product past float32: non_finite, after the hash
            out[index] = q.astype(np.float32) * scale[0]


def _gaps(index: npt.NDArray[np.int64]) -> bytes:
    """The varints of increasing indices' gaps: the first index, then each index
    minus the previous one minus 1."""
    return varints(np.diff(index, prepend=np.int64(-1)) - 1)


#: A varint holds at most this many bytes (a gap below 2^32).
MAX_VARINT_BYTES: Final = 5


def varints(values: npt.NDArray[np.int64]) -> bytes:
    """Unsigned LEB128 of each value (>= 0, < 2^32): 7 bits a byte, low bits first,
    the high bit set on every byte but the last; the shortest form."""
    v = values.astype(np.uint64)
    lengths = np.ones(v.size, dtype=np.int64)
    for b in range(1, MAX_VARINT_BYTES):
        lengths += v >= np.uint64(1 << (7 * b))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]) if v.size else 0, dtype=np.uint8)
    for b in range(MAX_VARINT_BYTES):
        has = lengths > b
        low = (v[has] >> np.uint64(7 * b)) & np.uint64(0x7F)
        more = (lengths[has] > b + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + b] = (low | more).astype(np.uint8)
    return out.tobytes()


def read_varints(data: npt.NDArray[np.uint8], count: int) -> npt.NDArray[np.uint64]:
    """Exactly ``count`` shortest-form varints filling ``data`` (CODEC_ERROR otherwise)."""
    if not count <= data.size <= MAX_VARINT_BYTES * count:
        raise DecodeError(
            Refusal.CODEC_ERROR, f"{data.size} index bytes cannot hold exactly {count} varints"
        )
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(data < 0x80)
    if ends.size != count or ends[-1] != data.size - 1:
        raise DecodeError(
            Refusal.CODEC_ERROR, f"the index bytes hold {ends.size} varints, not {count}"
        )
    starts = np.empty(count, dtype=np.int64)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    lengths = ends - starts + 1
    last = data[ends]
    if (
        int(lengths.max()) > MAX_VARINT_BYTES
        or ((lengths > 1) & (last == 0)).any()
        or ((lengths == MAX_VARINT_BYTES) & (last > 0x0F)).any()
    ):
        raise DecodeError(
            Refusal.CODEC_ERROR, "an index varint is too long, not shortest, or >= 2^32"
        )
    out = np.zeros(count, dtype=np.uint64)
    for b in range(MAX_VARINT_BYTES):
        has = lengths > b
        out[has] |= (data[starts[has] + b] & np.uint8(0x7F)).astype(np.uint64) << np.uint64(7 * b)
    return out


# --------------------------------------------------------------------------- registry

#: The lossy codecs by the base name a task spec chooses (``compression.codec``).
LOSSY_BASES: Final = ("f16", "bf16", "int8", "int8c", "topk", "topk8")
#: The lossy codecs whose encoder may round stochastically, and those that keep top-k.
STOCHASTIC_BASES: Final = ("int8", "int8c", "topk8")
TOPK_BASES: Final = ("topk", "topk8")
#: Codecs whose decoding gives back exactly what was encoded.
LOSSLESS_CODECS: Final = frozenset({"raw", "zstd"})


def lossy_codec(
    base: str,
    *,
    zstd: bool = False,
    stochastic: bool = False,
    topk_fraction: float | None = None,
) -> Codec:
    """The encoder of lossy codec ``base`` (``+zstd`` with ``zstd``) with the
    encoder-only choices; EncodeError for an unknown base or a choice it lacks."""
    if stochastic and base not in STOCHASTIC_BASES:
        raise EncodeError(f"stochastic rounding is int8's, int8c's and topk8's, not {base!r}'s")
    if topk_fraction is not None and base not in TOPK_BASES:
        raise EncodeError(f"a top-k fraction is topk's and topk8's, not {base!r}'s")
    if base in ("f16", "bf16"):
        return HalfCodec("f16" if base == "f16" else "bf16", zstd)
    if base in ("int8", "int8c"):
        return Int8Codec(per_channel=base == "int8c", zstd=zstd, stochastic=stochastic)
    if base in TOPK_BASES:
        codec = (
            TopKCodec(topk_fraction, zstd)
            if base == "topk"
            else TopK8Codec(topk_fraction, zstd, stochastic=stochastic)
        )
        codec.keep(1)  # refuses a missing or out-of-range fraction now
        return codec
    raise EncodeError(f"no lossy codec {base!r}; one of {', '.join(LOSSY_BASES)}")


CODECS: Final[dict[str, Codec]] = {
    c.name: c
    for c in (
        _ZSTD,
        _RAW,
        *(
            codec
            for zstd in (False, True)
            for codec in (
                HalfCodec("f16", zstd),
                HalfCodec("bf16", zstd),
                Int8Codec(zstd=zstd),
                Int8Codec(per_channel=True, zstd=zstd),
                TopKCodec(zstd=zstd),
                TopK8Codec(zstd=zstd),
            )
        ),
    )
}


def get_codec(name: str) -> Codec:
    """The codec registered under ``name``."""
    try:
        return CODECS[name]
    except KeyError:
        raise DecodeError(
            Refusal.UNKNOWN_CODEC, f"codec {name!r} is not one of {sorted(CODECS)}"
        ) from None


def accepted_codecs(lossy: str | None) -> frozenset[str]:
    """What an aggregator accepts in updates: the lossless codecs always, and the
    task's lossy codec (its wire name, e.g. ``int8+zstd``) when it chose one."""
    return LOSSLESS_CODECS | ({lossy} if lossy is not None else set())
