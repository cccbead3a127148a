"""The contract every registered strategy keeps: its cases, each run on one class.

A strategy is registered by name and owns its whole story: its capacity, its
steps, how replay recomputes a version from the recorded lineage and how the
counterfactual reweights a lineage without one participant. tests/test_strategy_contract.py
runs each ``check_*`` case on every class in :data:`aggregator.strategies.STRATEGIES`;
:func:`check_contract` runs them all on one class (tests/test_custom_strategy.py uses
it for a strategy registered there).

- **identity**: the registered name and mode, a capacity, JSON-able settings;
  an async strategy is what ``strategy_for`` builds for a spec naming it.
- **determinism**: the same offers in the same order give bit-identical versions
  and identical lineages.
- **conservation and capacity**: fewer than ``capacity`` updates are ever held;
  after a flush every offered update is in exactly one lineage.
- **replay equality**: ``recompute`` from the parent, the bases, the lineage and
  the deltas gives the step's parameters bit for bit (names, order, dtypes).
- **without a participant**: ``without`` leaves that participant out, keeps the
  others in order, and gives the weights (and, through ``recompute``, nearly the
  parameters) that a fresh strategy offered only the others would give.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import pytest
import torch

from aggregator.strategies import (
    MODES,
    STRATEGIES,
    AcceptedUpdate,
    Step,
    Strategy,
    strategy_for,
)
from aggregator.weighting import Remembering
from common.hashing import LineageEntry
from common.spec import (
    AsyncSettings,
    NumericFeature,
    StalenessSpec,
    SyncSettings,
    TargetSpec,
    TaskSpec,
)
from common.wire import Tensors

PARTICIPANTS = ("bank-a", "bank-b", "bank-c")
#: The staleness of successive offers (capped at the head's version).
STALENESS = (0, 2, 1, 0, 3, 0)
#: Who sends each offer: in async mode a buffer may hold one participant only, or
#: one participant twice.
SENDERS = tuple(f"bank-{c}" for c in "aaabcacbbabcab")
OFFERS = len(SENDERS)


def contract_spec(cls: type[Strategy]) -> TaskSpec:
    """A task whose mode is ``cls``'s and, when async, whose strategy is ``cls``."""
    return TaskSpec(
        task_id="contract",
        features=(NumericFeature(name="x"),),
        target=TargetSpec(name="y"),
        participants=PARTICIPANTS,
        mode="sync" if cls.mode == "sync" else "async",
        sync=SyncSettings(
            quorum=3, late="stale", staleness=StalenessSpec(kind="hinge", a=0.5, b=0)
        ),
        **{
            "async": AsyncSettings(
                strategy=cls.name if cls.mode == "async" else "fedasync",
                mixing=0.7,
                buffer_size=3,
                server_lr=0.8,
                staleness=StalenessSpec(kind="polynomial", a=0.5),
            )
        },
    )


def _tensors(gen: torch.Generator, scale: float) -> Tensors:
    return {
        "layer.weight": torch.randn(16, 8, generator=gen) * scale,
        "layer.bias": torch.randn(8, generator=gen) * scale,
        # float64 too, with enough values that a change of summation order shows.
        "out.weight": torch.randn(8, 32, generator=gen, dtype=torch.float64) * scale,
    }


Raw = list[tuple[str, str, tuple[int, ...], bytes]]


def _raw(params: Tensors) -> Raw:
    return [
        (name, str(t.dtype), tuple(t.shape), t.contiguous().numpy().tobytes())
        for name, t in params.items()
    ]


@dataclass
class Run:
    """What a strategy made from a scripted sequence of offers."""

    versions: list[Tensors]
    #: (parent version, the step that made the next one), in order.
    steps: list[tuple[int, Step]] = field(default_factory=list)
    offered: list[AcceptedUpdate] = field(default_factory=list)
    left: tuple[AcceptedUpdate, ...] = ()

    @property
    def deltas(self) -> dict[str, Tensors]:
        return {u.update_id: u.delta for u in self.offered}


def drive(cls: type[Strategy], spec: TaskSpec, seed: int = 7) -> Run:
    """Offer ``OFFERS`` admitted updates as the service would, then flush."""
    gen = torch.Generator().manual_seed(seed)
    strategy = cls.from_spec(spec)
    run = Run(versions=[_tensors(gen, 1.0)])

    def emit(step: Step | None) -> None:
        if step is not None:
            run.steps.append((len(run.versions) - 1, step))
            run.versions.append(step.params)
            if isinstance(strategy, Remembering):  # the service does this after a commit
                strategy.committed(step.lineage)

    for i in range(OFFERS):
        t = len(run.versions) - 1
        participant = SENDERS[i]
        held = {u.participant for u in strategy.pending()}
        if spec.mode == "sync" and participant in held:
            # A sync round takes one update per participant (admission's rule).
            participant = next(p for p in PARTICIPANTS if p not in held)
        staleness = min(STALENESS[i % len(STALENESS)], t)
        uid = f"u{i:02d}"
        update = AcceptedUpdate(
            update_id=uid,
            participant=participant,
            base_version=t - staleness,
            staleness=staleness,
            num_samples=10 + 7 * i,
            delta=_tensors(gen, 0.1),
            content_hash=hashlib.sha256(uid.encode()).digest(),
        )
        run.offered.append(update)
        base = run.versions[update.base_version] if cls.uses_base else run.versions[t]
        emit(strategy.offer(run.versions[t], base, update))
        assert len(strategy.pending()) < strategy.capacity, "holds as many as its capacity"
    emit(strategy.flush(run.versions[-1]))
    run.left = strategy.pending()
    return run


# --------------------------------------------------------------------------- the cases


def check_identity(cls: type[Strategy]) -> None:
    assert STRATEGIES[cls.name] is cls
    assert cls.mode in MODES
    spec = contract_spec(cls)
    strategy = cls.from_spec(spec)
    assert isinstance(strategy.capacity, int)
    assert strategy.capacity >= 1
    assert strategy.pending() == ()
    assert strategy.flush(_tensors(torch.Generator().manual_seed(0), 1.0)) is None
    json.dumps(strategy.settings())
    if cls.mode == "async":
        assert type(strategy_for(spec)) is cls


def check_determinism(cls: type[Strategy]) -> None:
    spec = contract_spec(cls)
    first, second = drive(cls, spec), drive(cls, spec)
    assert first.steps, "the scripted offers made no version"
    assert [_raw(v) for v in first.versions] == [_raw(v) for v in second.versions]
    assert [s.lineage for _, s in first.steps] == [s.lineage for _, s in second.steps]


def check_conservation(cls: type[Strategy]) -> None:
    run = drive(cls, contract_spec(cls))
    by_id = {u.update_id: u for u in run.offered}
    in_lineage = [e.update_id for _, s in run.steps for e in s.lineage]
    assert sorted(in_lineage + [u.update_id for u in run.left]) == sorted(by_id)
    for _, step in run.steps:
        for e in step.lineage:
            u = by_id[e.update_id]
            assert (e.participant, e.base_version, e.staleness, e.content_hash) == (
                u.participant,
                u.base_version,
                u.staleness,
                u.content_hash,
            )
            assert isinstance(e.weight, float)


def check_replay_equality(cls: type[Strategy]) -> None:
    run = drive(cls, contract_spec(cls))
    deltas = run.deltas
    for parent, step in run.steps:
        params = cls.recompute(run.versions[parent], run.versions.__getitem__, step.lineage, deltas)
        assert _raw(params) == _raw(step.params), f"version {parent + 1} does not replay"
    head = run.versions[-1]
    assert _raw(cls.recompute(head, run.versions.__getitem__, (), deltas)) == _raw(head)


def _counterfactual(
    cls: type[Strategy], spec: TaskSpec, run: Run, parent: int, kept: list[AcceptedUpdate]
) -> Step | None:
    """What a fresh strategy offered only ``kept`` (in order, on ``parent``) emits, with
    what it remembers restored to the versions before ``parent + 1``."""
    fresh = cls.from_spec(spec)
    if isinstance(fresh, Remembering):
        fresh.restore([s.lineage for p, s in run.steps if p < parent])
    head = run.versions[parent]
    steps = [
        fresh.offer(head, run.versions[u.base_version] if cls.uses_base else head, u) for u in kept
    ]
    steps.append(fresh.flush(head))
    emitted = [s for s in steps if s is not None]
    assert len(emitted) <= 1
    return emitted[0] if emitted else None


def _same_but_weight(a: LineageEntry, b: LineageEntry) -> bool:
    return (a.update_id, a.participant, a.base_version, a.staleness, a.content_hash) == (
        b.update_id,
        b.participant,
        b.base_version,
        b.staleness,
        b.content_hash,
    )


def check_without_participant(cls: type[Strategy]) -> None:
    spec = contract_spec(cls)
    run = drive(cls, spec)
    by_id = {u.update_id: u for u in run.offered}
    deltas = run.deltas
    for parent, step in run.steps:
        for participant in PARTICIPANTS:
            without = cls.without(step.lineage, participant)
            if all(e.participant != participant for e in step.lineage):
                assert without == step.lineage
                continue
            kept = [e for e in step.lineage if e.participant != participant]
            assert len(without) == len(kept)
            assert all(_same_but_weight(a, b) for a, b in zip(without, kept, strict=True))
            params = cls.recompute(run.versions[parent], run.versions.__getitem__, without, deltas)
            expected = _counterfactual(cls, spec, run, parent, [by_id[e.update_id] for e in kept])
            if not without:
                assert expected is None
                assert _raw(params) == _raw(run.versions[parent])
                continue
            assert expected is not None
            assert [e.update_id for e in expected.lineage] == [e.update_id for e in without]
            assert [e.weight for e in without] == pytest.approx(
                [e.weight for e in expected.lineage], rel=1e-12, abs=0
            )
            for name, t in expected.params.items():
                assert params[name].dtype == t.dtype
                torch.testing.assert_close(params[name], t)


CASES = (
    check_identity,
    check_determinism,
    check_conservation,
    check_replay_equality,
    check_without_participant,
)


def check_contract(cls: type[Strategy]) -> None:
    """Every case on one strategy class (registered under its name)."""
    for case in CASES:
        case(cls)
