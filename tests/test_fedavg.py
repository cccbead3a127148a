"""FedAvg rounds: the pure strategy against an independent weighted mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aggregator.strategies import AcceptedUpdate, FedAvg, strategy_for
from common.spec import (
    AsyncSettings,
    NumericFeature,
    StalenessSpec,
    SyncSettings,
    TargetSpec,
    TaskSpec,
)

HEAD = {"w": torch.tensor([[0.5, -1.0, 2.0]]), "b": torch.tensor([0.25])}


def _update(
    uid: str, participant: str, n: int, delta: dict[str, torch.Tensor], staleness: int = 0
) -> AcceptedUpdate:
    return AcceptedUpdate(uid, participant, 3 - staleness, staleness, n, delta, bytes(32))


def _random_updates(k: int, seed: int) -> list[AcceptedUpdate]:
    gen = torch.Generator().manual_seed(seed)
    return [
        _update(
            f"u{i}",
            f"bank-{i}",
            int(torch.randint(1, 500, (1,), generator=gen)),
            {name: torch.randn(t.shape, generator=gen) for name, t in HEAD.items()},
        )
        for i in range(k)
    ]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("weighted", [True, False])
def test_round_equals_an_independent_weighted_mean_of_local_models(
    seed: int, weighted: bool
) -> None:
    updates = _random_updates(4, seed)
    avg = FedAvg(SyncSettings(quorum=4, weighted=weighted), participants=4)
    steps = [avg.offer(HEAD, HEAD, u) for u in updates]
    assert steps[:3] == [None, None, None]
    step = steps[3]
    assert step is not None
    # Independent: numpy, float64, mean of the local models (head + delta) weighted by n.
    n = np.array([u.num_samples if weighted else 1 for u in updates], dtype=np.float64)
    for name, head in HEAD.items():
        local = np.stack([head.numpy().astype(np.float64) + u.delta[name].numpy() for u in updates])
        expected = np.tensordot(n / n.sum(), local, axes=1)
        np.testing.assert_allclose(step.params[name].numpy(), expected, rtol=1e-6, atol=1e-6)
        assert step.params[name].dtype == torch.float32
    assert [e.update_id for e in step.lineage] == [u.update_id for u in updates]
    assert sum(e.weight for e in step.lineage) == pytest.approx(1.0)
    assert avg.pending() == ()


def test_quorum_defaults_to_every_participant_and_flush_needs_the_minimum() -> None:
    avg = FedAvg(SyncSettings(min_updates=2), participants=5)
    assert avg.quorum == 5
    assert avg.capacity == 5
    updates = _random_updates(3, 0)
    assert avg.offer(HEAD, HEAD, updates[0]) is None
    assert avg.flush(HEAD) is None  # one update, minimum two: the round stays open
    assert avg.offer(HEAD, HEAD, updates[1]) is None
    step = avg.flush(HEAD)  # the deadline closes the round with the two present
    assert step is not None
    assert len(step.lineage) == 2


def test_late_updates_are_folded_in_with_the_sync_staleness_weight() -> None:
    # Admission refuses late updates unless sync.late = "stale"; then FedAvg weighs
    # them with sync.staleness (not async.staleness).
    ones = {name: torch.ones_like(t) for name, t in HEAD.items()}
    stale = FedAvg(
        SyncSettings(quorum=2, late="stale", staleness=StalenessSpec(kind="polynomial", a=1.0)),
        participants=2,
    )
    assert stale.offer(HEAD, HEAD, _update("fresh", "bank-0", 100, ones)) is None
    step = stale.offer(HEAD, HEAD, _update("late", "bank-1", 100, ones, staleness=1))
    assert step is not None
    # raw weights: 100 * (0+1)^-1 = 100 and 100 * (1+1)^-1 = 50 -> 2/3 and 1/3
    assert [e.weight for e in step.lineage] == pytest.approx([2 / 3, 1 / 3])
    assert stale.settings()["staleness"] == {"kind": "polynomial", "a": 1.0, "b": 4}


def test_sync_mode_reads_its_own_staleness_settings() -> None:
    spec = TaskSpec(
        task_id="t",
        features=(NumericFeature(name="x"),),
        target=TargetSpec(name="y"),
        participants=("a", "b"),
        mode="sync",
        sync=SyncSettings(late="stale", staleness=StalenessSpec(kind="constant")),
        **{"async": AsyncSettings(staleness=StalenessSpec(kind="polynomial", a=2.0))},
    )
    avg = strategy_for(spec)
    ones = {name: torch.ones_like(t) for name, t in HEAD.items()}
    assert avg.offer(HEAD, HEAD, _update("fresh", "a", 100, ones)) is None
    step = avg.offer(HEAD, HEAD, _update("late", "b", 100, ones, staleness=3))
    assert step is not None
    assert [e.weight for e in step.lineage] == [0.5, 0.5]  # constant: s = 1 for both


def test_stored_specs_without_the_sync_staleness_fields_still_parse() -> None:
    old = {
        "task_id": "t",
        "features": [{"name": "x", "kind": "numeric"}],
        "target": {"name": "y"},
        "mode": "sync",
        "sync": {"quorum": 0, "deadline_s": None, "min_updates": 1, "weighted": True},
    }
    spec = TaskSpec.parse(old)
    assert spec.sync.staleness == StalenessSpec()
    assert spec.sync.max_staleness == 20
    assert TaskSpec.from_json(spec.to_json()) == spec


def test_strategy_follows_the_task_mode() -> None:
    base = {
        "task_id": "t",
        "features": (NumericFeature(name="x"),),
        "target": TargetSpec(name="y"),
        "participants": ("a", "b", "c"),
    }
    assert strategy_for(TaskSpec(**base, mode="sync")).name == "fedavg"
    assert strategy_for(TaskSpec(**base)).name == "fedasync"
