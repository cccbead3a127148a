"""A message body held as segments: byte strings whose concatenation is the body.

A large model (hundreds of MB) is written to the store and announced without ever
joining its tensors' bytes into one buffer: the segments are the envelope's small
msgpack pieces and memoryviews of the tensors themselves.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Iterator, Sequence

#: A body in memory of its own, writable, that no one else holds: a reassembled chunk
#: set (a ``bytearray``, or for a large one an anonymous memory map, whose pages take
#: memory only as chunks are copied in), or a blob read from the store in pieces. A
#: decoder may hand out views into it (common/msgpack_views.py).
Owned = bytearray | mmap.mmap

#: The body, in order. Memoryviews are read, never kept past the call that takes them.
Segments = Sequence[bytes | bytearray | memoryview]


def total(segments: Segments) -> int:
    """The body's length in bytes."""
    return sum(memoryview(s).nbytes for s in segments)


def sha256(segments: Segments) -> bytes:
    """SHA-256 of the body, fed segment by segment."""
    h = hashlib.sha256()
    for s in segments:
        h.update(s)
    return h.digest()


def join(segments: Segments) -> bytes:
    """The body as one byte string (a copy)."""
    return b"".join(segments)


def pieces(segments: Segments, size: int) -> Iterator[bytes | bytearray]:
    """The body cut into consecutive pieces of ``size`` bytes (the last one shorter),
    each a copy of at most ``size`` bytes, yours to keep: one piece is made at a time."""
    if size < 1:
        raise ValueError("piece size must be at least 1")
    out = bytearray()
    for s in segments:
        view = memoryview(s).cast("B")
        while view.nbytes:
            take = min(size - len(out), view.nbytes)
            out += view[:take]
            view = view[take:]
            if len(out) == size:
                yield out
                out = bytearray()
    if out:
        yield out
