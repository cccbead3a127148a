"""A model envelope as segments: byte for byte ``pack_model``'s, the raw payloads
viewing the tensors' own memory."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.dtypes import FLOAT_WIRE_DTYPES, WIRE_DTYPES
from common.errors import EncodeError
from common.ids import NAME_RE
from common.model_segments import pack_model_segments
from common.segments import join, total
from common.wire import Tensors, decode_model, encode_tensors, pack_model

DTYPES = sorted(WIRE_DTYPES)
CODECS = ["raw", "zstd"]
#: Payload sizes on each side of msgpack's bin 8 / bin 16 / bin 32 boundaries.
EDGES = [0, 1, 255, 256, 65_535, 65_536, 65_537, 70_000]


def _tensor(dtype: str, elements: int, seed: int, dims: int) -> torch.Tensor:
    """``elements`` values of ``dtype`` (finite floats, valid bools) shaped in ``dims``."""
    t_dtype = WIRE_DTYPES[dtype]
    raw = np.random.default_rng(seed).integers(0, 256, elements * t_dtype.itemsize, np.uint8)
    t = torch.from_numpy(raw).view(t_dtype) if elements else torch.empty(0, dtype=t_dtype)
    if dtype == "bool":
        t = t.view(torch.uint8).remainder(2).view(torch.bool)
    elif dtype in FLOAT_WIRE_DTYPES:
        t = torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0)
    if dims == 0 and elements == 1:
        return t.reshape(())
    if dims >= 2 and elements % 2 == 0 and elements:
        return t.reshape(2, elements // 2, *([1] * (dims - 2)))
    return t.reshape(elements, *([1] * max(0, dims - 1)))


def _by_bytes(dtype: str, size: int) -> int:
    """Elements of ``dtype`` making at least ``size`` bytes (a payload on an edge)."""
    return math.ceil(size / WIRE_DTYPES[dtype].itemsize)


tensor_st = st.builds(
    lambda dtype, elements, seed, dims: _tensor(dtype, elements, seed, dims),
    st.sampled_from(DTYPES),
    st.one_of(st.integers(0, 40), st.sampled_from(EDGES)),
    st.integers(0, 2**32 - 1),
    st.integers(0, 4),
)
names_st = st.text(
    st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")), min_size=1, max_size=40
)
tensors_st = st.dictionaries(names_st, tensor_st, min_size=0, max_size=20)
versions_st = st.sampled_from([0, 1, 127, 128, 255, 256, 65_535, 65_536, 2**32, 2**63 - 1])
tasks_st = st.from_regex(NAME_RE, fullmatch=True)


@given(
    tensors=tensors_st,
    codec=st.sampled_from(CODECS),
    version=versions_st,
    task=tasks_st,
    version_hash=st.sampled_from([b"", b"\x07" * 32]),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_segments_join_to_pack_models_bytes(
    tensors: Tensors, codec: str, version: int, task: str, version_hash: bytes
) -> None:
    segments, digest = pack_model_segments(task, version, version_hash, tensors, codec)
    encoded = encode_tensors(tensors, codec)
    expected = pack_model(task, version, version_hash, encoded)
    assert join(segments) == expected
    assert total(segments) == len(expected)
    assert digest == encoded.digest


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("count", [15, 16, 300])  # fixarray, array 16 of tensors
def test_every_dtype_on_every_bin_edge(codec: str, count: int) -> None:
    cases = [(d, _by_bytes(d, size)) for d in DTYPES for size in EDGES]
    tensors = {
        f"t{i}.{d}": _tensor(d, n, seed=i, dims=i % 4)
        for i, (d, n) in enumerate((cases * (count // len(cases) + 1))[:count])
    }
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(3, 0)
    segments, digest = pack_model_segments("credit", 9, b"\x01" * 32, tensors, codec)
    encoded = encode_tensors(tensors, codec)
    assert join(segments) == pack_model("credit", 9, b"\x01" * 32, encoded)
    assert digest == encoded.digest
    out = decode_model(join(segments))
    assert list(out.tensors) == list(tensors)
    assert all(torch.equal(out.tensors[k], t) for k, t in tensors.items())


def test_tensors_that_are_not_plain_views_still_match() -> None:
    base = torch.randn(64, 32)
    tensors = {
        "transposed": base.t(),  # not contiguous: copied, as encode_tensors copies it
        "grad": torch.randn(10, requires_grad=True),
        "bf16": torch.randn(300).bfloat16(),
        "slice": base[3:9],
    }
    for codec in CODECS:
        segments, _ = pack_model_segments("credit", 1, b"", tensors, codec)
        assert join(segments) == pack_model("credit", 1, b"", encode_tensors(tensors, codec))


def _address(segment: bytes | bytearray | memoryview) -> int:
    return int(np.frombuffer(segment, dtype=np.uint8).ctypes.data)


def test_a_raw_payload_is_the_tensors_own_memory() -> None:
    tensors = {
        "w": torch.randn(1000, 300),
        "h": torch.randn(4096).half(),
        "b": torch.randn(5000).bfloat16(),
    }
    segments, _ = pack_model_segments("credit", 1, b"", tensors, "raw")
    views = [s for s in segments if isinstance(s, memoryview)]
    assert [_address(v) for v in views] == [t.data_ptr() for t in tensors.values()]
    assert [v.nbytes for v in views] == [t.numel() * t.element_size() for t in tensors.values()]
    # The envelope's own bytes are all there is besides them: a few dozen per tensor.
    assert total(segments) - sum(v.nbytes for v in views) < 200
    before = join(segments)
    tensors["w"][0, 0] = 1234.5  # the segment shows the change: it is that memory
    assert join(segments) != before
    assert bytes(views[0][:4]) == struct.pack("<f", 1234.5)


def test_zstd_payloads_are_the_compressed_frames() -> None:
    tensors = {"zeros": torch.zeros(100_000)}
    segments, _ = pack_model_segments("credit", 1, b"", tensors, "zstd")
    assert total(segments) < 10_000
    assert not any(isinstance(s, memoryview) for s in segments)


def _same_error(make: Callable[[], Any], reference: Callable[[], Any]) -> None:
    with pytest.raises(EncodeError) as got:
        make()
    with pytest.raises(EncodeError) as want:
        reference()
    assert type(got.value) is type(want.value)
    assert str(got.value) == str(want.value)


GOOD: Tensors = {"w": torch.ones(3)}


@pytest.mark.parametrize(
    ("tensors", "task", "version", "version_hash", "codec"),
    [
        ({"w": torch.tensor([1.0, math.nan])}, "credit", 1, b"", "raw"),  # NonFiniteError
        ({"w": torch.tensor([math.inf]).bfloat16()}, "credit", 1, b"", "zstd"),
        ({"": torch.ones(1)}, "credit", 1, b"", "raw"),
        ({"x" * 257: torch.ones(1)}, "credit", 1, b"", "raw"),
        ({"\ud800": torch.ones(1)}, "credit", 1, b"", "raw"),
        ({"w": torch.ones(1, dtype=torch.complex64)}, "credit", 1, b"", "raw"),
        ({"w": torch.ones([1] * 9)}, "credit", 1, b"", "raw"),
        ({"w": [1.0]}, "credit", 1, b"", "raw"),
        (GOOD, "no spaces", 1, b"", "raw"),
        (GOOD, "credit", -1, b"", "raw"),
        (GOOD, "credit", 2**63, b"", "raw"),
        (GOOD, "credit", True, b"", "raw"),
        (GOOD, "credit", 1, b"\x01" * 31, "raw"),
        (GOOD, "credit", 1, b"", "nope"),
        (GOOD, "credit", 1, b"", "int8"),
        (GOOD, "credit", 1, b"", "f16+zstd"),
    ],
)
def test_bad_input_is_refused_as_pack_model_refuses_it(
    tensors: Any, task: str, version: int, version_hash: bytes, codec: str
) -> None:
    _same_error(
        lambda: pack_model_segments(task, version, version_hash, tensors, codec),
        lambda: pack_model(task, version, version_hash, encode_tensors(tensors, codec)),
    )


def test_too_many_tensors_are_refused() -> None:
    many = {f"t{i}": torch.ones(1) for i in range(4097)}
    _same_error(
        lambda: pack_model_segments("credit", 1, b"", many, "raw"),
        lambda: pack_model("credit", 1, b"", encode_tensors(many, "raw")),
    )
