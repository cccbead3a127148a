"""Lossy codecs: round trips, determinism, error bounds, refusals, the hash rule, error
feedback at the bank, the task's ``compression`` option, the aggregator's acceptance,
and a compressed federation replayed bit for bit."""

from __future__ import annotations

import asyncio
import math
import struct
import tracemalloc
import uuid
from collections.abc import Mapping, Sequence
from typing import cast

import fakeredis
import msgpack
import numpy as np
import pandas as pd
import pytest
import torch
import zstandard

from aggregator.admission import Admission, AdmissionConfig, Admitted, Refused
from aggregator.audit.replay import index_updates, replay
from aggregator.service import AggregatorService
from aggregator.store import RedisModelStore
from aggregator.strategies import AcceptedUpdate
from common.agreement import AgreementKey
from common.codecs import (
    CODECS,
    INT8_LEVELS,
    LOSSLESS_CODECS,
    Codec,
    Int8Codec,
    TopK8Codec,
    TopKCodec,
    accepted_codecs,
    get_codec,
    lossy_codec,
    read_varints,
    varints,
)
from common.errors import DecodeError, EncodeError, SpecError, TransportError
from common.hashing import TensorHasher
from common.models import build_task_model, model_tensors, tensor_specs
from common.refusals import Refusal
from common.signing import SigningKey
from common.spec import CompressionSpec, IdentitySpec, TaskSpec
from common.transport import Transport
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import (
    DEFAULT_LIMITS,
    ModelEnvelope,
    Tensors,
    UpdateEnvelope,
    decode_model,
    decode_update,
    encode_model,
    encode_tensors,
    encode_update,
    tensors_hash,
)
from fedq.simulate import SimulationConfig, prepare
from participant.compression import Compressor
from participant.worker import ParticipantWorker, WorkerConfig

LOSSY = sorted(name for name in CODECS if name not in LOSSLESS_CODECS)
BASES = ("f16", "bf16", "int8", "int8c", "topk", "topk8")


def _encoder(name: str, *, fraction: float = 0.1, stochastic: bool = False) -> Codec:
    base, _, zstd = name.partition("+")
    return lossy_codec(
        base,
        zstd=bool(zstd),
        stochastic=stochastic,
        topk_fraction=fraction if base in ("topk", "topk8") else None,
    )


def _encode(
    tensors: Mapping[str, torch.Tensor],
    name: str,
    *,
    seed: int | None = 0,
    fraction: float = 0.1,
    stochastic: bool = False,
) -> tuple[bytes, bytes, Tensors]:
    """An update of ``tensors`` under codec ``name``: (body, content hash, decoded)."""
    encoded = encode_tensors(
        tensors,
        _encoder(name, fraction=fraction, stochastic=stochastic),
        seed=seed,
    )
    assert encoded.codec == name and encoded.decoded is not None
    body, digest = encode_update(
        UpdateEnvelope(
            task="credit",
            participant="bank-a",
            update_id="u-1",
            base_version=0,
            num_samples=10,
            tensors=dict(tensors),
            codec=name,
        ),
        encoded=encoded,
    )
    return body, digest, encoded.decoded


def _sample(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "net.0.weight": torch.randn(32, 74, generator=g) * 0.02,
        "net.0.bias": torch.randn(32, generator=g) * 0.1,
        "net.2.weight": torch.randn(1, 32, generator=g),
        "scalar": torch.tensor(-0.75),
        "empty": torch.zeros(0, 5),
    }


def _bits(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", LOSSY)
def test_round_trip_gives_the_decoded_tensors_bit_for_bit(name: str) -> None:
    params = _sample()
    body, digest, decoded = _encode(params, name)
    env = decode_update(body)
    assert env.codec == name
    assert env.content_hash == digest
    assert list(env.tensors) == list(params)
    for key, t in env.tensors.items():
        assert t.dtype == torch.float32 and t.shape == params[key].shape, key
        assert _bits(t) == _bits(decoded[key]), key
    # The hash rule: the hash of what is decoded, not of what was sent in.
    assert digest == tensors_hash(env.tensors)
    assert digest != tensors_hash(params)


@pytest.mark.parametrize("name", LOSSY)
def test_encoding_and_decoding_are_deterministic(name: str) -> None:
    params = _sample(1)
    first, second = _encode(params, name, seed=None), _encode(params, name, seed=None)
    assert first[0] == second[0]  # no randomness unless stochastic rounding is asked for
    a, b = decode_update(first[0]), decode_update(first[0])
    assert all(_bits(a.tensors[k]) == _bits(b.tensors[k]) for k in params)


@pytest.mark.parametrize("name", ["int8", "int8c", "int8+zstd", "topk8", "topk8+zstd"])
def test_stochastic_rounding_is_seeded_at_the_encoder_only(name: str) -> None:
    params = _sample(2)
    one = _encode(params, name, seed=5, stochastic=True)
    again = _encode(params, name, seed=5, stochastic=True)
    other = _encode(params, name, seed=6, stochastic=True)
    nearest = _encode(params, name, seed=5)
    assert one[0] == again[0]
    assert one[0] != other[0] and one[0] != nearest[0]
    # Each decodes with the one decoder, whatever the seed was.
    assert decode_update(other[0]).content_hash == other[1]


def test_stochastic_rounding_is_unbiased() -> None:
    x = torch.full((20_000,), 0.3)
    x[0] = 1.0  # scale 1/127: 0.3 is 38.1 levels
    _, _, decoded = _encode({"x": x}, "int8", seed=3, stochastic=True)
    levels = decoded["x"][1:] * 127
    assert set(torch.unique(torch.round(levels)).tolist()) == {38.0, 39.0}
    assert abs(float(decoded["x"][1:].mean()) - 0.3) < 5e-4
    _, _, nearest = _encode({"x": x}, "int8")
    assert float((nearest["x"][1:] - 0.3).abs().max()) > 0.0007  # always 38 levels


def test_other_dtypes_travel_exactly_under_a_lossy_codec() -> None:
    params = {
        "w": torch.randn(4, 4),
        "d": torch.tensor([math.pi, 1e-300], dtype=torch.float64),
        "i": torch.tensor([-(2**63), 7], dtype=torch.int64),
        "h": torch.tensor([0.1, 3.0], dtype=torch.float16),
        "m": torch.tensor([True, False]),
    }
    for name in LOSSY:
        env = decode_update(_encode(params, name)[0])
        for key in ("d", "i", "h", "m"):
            assert env.tensors[key].dtype == params[key].dtype, (name, key)
            assert _bits(env.tensors[key]) == _bits(params[key]), (name, key)


# --------------------------------------------------------------------------- error bounds


@pytest.mark.parametrize("name", ["int8", "int8c"])
def test_int8_error_is_at_most_half_a_step(name: str) -> None:
    w = torch.randn(16, 300) * torch.logspace(-4, 0, 16).unsqueeze(1)  # rows of every size
    body, _, _ = _encode({"w": w}, name)
    payload = msgpack.unpackb(body)["ts"][0]["b"]
    rows = 16 if name == "int8c" else 1
    scales = torch.tensor(struct.unpack(f"<{rows}f", payload[: 4 * rows])).unsqueeze(1)
    top = w.abs().amax(dim=1) if rows > 1 else w.abs().max().reshape(1)
    assert torch.equal(scales.squeeze(1), top / INT8_LEVELS)
    error = (decode_update(body).tensors["w"] - w).abs()
    # Half a level, plus the float32 rounding of x / S and of q * S.
    bound = scales / 2 + 2 * torch.finfo(torch.float32).eps * w.abs()
    assert bool((error <= bound).all())
    assert float(error.max()) > 0  # it is lossy


def test_per_channel_scales_keep_small_rows_precise() -> None:
    w = torch.randn(4, 500)
    w[0] *= 1e-3  # a row a thousand times smaller than the others
    per_tensor = decode_update(_encode({"w": w}, "int8")[0]).tensors["w"]
    per_row = decode_update(_encode({"w": w}, "int8c")[0]).tensors["w"]
    assert float((per_row[0] - w[0]).abs().max()) * 100 < float((per_tensor[0] - w[0]).abs().max())


@pytest.mark.parametrize(("name", "bits"), [("f16", 11), ("bf16", 8)])
def test_half_codecs_round_to_nearest(name: str, bits: int) -> None:
    w = torch.randn(5000) * 10
    got = decode_update(_encode({"w": w}, name)[0]).tensors["w"]
    relative = ((got - w).abs() / w.abs()).max()
    assert float(relative) <= 2.0**-bits  # half a unit in the last place
    cast = torch.float16 if name == "f16" else torch.bfloat16
    assert torch.equal(got, w.to(cast).float())  # torch rounds to nearest even too


def test_f16_saturates_and_bf16_never_overflows() -> None:
    big = torch.tensor([1e6, -70000.0, 65519.0, 3.0e38, -3.4028235e38])
    f16 = decode_update(_encode({"w": big}, "f16")[0]).tensors["w"]
    assert f16.tolist() == [65504.0, -65504.0, 65504.0, 65504.0, -65504.0]
    bf16 = decode_update(_encode({"w": big}, "bf16")[0]).tensors["w"]
    assert bool(bf16.isfinite().all())
    assert bf16[-1].item() == -struct.unpack("<f", struct.pack("<I", 0x7F7F0000))[0]


# --------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.5, 1.0])
def test_topk_keeps_exactly_k_of_the_largest(fraction: float) -> None:
    w = torch.randn(123, 45)
    n = w.numel()
    k = min(n, max(1, round(fraction * n)))
    got = decode_update(_encode({"w": w}, "topk", fraction=fraction)[0]).tensors["w"]
    kept = got != 0
    assert int(kept.sum()) == k
    assert torch.equal(got[kept], w[kept])  # kept values are exact
    smallest_kept = w[kept].abs().min()
    assert bool((w[~kept].abs() <= smallest_kept).all())


def test_topk_breaks_ties_by_the_lower_index_and_keeps_at_least_one() -> None:
    w = torch.tensor([1.0, -2.0, 2.0, -2.0, 0.5])
    got = decode_update(_encode({"w": w}, "topk", fraction=0.4)[0]).tensors["w"]
    assert got.tolist() == [0.0, -2.0, 2.0, 0.0, 0.0]
    tiny = decode_update(_encode({"w": w}, "topk", fraction=1e-9)[0]).tensors["w"]
    assert tiny.tolist() == [0.0, -2.0, 0.0, 0.0, 0.0]


def test_topk_payload_is_count_values_then_gap_varints() -> None:
    w = torch.zeros(20_000)
    w[[5, 6, 300, 19_999]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    body, _, _ = _encode({"w": w}, "topk", fraction=4 / 20_000)
    payload = msgpack.unpackb(body)["ts"][0]["b"]
    assert payload == struct.pack("<I4f", 4, 1.0, 2.0, 3.0, 4.0) + bytes(
        [0x05, 0x00, 0xA5, 0x02, 0xF2, 0x99, 0x01]  # gaps 5, 0, 293, 19698
    )
    assert len(payload) == 4 + 16 + 7


@pytest.mark.parametrize("fraction", [1.0, 1e-9])
def test_the_longest_topk_payloads_fit_the_zstd_bound(fraction: float) -> None:
    w = torch.zeros(5000)
    w[4999] = 1.0  # k = 1: one gap of 4999 (2 bytes); k = n: n gaps of 0 (4 + 5n bytes)
    w[:4999] = torch.linspace(-0.5, 0.5, 4999)
    body, digest, decoded = _encode({"w": w}, "topk+zstd", fraction=fraction)
    content = zstandard.ZstdDecompressor().decompress(msgpack.unpackb(body)["ts"][0]["b"])
    assert len(content) == (4 + 5 * 5000 if fraction == 1.0 else 4 + 4 + 2)
    env = decode_update(body)
    assert env.content_hash == digest
    assert torch.equal(env.tensors["w"], decoded["w"])


def _topk8_parts(body: bytes) -> tuple[int, float, list[int], bytes]:
    """(k, S, levels, varint bytes) of the first tensor's topk8 payload."""
    payload = msgpack.unpackb(body)["ts"][0]["b"]
    k, scale = struct.unpack_from("<If", payload)
    levels = list(struct.unpack_from(f"<{k}b", payload, 8))
    return k, scale, levels, payload[8 + k :]


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.5, 1.0])
def test_topk8_keeps_topks_entries_each_within_half_a_step(
    fraction: float, stochastic: bool
) -> None:
    w = torch.randn(123, 45)
    n = w.numel()
    k = min(n, max(1, round(fraction * n)))
    body, _, _ = _encode({"w": w}, "topk8", fraction=fraction, stochastic=stochastic)
    got = decode_update(body).tensors["w"]
    exact = decode_update(_encode({"w": w}, "topk", fraction=fraction)[0]).tensors["w"]
    kept = exact != 0  # topk's k entries: the same ones, in the same order
    count, scale, levels, gaps = _topk8_parts(body)
    assert count == k and len(levels) == k and -128 not in levels
    assert (
        gaps
        == msgpack.unpackb(_encode({"w": w}, "topk", fraction=fraction)[0])["ts"][0]["b"][
            4 + 4 * k :
        ]
    )
    assert scale == float(torch.tensor(float(w[kept].abs().max())) / INT8_LEVELS)
    assert bool((got[~kept] == 0).all())
    assert torch.equal(got[kept], torch.tensor(levels, dtype=torch.float32) * scale)
    error = (got[kept] - w[kept]).abs()
    # Half a level (a whole one when rounding stochastically), plus float32 rounding.
    step = scale if stochastic else scale / 2
    assert bool((error <= step + 2 * torch.finfo(torch.float32).eps * w[kept].abs()).all())
    assert max(abs(q) for q in levels) == INT8_LEVELS  # the largest kept value is +-127


def test_topk8_payload_is_count_scale_levels_then_gap_varints() -> None:
    w = torch.zeros(20_000)
    w[[5, 6, 300, 19_999]] = torch.tensor([1.0, -2.0, 0.5, 4.0])
    body, _, decoded = _encode({"w": w}, "topk8", fraction=4 / 20_000)
    payload = msgpack.unpackb(body)["ts"][0]["b"]
    scale = struct.unpack("<f", struct.pack("<f", 4.0 / 127))[0]
    # 1.0 / S = 31.75 -> 32, -2.0 / S = -63.5 -> -64 (a tie, to even), 0.5 / S = 15.875 -> 16
    assert payload == struct.pack("<If4b", 4, scale, 32, -64, 16, 127) + bytes(
        [0x05, 0x00, 0xA5, 0x02, 0xF2, 0x99, 0x01]  # gaps 5, 0, 293, 19698, as topk's
    )
    assert len(payload) == 4 + 4 + 4 + 7
    assert decoded["w"][[5, 6, 300, 19_999]].tolist() == [
        struct.unpack("<f", struct.pack("<f", q * scale))[0] for q in (32, -64, 16, 127)
    ]


def test_topk8_of_zeros_keeps_zeros_with_a_zero_scale() -> None:
    body, digest, _ = _encode({"w": torch.zeros(10), "e": torch.zeros(0)}, "topk8")
    assert _topk8_parts(body) == (1, 0.0, [0], b"\x00")
    env = decode_update(body)
    assert env.content_hash == digest
    assert _bits(env.tensors["w"]) == bytes(40)  # +0.0 everywhere
    assert msgpack.unpackb(body)["ts"][1]["b"] == bytes(8)  # k 0, S +0.0


@pytest.mark.parametrize("fraction", [1.0, 1e-9])
def test_the_longest_topk8_payloads_fit_the_zstd_bound(fraction: float) -> None:
    w = torch.zeros(5000)
    w[4999] = 1.0  # k = 1: one gap of 4999 (2 bytes); k = n: n gaps of 0 (8 + 2n bytes)
    w[:4999] = torch.linspace(-0.5, 0.5, 4999)
    body, digest, decoded = _encode({"w": w}, "topk8+zstd", fraction=fraction)
    content = zstandard.ZstdDecompressor().decompress(msgpack.unpackb(body)["ts"][0]["b"])
    assert len(content) == (8 + 2 * 5000 if fraction == 1.0 else 8 + 1 + 2)
    env = decode_update(body)
    assert env.content_hash == digest
    assert torch.equal(env.tensors["w"], decoded["w"])


@pytest.mark.parametrize("value", [0, 1, 127, 128, 16383, 16384, 2**21, 2**28, 2**32 - 1])
def test_varints_round_trip_in_the_shortest_form(value: int) -> None:
    data = varints(np.array([value, 3], dtype=np.int64))
    assert len(data) == 1 + max(1, math.ceil(value.bit_length() / 7))
    assert read_varints(np.frombuffer(data, dtype=np.uint8), 2).tolist() == [value, 3]


# --------------------------------------------------------------------------- refusals


def _with_payload(codec: str, payload: bytes, shape: Sequence[int] = (4, 8)) -> bytes:
    """An update of one f32 tensor ``w`` of ``shape`` whose payload is ``payload``."""
    body, _, _ = _encode({"w": torch.ones(shape)}, codec if codec in CODECS else "int8")
    doc = msgpack.unpackb(body)
    doc["c"] = codec
    doc["ts"][0]["b"] = payload
    packed: bytes = msgpack.packb(doc, use_bin_type=True)
    return packed


def _refused(body: bytes) -> Refusal:
    with pytest.raises(DecodeError) as info:
        decode_update(body)
    return info.value.reason


def _frame(content: bytes, *, size: bool = True) -> bytes:
    out: bytes = zstandard.ZstdCompressor(write_content_size=size).compress(content)
    return out


@pytest.mark.parametrize(
    ("codec", "payload", "reason"),
    [
        ("int8", struct.pack("<f", 1.0) + bytes(31), Refusal.SIZE_MISMATCH),
        ("int8", struct.pack("<f", math.nan) + bytes(32), Refusal.CODEC_ERROR),
        ("int8", struct.pack("<f", -math.inf) + bytes(32), Refusal.CODEC_ERROR),
        ("int8", struct.pack("<f", -1.0) + bytes(32), Refusal.CODEC_ERROR),
        ("int8", struct.pack("<f", 1.0) + bytes(31) + b"\x80", Refusal.CODEC_ERROR),
        ("int8c", struct.pack("<f", 1.0) + bytes(32), Refusal.SIZE_MISMATCH),
        ("f16", bytes(63), Refusal.SIZE_MISMATCH),
        ("bf16", bytes(64) + b"\x00", Refusal.SIZE_MISMATCH),
        ("topk", b"", Refusal.SIZE_MISMATCH),
        ("topk", struct.pack("<I", 33), Refusal.CODEC_ERROR),  # more than 32 entries
        ("topk", struct.pack("<I", 2**32 - 1), Refusal.CODEC_ERROR),
        ("topk", struct.pack("<If", 2, 1.0) + b"\x00", Refusal.SIZE_MISMATCH),
        ("topk", struct.pack("<I2f", 2, 1.0, 2.0) + b"\x1f\x00", Refusal.CODEC_ERROR),  # 31+1+0
        (
            "topk",
            struct.pack("<I2f", 2, 1.0, 2.0) + b"\x80\x80\x80\x80\x80\x00",
            Refusal.CODEC_ERROR,
        ),
        ("topk", struct.pack("<If", 1, 1.0) + bytes(60), Refusal.CODEC_ERROR),
        ("topk8", struct.pack("<I", 1) + b"\x00\x00\x80", Refusal.SIZE_MISMATCH),
        ("topk8", struct.pack("<If", 33, 1.0), Refusal.CODEC_ERROR),  # more than 32 entries
        ("topk8", struct.pack("<If", 2**32 - 1, 1.0), Refusal.CODEC_ERROR),
        ("topk8", struct.pack("<If", 2, 1.0) + b"\x01", Refusal.SIZE_MISMATCH),
        ("topk8", struct.pack("<If", 1, math.nan) + b"\x01\x00", Refusal.CODEC_ERROR),
        ("topk8", struct.pack("<If", 1, math.inf) + b"\x01\x00", Refusal.CODEC_ERROR),
        ("topk8", struct.pack("<If", 1, -1.0) + b"\x01\x00", Refusal.CODEC_ERROR),
        ("topk8", struct.pack("<If", 1, -0.0) + b"\x01\x00", Refusal.CODEC_ERROR),
        ("topk8", struct.pack("<If", 2, 1.0) + b"\x01\x80\x00\x01", Refusal.CODEC_ERROR),
        ("topk8", struct.pack("<If", 2, 1.0) + b"\x01\x02\x1f\x00", Refusal.CODEC_ERROR),
        ("topk8", struct.pack("<If", 2, 1.0) + b"\x01\x02\x00", Refusal.CODEC_ERROR),
        ("topk8", struct.pack("<If", 1, 1.0) + b"\x01\x80\x00", Refusal.CODEC_ERROR),
        ("topk8", struct.pack("<If", 1, 1.0) + b"\x01" + bytes(60), Refusal.CODEC_ERROR),
        ("int8+zstd", _frame(bytes(100)), Refusal.SIZE_MISMATCH),
        ("f16+zstd", b"junk", Refusal.CODEC_ERROR),
        ("bf16+zstd", _frame(bytes(64)) + _frame(b""), Refusal.CODEC_ERROR),
        ("topk+zstd", _frame(bytes(4 + 5 * 32 + 1)), Refusal.SIZE_MISMATCH),
        ("topk+zstd", _frame(bytes(4 + 5 * 32 + 1), size=False), Refusal.SIZE_MISMATCH),
        ("topk8+zstd", _frame(bytes(8 + 2 * 32 + 1)), Refusal.SIZE_MISMATCH),
        ("topk8+zstd", _frame(bytes(8 + 2 * 32 + 1), size=False), Refusal.SIZE_MISMATCH),
        ("topk8+zstd", _frame(struct.pack("<If", 2, 1.0) + b"\x01"), Refusal.SIZE_MISMATCH),
        ("int9", bytes(36), Refusal.UNKNOWN_CODEC),
    ],
)
def test_garbage_is_refused_with_its_reason(codec: str, payload: bytes, reason: Refusal) -> None:
    assert _refused(_with_payload(codec, payload)) == reason


@pytest.mark.parametrize(
    ("codec", "payload", "decoded"),
    [
        ("f16", struct.pack("<e", math.inf) + bytes(62), [math.inf] + [0.0] * 31),
        ("topk", struct.pack("<If", 1, math.nan) + b"\x01", [0.0, math.nan] + [0.0] * 30),
        (
            "topk8",
            struct.pack("<Ifb", 1, 3.4028235e38, 127) + b"\x02",  # 127 x the largest float
            [0.0, 0.0, math.inf] + [0.0] * 29,
        ),
        (
            "int8",
            struct.pack("<f", 3.4028235e38) + bytes([127] + [0] * 31),
            [math.inf] + [0.0] * 31,
        ),
        ("bf16", struct.pack("<H", 0xFF80) + bytes(62), [-math.inf] + [0.0] * 31),
    ],
)
def test_a_payload_that_decodes_to_nan_or_inf_is_non_finite(
    codec: str, payload: bytes, decoded: list[float]
) -> None:
    doc = msgpack.unpackb(_with_payload(codec, payload))
    hasher = TensorHasher()  # the hash of what it decodes to: the value check comes next
    hasher.add("w", "f32", (4, 8), struct.pack("<32f", *decoded))
    doc["h"] = hasher.digest()
    assert _refused(msgpack.packb(doc, use_bin_type=True)) == Refusal.NON_FINITE


def test_a_bomb_is_refused_before_it_is_expanded() -> None:
    # 512 MiB of zeros in a few kB, for a tensor of 32 elements, declared and not.
    huge = zstandard.ZstdCompressor().compressobj()
    chunk = bytes(1 << 20)
    frame = b"".join(huge.compress(chunk) for _ in range(512)) + huge.flush()
    for codec, payload in (
        ("topk+zstd", frame),
        ("topk8+zstd", frame),
        ("int8+zstd", _frame(bytes(1 << 26))),
    ):
        tracemalloc.start()
        try:
            reason = _refused(_with_payload(codec, payload))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert reason == Refusal.SIZE_MISMATCH
        assert peak < 4 << 20, (codec, peak)


def test_a_lossy_codec_never_reaches_a_model_envelope() -> None:
    params = _sample()
    with pytest.raises(EncodeError, match="lossy"):
        encode_model(ModelEnvelope(task="credit", version=1, tensors=params, codec="int8"))
    body, _, _ = _encode(params, "int8")
    doc = msgpack.unpackb(body)
    model = {"fv": 1, "k": "m", "t": "credit", "v": 1, "c": "int8", "ts": doc["ts"], "h": doc["h"]}
    with pytest.raises(DecodeError) as info:
        decode_model(msgpack.packb(model, use_bin_type=True))
    assert info.value.reason == Refusal.UNKNOWN_CODEC
    assert "model envelope" in info.value.detail


def test_encoder_settings_are_checked() -> None:
    with pytest.raises(EncodeError, match="fraction"):
        encode_tensors({"w": torch.ones(3)}, "topk")  # the registry's topk has no fraction
    for base in ("topk", "topk8"):
        for bad in (0.0, 1.5, None):
            with pytest.raises(EncodeError, match="fraction"):
                lossy_codec(base, topk_fraction=bad)
    with pytest.raises(EncodeError, match="fraction"):
        encode_tensors({"w": torch.ones(3)}, "topk8+zstd")
    for base in ("f16", "topk"):
        with pytest.raises(EncodeError, match="stochastic"):
            lossy_codec(base, stochastic=True)
    with pytest.raises(EncodeError, match="top-k fraction is topk's and topk8's"):
        lossy_codec("int8", topk_fraction=0.1)
    chosen = lossy_codec("topk8", zstd=True, stochastic=True, topk_fraction=0.1)
    assert chosen == TopK8Codec(0.1, zstd=True, stochastic=True)
    assert chosen.name == "topk8+zstd"
    with pytest.raises(EncodeError, match="no lossy codec"):
        lossy_codec("int4")
    encoded = encode_tensors({"w": torch.ones(3)}, "int8")
    env = UpdateEnvelope("credit", "bank-a", "u-1", 0, 1, {"w": torch.ones(3)}, codec="raw")
    with pytest.raises(EncodeError, match="encoded with 'int8'"):
        encode_update(env, encoded=encoded)


def test_lossless_codecs_keep_their_hashes_and_bytes() -> None:
    params = _sample()
    for name in ("raw", "zstd"):
        encoded = encode_tensors(params, name)
        assert encoded.decoded is None
        assert encoded.digest == tensors_hash(params)
        assert get_codec(name).lossless
    assert not any(get_codec(name).lossless for name in LOSSY)
    assert isinstance(get_codec("int8c+zstd"), Int8Codec)
    assert isinstance(get_codec("topk"), TopKCodec)
    assert isinstance(get_codec("topk8+zstd"), TopK8Codec)


# --------------------------------------------------------------------------- error feedback


def test_error_feedback_keeps_what_compression_lost() -> None:
    compressor = Compressor(CompressionSpec(codec="topk", topk_fraction=0.05))
    g = torch.Generator().manual_seed(9)
    deltas = [
        {"w": torch.randn(20, 10, generator=g), "b": torch.randn(3, generator=g)} for _ in range(3)
    ]
    sent: list[Tensors] = []
    for delta in deltas:
        previous = dict(compressor.residual)
        encoded, residual = compressor.compress(delta, seed=1)
        assert encoded.decoded is not None
        for key, t in delta.items():
            target = t + previous[key] if previous else t
            assert torch.equal(residual[key], target - encoded.decoded[key]), key
        assert compressor.residual == previous  # not kept until the update has left
        compressor.keep(residual)
        sent.append(encoded.decoded)
    # Nothing is lost for good: what was sent plus the residual is what was trained.
    for key in ("w", "b"):
        total = torch.stack([d[key] for d in deltas]).sum(0)
        arrived = torch.stack([s[key] for s in sent]).sum(0)
        assert torch.allclose(arrived + compressor.residual[key], total, atol=1e-6), key
        assert not torch.allclose(arrived, total, atol=1e-3), key


@pytest.mark.parametrize("stochastic", [False, True])
def test_topk8_error_feedback_keeps_the_quantization_error_too(stochastic: bool) -> None:
    spec = CompressionSpec(codec="topk8", topk_fraction=0.1, stochastic_rounding=stochastic)
    compressor = Compressor(spec)
    g = torch.Generator().manual_seed(4)
    deltas = [{"w": torch.randn(30, 20, generator=g)} for _ in range(4)]
    sent: list[torch.Tensor] = []
    for i, delta in enumerate(deltas):
        target = compressor.with_residual(delta)["w"]
        encoded, residual = compressor.compress(delta, seed=i)
        assert encoded.codec == "topk8" and encoded.decoded is not None
        decoded = encoded.decoded["w"]
        assert torch.equal(residual["w"], target - decoded)
        kept = decoded != 0
        assert int(kept.sum()) == 60  # no kept value is this small: none decodes to 0
        # Where an entry was sent, the residual is its quantization error: at most a
        # step (half a step rounding to nearest), and not nothing as for topk.
        scale = float(target[kept].abs().max()) / INT8_LEVELS
        step = scale if stochastic else scale / 2
        assert float(residual["w"][kept].abs().max()) <= step * (1 + 1e-5)
        assert bool((residual["w"][kept] != 0).any())
        assert torch.equal(residual["w"][~kept], target[~kept])
        compressor.keep(residual)
        sent.append(decoded)
    total = torch.stack([d["w"] for d in deltas]).sum(0)
    arrived = torch.stack(sent).sum(0)
    assert torch.allclose(arrived + compressor.residual["w"], total, atol=1e-5)


def test_error_feedback_off_keeps_no_residual() -> None:
    compressor = Compressor(CompressionSpec(codec="int8", error_feedback=False))
    encoded, residual = compressor.compress({"w": torch.randn(5, 5)})
    assert residual == {} and compressor.residual == {}
    assert compressor.name == "int8" and encoded.codec == "int8"


def test_the_residual_skips_tensors_that_travel_exactly() -> None:
    compressor = Compressor(CompressionSpec(codec="int8c", lossless="zstd"))
    delta = {"w": torch.randn(4, 6), "count": torch.tensor([3], dtype=torch.int64)}
    encoded, residual = compressor.compress(delta)
    assert list(residual) == ["w"] and encoded.codec == "int8c+zstd"
    compressor.keep(residual)
    again = compressor.with_residual(delta)
    assert torch.equal(again["w"], delta["w"] + residual["w"])
    assert again["count"] is delta["count"]


class _FlakyTransport:
    """Just what publishing needs: fails while ``fail`` is set, else keeps the body."""

    def __init__(self) -> None:
        self.fail = True
        self.sent: list[bytes] = []

    async def publish_update(
        self, task: str, participant: str, body: bytes, *, message_id: str
    ) -> None:
        if self.fail:
            raise TransportError("the broker is gone")
        self.sent.append(body)


async def test_the_worker_keeps_the_residual_only_once_the_update_has_left() -> None:
    prep = prepare(SimulationConfig(participants=2))
    spec = TaskSpec.parse(
        {
            **prep.spec.model_dump(mode="json", by_alias=True),
            "compression": {"codec": "topk", "topk_fraction": 0.05},
        }
    )
    flaky = _FlakyTransport()
    name = spec.participants[0]
    worker = ParticipantWorker(
        spec, WorkerConfig(participant=name), cast(Transport, flaky), prep.shards[name]
    )
    assert worker.compressor is not None
    model = ModelEnvelope(
        task=spec.task_id, version=0, tensors=model_tensors(build_task_model(spec))
    )
    with pytest.raises(TransportError):
        await worker._train_and_publish(model, {})
    assert worker.compressor.residual == {}  # lost with the update: nothing to carry
    flaky.fail = False
    await worker._train_and_publish(model, {})
    (body,) = flaky.sent
    env = decode_update(body)
    assert env.codec == "topk" and env.spec_hash == spec.spec_hash()
    residual = worker.compressor.residual
    assert set(residual) == set(env.tensors)
    kept = {k: int((t != 0).sum()) for k, t in env.tensors.items()}
    assert kept == {k: max(1, round(0.05 * t.numel())) for k, t in env.tensors.items()}
    # Where an entry was sent, the residual is what float32 rounding left: nothing.
    for key, t in env.tensors.items():
        assert bool((residual[key][t != 0] == 0).all()), key
    weight = next(k for k in env.tensors if k.endswith("weight"))
    assert bool((residual[weight][env.tensors[weight] == 0] != 0).any())


# --------------------------------------------------------------------------- the task spec


def _spec(**extra: object) -> TaskSpec:
    return TaskSpec.parse(
        {
            "task_id": "codecs",
            "features": [{"name": "x0", "kind": "numeric"}, {"name": "x1", "kind": "numeric"}],
            "target": {"name": "y"},
            "participants": ["bank-a", "bank-b"],
            **extra,
        }
    )


def test_a_spec_without_compression_keeps_its_canonical_json() -> None:
    spec = _spec()
    assert spec.compression is None
    assert '"compression"' not in spec.to_json()
    assert "compression" not in spec.model_dump()
    # The same JSON as a spec built from it: the field is simply absent.
    assert TaskSpec.from_json(spec.to_json()).spec_hash() == spec.spec_hash()
    chosen = _spec(compression={"codec": "int8"})
    assert chosen.spec_hash() != spec.spec_hash()
    text = chosen.to_json()
    assert '"compression":{"codec":"int8","lossless":null,"stochastic_rounding":false,' in text
    assert TaskSpec.from_json(text) == chosen
    assert text.index('"robustness"') < text.index('"compression"') < text.index('"seed"')


@pytest.mark.parametrize(
    ("compression", "wire"),
    [
        ({"codec": "f16"}, "f16"),
        ({"codec": "bf16", "lossless": "zstd"}, "bf16+zstd"),
        ({"codec": "int8", "stochastic_rounding": True}, "int8"),
        ({"codec": "int8c", "lossless": "zstd"}, "int8c+zstd"),
        ({"codec": "topk", "topk_fraction": 1.0}, "topk"),
        ({"codec": "topk", "topk_fraction": 0.01, "lossless": "zstd"}, "topk+zstd"),
        ({"codec": "topk8", "topk_fraction": 0.05}, "topk8"),
        (
            {
                "codec": "topk8",
                "topk_fraction": 0.05,
                "lossless": "zstd",
                "stochastic_rounding": True,
            },
            "topk8+zstd",
        ),
    ],
)
def test_valid_compression_names_its_wire_codec(compression: dict[str, object], wire: str) -> None:
    spec = _spec(compression=compression)
    assert spec.compression is not None and spec.compression.wire_codec == wire
    assert Compressor(spec.compression).name == wire
    assert wire in CODECS


@pytest.mark.parametrize(
    ("compression", "message"),
    [
        ({"codec": "topk"}, "needs compression.topk_fraction"),
        ({"codec": "topk8"}, "'topk8' needs compression.topk_fraction"),
        ({"codec": "topk8", "topk_fraction": 0.0}, "greater than 0"),
        ({"codec": "int8c", "topk_fraction": 0.1}, "topk_fraction is topk's and topk8's"),
        ({"codec": "topk", "topk_fraction": 0.1, "stochastic_rounding": True}, "not 'topk''s"),
        ({"codec": "topk", "topk_fraction": 0.0}, "greater than 0"),
        ({"codec": "topk", "topk_fraction": 1.5}, "less than or equal to 1"),
        ({"codec": "int8", "topk_fraction": 0.1}, "topk_fraction is topk's"),
        ({"codec": "f16", "stochastic_rounding": True}, "stochastic_rounding is int8's"),
        ({"codec": "int4"}, "compression.codec"),
        ({"codec": "int8", "lossless": "gzip"}, "compression.lossless"),
        ({"codec": "int8", "extra": 1}, "compression.extra"),
    ],
)
def test_invalid_compression_is_refused(compression: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _spec(compression=compression)


def test_compression_and_secure_aggregation_exclude_each_other() -> None:
    keys = {p: SigningKey.generate() for p in ("bank-a", "bank-b")}
    identity = IdentitySpec(
        require_signatures=True,
        aggregator_key=SigningKey.generate().public.text,
        participant_keys={p: k.public.text for p, k in keys.items()},
        agreement_keys={p: AgreementKey.from_signing_key(k).public.text for p, k in keys.items()},
    )
    secure = {
        "mode": "sync",
        "identity": identity.model_dump(mode="json"),
        "secure_aggregation": {},
    }
    _spec(**secure)  # valid without compression
    with pytest.raises(SpecError, match="secure_aggregation masks exact integers"):
        _spec(**secure, compression={"codec": "int8"})


# --------------------------------------------------------------------------- the aggregator


class _State:
    """An AdmissionState in memory: head 0, nothing held or applied."""

    head_version = 0

    def held(self, update_id: str) -> bool | None:
        return None

    def pending(self) -> Sequence[AcceptedUpdate]:
        return []

    async def applied_in(self, update_id: str, base_version: int, participant: str) -> int | None:
        return None

    async def base(self, version: int) -> Tensors | None:
        return {}


def _update(spec: TaskSpec, codec: str) -> bytes:
    delta = {k: torch.randn_like(v) for k, v in model_tensors(build_task_model(spec)).items()}
    env = UpdateEnvelope(
        task=spec.task_id,
        participant="bank-a",
        update_id=uuid.uuid4().hex,
        base_version=0,
        num_samples=10,
        tensors=delta,
        codec=codec,
        spec_hash=spec.spec_hash(),
    )
    if codec in LOSSLESS_CODECS:
        return encode_update(env)[0]
    encoded = encode_tensors(delta, _encoder(codec))
    return encode_update(env, encoded=encoded)[0]


@pytest.mark.parametrize(
    ("compression", "accepted"),
    [
        (None, {"raw", "zstd"}),
        ({"codec": "int8", "lossless": "zstd"}, {"raw", "zstd", "int8+zstd"}),
        ({"codec": "topk", "topk_fraction": 0.1}, {"raw", "zstd", "topk"}),
        ({"codec": "topk8", "topk_fraction": 0.1}, {"raw", "zstd", "topk8"}),
    ],
)
async def test_the_aggregator_accepts_lossless_codecs_and_the_tasks_own(
    compression: dict[str, object] | None, accepted: set[str]
) -> None:
    spec = _spec(compression=compression) if compression else _spec()
    expected = tensor_specs(model_tensors(build_task_model(spec)))
    admission = Admission(spec, AdmissionConfig(DEFAULT_LIMITS), expected, uses_base=True)
    assert admission.codecs == accepted_codecs(
        spec.compression.wire_codec if spec.compression else None
    )
    assert admission.codecs == accepted
    for codec in CODECS:
        outcome = await admission.admit(_update(spec, codec), "bank-a", _State())
        if codec in accepted:
            assert isinstance(outcome, Admitted), (codec, outcome)
        else:
            assert isinstance(outcome, Refused), codec
            assert outcome.reason == Refusal.UNKNOWN_CODEC
            assert f"codec {codec!r} is not accepted in this task" in outcome.detail
            assert "accepted: " + ", ".join(sorted(accepted)) in outcome.detail


# --------------------------------------------------------------------------- a federation


async def _federation(
    spec: TaskSpec, shards: Mapping[str, pd.DataFrame], versions: int
) -> tuple[RedisModelStore, MemoryTransport, list[ParticipantWorker]]:
    """An embedded federation of ``spec`` run to ``versions``: its store, broker, workers."""
    broker = MemoryBroker()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    agg = MemoryTransport(broker, "fedq-aggregator")
    service = AggregatorService(spec, store, agg)
    stop, bank_stop = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    workers = [
        ParticipantWorker(
            spec,
            WorkerConfig(participant=n, seed=i, delay_s=0.005, wait_for_model_s=0.2),
            MemoryTransport(broker, n),
            shards[n],
        )
        for i, n in enumerate(spec.participants)
    ]
    tasks = [asyncio.create_task(w.run(bank_stop)) for w in workers]
    async with asyncio.timeout(60):
        while service.head_version < versions:
            await asyncio.sleep(0.01)
    bank_stop.set()
    await asyncio.gather(*tasks)
    stop.set()
    await running
    assert service.stats.refused_total == 0
    return store, agg, workers


@pytest.mark.slow
@pytest.mark.parametrize(
    "compression",
    [
        {"codec": "topk", "topk_fraction": 0.2, "lossless": "zstd"},
        {"codec": "int8c", "stochastic_rounding": True},
        {"codec": "topk8", "topk_fraction": 0.1, "stochastic_rounding": True},
    ],
    ids=["topk+zstd", "int8c-stochastic", "topk8-stochastic"],
)
async def test_a_compressed_federation_replays_bit_for_bit(compression: dict[str, object]) -> None:
    prep = prepare(SimulationConfig(participants=3))
    spec = TaskSpec.parse(
        {**prep.spec.model_dump(mode="json", by_alias=True), "compression": compression}
    )
    store, transport, workers = await _federation(spec, prep.shards, 8)
    bodies = [b async for b in transport.read_audit(spec.task_id)]
    assert bodies
    codec = spec.compression.wire_codec if spec.compression else ""
    assert {decode_update(b).codec for b in bodies} == {codec}
    # Every worker that published keeps a residual, in memory, for its next update.
    assert all(w.compressor is not None for w in workers)
    assert any(w.compressor is not None and w.compressor.residual for w in workers)
    report = await replay(store, index_updates(bodies), spec.task_id)
    assert report.ok, report.reason
    assert report.checked == await store.head(spec.task_id)
