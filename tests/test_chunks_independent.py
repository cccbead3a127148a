"""A second implementation of the chunk format, written from docs/chunking.md alone
(sections 1 to 4), checked against the reference (common/chunks.py) both ways: the
reference's chunk messages parse and reassemble here; chunk messages built here are
accepted and reassembled by the reference, and the ones the document says to refuse
are refused with the reason it names.

Nothing here imports the reference's format code to build or parse: only msgpack and
hashlib, as a team writing a participant in another language would.
"""

from __future__ import annotations

import hashlib
import math
import os

import msgpack
import pytest

MAGIC = bytes([0x99, 0xAA]) + b"fedq-chunk"  # section 1: the 12 bytes every chunk begins with


def independent_split(body: bytes, set_id: str, size: int) -> list[bytes]:
    """Section 1 and 2: one message per slice, header then data, index order."""
    total = len(body)
    count = math.ceil(total / size)
    whole = hashlib.sha256(body).digest()
    out = []
    for index in range(count):
        data = body[index * size : min((index + 1) * size, total)]
        header = ["fedq-chunk", 1, set_id, index, count, total, size]
        header += [hashlib.sha256(data).digest(), whole]
        out.append(msgpack.packb(header, use_bin_type=True) + data)
    return out


def independent_parse(message: bytes) -> tuple[list[object], bytes]:
    """Section 1: the header (an array of nine) and the data after it."""
    assert message[:12] == MAGIC
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(message)
    header = unpacker.unpack()
    offset = unpacker.tell()
    assert offset <= 512
    assert isinstance(header, list) and len(header) == 9
    magic, version, set_id, index, count, total, size, chunk_hash, body_hash = header
    assert (magic, version) == ("fedq-chunk", 1)
    assert isinstance(set_id, str) and 1 <= len(set_id.encode()) <= 255
    assert count == math.ceil(total / size) and 0 <= index < count
    data = message[offset:]
    assert len(data) == min((index + 1) * size, total) - index * size
    assert hashlib.sha256(data).digest() == chunk_hash and len(body_hash) == 32
    return header, data


def independent_join(messages: list[bytes]) -> bytes:
    """Section 3: any order, exact duplicates ignored, the whole hash checked."""
    buffer: bytearray | None = None
    seen: set[int] = set()
    body_hash = b""
    for message in messages:
        header, data = independent_parse(message)
        index, total, size = int(header[3]), int(header[5]), int(header[6])  # type: ignore[call-overload]
        if buffer is None:
            buffer, body_hash = bytearray(total), bytes(header[8])  # type: ignore[call-overload]
        if index in seen:
            continue
        seen.add(index)
        buffer[index * size : index * size + len(data)] = data
    assert buffer is not None and len(seen) == int(header[4])  # type: ignore[call-overload]
    assert hashlib.sha256(buffer).digest() == body_hash
    return bytes(buffer)


def test_the_reference_chunks_parse_and_join_here() -> None:
    from common.chunks import split

    body = os.urandom(10_000)
    messages = list(split(body, id="u1", chunk_size=4096))
    assert [len(independent_parse(m)[1]) for m in messages] == [4096, 4096, 1808]
    assert independent_join(list(reversed(messages)) + messages[:1]) == body
    # Byte for byte what the document describes (shortest msgpack integers).
    assert messages == independent_split(body, "u1", 4096)


def test_chunks_built_from_the_document_are_reassembled_by_the_reference() -> None:
    from common.chunks import Reassembler, parse

    body = os.urandom(20_001)
    messages = independent_split(body, "set-7", 3000)
    assert len(messages) == 7
    order = [3, 0, 6, 6, 1, 5, 2, 4]  # shuffled, one exact duplicate
    reassembler: Reassembler[int] = Reassembler()
    results = [reassembler.add(parse(messages[i]), n, sender="bank-a") for n, i in enumerate(order)]
    done = results[-1]
    assert getattr(done, "body", None) == body
    assert len(reassembler) == 0


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda h, d: (["fedq-chunk", 2, *h[2:]], d), "unsupported_version"),
        (lambda h, d: ([*h[:4], h[4] + 1, *h[5:]], d), "invalid_field"),  # count != ceil
        (lambda h, d: (h, d[:-1]), "size_mismatch"),
        (lambda h, d: (h, bytes([d[0] ^ 1]) + d[1:]), "hash_mismatch"),
    ],
    ids=["version", "count", "short-data", "chunk-hash"],
)
def test_a_chunk_the_document_refuses_is_refused_by_the_reference_with_its_reason(
    tamper: object, reason: str
) -> None:
    from common.chunks import ChunkError, parse, verify

    header, data = independent_parse(independent_split(os.urandom(5000), "u2", 2048)[0])
    new_header, new_data = tamper(header, data)  # type: ignore[operator]
    message = msgpack.packb(new_header, use_bin_type=True) + new_data
    with pytest.raises(ChunkError) as err:
        verify(parse(message))
    assert err.value.reason.value == reason


def test_a_whole_body_hash_mismatch_refuses_the_set() -> None:
    """Section 3, step 7: every chunk good, the whole hash not the body's."""
    from common.chunks import ChunkError, Reassembler, parse

    body = os.urandom(5000)
    messages = []
    for m in independent_split(body, "u3", 2048):
        header, data = independent_parse(m)
        header[8] = hashlib.sha256(b"another body").digest()
        messages.append(msgpack.packb(header, use_bin_type=True) + data)
    reassembler: Reassembler[int] = Reassembler()
    for n, m in enumerate(messages[:-1]):
        reassembler.add(parse(m), n, sender="bank-a")
    with pytest.raises(ChunkError) as err:
        reassembler.add(parse(messages[-1]), len(messages), sender="bank-a")
    assert err.value.reason.value == "hash_mismatch"
