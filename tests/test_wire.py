"""The wire format: round trips, limits, and refusal of every malformed input."""

from __future__ import annotations

import contextlib
import math
import tracemalloc
from typing import Any

import msgpack
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.dtypes import FLOAT_WIRE_DTYPES, WIRE_DTYPES
from common.errors import DecodeError, EncodeError
from common.hashing import TensorHasher
from common.wire import (
    DecodeLimits,
    ModelEnvelope,
    Tensors,
    TensorSpec,
    UpdateEnvelope,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
    peek_header,
    tensors_hash,
)

DTYPES = sorted(WIRE_DTYPES)
CODECS = ["zstd", "raw"]


def _tensor(dtype: str, shape: tuple[int, ...], raw: bytes) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` filled from ``raw`` (finite, valid bools)."""
    t_dtype = WIRE_DTYPES[dtype]
    n = math.prod(shape) * t_dtype.itemsize
    buf = bytearray((raw * (n // max(len(raw), 1) + 1))[:n]) if raw else bytearray(n)
    t = torch.tensor(list(buf), dtype=torch.uint8).view(t_dtype).reshape(shape)
    if dtype == "bool":
        return t.view(torch.uint8).remainder(2).view(torch.bool)
    if dtype in FLOAT_WIRE_DTYPES:
        return torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0)
    return t


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


tensor_st = st.builds(
    _tensor,
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple),
    st.binary(min_size=0, max_size=64),
)
tensors_st = st.dictionaries(
    st.text(
        st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")), min_size=1, max_size=12
    ),
    tensor_st,
    min_size=0,
    max_size=6,
)


def _update(tensors: Tensors, codec: str = "zstd", **kw: Any) -> UpdateEnvelope:
    fields: dict[str, Any] = {
        "task": "credit",
        "participant": "bank-a",
        "update_id": "01J9Z3-update-1",
        "base_version": 7,
        "num_samples": 120,
        "tensors": tensors,
        "metrics": {"auc": 0.71, "loss": 0.52},
        "codec": codec,
    }
    fields.update(kw)
    return UpdateEnvelope(**fields)


def _assert_same(a: Tensors, b: Tensors) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert _raw(a[name]) == _raw(b[name]), name  # bit for bit, -0.0 included


@given(tensors=tensors_st, codec=st.sampled_from(CODECS))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_update_round_trip_every_dtype_and_shape(tensors: Tensors, codec: str) -> None:
    env = _update(tensors, codec, created_at=1700000000.5, signature=b"\x01" * 64)
    data, digest = encode_update(env)
    out = decode_update(data)
    _assert_same(tensors, out.tensors)
    assert out.content_hash == digest == tensors_hash(tensors)
    assert (out.task, out.participant, out.update_id) == ("credit", "bank-a", "01J9Z3-update-1")
    assert (out.base_version, out.num_samples, out.codec) == (7, 120, codec)
    assert out.metrics == {"auc": 0.71, "loss": 0.52}
    assert out.created_at == 1700000000.5
    assert out.signature == b"\x01" * 64


@given(tensors=tensors_st, codec=st.sampled_from(CODECS), version=st.integers(0, 2**63 - 1))
@settings(max_examples=100)
def test_model_round_trip(tensors: Tensors, codec: str, version: int) -> None:
    data, digest = encode_model(
        ModelEnvelope(
            task="credit", version=version, tensors=tensors, version_hash=b"\x07" * 32, codec=codec
        )
    )
    out = decode_model(data)
    _assert_same(tensors, out.tensors)
    assert out.version == version
    assert out.version_hash == b"\x07" * 32
    assert out.content_hash == digest


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_with_real_values(dtype: str) -> None:
    if dtype == "bool":
        t = torch.tensor([[True, False, True]])
    elif dtype in FLOAT_WIRE_DTYPES:
        t = torch.tensor([[-1.5, 0.0, -0.0], [3.25, 1e-3, 65504.0]], dtype=WIRE_DTYPES[dtype])
    else:
        info = torch.iinfo(WIRE_DTYPES[dtype])
        t = torch.tensor([info.min, 0, info.max], dtype=WIRE_DTYPES[dtype])
    out = decode_update(encode_update(_update({"w": t}))[0])
    _assert_same({"w": t}, out.tensors)


def test_wire_layout_is_little_endian_raw_bytes() -> None:
    """Another language reads the payload as plain little-endian bytes."""
    t = torch.tensor([1.0, -2.0], dtype=torch.float32)
    doc = msgpack.unpackb(encode_update(_update({"w": t}, "raw"))[0])
    assert doc["ts"] == [{"n": "w", "d": "f32", "s": [2], "b": b"\x00\x00\x80?\x00\x00\x00\xc0"}]
    assert doc["fv"] == 1 and doc["k"] == "u"


def test_non_contiguous_and_views_encode_their_values() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    t = base.t()[1:]
    out = decode_update(encode_update(_update({"w": t}))[0])
    assert torch.equal(out.tensors["w"], t)


# ------------------------------------------------------------------ refusals


def _expect(reason: str, data: bytes, **kw: Any) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_update(data, **kw)
    assert info.value.reason == reason, info.value
    return info.value


_DROP = object()


def _doc(**changes: Any) -> bytes:
    """A valid update document with fields replaced (or dropped with _DROP), re-packed."""
    doc = msgpack.unpackb(encode_update(_update({"w": torch.ones(3)}))[0])
    for k, v in changes.items():
        if v is _DROP:
            doc.pop(k, None)
        else:
            doc[k] = v
    return bytes(msgpack.packb(doc))


@given(st.binary(max_size=2048))
@settings(max_examples=500)
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    for decode in (decode_update, decode_model, peek_header):
        with contextlib.suppress(DecodeError):
            decode(data)


@given(
    tensors=tensors_st,
    codec=st.sampled_from(CODECS),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(0, 10**6),
    mode=st.sampled_from(["flip", "truncate", "insert", "delete"]),
)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_messages_raise_only_decode_error(
    tensors: Tensors, codec: str, edits: list[tuple[int, int]], cut: int, mode: str
) -> None:
    data = bytearray(encode_update(_update(tensors, codec))[0])
    for pos, byte in edits:
        i = pos % len(data)
        if mode == "flip":
            data[i] ^= byte or 1
        elif mode == "insert":
            data.insert(i, byte)
        elif mode == "delete" and len(data) > 1:
            del data[i]
    if mode == "truncate":
        data = data[: cut % len(data)]
    try:
        out = decode_update(bytes(data))
    except DecodeError:
        return
    # A mutation that still decodes must have left the tensors intact (the hash guards them).
    _assert_same(tensors, out.tensors)


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(
    key=st.sampled_from(["fv", "k", "t", "p", "id", "bv", "n", "m", "c", "ts", "h", "at", "sg"]),
    value=json_like,
)
@settings(max_examples=400)
def test_wrongly_typed_fields_raise_only_decode_error(key: str, value: Any) -> None:
    if value is None:
        value = _DROP if key in ("at", "sg") else None
    with contextlib.suppress(DecodeError):
        decode_update(_doc(**{key: value}))


@given(entry=json_like)
@settings(max_examples=300)
def test_malformed_tensor_entries_raise_only_decode_error(entry: Any) -> None:
    with contextlib.suppress(DecodeError):
        decode_update(_doc(ts=[entry]))


def test_refusal_reasons() -> None:
    _expect("malformed", b"\xc1")
    _expect("malformed", msgpack.packb([1, 2, 3]))
    _expect("unsupported_version", _doc(fv=2))
    _expect("wrong_kind", _doc(k="m"))
    _expect("unknown_field", _doc(zz=1))
    _expect("missing_field", _doc(id=_DROP))
    _expect("invalid_field", _doc(t="no.dots"))
    _expect("invalid_field", _doc(bv=-1))
    _expect("invalid_field", _doc(n=0))
    _expect("invalid_field", _doc(m={"auc": float("nan")}))
    _expect("unknown_codec", _doc(c="lz4"))
    _expect("bad_dtype", _doc(ts=[{"n": "w", "d": "f128", "s": [1], "b": b""}]))
    _expect("bad_shape", _doc(ts=[{"n": "w", "d": "f32", "s": [-1], "b": b""}]))
    _expect("hash_mismatch", _doc(h=b"\x00" * 32))
    _expect("too_large", b"\x00" * 101, limits=DecodeLimits(max_message_bytes=100))


def _raw_tensor_doc(name: str, dtype: str, shape: list[int], raw: bytes) -> bytes:
    """An update whose one tensor carries ``raw`` as is (bypassing the encoder's checks)."""
    h = TensorHasher()
    h.add(name, dtype, tuple(shape), raw)
    return _doc(ts=[{"n": name, "d": dtype, "s": shape, "b": raw}], c="raw", h=h.digest())


def test_nan_and_inf_are_refused() -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        raw = _raw(torch.tensor([1.0, bad]))
        _expect("non_finite", _raw_tensor_doc("w", "f32", [2], raw))
        with pytest.raises(EncodeError, match="NaN or Inf"):
            encode_update(_update({"w": torch.tensor([1.0, bad])}))
    # ...unless the decoder is explicitly told to allow them.
    data = _raw_tensor_doc("w", "f32", [1], _raw(torch.tensor([float("nan")])))
    out = decode_update(data, limits=DecodeLimits(require_finite=False))
    assert torch.isnan(out.tensors["w"]).all()


def test_invalid_bool_bytes_refused() -> None:
    _expect("invalid_tensor", _raw_tensor_doc("w", "bool", [2], b"\x00\x02"))


def test_encoder_refuses_what_the_decoder_would() -> None:
    w = {"w": torch.zeros(1)}
    for bad in (
        _update(w, metrics={"auc": float("nan")}),
        _update(w, metrics={"": 1.0}),
        _update(w, metrics={f"m{i}": 1.0 for i in range(65)}),
        _update({"x" * 257: torch.zeros(1)}),
        _update({"\ud800": torch.zeros(1)}),
        _update({"w": torch.zeros([1] * 9)}),
        _update(w, signature=b"s" * 257),
        _update(w, created_at=float("inf")),
    ):
        with pytest.raises(EncodeError):
            encode_update(bad)


def test_limits_one_past_get_their_own_reason() -> None:
    many = [{"n": f"w{i}", "d": "f32", "s": [0], "b": b""} for i in range(4097)]
    _expect("too_many_tensors", _doc(ts=many))
    _expect("invalid_field", _doc(m={f"m{i}": 1.0 for i in range(65)}))


def test_repeated_map_keys_and_nil_optionals_are_refused() -> None:
    body = _doc()
    # Re-pack with "t" twice: build the map by hand (msgpack-python dicts cannot repeat keys).
    doc = msgpack.unpackb(body)
    items = [*list(doc.items()), ("t", "other")]
    packer = msgpack.Packer()
    repeated = packer.pack_map_header(len(items)) + b"".join(
        packer.pack(k) + packer.pack(v) for k, v in items
    )
    _expect("malformed", repeated)
    _expect("invalid_field", _doc(at=None))
    _expect("invalid_field", _doc(sg=None))
    _expect("unsupported_version", _doc(fv=1.0))


def test_shape_and_count_limits_refused_before_allocation() -> None:
    huge = [{"n": "w", "d": "f64", "s": [2**31, 2**31, 2**31], "b": b""}]
    _expect("too_large", _doc(ts=huge))
    many = [{"n": f"w{i}", "d": "f32", "s": [0], "b": b""} for i in range(20)]
    _expect("too_many_tensors", _doc(ts=many), limits=DecodeLimits(max_tensors=10))
    deep = [{"n": "w", "d": "f32", "s": [1] * 9, "b": b""}]
    _expect("bad_shape", _doc(ts=deep))
    # Zero bytes, but dimensions whose strides would overflow.
    empty_but_huge = [{"n": "w", "d": "f32", "s": [0] + [2**32 - 1] * 7, "b": b""}]
    _expect("bad_shape", _doc(ts=empty_but_huge))


def test_non_string_map_keys_are_malformed() -> None:
    mixed = msgpack.packb({"fv": 1, "k": "u", b"x": 1, "y": 2}, use_bin_type=True)
    _expect("malformed", mixed)


def test_expected_specs_pin_names_shapes_and_dtypes() -> None:
    data, _ = encode_update(_update({"w": torch.zeros(2, 3), "b": torch.zeros(2)}))
    good = {"w": TensorSpec((2, 3), "f32"), "b": TensorSpec((2,), "f32")}
    assert list(decode_update(data, expected=good).tensors) == ["w", "b"]
    for bad in (
        {"w": TensorSpec((3, 2), "f32"), "b": TensorSpec((2,), "f32")},
        {"w": TensorSpec((2, 3), "f64"), "b": TensorSpec((2,), "f32")},
        {"b": TensorSpec((2,), "f32"), "w": TensorSpec((2, 3), "f32")},
        {"w": TensorSpec((2, 3), "f32")},
    ):
        _expect("tensor_mismatch", data, expected=bad)


def _bomb(expanded: int, content_size: bool) -> bytes:
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=content_size)
    if content_size:
        return cctx.compress(bytes(expanded))
    chunk = bytes(1 << 20)
    comp = cctx.compressobj(size=-1)
    parts = [comp.compress(chunk) for _ in range(expanded >> 20)]
    parts.append(comp.flush())
    return b"".join(parts)


@pytest.mark.parametrize("content_size", [True, False], ids=["declared", "streamed"])
def test_decompression_bomb_refused_before_it_expands(content_size: bool) -> None:
    expanded = 256 << 20  # 256 MiB of zeros in a few kilobytes
    payload = _bomb(expanded, content_size)
    assert len(payload) < 128 * 1024
    h = TensorHasher()
    h.add("w", "f32", (16,), bytes(64))
    data = _doc(ts=[{"n": "w", "d": "f32", "s": [16], "b": payload}], c="zstd", h=h.digest())
    tracemalloc.start()
    try:
        err = _expect("size_mismatch", data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "shape needs 64" in str(err)
    assert peak < 4 * 1024 * 1024, f"decoder allocated {peak} bytes for a 64-byte tensor"


def test_encode_refuses_bad_values() -> None:
    with pytest.raises(EncodeError):
        encode_update(_update({"w": torch.zeros(2, dtype=torch.complex64)}))
    with pytest.raises(EncodeError):
        encode_update(_update({"w": torch.zeros(2)}, participant="bank a"))
    with pytest.raises(EncodeError):
        encode_update(_update({"w": torch.zeros(2)}, num_samples=0))
    with pytest.raises(EncodeError):
        encode_update(_update({"w": torch.zeros(2)}, codec="nope"))


def test_peek_header_reads_small_fields_only() -> None:
    head = peek_header(encode_update(_update({"w": torch.ones(4)}))[0])
    assert head["t"] == "credit" and head["p"] == "bank-a" and head["bv"] == 7
    assert "ts" not in head and "h" not in head


def test_limits_for_a_task_let_its_own_model_through_and_nothing_larger() -> None:
    """A model larger than the default message limit (it travels chunked) decodes under
    the task's limits; the default limits refuse it; a larger body is still refused."""
    from common.refusals import Refusal
    from common.wire import DEFAULT_LIMITS, limits_for

    small = DecodeLimits(max_message_bytes=1024, max_tensor_bytes=512)
    expected = {"w": TensorSpec((40, 25), "f32"), "b": TensorSpec((25,), "f32")}
    tensors = {"w": torch.ones(40, 25), "b": torch.zeros(25)}
    body, _ = encode_update(
        UpdateEnvelope(
            task="t",
            participant="bank-a",
            update_id="u1",
            base_version=0,
            num_samples=1,
            tensors=tensors,
            codec="raw",
        )
    )
    with pytest.raises(DecodeError) as err:
        decode_update(body, small, expected)
    assert err.value.reason is Refusal.TOO_LARGE
    limits = limits_for(expected, small)
    assert limits.max_tensor_bytes == 4100 and limits.max_message_bytes == 4100 + 64 + (64 << 10)
    assert torch.equal(decode_update(body, limits, expected).tensors["w"], tensors["w"])
    assert limits_for({}, small) == small
    assert limits_for({"w": TensorSpec((2,), "f32")}) == DEFAULT_LIMITS  # never lowered
