"""Parameter blobs to and from Redis without a whole copy in this process.

A 100M-parameter model is a 400 MB blob. Written, it stays segments
(``common.model_segments``: memoryviews of the tensors) and goes to Redis as several
arguments of a few MiB, concatenated by Redis (the commit script, or SET and APPEND in a
transaction). Read, it comes back in pieces of :data:`READ_PIECE_BYTES` (GETRANGE) into
one preallocated ``bytearray``, which the decoder's tensors then view. Small blobs
travel whole, as one argument and one reply.
"""

from __future__ import annotations

from typing import Final, cast

import redis.asyncio as aioredis

from common.errors import StoreError
from common.segments import Segments, join, total

__all__ = [
    "ARG_PIECE_BYTES",
    "READ_PIECE_BYTES",
    "SEGMENTED_ABOVE",
    "Arg",
    "arg_pieces",
    "read_blob",
]

#: One argument of a Redis command (redis-py sends a memoryview as it is, no copy).
Arg = bytes | bytearray | memoryview

#: The largest blob stored: Redis's default ``proto-max-bulk-len``, the largest string
#: one argument (a blob written whole) or SETRANGE (one written in pieces) makes.
#: A larger one is refused before anything is sent: SETRANGE would fail midway.
MAX_BLOB_BYTES: Final = 512 << 20
#: A blob up to this size is one argument (joined: a copy of at most this much).
SEGMENTED_ABOVE: Final = 1 << 20
#: A larger blob is arguments of at most about this size: slices of its segments, and
#: its small segments (under :data:`_MERGE_BELOW`) copied together.
ARG_PIECE_BYTES: Final = 8 << 20
#: Segments under this size are merged into one argument (a copy), not sent one by one.
_MERGE_BELOW: Final = 64 << 10
#: A blob is read in pieces of this size (GETRANGE); one up to it is one reply.
READ_PIECE_BYTES: Final = 8 << 20


def arg_pieces(blob: Segments | bytes) -> list[Arg]:
    """``blob`` as the arguments whose concatenation it is: one when it is at most
    :data:`SEGMENTED_ABOVE` bytes (joined), else pieces of at most about
    :data:`ARG_PIECE_BYTES`: the large segments sliced (views, no copy), runs of small
    ones copied together. Never an empty piece, unless the blob is empty."""
    segments: Segments = [blob] if isinstance(blob, bytes) else blob
    size = total(segments)
    if size > MAX_BLOB_BYTES:
        raise StoreError(
            f"a blob of {size} bytes is over Redis's {MAX_BLOB_BYTES >> 20} MiB string limit"
        )
    if size <= SEGMENTED_ABOVE:
        return [segments[0] if len(segments) == 1 else join(segments)]  # join([]): b""
    most = ARG_PIECE_BYTES
    out: list[Arg] = []
    pending = bytearray()
    for s in segments:
        view = memoryview(s).cast("B")
        if view.nbytes < _MERGE_BELOW:
            pending += view
            if len(pending) >= most:
                out.append(pending)
                pending = bytearray()
            continue
        if pending:
            out.append(pending)
            pending = bytearray()
        out += [view[start : start + most] for start in range(0, view.nbytes, most)]
    if pending:
        out.append(pending)
    return out


async def read_blob(r: aioredis.Redis, key: str) -> bytes | bytearray | None:
    """The string at ``key``, or None when there is none (a blob is never empty).

    One round trip (STRLEN and the first GETRANGE, pipelined: no transaction, which
    the auditor's read-only Redis user may not open) for a blob up to
    :data:`READ_PIECE_BYTES`: its bytes. A larger one is read on into one
    ``bytearray`` of its length, a piece at a time. A blob is written once and only
    ever deleted (retention): one gone mid-read is None, as if it had been gone at the
    start; one whose length changed is a StoreError.
    """
    async with r.pipeline(transaction=False) as p:
        p.strlen(key)
        p.getrange(key, 0, READ_PIECE_BYTES - 1)
        size, first = await p.execute()
    size = int(size)
    if size == 0:
        return None
    if len(first) != min(size, READ_PIECE_BYTES):
        await _check_gone(r, key, size)
        return None
    if len(first) == size:
        return bytes(first)  # redis-py's reply: bytes already, no copy
    out = bytearray(size)
    at = len(first)
    out[:at] = first
    del first
    while at < size:
        end = min(at + READ_PIECE_BYTES, size)
        piece = cast(bytes, await r.getrange(key, at, end - 1))  # no decode_responses
        if len(piece) != end - at:
            await _check_gone(r, key, size)
            return None
        out[at:end] = piece
        at = end
    return out


async def _check_gone(r: aioredis.Redis, key: str, size: int) -> None:
    """A read came back short: StoreError unless ``key`` is gone (pruned)."""
    if await r.exists(key):
        raise StoreError(f"{key} changed length while it was read ({size} bytes before)")
