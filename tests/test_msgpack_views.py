"""common/msgpack_views.py: the same documents as msgpack.unpackb, large bins as views."""

from __future__ import annotations

import random
import struct
from typing import Any

import msgpack
import pytest
import torch

from common.errors import DecodeError
from common.msgpack_views import UnpackError, unpackb_views
from common.wire import UpdateEnvelope, decode_update, encode_update

pytestmark = pytest.mark.timeout(60)

LIMITS: dict[str, int] = {
    "max_bin_len": 1 << 20,
    "max_str_len": 64,
    "max_array_len": 16,
    "max_map_len": 16,
}


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    if not all(isinstance(k, str) for k, _ in pairs):
        raise ValueError("map keys must be strings")
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a map repeats a key")
    return out


def same(a: tuple[str, Any], b: tuple[str, Any]) -> bool:
    """Equal outcomes, floats compared by their bits (NaN equals NaN)."""
    return a[0] == b[0] and msgpack.packb(a[1], use_bin_type=True) == msgpack.packb(
        b[1], use_bin_type=True
    )


def reference(data: bytes) -> tuple[str, Any]:
    try:
        return "ok", msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_ext_len=0,
            object_pairs_hook=_pairs,
            max_bin_len=LIMITS["max_bin_len"],
            max_str_len=LIMITS["max_str_len"],
            max_array_len=LIMITS["max_array_len"],
            max_map_len=LIMITS["max_map_len"],
        )
    except Exception:
        return "refused", None


def ours(data: bytes, view_min: int = 8) -> tuple[str, Any]:
    try:
        value = unpackb_views(
            bytearray(data), object_pairs_hook=_pairs, view_min=view_min, **LIMITS
        )
    except (UnpackError, ValueError):
        return "refused", None
    return "ok", _plain(value)


def _plain(value: Any) -> Any:
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 4 else 8)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, 1, 127, 128, 255, 256, 65535, 65536, 2**32, 2**64 - 1])
    if kind == 2:
        return rng.choice([-1, -32, -33, -128, -129, -32768, -(2**31), -(2**63)])
    if kind == 3:
        return rng.choice([0.0, -1.5, 1e300, float("inf"), 3.25])
    if kind == 4:
        return "".join(rng.choice("ab\u00e9\u4e2d") for _ in range(rng.randrange(0, 40)))
    if kind in (5, 6, 7):
        return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 8, 31, 300])))
    if kind in (8, 9):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 6))]
    return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.randrange(0, 6))}


def test_same_documents_as_msgpack_and_large_bins_are_views() -> None:
    rng = random.Random(7)
    for _ in range(600):
        doc = random_value(rng)
        data = msgpack.packb(doc, use_bin_type=True)
        assert same(ours(data), reference(data)), doc
    blob = bytes(range(256)) * 4
    buf = bytearray(msgpack.packb({"b": blob, "s": b"tiny"}, use_bin_type=True))
    doc = unpackb_views(buf, object_pairs_hook=_pairs, view_min=64, **LIMITS)
    assert isinstance(doc["b"], memoryview) and isinstance(doc["s"], bytes)
    buf[buf.index(blob)] = 0xFF  # the view is the input's memory
    assert doc["b"][0] == 0xFF


def test_float32_and_every_header_width() -> None:
    cases = [
        b"\xca" + struct.pack(">f", 1.5),
        b"\xd9\x03abc",
        b"\xda\x00\x03abc",
        b"\xdb\x00\x00\x00\x03abc",
        b"\xc4\x02hi",
        b"\xc5\x00\x02hi",
        b"\xc6\x00\x00\x00\x02hi",
        b"\xdc\x00\x01\x01",
        b"\xdd\x00\x00\x00\x01\x01",
        b"\xde\x00\x01\xa1a\x01",
        b"\xdf\x00\x00\x00\x01\xa1a\x01",
        b"\xd0\xff",
        b"\xd1\xff\xfe",
        b"\xcc\xff",
        b"\xcf" + b"\xff" * 8,
    ]
    for data in cases:
        assert same(ours(data), reference(data)), data
        assert ours(data)[0] == "ok"


def test_refuses_what_msgpack_refuses() -> None:
    rng = random.Random(11)
    bad = [
        b"",
        b"\xc1",  # never used
        b"\xd4\x01\x00",  # fixext
        b"\xc7\x01\x01\x00",  # ext8
        b"\x81\x01\x02",  # int key
        b"\x82\xa1a\x01\xa1a\x02",  # repeated key
        b"\xa2\xff\xfe",  # not UTF-8
        b"\x01\x02",  # extra data
        b"\x91",  # truncated
        b"\xc6\xff\xff\xff\xff",  # bin over the limit
        b"\xdc\x00\x11" + b"\x00" * 17,  # array over the limit
        b"\xd9\x41" + b"a" * 65,  # str over the limit
    ]
    for data in bad:
        assert ours(data) == reference(data) == ("refused", None), data
    for _ in range(300):  # truncations and corruptions of valid documents
        mutable = bytearray(msgpack.packb(random_value(rng), use_bin_type=True))
        if rng.random() < 0.5 and len(mutable) > 1:
            del mutable[rng.randrange(1, len(mutable)) :]
        else:
            mutable[rng.randrange(len(mutable))] = rng.randrange(256)
        data = bytes(mutable)
        assert same(ours(data), reference(data)), data


def test_deep_nesting_is_refused_not_a_crash() -> None:
    data = b"\x91" * 5000 + b"\x00"
    with pytest.raises(UnpackError, match="nested deeper"):
        unpackb_views(bytearray(data), object_pairs_hook=_pairs, **LIMITS)


def _update(n: int) -> bytes:
    env = UpdateEnvelope(
        task="t",
        participant="bank-a",
        update_id="u-1",
        base_version=0,
        num_samples=10,
        tensors={"w": torch.arange(n, dtype=torch.float32), "b": torch.ones(3)},
        codec="raw",
    )
    body, _ = encode_update(env)
    return body


def test_decode_update_from_a_bytearray_gives_views_into_it() -> None:
    body = _update(50_000)
    from_bytes = decode_update(body)
    buf = bytearray(body)
    from_views = decode_update(buf)
    assert from_views.content_hash == from_bytes.content_hash
    for name, t in from_bytes.tensors.items():
        assert torch.equal(from_views.tensors[name], t)
    base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    w = from_views.tensors["w"]
    assert base <= w.data_ptr() < base + len(buf)  # no copy: the tensor lies inside the body


def test_a_corrupt_bytearray_body_is_refused_with_a_reason() -> None:
    buf = bytearray(_update(50_000))
    buf[-40] ^= 0xFF  # inside the payload: the content hash no longer matches
    with pytest.raises(DecodeError) as e:
        decode_update(buf)
    assert e.value.reason.value in {"hash_mismatch", "malformed", "invalid_field"}
    with pytest.raises(DecodeError) as e2:
        decode_update(bytearray(_update(50_000))[:-5])
    assert e2.value.reason.value == "malformed"


def test_a_document_of_too_many_values_is_refused_before_they_are_built() -> None:
    # 2M nested empty arrays in arrays of 16: msgpack would build them all (gigabytes of
    # Python objects for a body of a bank's largest size); refused at the budget.
    from common.msgpack_views import MAX_VALUES

    leaf = b"\x9f" + b"\x90" * 15  # an array of 15 empty arrays
    count = MAX_VALUES // 16 + 10
    data = b"\xdd" + count.to_bytes(4, "big") + leaf * count
    with pytest.raises(UnpackError, match="values in one document"):
        unpackb_views(
            bytearray(data),
            object_pairs_hook=_pairs,
            max_bin_len=1 << 30,
            max_str_len=64,
            max_array_len=1 << 30,
            max_map_len=16,
        )
