"""FedAsync's mix without a second model in memory (issue 18): blockwise and in place
over the update's own tensors, bit for bit the formula replay recomputes; a reassembled
chunk set is the update's memory, and its tensors are views into it."""

from __future__ import annotations

import mmap

import pytest
import torch

from aggregator import aggregate
from aggregator.strategies.base import AcceptedUpdate, mix_step
from common.chunks import LAZY_ABOVE, ChunkLimits, Complete, Reassembler, parse, split
from common.wire import UpdateEnvelope, decode_update, encode_update

pytestmark = pytest.mark.timeout(60)


def _tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(300, 70, generator=g) * scale,
        "b": torch.randn(70, generator=g) * scale,
        "s": torch.randn((), generator=g) * scale,
        "e": torch.empty(0, 3),
    }


@pytest.mark.parametrize("block", [7, 1000, 1 << 20])
def test_blocks_and_in_place_give_the_same_bits(
    monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    head, base, delta = _tensors(1), _tensors(2), _tensors(3, 1e-2)
    whole = aggregate.mix(head, base, delta, 0.37)  # BLOCK 2^20: one block per tensor
    monkeypatch.setattr(aggregate, "BLOCK", block)
    blocked = aggregate.mix(head, base, delta, 0.37)
    spare = {k: v.clone() for k, v in delta.items()}
    into = aggregate.mix_into(head, base, spare, 0.37)
    assert into is spare  # written over the update's own tensors
    for name in head:
        assert torch.equal(blocked[name], whole[name])
        assert torch.equal(into[name], whole[name])
        assert whole[name].dtype == head[name].dtype and whole[name].shape == head[name].shape


def test_in_place_writes_nothing_when_a_result_is_not_finite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aggregate, "BLOCK", 100)
    head, base = _tensors(1), _tensors(2)
    delta = _tensors(3)
    base["w"][-1, -1] = 2e38
    delta["w"][-1, -1] = 3e38  # base + delta overflows float32, in the last block only
    before = {k: v.clone() for k, v in delta.items()}
    assert aggregate.mix_into(head, base, delta, 1.0) is None
    for name in delta:
        assert torch.equal(delta[name], before[name])  # untouched: the body stays intact
    update = AcceptedUpdate("u", "bank-a", 0, 0, 10, delta, b"\0" * 32, spare=True)
    step = mix_step(head, base, update, 1.0)  # falls back to a new tensor (and says why)
    assert not bool(torch.isfinite(step.params["w"]).all())
    assert torch.equal(delta["w"], before["w"])


def test_a_large_chunk_set_is_a_lazy_map_and_its_update_views_it() -> None:
    tensors = {"w": torch.randn(400_000), "b": torch.randn(10)}
    body, _ = encode_update(
        UpdateEnvelope(
            task="t",
            participant="bank-a",
            update_id="u-1",
            base_version=0,
            num_samples=5,
            tensors=tensors,
            codec="raw",
        )
    )
    assert len(body) > LAZY_ABOVE
    r: Reassembler[int] = Reassembler(ChunkLimits(max_total=len(body) + 1))
    done = None
    for i, m in enumerate(split(body, id="u-1", chunk_size=256 * 1024)):
        done = r.add(parse(m), i, "bank-a")
    assert isinstance(done, Complete)
    assert isinstance(done.body, mmap.mmap)
    assert bytes(done.body) == body
    env = decode_update(done.body)
    assert torch.equal(env.tensors["w"], tensors["w"])
    start = torch.frombuffer(done.body, dtype=torch.uint8).data_ptr()
    assert start <= env.tensors["w"].data_ptr() < start + len(body)  # a view, no copy
    assert env.content_hash == decode_update(body).content_hash
