"""Bodies larger than one broker message, as sets of chunk messages (docs/chunking.md).

Pure functions and one stateful class, no I/O. A body longer than the chunk size (or
one that begins with the chunk prefix) travels as ``count`` chunk messages; each one's
body is a small msgpack header followed by a slice of the whole body::

    ["fedq-chunk", 1, id, index, count, total, size, chunk_sha256, body_sha256] || data

The header is a msgpack array of nine items: the str ``"fedq-chunk"``, the format
version 1, the set's ``id`` (the update or announcement it carries), the chunk's
``index`` (0-based), ``count`` = ceil(total / size), the whole body's length
``total``, the nominal chunk length ``size``, and two 32-byte SHA-256 digests: of this
chunk's data and of the whole body. Chunk ``index`` holds bytes
``[index * size, min((index + 1) * size, total))`` of the body. Every well-formed
chunk message therefore begins with the 12 bytes ``0x99 0xaa "fedq-chunk"``
(:data:`MAGIC`), which no fedq envelope (a msgpack map) begins with.

:class:`Reassembler` takes chunks in any order, ignores exact duplicates, refuses
inconsistent ones with a :class:`ChunkError` (a reason from
:class:`~common.refusals.Refusal`), writes each chunk into one preallocated buffer of
the body's length (it keeps no chunk's bytes), checks the whole body's hash when the
last chunk arrives, and reports sets that made no progress for ``timeout_s`` as
:class:`Failed` (``chunks_incomplete``). Each chunk comes with a *handle* of the
caller's (a broker message to settle later): the reassembler hands the handles back
with the set, complete or failed, and never looks at them.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, Generic, TypeVar

import msgpack

from common import segments
from common.errors import FedqError
from common.refusals import Refusal
from common.segments import Owned, Segments

#: The first 12 bytes of every chunk message: msgpack ``fixarray(9)``, ``fixstr(10)``
#: and ``"fedq-chunk"``.
MAGIC: Final = b"\x99\xaafedq-chunk"
#: The chunk format version this module writes and reads.
FORMAT_VERSION: Final = 1
#: A chunk header is never longer than this (an id of at most 255 bytes fits easily).
MAX_HEADER_BYTES: Final = 512
#: Longest set id, in UTF-8 bytes (an AMQP short string, like a message id).
MAX_ID_BYTES: Final = 255
HASH_BYTES: Final = 32

#: Default chunk size of the transports: well under RabbitMQ's default
#: ``max_message_size`` of 16 MiB (broker_config/rabbitmq.conf), header included.
DEFAULT_CHUNK_SIZE: Final = 8 * 1024 * 1024
#: Default largest body a receiver reassembles: the decoder's own limit
#: (``common.wire.DEFAULT_LIMITS.max_message_bytes``), which refuses anything larger.
DEFAULT_MAX_TOTAL: Final = 64 * 1024 * 1024

H = TypeVar("H")

#: A set is known by its sender (the broker-validated user id; "" if none) and its id:
#: chunks of different senders never mix, whatever ids they claim.
SetKey = tuple[str, str]


class ChunkError(FedqError):
    """A chunk (or a whole chunk set) refused: ``reason`` is a Refusal, ``detail`` for
    humans. ``failed`` is the set it ended, if it ended one (its handles and buffer, for
    the caller to settle); None when only this one chunk is refused."""

    def __init__(self, reason: Refusal, detail: str, failed: Failed[Any] | None = None) -> None:
        self.reason = Refusal(reason)
        self.detail = detail
        self.failed = failed
        super().__init__(f"{self.reason}: {detail}")


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """The fields of one chunk's header (validated: see :func:`parse`)."""

    id: str
    index: int
    count: int
    total: int
    size: int
    chunk_hash: bytes
    body_hash: bytes

    @property
    def start(self) -> int:
        """Offset of this chunk's data in the whole body."""
        return self.index * self.size

    @property
    def end(self) -> int:
        """End (exclusive) of this chunk's data in the whole body."""
        return min(self.start + self.size, self.total)

    @property
    def shape(self) -> tuple[int, int, int, bytes]:
        """What every chunk of one set must agree on: count, total, size, body hash."""
        return (self.count, self.total, self.size, self.body_hash)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One parsed chunk message: its header, the header's bytes as sent, its data."""

    header: ChunkHeader
    #: The message's bytes before the data (magic and header), kept to rebuild it.
    prefix: bytes
    #: A view of the message's data (no copy): valid while the message body lives.
    data: memoryview


@dataclass(slots=True)
class Part(Generic[H]):
    """One message of a set: the caller's handle and where its data lies in the set's
    buffer. :meth:`message` rebuilds the message's body byte for byte."""

    handle: H
    prefix: bytes
    start: int
    end: int

    def message(self, buffer: bytes | Owned) -> bytes:
        """The message's body: its prefix and its slice of ``buffer``."""
        if (
            not self.prefix
            and isinstance(buffer, bytes)
            and (self.start, self.end)
            == (
                0,
                len(buffer),
            )
        ):
            return buffer  # a whole message kept as it came: no copy
        return self.prefix + bytes(memoryview(buffer)[self.start : self.end])


@dataclass(frozen=True, slots=True)
class Complete(Generic[H]):
    """A set reassembled and verified: the whole body and every message it took."""

    key: SetKey
    #: The set's own buffer (no copy): the receiver holds the only reference.
    body: Owned
    parts: list[Part[H]]


@dataclass(frozen=True, slots=True)
class Failed(Generic[H]):
    """A set (or one chunk) refused: why, and its messages with the buffer they index."""

    key: SetKey
    reason: Refusal
    detail: str
    buffer: bytes | Owned
    parts: list[Part[H]]

    def messages(self) -> list[bytes]:
        """The bodies of its messages, as they were sent (in arrival order)."""
        return [p.message(self.buffer) for p in self.parts]


class Added(Enum):
    """What :meth:`Reassembler.add` did with a chunk that did not complete its set."""

    #: Written into its set's buffer; the set waits for more.
    STORED = "stored"
    #: An exact copy of a chunk the set has: its handle joins the set, its bytes are dropped.
    DUPLICATE = "duplicate"
    #: A copy of a chunk of a set completed recently (a publisher that retried): not
    #: kept; the caller settles its handle with that set or alone.
    LATE = "late"


@dataclass(frozen=True, slots=True)
class ChunkLimits:
    """What a reassembler accepts at most."""

    #: Largest whole body (bytes).
    max_total: int = DEFAULT_MAX_TOTAL
    #: Most chunks in one set.
    max_chunks: int = 4096
    #: Most sets incomplete at once (each holds a buffer of its total length).
    max_incomplete: int = 16
    #: ... and of one sender: a bank that opens sets and never finishes them (one small
    #: chunk opens a buffer of the whole length) holds at most this many buffers and
    #: cannot take the other banks' room.
    max_per_sender: int = 2
    #: A set that received no new chunk for this long (seconds) fails (``chunks_incomplete``).
    timeout_s: float = 300.0
    #: Completed sets remembered (their header only) to recognise late copies.
    recent: int = 1024

    def __post_init__(self) -> None:
        if min(self.max_total, self.max_chunks, self.max_incomplete, self.max_per_sender) < 1:
            raise ValueError("chunk limits must be positive")
        if not self.timeout_s > 0:
            raise ValueError("the chunk timeout must be positive")
        if self.recent < 0:
            raise ValueError("recent must not be negative")


# ------------------------------------------------------------------ format


#: A set of more bytes than this is reassembled in an anonymous memory map, not a
#: ``bytearray``: a bytearray is zero-filled (all its memory taken) when the first chunk
#: arrives, while the set's other chunks may still be queued in the client, each its own
#: copy; a map's pages take memory as chunks are copied in and those copies are dropped.
LAZY_ABOVE: Final = 1 << 20


class _Map(mmap.mmap):
    """An anonymous memory map that compares equal to bytes of the same content, as a
    ``bytearray`` does."""

    __hash__ = None  # type: ignore[assignment]  # mutable, as a bytearray

    def __eq__(self, other: object) -> bool:
        try:
            return memoryview(self) == memoryview(other)  # type: ignore[arg-type]
        except TypeError:
            return NotImplemented


def _buffer(size: int) -> Owned:
    """A set's buffer of ``size`` bytes (zeros)."""
    return _Map(-1, size, flags=mmap.MAP_PRIVATE) if size > LAZY_ABOVE else bytearray(size)


def is_chunk(body: bytes | bytearray | memoryview) -> bool:
    """Whether ``body`` is a chunk message (it begins with :data:`MAGIC`)."""
    return bytes(body[: len(MAGIC)]) == MAGIC


def needs_chunks(body: bytes | Segments, chunk_size: int) -> bool:
    """Whether ``body`` (bytes, or segments: common/segments.py) must travel as chunks:
    longer than ``chunk_size``, or beginning with :data:`MAGIC` (sent whole, it would
    be taken for a chunk)."""
    if isinstance(body, bytes):
        return len(body) > chunk_size or is_chunk(body)
    return segments.total(body) > chunk_size or is_chunk(next(segments.pieces(body, 16), b""))


def chunk_count(total: int, size: int) -> int:
    """Chunks of a ``total``-byte body at ``size`` bytes each (at least one)."""
    return max(1, math.ceil(total / size))


def split(body: bytes | Segments, *, id: str, chunk_size: int) -> Iterator[bytes]:
    """The chunk messages of ``body`` (bytes, or segments: common/segments.py, whose
    join is never made), in order, made one at a time (only the chunk being sent is
    copied). Raises ValueError for a bad id or chunk size."""
    _check_id(id)
    if chunk_size < 1:
        raise ValueError(f"chunk size must be positive, not {chunk_size}")
    parts: Segments = (body,) if isinstance(body, bytes) else body
    total = segments.total(parts)
    if not total:
        raise ValueError("an empty body is never chunked")
    count = chunk_count(total, chunk_size)
    whole = segments.sha256(parts)
    for index, data in enumerate(segments.pieces(parts, chunk_size)):
        header: bytes = msgpack.packb(
            [
                "fedq-chunk",
                FORMAT_VERSION,
                id,
                index,
                count,
                total,
                chunk_size,
                hashlib.sha256(data).digest(),
                whole,
            ],
            use_bin_type=True,
        )
        yield header + data


def parse(message: bytes | bytearray | memoryview) -> Chunk:
    """The header and data of a chunk message; ChunkError if it is not a valid one.

    Checks the structure only (types, ranges, the data's length); the data's hash is
    checked by :meth:`Reassembler.add` (or :func:`verify`).
    """
    view = memoryview(message)
    if not is_chunk(view):
        raise ChunkError(Refusal.MALFORMED, "not a chunk message (no chunk magic)")
    unpacker = msgpack.Unpacker(
        raw=False,
        use_list=True,
        max_buffer_size=MAX_HEADER_BYTES,
        max_str_len=MAX_ID_BYTES * 4,
        max_bin_len=HASH_BYTES,
        max_array_len=9,
        max_map_len=0,
        max_ext_len=0,
    )
    unpacker.feed(bytes(view[:MAX_HEADER_BYTES]))
    try:
        fields = unpacker.unpack()
    except msgpack.OutOfData:
        raise ChunkError(
            Refusal.MALFORMED, f"chunk header longer than {MAX_HEADER_BYTES} bytes or cut short"
        ) from None
    except (ValueError, msgpack.UnpackException) as e:
        raise ChunkError(Refusal.MALFORMED, f"chunk header is not valid msgpack: {e}") from None
    length = unpacker.tell()
    if not isinstance(fields, list) or len(fields) != 9:
        raise ChunkError(Refusal.MALFORMED, "chunk header is not an array of nine")
    if fields[1] != FORMAT_VERSION or type(fields[1]) is not int:
        raise ChunkError(Refusal.UNSUPPORTED_VERSION, f"chunk format {fields[1]!r}, expected 1")
    header = _header(fields)
    data = view[length:]
    expected = header.end - header.start
    if len(data) != expected:
        raise ChunkError(
            Refusal.SIZE_MISMATCH,
            f"chunk {header.index} of {header.id!r} holds {len(data)} bytes, "
            f"its header says {expected}",
        )
    return Chunk(header, bytes(view[:length]), data)


def verify(chunk: Chunk) -> None:
    """ChunkError (``hash_mismatch``) if the chunk's data does not match its hash."""
    h = chunk.header
    if hashlib.sha256(chunk.data).digest() != h.chunk_hash:
        raise ChunkError(
            Refusal.HASH_MISMATCH, f"chunk {h.index} of {h.count} of {h.id!r}: data hash differs"
        )


def join(messages: Iterable[bytes]) -> bytes:
    """The whole body of a complete set of chunk messages (any order, copies allowed).

    For tools and tests; a receiver of live traffic uses :class:`Reassembler`.
    """
    reassembler: Reassembler[None] = Reassembler(
        ChunkLimits(max_total=2**62, max_chunks=2**31, max_incomplete=1, recent=0)
    )
    for message in messages:
        done = reassembler.add(parse(message), None)
        if isinstance(done, Complete):
            return bytes(done.body)
    raise ChunkError(Refusal.CHUNKS_INCOMPLETE, "the chunk messages do not make a whole set")


def _check_id(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("a chunk set id must be a non-empty str")
    if len(value.encode()) > MAX_ID_BYTES:
        raise ValueError(f"a chunk set id is at most {MAX_ID_BYTES} bytes")
    return value


def _count(value: object, name: str, minimum: int) -> int:
    if type(value) is not int or value < minimum:
        raise ChunkError(Refusal.INVALID_FIELD, f"chunk header: {name} {value!r} is invalid")
    return value


def _header(fields: list[object]) -> ChunkHeader:
    if fields[0] != "fedq-chunk":
        raise ChunkError(Refusal.MALFORMED, "chunk header does not begin with 'fedq-chunk'")
    try:
        set_id = _check_id(fields[2])
    except ValueError as e:
        raise ChunkError(Refusal.INVALID_FIELD, f"chunk header: {e}") from None
    index = _count(fields[3], "index", 0)
    count = _count(fields[4], "count", 1)
    total = _count(fields[5], "total", 1)
    size = _count(fields[6], "size", 1)
    chunk_hash, body_hash = fields[7], fields[8]
    if not (isinstance(chunk_hash, bytes) and len(chunk_hash) == HASH_BYTES):
        raise ChunkError(Refusal.INVALID_FIELD, "chunk header: the chunk hash is not 32 bytes")
    if not (isinstance(body_hash, bytes) and len(body_hash) == HASH_BYTES):
        raise ChunkError(Refusal.INVALID_FIELD, "chunk header: the body hash is not 32 bytes")
    if count != chunk_count(total, size):
        raise ChunkError(
            Refusal.INVALID_FIELD,
            f"chunk header of {set_id!r}: {count} chunks of {size} bytes cannot hold {total}",
        )
    if index >= count:
        raise ChunkError(
            Refusal.INVALID_FIELD, f"chunk header of {set_id!r}: index {index} of {count}"
        )
    return ChunkHeader(set_id, index, count, total, size, chunk_hash, body_hash)


# ------------------------------------------------------------------ reassembly


@dataclass(slots=True)
class _Set(Generic[H]):
    shape: tuple[int, int, int, bytes]
    buffer: Owned
    #: The chunk hash of each index received (missing: not received yet).
    hashes: dict[int, bytes] = field(default_factory=dict)
    parts: list[Part[H]] = field(default_factory=list)
    last: float = 0.0


class Reassembler(Generic[H]):
    """Chunk sets being reassembled, each into one buffer of its whole length.

    Memory: one buffer per incomplete set (at most ``max_incomplete`` of at most
    ``max_total`` bytes; a memory map above LAZY_ABOVE, whose pages are taken as chunks
    arrive), 32 bytes per chunk received and the chunks' small prefixes; no chunk's
    data. A completed set's body is its buffer itself (no copy), handed to the caller.
    """

    def __init__(
        self, limits: ChunkLimits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or ChunkLimits()
        self._clock = clock
        self._sets: OrderedDict[SetKey, _Set[H]] = OrderedDict()
        self._recent: OrderedDict[SetKey, tuple[int, int, int, bytes]] = OrderedDict()

    def __len__(self) -> int:
        """Sets incomplete now."""
        return len(self._sets)

    @property
    def held_bytes(self) -> int:
        """Bytes of the buffers held (the sum of the incomplete sets' totals)."""
        return sum(len(s.buffer) for s in self._sets.values())

    def buffers(self) -> list[Owned]:
        """The buffers held, one per incomplete set (for inspection)."""
        return [s.buffer for s in self._sets.values()]

    def missing(self, key: SetKey) -> list[int]:
        """The indices a set still waits for (empty if it is not incomplete here)."""
        found = self._sets.get(key)
        if found is None:
            return []
        return [i for i in range(found.shape[0]) if i not in found.hashes]

    def next_deadline(self) -> float | None:
        """When the set idle longest times out (clock time), or None if none is held."""
        if not self._sets:
            return None
        return min(s.last for s in self._sets.values()) + self.limits.timeout_s

    def add(self, chunk: Chunk, handle: H, sender: str | None = None) -> Complete[H] | Added:
        """Take one parsed chunk and its handle.

        Returns :class:`Complete` when it completes its set (whose body hash matched),
        else an :class:`Added`. Raises ChunkError when it refuses the chunk: alone
        (``failed`` None: the handle is the caller's to settle) or, on a whole-body hash
        mismatch, with its whole set (``failed``: every handle of the set, this one too).
        """
        h = chunk.header
        key: SetKey = (sender or "", h.id)
        verify(chunk)
        held = self._sets.get(key)
        if held is None:
            if self._recent.get(key) == h.shape:
                return Added.LATE
            held = self._open(key, h)
        elif held.shape != h.shape:
            raise ChunkError(
                Refusal.INVALID_FIELD,
                f"chunk {h.index} of {h.id!r} disagrees with the chunks received before "
                "(count, total, size or body hash)",
            )
        part = Part(handle, chunk.prefix, h.start, h.end)
        seen = held.hashes.get(h.index)
        if seen is not None:
            if seen != h.chunk_hash:
                raise ChunkError(
                    Refusal.INVALID_FIELD,
                    f"chunk {h.index} of {h.id!r} came twice with different data",
                )
            held.parts.append(part)
            return Added.DUPLICATE
        held.buffer[h.start : h.end] = chunk.data
        held.hashes[h.index] = h.chunk_hash
        held.parts.append(part)
        held.last = self._clock()
        self._sets.move_to_end(key)
        if len(held.hashes) < h.count:
            return Added.STORED
        del self._sets[key]
        if hashlib.sha256(held.buffer).digest() != h.body_hash:
            failed: Failed[H] = Failed(
                key,
                Refusal.HASH_MISMATCH,
                f"the {h.count} chunks of {h.id!r} do not make the body their hash names",
                held.buffer,
                held.parts,
            )
            raise ChunkError(failed.reason, failed.detail, failed)
        self._remember(key, h.shape)
        return Complete(key, held.buffer, held.parts)

    def _open(self, key: SetKey, h: ChunkHeader) -> _Set[H]:
        limits = self.limits
        if h.total > limits.max_total:
            raise ChunkError(
                Refusal.TOO_LARGE,
                f"chunk set {h.id!r} of {h.total} bytes is over the limit of {limits.max_total}",
            )
        if h.count > limits.max_chunks:
            raise ChunkError(
                Refusal.TOO_LARGE,
                f"chunk set {h.id!r} of {h.count} chunks is over the limit of {limits.max_chunks}",
            )
        if len(self._sets) >= limits.max_incomplete:
            raise ChunkError(
                Refusal.CHUNKS_INCOMPLETE,
                f"chunk set {h.id!r} refused: {limits.max_incomplete} sets are incomplete already",
            )
        if self.held_by(key[0]) >= limits.max_per_sender:
            raise ChunkError(
                Refusal.CHUNKS_INCOMPLETE,
                f"chunk set {h.id!r} refused: its sender has {limits.max_per_sender} sets "
                "incomplete already",
            )
        held: _Set[H] = _Set(h.shape, _buffer(h.total), last=self._clock())
        self._sets[key] = held
        return held

    def _remember(self, key: SetKey, shape: tuple[int, int, int, bytes]) -> None:
        if self.limits.recent == 0:
            return
        self._recent[key] = shape
        self._recent.move_to_end(key)
        while len(self._recent) > self.limits.recent:
            self._recent.popitem(last=False)

    def expire(self, now: float | None = None) -> list[Failed[H]]:
        """Sets that received no new chunk for ``timeout_s``: removed, reported as
        :class:`Failed` (``chunks_incomplete``) with their handles, oldest first."""
        now = self._clock() if now is None else now
        limit = self.limits.timeout_s
        stale = [k for k, s in self._sets.items() if now - s.last >= limit]
        return [self._fail(k, f"no chunk for {limit:g}s") for k in stale]

    def held_by(self, sender: str | None) -> int:
        """Sets of ``sender`` incomplete now."""
        return sum(1 for who, _ in self._sets if who == (sender or ""))

    def evict_oldest(self, sender: str | None = None) -> Failed[H] | None:
        """Give up the set idle longest (``chunks_incomplete``), of ``sender`` when it
        holds as many as it may (else of anyone); None if none is held."""
        mine = [k for k in self._sets if k[0] == (sender or "")]
        keys = mine if len(mine) >= self.limits.max_per_sender else list(self._sets)
        if not keys:
            return None
        return self._fail(keys[0], "evicted to make room for another set")

    def drain(self) -> list[Failed[H]]:
        """Give up every incomplete set (``chunks_incomplete``), oldest first."""
        return [self._fail(k, "the input ended") for k in list(self._sets)]

    def forget(self) -> None:
        """Drop every incomplete set and its handles (their messages went back to the
        queue by themselves: a lost channel)."""
        self._sets.clear()

    def _fail(self, key: SetKey, why: str) -> Failed[H]:
        held = self._sets.pop(key)
        count = held.shape[0]
        return Failed(
            key,
            Refusal.CHUNKS_INCOMPLETE,
            f"chunk set {key[1]!r} incomplete: {len(held.hashes)} of {count} chunks ({why})",
            held.buffer,
            held.parts,
        )
