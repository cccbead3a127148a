"""Chunk sets (common/chunks.py): the format, the reassembler's rules and bounds."""

from __future__ import annotations

import hashlib
import os
import random
import sys
from pathlib import Path

import msgpack
import pytest

from common.chunks import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_TOTAL,
    MAGIC,
    MAX_HEADER_BYTES,
    Added,
    ChunkError,
    ChunkLimits,
    Complete,
    Reassembler,
    chunk_count,
    is_chunk,
    join,
    needs_chunks,
    parse,
    split,
)
from common.errors import FedqError
from common.refusals import Refusal
from common.transport.base import (
    MAX_PREFETCH_MESSAGES,
    Chunking,
    DeadLetter,
    StreamJoiner,
    merge_dead_letters,
)
from common.wire import DEFAULT_LIMITS


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _body(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _messages(body: bytes, size: int = 100, set_id: str = "u1") -> list[bytes]:
    return list(split(body, id=set_id, chunk_size=size))


def _reassembler(clock: Clock | None = None, **limits: object) -> Reassembler[int]:
    return Reassembler(ChunkLimits(**limits), clock or Clock())  # type: ignore[arg-type]


def _add_all(r: Reassembler[int], messages: list[bytes], sender: str = "bank-a") -> list[object]:
    return [r.add(parse(m), i, sender) for i, m in enumerate(messages)]


# ------------------------------------------------------------------ the format


def test_split_makes_the_documented_header_and_slices() -> None:
    body = _body(250)
    messages = _messages(body)
    assert len(messages) == 3 == chunk_count(250, 100)
    for index, message in enumerate(messages):
        assert message.startswith(MAGIC + b"\x01")
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(message)
        fields = unpacker.unpack()
        data = message[unpacker.tell() :]
        assert fields[:7] == ["fedq-chunk", 1, "u1", index, 3, 250, 100]
        assert data == body[index * 100 : (index + 1) * 100]
        assert fields[7] == hashlib.sha256(data).digest()
        assert fields[8] == hashlib.sha256(body).digest()
        chunk = parse(message)
        assert (chunk.header.start, chunk.header.end) == (index * 100, min(250, index * 100 + 100))
        assert chunk.prefix + bytes(chunk.data) == message


def test_only_large_or_lookalike_bodies_are_chunked() -> None:
    assert not needs_chunks(b"x" * 100, 100)
    assert needs_chunks(b"x" * 101, 100)
    # A small body that begins like a chunk would be taken for one: it is sent as a set.
    lookalike = MAGIC + b"not really"
    assert needs_chunks(lookalike, 100)
    assert join(_messages(lookalike)) == lookalike
    # No fedq envelope (a msgpack map) begins with the magic.
    assert not is_chunk(msgpack.packb({"k": "u"}))


def test_the_default_sizes_fit_the_broker_and_the_decoder() -> None:
    conf = Path(__file__).resolve().parent.parent / "broker_config" / "rabbitmq.conf"
    (line,) = [x for x in conf.read_text().splitlines() if x.startswith("max_message_size")]
    broker_limit = int(line.split("=")[1])
    assert broker_limit > DEFAULT_CHUNK_SIZE + MAX_HEADER_BYTES
    assert DEFAULT_LIMITS.max_message_bytes == DEFAULT_MAX_TOTAL


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: b"\x99\xaafedq-chunX" + m[12:], Refusal.MALFORMED),
        (lambda m: m[:13], Refusal.MALFORMED),
        (lambda m: MAGIC + b"\x02" + m[13:], Refusal.UNSUPPORTED_VERSION),
        (lambda m: m + b"extra", Refusal.SIZE_MISMATCH),
        (lambda m: m[:-1], Refusal.SIZE_MISMATCH),
    ],
)
def test_parse_refuses_bad_messages(mutate: object, reason: Refusal) -> None:
    message = _messages(_body(250))[0]
    with pytest.raises(ChunkError) as caught:
        parse(mutate(message))  # type: ignore[operator]
    assert caught.value.reason is reason
    assert isinstance(caught.value, FedqError)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (["fedq-chunk", 1, "", 0, 1, 5, 5], Refusal.INVALID_FIELD),  # empty id
        (["fedq-chunk", 1, "u", 0, 2, 5, 5], Refusal.INVALID_FIELD),  # count != ceil(5/5)
        (["fedq-chunk", 1, "u", 1, 1, 5, 5], Refusal.INVALID_FIELD),  # index past count
        (["fedq-chunk", 1, "u", 0, 1, 0, 5], Refusal.INVALID_FIELD),  # empty body
        (["fedq-chunk", 1, "u", True, 1, 5, 5], Refusal.INVALID_FIELD),  # a bool index
        (["fedq-chunk", 1, "u", 0, 1, 5, 0], Refusal.INVALID_FIELD),  # zero size
    ],
)
def test_parse_refuses_inconsistent_headers(fields: list[object], reason: Refusal) -> None:
    digest = hashlib.sha256(b"hello").digest()
    message = msgpack.packb([*fields, digest, digest], use_bin_type=True) + b"hello"
    with pytest.raises(ChunkError) as caught:
        parse(message)
    assert caught.value.reason is reason


def test_split_refuses_what_it_cannot_describe() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        list(split(b"x" * 10, id="", chunk_size=4))
    with pytest.raises(ValueError, match="at most 255"):
        list(split(b"x" * 10, id="u" * 256, chunk_size=4))
    with pytest.raises(ValueError, match="positive"):
        list(split(b"x" * 10, id="u", chunk_size=0))


# ------------------------------------------------------------------ the reassembler


def test_chunks_in_any_order_with_copies_make_the_body_once() -> None:
    body = _body(1000, seed=3)
    messages = _messages(body)
    order = messages + messages[2:5]  # copies of three chunks
    random.Random(7).shuffle(order)
    r = _reassembler()
    done = [x for x in _add_all(r, order) if isinstance(x, Complete)]
    assert len(done) == 1
    assert bytes(done[0].body) == body
    assert done[0].key == ("bank-a", "u1")
    assert len(done[0].parts) <= len(order)  # every message received before completion
    assert len(r) == 0 and r.held_bytes == 0


def test_exact_copies_are_ignored_and_their_handles_kept() -> None:
    messages = _messages(_body(300))
    r = _reassembler()
    assert r.add(parse(messages[0]), 10, "s") is Added.STORED
    assert r.add(parse(messages[0]), 11, "s") is Added.DUPLICATE
    assert r.add(parse(messages[1]), 12, "s") is Added.STORED
    done = r.add(parse(messages[2]), 13, "s")
    assert isinstance(done, Complete)
    assert [p.handle for p in done.parts] == [10, 11, 12, 13]
    # Every part rebuilds its message byte for byte from the body.
    assert [p.message(done.body) for p in done.parts] == [
        messages[0],
        messages[0],
        messages[1],
        messages[2],
    ]


def test_a_late_copy_of_a_completed_set_is_recognised() -> None:
    messages = _messages(_body(300))
    r = _reassembler()
    assert isinstance(_add_all(r, messages)[-1], Complete)
    assert r.add(parse(messages[1]), 99, "bank-a") is Added.LATE
    assert len(r) == 0  # no new set was opened for it
    # Another sender's chunks under the same id are another set.
    assert r.add(parse(messages[1]), 99, "bank-b") is Added.STORED


def test_senders_never_share_a_set() -> None:
    body = _body(300)
    messages = _messages(body)
    r = _reassembler()
    r.add(parse(messages[0]), 0, "bank-a")
    r.add(parse(messages[1]), 1, "bank-b")  # bank-b cannot complete bank-a's set
    assert r.add(parse(messages[2]), 2, "bank-a") is Added.STORED
    assert len(r) == 2
    done = r.add(parse(messages[1]), 3, "bank-a")
    assert isinstance(done, Complete) and bytes(done.body) == body


def test_a_chunk_whose_data_does_not_match_its_hash_is_refused_alone() -> None:
    messages = _messages(_body(300))
    r = _reassembler()
    r.add(parse(messages[0]), 0, "s")
    bad = bytearray(messages[1])
    bad[-1] ^= 0xFF
    with pytest.raises(ChunkError) as caught:
        r.add(parse(bytes(bad)), 1, "s")
    assert caught.value.reason is Refusal.HASH_MISMATCH
    assert caught.value.failed is None  # the set goes on: a good copy may still come
    r.add(parse(messages[1]), 2, "s")
    assert isinstance(r.add(parse(messages[2]), 3, "s"), Complete)


def test_chunks_that_disagree_with_their_set_are_refused() -> None:
    first = _messages(_body(300, seed=1))
    other = _messages(_body(300, seed=2))  # same id, another body
    longer = _messages(_body(400, seed=1))
    r = _reassembler()
    r.add(parse(first[0]), 0, "s")
    for wrong in (other[1], longer[1]):
        with pytest.raises(ChunkError) as caught:
            r.add(parse(wrong), 1, "s")
        assert caught.value.reason is Refusal.INVALID_FIELD
        assert "disagrees" in caught.value.detail
    assert r.missing(("s", "u1")) == [1, 2]


def test_a_set_whose_body_hash_differs_fails_whole() -> None:
    body = _body(300)
    messages = _messages(body)
    # Forge a set whose chunks are consistent but whose whole hash names another body.
    forged = []
    for m in messages:
        chunk = parse(m)
        h = chunk.header
        header = msgpack.packb(
            ["fedq-chunk", 1, h.id, h.index, h.count, h.total, h.size, h.chunk_hash, b"\0" * 32],
            use_bin_type=True,
        )
        forged.append(header + bytes(chunk.data))
    r = _reassembler()
    r.add(parse(forged[0]), 0, "s")
    r.add(parse(forged[1]), 1, "s")
    with pytest.raises(ChunkError) as caught:
        r.add(parse(forged[2]), 2, "s")
    failed = caught.value.failed
    assert caught.value.reason is Refusal.HASH_MISMATCH
    assert failed is not None
    assert [p.handle for p in failed.parts] == [0, 1, 2]
    assert failed.messages() == forged  # the messages as they were sent, for dead letters
    assert len(r) == 0


def test_bounds_on_size_chunks_and_open_sets() -> None:
    r = _reassembler(max_total=1000, max_chunks=5, max_incomplete=2)
    with pytest.raises(ChunkError) as caught:
        r.add(parse(_messages(_body(1001))[0]), 0, "s")
    assert caught.value.reason is Refusal.TOO_LARGE
    with pytest.raises(ChunkError) as caught:
        r.add(parse(_messages(_body(600))[0]), 0, "s")  # six chunks of 100
    assert caught.value.reason is Refusal.TOO_LARGE
    assert len(r) == 0
    r.add(parse(_messages(_body(200), set_id="a")[0]), 0, "s")
    r.add(parse(_messages(_body(200), set_id="b")[0]), 0, "s")
    with pytest.raises(ChunkError) as caught:
        r.add(parse(_messages(_body(200), set_id="c")[0]), 0, "s")
    assert caught.value.reason is Refusal.CHUNKS_INCOMPLETE
    assert "2 sets are incomplete" in caught.value.detail
    assert len(r) == 2


def test_one_sender_cannot_hold_more_than_its_share_of_open_sets() -> None:
    """A hostile bank sends the first chunk of set after set (each small chunk opens a
    buffer of the whole length): past ``max_per_sender`` its sets are refused, and the
    other banks' sets still open and complete."""
    r = _reassembler(max_incomplete=16, max_per_sender=2)
    for n in range(2):
        r.add(parse(_messages(_body(500, n), set_id=f"junk-{n}")[0]), n, "hostile")
    with pytest.raises(ChunkError) as caught:
        r.add(parse(_messages(_body(500, 9), set_id="junk-9")[0]), 9, "hostile")
    assert caught.value.reason is Refusal.CHUNKS_INCOMPLETE
    assert "its sender has 2 sets" in caught.value.detail
    assert r.held_by("hostile") == 2 and r.held_bytes == 1000
    honest = _body(300, 5)
    assert getattr(_add_all(r, _messages(honest), "bank-a")[-1], "body", None) == honest


def test_the_stream_joiner_gives_up_the_crowding_senders_own_set() -> None:
    """Reading the audit stream, a sender over its share loses its own oldest set, not
    another bank's."""
    joiner = StreamJoiner(ChunkLimits(max_incomplete=16, max_per_sender=1))
    honest = _messages(_body(250, 1), set_id="a")
    junk = [_messages(_body(250, 10 + n), set_id=f"junk-{n}")[0] for n in range(2)]
    assert joiner.feed(honest[0], "bank-a") == []
    assert joiner.feed(junk[0], "hostile") == []
    assert joiner.feed(junk[1], "hostile") == [junk[0]]  # its own, as it was sent
    out = [x for m in honest[1:] for x in joiner.feed(m, "bank-a")]
    assert out == [_body(250, 1)]


def test_an_idle_set_expires_with_its_reason_and_handles() -> None:
    clock = Clock()
    r = _reassembler(clock, timeout_s=10.0)
    messages = _messages(_body(500))
    r.add(parse(messages[0]), 0, "s")
    clock.now += 6
    r.add(parse(messages[3]), 3, "s")  # progress: the idle time starts again
    assert r.next_deadline() == clock.now + 10
    clock.now += 9
    assert r.expire() == []
    r.add(parse(_messages(_body(200), set_id="other")[0]), 0, "s")
    clock.now += 1
    (failed,) = r.expire()  # "u1" idle 10 s; "other" only 1 s
    assert failed.reason is Refusal.CHUNKS_INCOMPLETE
    assert failed.key == ("s", "u1")
    assert "2 of 5 chunks" in failed.detail
    assert [p.handle for p in failed.parts] == [0, 3]
    assert failed.messages() == [messages[0], messages[3]]
    assert len(r) == 1


def test_a_duplicate_is_no_progress() -> None:
    clock = Clock()
    r = _reassembler(clock, timeout_s=10.0)
    messages = _messages(_body(300))
    r.add(parse(messages[0]), 0, "s")
    clock.now += 9
    assert r.add(parse(messages[0]), 1, "s") is Added.DUPLICATE
    clock.now += 1
    assert len(r.expire()) == 1


def test_the_reassembler_holds_one_buffer_per_set_and_no_chunk() -> None:
    size, count = 1000, 20
    body = _body(size * count - 7)
    messages = _messages(body, size=size)
    r = _reassembler()
    refs = []
    for i, m in enumerate(messages[:-1]):
        before = sys.getrefcount(m)
        r.add(parse(m), i, "s")
        refs.append(sys.getrefcount(m) - before)
    assert refs == [0] * (count - 1)  # no message (nor a view of it) is kept
    (buffer,) = r.buffers()
    assert isinstance(buffer, bytearray)
    assert len(buffer) == len(body) == r.held_bytes
    done = r.add(parse(messages[-1]), count, "s")
    assert isinstance(done, Complete) and bytes(done.body) == body
    assert r.buffers() == [] and r.held_bytes == 0


def test_a_chunk_copied_before_the_message_changes_keeps_its_bytes() -> None:
    messages = _messages(_body(300))
    r = _reassembler()
    for i, m in enumerate(messages):
        mutable = bytearray(m)
        out = r.add(parse(mutable), i, "s")
        mutable[-5:] = b"\0" * 5  # the receiver reuses its buffer: the set has a copy
    assert isinstance(out, Complete)
    assert bytes(out.body) == join(messages)


def test_join_needs_a_whole_set() -> None:
    messages = _messages(_body(300))
    with pytest.raises(ChunkError) as caught:
        join(messages[:2])
    assert caught.value.reason is Refusal.CHUNKS_INCOMPLETE


def test_limits_must_make_sense() -> None:
    with pytest.raises(ValueError, match="positive"):
        ChunkLimits(max_total=0)
    with pytest.raises(ValueError, match="timeout"):
        ChunkLimits(timeout_s=0)
    with pytest.raises(ValueError, match="positive"):
        Chunking(chunk_size=0)


# ------------------------------------------------------------------ transport helpers


def test_the_message_prefetch_lets_a_whole_update_through() -> None:
    chunking = Chunking(chunk_size=100, limits=ChunkLimits(max_total=800))
    assert chunking.max_chunks == 8
    # Not told the update size: room for ``prefetch`` updates of the largest size.
    assert chunking.prefetch_messages(3) == 24
    # Told: room for ``prefetch - 1`` updates of that size and one of the largest.
    assert chunking.prefetch_messages(3, update_bytes=50) == 3 * 1 + 7
    assert chunking.prefetch_messages(3, update_bytes=250) == 3 * 3 + 5
    assert chunking.prefetch_messages(1, update_bytes=50) >= chunking.max_chunks
    # max_chunks caps the largest set too.
    capped = Chunking(chunk_size=100, limits=ChunkLimits(max_total=800, max_chunks=4))
    assert capped.prefetch_messages(2) == 8
    huge = Chunking(chunk_size=1, limits=ChunkLimits(max_total=2**31, max_chunks=2**31))
    assert huge.prefetch_messages(64) == MAX_PREFETCH_MESSAGES
    with pytest.raises(ValueError, match="positive"):
        chunking.prefetch_messages(0)


def test_the_stream_joiner_yields_whole_bodies_where_they_complete() -> None:
    a, b = _body(250, 1), _body(250, 2)
    ma, mb = _messages(a, set_id="a"), _messages(b, set_id="b")
    joiner = StreamJoiner(ChunkLimits())
    stream = [
        (b"plain-1", "bank-a"),
        (ma[0], "bank-a"),
        (mb[0], "bank-b"),
        (ma[1], "bank-a"),
        (ma[1], "bank-a"),  # a copy
        (mb[1], "bank-b"),
        (ma[2], "bank-a"),
        (ma[2], "bank-a"),  # a late copy
        (b"plain-2", "bank-b"),
    ]
    out = [x for body, sender in stream for x in joiner.feed(body, sender)]
    assert out == [b"plain-1", a, b"plain-2"]
    assert joiner.finish() == [mb[0], mb[1]]  # b never completed: as it was sent


def test_the_stream_joiner_gives_up_the_oldest_set_to_make_room() -> None:
    joiner = StreamJoiner(ChunkLimits(max_incomplete=1))
    first = _messages(_body(250, 1), set_id="a")
    second = _messages(_body(250, 2), set_id="b")
    assert joiner.feed(first[0], "s") == []
    assert joiner.feed(second[0], "s") == [first[0]]
    assert joiner.feed(b"\x99\xaafedq-chunk\x01\xc1", "s") == [b"\x99\xaafedq-chunk\x01\xc1"]
    assert joiner.finish() == [second[0]]


def test_dead_letters_of_a_set_merge_into_one() -> None:
    body = _body(250)
    messages = _messages(body)
    dead = [
        DeadLetter(b"whole", "malformed", "x"),
        *(DeadLetter(m, "too_stale", "old", {"x-fedq-user-id": "bank-a"}) for m in messages),
        DeadLetter(_messages(_body(250, 9), set_id="cut")[0], "chunks_incomplete", "t"),
    ]
    merged = merge_dead_letters(dead)
    assert [(d.body, d.reason) for d in merged] == [
        (b"whole", "malformed"),
        (body, "too_stale"),
        (dead[-1].body, "chunks_incomplete"),
    ]


def test_chunking_round_trips_many_sizes() -> None:
    for n in (1, 99, 100, 101, 199, 200, 201, 1000):
        body = os.urandom(n)
        if not needs_chunks(body, 100):
            continue
        messages = _messages(body)
        assert len(messages) == chunk_count(n, 100)
        assert join(reversed(messages)) == body
