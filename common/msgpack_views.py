"""A msgpack reader that hands out large byte strings as views into its input.

``msgpack.unpackb`` copies every ``bin`` value into a new ``bytes``: decoding a 400 MB
model envelope would hold the message and a second copy of its tensors. This reader
accepts exactly what ``msgpack.unpackb(data, raw=False, use_list=True,
strict_map_key=True, max_ext_len=0, object_pairs_hook=...)`` accepts under the same
length limits (nesting deeper than MAX_DEPTH and more than MAX_VALUES values aside)
and builds the same objects, except that a ``bin`` of ``view_min`` bytes or more is a
``memoryview`` of ``data`` (no copy): the caller keeps ``data`` alive and unchanged
while it uses them. tests/test_msgpack_views.py compares the two on generated and
malformed documents.

Used for the bodies that are large by construction (a reassembled chunk set, a blob
read from the store in pieces); ``msgpack.unpackb`` (C) stays the reader of everything
else.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from typing import Any

from common.errors import FedqError

#: The deepest nesting accepted. msgpack's own unpacker stops at 1024; Python's
#: recursion would stop first, and an envelope nests 4 deep: deeper is refused here.
MAX_DEPTH = 256
#: The most values (arrays, maps and their items) one document may hold. msgpack has no
#: such bound; an envelope holds a few thousand. Without it a body of nested empty
#: arrays from any bank (up to the task's largest message) kept this reader busy for
#: minutes and built gigabytes of Python objects; refused before they are built.
MAX_VALUES = 1 << 20

_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")


class UnpackError(FedqError):
    """The input is not one msgpack document within the limits."""


PairsHook = Callable[[list[tuple[Any, Any]]], Any]


def unpackb_views(
    data: bytes | bytearray | memoryview | mmap.mmap,
    *,
    max_bin_len: int,
    max_str_len: int,
    max_array_len: int,
    max_map_len: int,
    object_pairs_hook: PairsHook,
    view_min: int = 64 * 1024,
) -> Any:
    """One msgpack document from ``data``; ``bin`` values of ``view_min`` bytes or more
    as memoryviews into it. Raises UnpackError (or what ``object_pairs_hook`` raises)."""
    reader = _Reader(
        memoryview(data).cast("B"),
        max_bin_len,
        max_str_len,
        max_array_len,
        max_map_len,
        object_pairs_hook,
        view_min,
    )
    value = reader.value(0)
    if reader.pos != len(reader.buf):
        raise UnpackError(f"extra data: {len(reader.buf) - reader.pos} bytes after the document")
    return value


class _Reader:
    __slots__ = (
        "budget",
        "buf",
        "hook",
        "max_array",
        "max_bin",
        "max_map",
        "max_str",
        "pos",
        "view_min",
    )

    def __init__(
        self,
        buf: memoryview,
        max_bin: int,
        max_str: int,
        max_array: int,
        max_map: int,
        hook: PairsHook,
        view_min: int,
    ) -> None:
        self.buf, self.pos = buf, 0
        self.max_bin, self.max_str = max_bin, max_str
        self.max_array, self.max_map = max_array, max_map
        self.hook, self.view_min = hook, view_min
        self.budget = MAX_VALUES

    def spend(self, n: int) -> None:
        """Count ``n`` more values, before any is built."""
        self.budget -= n
        if self.budget < 0:
            raise UnpackError(f"more than {MAX_VALUES} values in one document")

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise UnpackError("unexpected end of data")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def sint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big", signed=True)

    def value(self, depth: int) -> Any:  # noqa: C901 - one branch per type
        if depth > MAX_DEPTH:
            raise UnpackError(f"nested deeper than {MAX_DEPTH}")
        b = self.uint(1)
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0xA0 <= b <= 0xBF:
            return self.text(b & 0x1F)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F, depth)
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F, depth)
        if b == 0xC0:
            return None
        if b == 0xC2:
            return False
        if b == 0xC3:
            return True
        if b in (0xC4, 0xC5, 0xC6):
            return self.binary(self.uint(1 << (b - 0xC4)))
        if b == 0xCA:
            return float(_F32.unpack(self.take(4))[0])
        if b == 0xCB:
            return float(_F64.unpack(self.take(8))[0])
        if 0xCC <= b <= 0xCF:
            return self.uint(1 << (b - 0xCC))
        if 0xD0 <= b <= 0xD3:
            return self.sint(1 << (b - 0xD0))
        if b in (0xD9, 0xDA, 0xDB):
            return self.text(self.uint(1 << (b - 0xD9)))
        if b in (0xDC, 0xDD):
            return self.array(self.uint(2 if b == 0xDC else 4), depth)
        if b in (0xDE, 0xDF):
            return self.map(self.uint(2 if b == 0xDE else 4), depth)
        # 0xC1 (never used), ext 0xC7-0xC9 and 0xD4-0xD8: refused (max_ext_len 0).
        raise UnpackError(f"type byte 0x{b:02x} is not accepted")

    def binary(self, n: int) -> bytes | memoryview:
        if n > self.max_bin:
            raise UnpackError(f"bin of {n} bytes over the limit of {self.max_bin}")
        view = self.take(n)
        return view if n >= self.view_min else bytes(view)

    def text(self, n: int) -> str:
        if n > self.max_str:
            raise UnpackError(f"str of {n} bytes over the limit of {self.max_str}")
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError as e:
            raise UnpackError(f"str is not UTF-8: {e}") from e

    def array(self, n: int, depth: int) -> list[Any]:
        if n > self.max_array:
            raise UnpackError(f"array of {n} items over the limit of {self.max_array}")
        self.spend(n + 1)
        return [self.value(depth + 1) for _ in range(n)]

    def map(self, n: int, depth: int) -> Any:
        if n > self.max_map:
            raise UnpackError(f"map of {n} entries over the limit of {self.max_map}")
        self.spend(2 * n + 1)
        pairs: list[tuple[Any, Any]] = []
        for _ in range(n):
            key = self.value(depth + 1)
            if type(key) is not str and type(key) is not bytes:
                # strict_map_key: only str (and bytes) keys
                raise UnpackError(f"map key of type {type(key).__name__}")
            pairs.append((key, self.value(depth + 1)))
        return self.hook(pairs)
