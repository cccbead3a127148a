"""Large models (issue 18): what the aggregator keeps in memory is bounded by bytes, and
the audit commands read chunk sets as large as the task's own updates. Small, fast
tests; bench/large_model.py runs a 100M-parameter model through the whole path."""

from __future__ import annotations

import pytest

from aggregator.service import (
    BASE_BYTES,
    BASE_CACHE,
    PRUNED_BASE_BYTES,
    base_budget,
)
from common.spec import ModelSpec, NumericFeature, TargetSpec, TaskSpec

#: 100,777,985 parameters: bench/large_model.py's MLP 20 -> 4096 x 7 -> 1.
BIG = 100_777_985


@pytest.mark.parametrize("prunes", [False, True])
def test_base_budget_of_a_100m_model_is_the_head_only(prunes: bool) -> None:
    # Before: a pruning store kept at least BASE_CACHE = 32 versions, 12.8 GB at 100M;
    # then 2 (800 MB). A stale update's base is read from the store when it comes.
    assert base_budget(BIG, uses_base=True, prunes=prunes) == 1


@pytest.mark.parametrize("numel", [75, 2_433, 10_011, 999_955, 4_000_000, 20_000_000, BIG])
@pytest.mark.parametrize("prunes", [False, True])
def test_base_budget_is_bounded_by_bytes_at_every_size(numel: int, prunes: bool) -> None:
    n = base_budget(numel, uses_base=True, prunes=prunes)
    assert n >= 1
    if n > 1:
        assert n * 4 * numel <= max(BASE_BYTES, PRUNED_BASE_BYTES)
    if 4 * numel <= BASE_BYTES // 2:
        assert n >= 2  # a small model keeps a base beside the head


def test_base_budget_keeps_the_small_models_cache() -> None:
    # unchanged below a few million parameters: a pruning store keeps BASE_CACHE bases
    assert base_budget(999_955, uses_base=True, prunes=True) == BASE_CACHE
    assert base_budget(10_011, uses_base=True, prunes=True) == BASE_BYTES // (4 * 10_011)
    assert base_budget(999_955, uses_base=True, prunes=False) == BASE_BYTES // (4 * 999_955)
    assert base_budget(BIG, uses_base=False, prunes=True) == 1


def _spec(hidden: tuple[int, ...]) -> TaskSpec:
    return TaskSpec(
        task_id="large-audit",
        model=ModelSpec(kind="mlp", hidden=hidden),
        features=tuple(NumericFeature(name=f"x{i}") for i in range(20)),
        target=TargetSpec(name="y"),
        participants=("bank-a",),
    )


def test_audit_reader_chunking_takes_the_tasks_updates() -> None:
    # fedq replay / contributions / export read the audit stream with the task's
    # chunking: a 64 MiB default would refuse a 400 MB update's set as too large.
    from fedq.cli_audit import _chunking

    spec = _spec((4096,) * 7)
    assert _chunking(spec).limits.max_total > 4 * BIG


def test_malloc_is_tuned_only_for_models_that_travel_in_chunks() -> None:
    # glibc (Debian, as CI): a chunked model's allocations of 1 MiB or more are their
    # own memory maps, so freed chunk-sized buffers go back to the system.
    from fedq.services import tune_memory

    assert tune_memory(_spec((64,))) is False
    assert tune_memory(_spec((4096, 1024))) is True  # 16 MiB of parameters: chunked
