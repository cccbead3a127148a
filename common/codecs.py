"""Codecs for tensor payloads.

A codec turns the raw little-endian bytes of one tensor into the bytes carried in
the envelope and back. The decoder is told the exact size the tensor must have,
so it can refuse a payload before it expands it (decompression bombs).

``zstd`` is lossless and the default; ``raw`` carries the bytes as they are.
Lossy codecs join by registering under a new name: the envelope names its codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

import zstandard

from common.errors import DecodeError, EncodeError
from common.refusals import Refusal


class Codec(Protocol):
    """Encodes one tensor's raw bytes for the wire and decodes them into a buffer."""

    @property
    def name(self) -> str:
        """The codec's name in the envelope."""
        ...

    def encode(self, raw: bytes | memoryview) -> bytes:
        """Encode raw tensor bytes."""
        ...

    def decode_into(self, data: bytes, out: memoryview) -> None:
        """Decode ``data`` into ``out``, which has exactly the expected size.

        Raises DecodeError when ``data`` does not decode to exactly ``len(out)`` bytes;
        never writes past ``out`` and never allocates more than ``out`` holds.
        """
        ...


@dataclass(frozen=True)
class RawCodec:
    """No transformation: the payload is the raw bytes."""

    name: str = "raw"

    def encode(self, raw: bytes | memoryview) -> bytes:
        return bytes(raw)

    def decode_into(self, data: bytes, out: memoryview) -> None:
        if len(data) != len(out):
            raise DecodeError(
                Refusal.SIZE_MISMATCH, f"raw payload has {len(data)} bytes, shape needs {len(out)}"
            )
        out[:] = data


#: Largest zstd window a decoder accepts (bounds the decoder's own memory).
MAX_ZSTD_WINDOW: Final[int] = 1 << 27


@dataclass(frozen=True)
class ZstdCodec:
    """Lossless Zstandard, one frame per tensor, content size in the frame header."""

    #: Level 1: float32 weights barely compress (about 7%), so speed matters more.
    level: int = 1
    name: str = "zstd"

    def encode(self, raw: bytes | memoryview) -> bytes:
        try:
            return zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(raw)
        except zstandard.ZstdError as e:  # pragma: no cover - zstd does not fail on bytes
            raise EncodeError(f"zstd compression failed: {e}") from e

    def decode_into(self, data: bytes, out: memoryview) -> None:
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
        size = _frame_size(data)
        if size != len(data):
            raise DecodeError(
                Refusal.CODEC_ERROR,
                "payload is not exactly one zstd frame"
                + (f" ({len(data) - size} bytes after it)" if size >= 0 else " (truncated)"),
            )
        got = 0
        extra = b""
        try:
            dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
            # Read straight into the tensor's memory, never more than it holds; then
            # one more byte: a frame that expands past the shape is refused.
            with dctx.stream_reader(data, read_across_frames=False) as reader:
                while got < expected:
                    n = reader.readinto(out[got:])
                    if n == 0:
                        break
                    got += n
                if got == expected:
                    extra = reader.read(1)
        except zstandard.ZstdError as e:
            raise DecodeError(Refusal.CODEC_ERROR, f"zstd payload does not decode: {e}") from e
        if got != expected or extra:
            more = "more than " if extra else ""
            raise DecodeError(
                Refusal.SIZE_MISMATCH,
                f"zstd payload decodes to {more}{got} bytes, shape needs {expected}",
            )


def _frame_size(data: bytes) -> int:
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


CODECS: Final[dict[str, Codec]] = {c.name: c for c in (ZstdCodec(), RawCodec())}


def get_codec(name: str) -> Codec:
    """The codec registered under ``name``."""
    try:
        return CODECS[name]
    except KeyError:
        raise DecodeError(
            Refusal.UNKNOWN_CODEC, f"codec {name!r} is not one of {sorted(CODECS)}"
        ) from None
