"""The server optimizer (sgd, momentum, FedAdam, FedYogi): arithmetic, storage, restarts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path

import fakeredis
import numpy as np
import pytest
import redis.asyncio as aioredis
import torch

from aggregator.server_opt import (
    ServerOptimizer,
    ServerState,
    apply,
    carried,
    initial_state,
)
from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, StoreConfig
from aggregator.strategies import (
    STRATEGIES,
    AcceptedUpdate,
    FedAvg,
    strategy_for,
    weighted_step,
)
from aggregator.strategies.base import optimizer_step, server_optimizer
from common.errors import StoreError
from common.hashing import lineage_bytes, optimizer_bytes, version_hash
from common.spec import (
    NumericFeature,
    ServerOptimizerSpec,
    SyncSettings,
    TargetSpec,
    TaskSpec,
)
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import ModelEnvelope, Tensors, encode_model, tensors_hash
from tests.helpers import CREDIT_TASK, encoded_update, init_task, lineage_entry, wait_for
from tests.strategy_contract import PARTICIPANTS, contract_spec

F64 = torch.float64
KINDS = ("momentum", "adam", "yogi")


def _spec(kind: str) -> ServerOptimizerSpec:
    # Not the defaults, so that each hyperparameter has to be used where it belongs.
    return ServerOptimizerSpec(kind=kind, lr=0.3, beta1=0.8, beta2=0.95, tau=0.01)


def _head(gen: torch.Generator) -> Tensors:
    return {
        "a.weight": torch.randn(5, 4, generator=gen),
        "a.bias": torch.randn(4, generator=gen),
        "b": torch.randn(7, generator=gen, dtype=F64),
    }


def _deltas(gen: torch.Generator, head: Tensors, n: int) -> list[Tensors]:
    return [
        {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.1 for k, v in head.items()}
        for _ in range(n)
    ]


def _update(i: int, delta: Tensors) -> AcceptedUpdate:
    return AcceptedUpdate(
        update_id=f"u{i}",
        participant=f"bank-{i}",
        base_version=0,
        staleness=0,
        num_samples=10 + i,
        delta=delta,
        content_hash=bytes(32),
    )


# ------------------------------------------------------------ a float64 numpy reference


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.float64)


def _reference(
    spec: ServerOptimizerSpec,
    head: Tensors,
    state: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None,
    deltas: Sequence[Tensors],
    weights: Sequence[float],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One step written from Reddi et al., Algorithm 2, in float64 numpy, as documented."""
    b1, b2, lr, tau = spec.beta1, spec.beta2, spec.lr, spec.tau
    params, ms, vs = {}, {}, {}
    for k, h in head.items():
        d = _np(deltas[0][k]) * weights[0]
        for delta, w in zip(deltas[1:], weights[1:], strict=True):
            d = d + _np(delta[k]) * w
        m = state[0][k] if state else np.zeros(h.shape)
        v = state[1][k] if state else np.full(h.shape, tau * tau)
        if spec.kind == "momentum":
            m = b1 * m + d
            x = _np(h) + lr * m
        else:
            m = b1 * m + (1 - b1) * d
            if spec.kind == "adam":
                v = b2 * v + (1 - b2) * (d * d)
            else:
                v = v - ((1 - b2) * (d * d)) * np.sign(v - d * d)
            x = _np(h) + (lr * m) / (np.sqrt(v) + tau)
        params[k] = x.astype(h.numpy().dtype)
        ms[k], vs[k] = m, v
    return params, ms, vs


@pytest.mark.parametrize("kind", KINDS)
def test_three_steps_match_a_float64_numpy_reference_bit_for_bit(kind: str) -> None:
    spec = _spec(kind)
    gen = torch.Generator().manual_seed(7)
    head = _head(gen)
    server = ServerOptimizer(spec)
    ref_state: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
    for step_no in range(3):
        deltas = _deltas(gen, head, 3)
        weights = [0.5, 0.25 + step_no / 10, 0.125]
        params, state = server.step(head, deltas, weights)
        ref_params, ref_m, ref_v = _reference(spec, head, ref_state, deltas, weights)
        assert state is not None
        for k, h in head.items():
            assert params[k].dtype == h.dtype
            assert np.array_equal(params[k].numpy(), ref_params[k]), (kind, step_no, k)
            assert state.m[k].dtype == F64
            assert np.array_equal(state.m[k].numpy(), ref_m[k]), (kind, step_no, k)
            if kind == "momentum":
                assert state.v == {}
            else:
                assert np.array_equal(state.v[k].numpy(), ref_v[k]), (kind, step_no, k)
        # The model moved, and by the optimizer, not by the plain weighted sum.
        plain = weighted_step(head, [_update(i, d) for i, d in enumerate(deltas)], weights)
        assert any(not torch.equal(params[k], plain.params[k]) for k in head)
        server.advance(state)
        head, ref_state = params, (ref_m, ref_v)


def test_sgd_is_the_weighted_step_bit_for_bit_and_keeps_no_state() -> None:
    gen = torch.Generator().manual_seed(3)
    head = _head(gen)
    updates = [_update(i, d) for i, d in enumerate(_deltas(gen, head, 4))]
    weights = [0.1, 0.2, 0.3000000000000001, 0.4]
    expected = weighted_step(head, updates, weights)
    step = optimizer_step(ServerOptimizer(), head, updates, weights)
    assert step.state is None
    assert step.lineage == expected.lineage
    assert all(torch.equal(step.params[k], expected.params[k]) for k in head)
    params, state = apply(ServerOptimizerSpec(), head, None, [u.delta for u in updates], weights)
    assert state is None
    assert all(torch.equal(params[k], expected.params[k]) for k in head)


def test_state_carries_over_only_within_the_same_kind() -> None:
    head = _head(torch.Generator().manual_seed(1))
    adam = initial_state(_spec("adam"), head)
    assert carried(_spec("adam"), adam) is adam
    assert carried(_spec("yogi"), adam) is None
    assert carried(_spec("adam").model_copy(update={"lr": 2.0}), adam) is adam
    assert carried(_spec("momentum"), None) is None
    assert all(float(t.abs().max()) == 0.0 for t in adam.m.values())
    assert all(bool((t == 0.01 * 0.01).all()) for t in adam.v.values())


def test_state_tensors_round_trip_and_refuse_another_layout() -> None:
    head = _head(torch.Generator().manual_seed(2))
    state = initial_state(_spec("yogi"), head)
    flat = state.tensors()
    assert list(flat) == [f"m/{k}" for k in head] + [f"v/{k}" for k in head]
    back = ServerState.from_tensors(_spec("yogi"), flat)
    assert back.tensors().keys() == flat.keys()
    assert back.digest() == state.digest() == tensors_hash(flat)
    with pytest.raises(ValueError, match="does not fit"):
        ServerState.from_tensors(_spec("momentum"), flat)
    with pytest.raises(ValueError, match="float64"):
        ServerState.from_tensors(_spec("yogi"), {**flat, "x/other": torch.zeros(1, dtype=F64)})


def test_fedavg_rounds_step_through_the_task_optimizer() -> None:
    spec = TaskSpec(
        task_id="opt",
        features=(NumericFeature(name="x"),),
        target=TargetSpec(name="y"),
        participants=("bank-0", "bank-1"),
        mode="sync",
        server=_spec("adam"),
    )
    strategy = strategy_for(spec)
    assert isinstance(strategy, FedAvg)
    server = server_optimizer(strategy)
    assert server is not None and server.spec == _spec("adam")
    gen = torch.Generator().manual_seed(5)
    head = _head(gen)
    deltas = _deltas(gen, head, 2)
    assert strategy.offer(head, head, _update(0, deltas[0])) is None
    step = strategy.offer(head, head, _update(1, deltas[1]))
    assert step is not None and step.state is not None
    weights = [e.weight for e in step.lineage]
    assert weights == [10 / 21, 11 / 21]
    params, state = apply(_spec("adam"), head, None, deltas, weights)
    assert all(torch.equal(step.params[k], params[k]) for k in head)
    assert state is not None and step.state.digest() == state.digest()
    # Not committed: the next round starts from the same state; committed: from the new one.
    assert server.state is None
    server.advance(step.state)
    again = server.step(params, deltas, weights)[1]
    assert again is not None and again.digest() != state.digest()


# ------------------------------------------------------------------ the model store


def _state_for(params: Tensors, kind: str, seed: int) -> ServerState:
    gen = torch.Generator().manual_seed(seed)
    state = initial_state(_spec(kind), params)
    m = {k: torch.randn(t.shape, generator=gen, dtype=F64) / 3 for k, t in state.m.items()}
    return ServerState(state.spec, m, state.v)


class TestStoredState:
    async def test_state_commits_with_its_version_and_reads_back_bit_for_bit(
        self, store: RedisModelStore, task_spec: TaskSpec
    ) -> None:
        params = await init_task(store, task_spec)
        state = _state_for(params, "adam", 1)
        lineage = [lineage_entry("u1", weight=0.5)]
        genesis = await store.get_version(CREDIT_TASK, 0)
        result = await store.commit(
            CREDIT_TASK, parent=0, params=params, lineage=lineage, state=state
        )
        assert result.committed and result.record is not None
        record = await store.get_version(CREDIT_TASK, 1)
        assert record.optimizer == state.spec
        assert record.state_hash == state.digest()
        # The version hash binds the optimizer's settings and state hash (wire-format 9).
        expected = version_hash(
            task=CREDIT_TASK,
            version=1,
            parent_hash=genesis.version_hash,
            param_hash=tensors_hash(params),
            lineage=lineage_bytes(lineage),
            optimizer=optimizer_bytes(
                kind="adam", lr=0.3, beta1=0.8, beta2=0.95, tau=0.01, state_hash=state.digest()
            ),
        )
        assert record.version_hash == expected == result.record.version_hash
        back = await store.get_state(CREDIT_TASK, 1)
        assert back is not None and back.spec == state.spec
        for k, t in state.tensors().items():
            stored = back.tensors()[k]
            assert stored.dtype == F64 and torch.equal(stored, t)
        assert await store.get_state(CREDIT_TASK, 0) is None
        assert (await store.verify_chain(CREDIT_TASK)).ok

    async def test_a_version_without_state_hashes_as_before(
        self, store: RedisModelStore, task_spec: TaskSpec
    ) -> None:
        params = await init_task(store, task_spec)
        lineage = [lineage_entry("u1")]
        result = await store.commit(CREDIT_TASK, parent=0, params=params, lineage=lineage)
        assert result.record is not None
        genesis = await store.get_version(CREDIT_TASK, 0)
        assert result.record.version_hash == version_hash(
            task=CREDIT_TASK,
            version=1,
            parent_hash=genesis.version_hash,
            param_hash=tensors_hash(params),
            lineage=lineage_bytes(lineage),
        )
        assert result.record.optimizer is None and result.record.state_hash is None
        assert "state_hash" not in json.loads(result.record.meta_json())
        assert await store.get_state(CREDIT_TASK, 1) is None

    async def test_tampered_state_blob_or_hash_is_named(
        self, store: RedisModelStore, task_spec: TaskSpec, redis_client: aioredis.Redis
    ) -> None:
        params = await init_task(store, task_spec)
        for v in range(3):
            state = _state_for(params, "momentum", v)
            lineage = [lineage_entry(f"u{v}")]
            result = await store.commit(
                CREDIT_TASK, parent=v, params=params, lineage=lineage, state=state
            )
            assert result.committed
        r = redis_client
        key = store.keys.state(CREDIT_TASK, 2)
        original = await r.get(key)
        stored = await store.get_state(CREDIT_TASK, 2)
        assert stored is not None
        changed = stored.tensors()
        first = next(iter(changed))
        changed[first] = changed[first].clone()
        changed[first].view(-1)[0] += 1e-12
        record = await store.get_version(CREDIT_TASK, 2)
        forged, _ = encode_model(
            ModelEnvelope(
                task=CREDIT_TASK,
                version=2,
                tensors=changed,
                version_hash=record.version_hash,
                codec="raw",
            )
        )
        await r.set(key, forged)
        report = await store.verify_chain(CREDIT_TASK)
        assert report.first_bad_version == 2
        assert "optimizer state hash differs" in report.reason
        with pytest.raises(StoreError, match="corrupt"):
            await store.get_state(CREDIT_TASK, 2)
        await r.set(key, original or b"")
        assert (await store.verify_chain(CREDIT_TASK)).ok
        # The recorded state hash itself changed: the chain no longer verifies.
        meta_key = store.keys.meta(CREDIT_TASK, 1)
        meta = json.loads(await r.get(meta_key) or b"{}")
        meta["state_hash"] = "00" * 32
        await r.set(meta_key, json.dumps(meta))
        report = await store.verify_chain(CREDIT_TASK)
        assert report.first_bad_version == 1
        assert "state" in report.reason

    async def test_retention_drops_old_states_and_keeps_the_head_s(
        self, redis_client: aioredis.Redis, prefix: str, task_spec: TaskSpec
    ) -> None:
        store = RedisModelStore(redis_client, StoreConfig(prefix=prefix, keep_blobs=2))
        params = await init_task(store, task_spec)
        for v in range(4):
            state = _state_for(params, "yogi", v)
            lineage = [lineage_entry(f"u{v}")]
            await store.commit(CREDIT_TASK, parent=v, params=params, lineage=lineage, state=state)
        assert await store.get_state(CREDIT_TASK, 4) is not None
        assert await store.get_state(CREDIT_TASK, 3) is not None
        for v in (1, 2):
            assert not await redis_client.exists(store.keys.state(CREDIT_TASK, v))
        report = await store.verify_chain(CREDIT_TASK)
        assert report.ok and report.unverified_params == (1, 2)
        keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:*")]
        await redis_client.delete(*keys)


# ------------------------------------------------------------ restart equivalence


def _sync_spec(task: str) -> TaskSpec:
    return TaskSpec(
        task_id=task,
        features=tuple(NumericFeature(name=f"x{i}") for i in range(3)),
        target=TargetSpec(name="y"),
        participants=("bank-a", "bank-b"),
        mode="sync",
        sync=SyncSettings(quorum=2),
        server=ServerOptimizerSpec(kind="adam", lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3),
    )


ROUNDS = 4


async def _run(spec: TaskSpec, restart_after: int | None) -> tuple[list[bytes], RedisModelStore]:
    """Rounds of two fixed updates; the aggregator is restarted after ``restart_after``."""
    broker = MemoryBroker()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    bank = MemoryTransport(broker, "banks")
    config = ServiceConfig(require_sender_match=False)
    stop = asyncio.Event()
    service = AggregatorService(spec, store, MemoryTransport(broker, "fedq-aggregator"), config)
    running = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set())
    for r in range(ROUNDS):
        if r == restart_after:
            stop.set()
            await running
            stop = asyncio.Event()
            agg = MemoryTransport(broker, "fedq-aggregator")
            service = AggregatorService(spec, store, agg, config)
            running = asyncio.create_task(service.run(stop))
            await wait_for(lambda: service.ready.is_set())  # noqa: B023
        for i, p in enumerate(spec.participants):
            uid, body = encoded_update(
                spec, base=r, participant=p, scale=0.01 * (r + 1) * (i + 2), update_id=f"r{r}-{p}"
            )
            await bank.publish_update(spec.task_id, p, body, message_id=uid)
        await wait_for(lambda: service.head_version == r + 1)  # noqa: B023
    stop.set()
    await running
    hashes = [(await store.get_version(spec.task_id, v)).version_hash for v in range(ROUNDS + 1)]
    return hashes, store


async def test_a_restarted_aggregator_continues_the_same_chain() -> None:
    spec = _sync_spec(f"opt{uuid.uuid4().hex[:8]}")
    straight, store = await _run(spec, None)
    restarted, other = await _run(spec, 2)
    assert restarted == straight
    last = await other.get_state(spec.task_id, ROUNDS)
    assert (
        last is not None
        and last.digest() == (await store.get_version(spec.task_id, ROUNDS)).state_hash
    )
    # The test can tell: a restart that forgot the state makes another version.
    head = (await store.get_params(spec.task_id, ROUNDS - 1)).tensors
    record = await store.get_version(spec.task_id, ROUNDS)
    deltas = [
        {k: torch.full_like(t, 0.01 * ROUNDS * (i + 2)) for k, t in head.items()} for i in range(2)
    ]
    weights = [e.weight for e in record.lineage]
    kept = await store.get_state(spec.task_id, ROUNDS - 1)
    again, _ = apply(spec.server, head, kept, deltas, weights)
    assert tensors_hash(again) == record.param_hash
    forgot, _ = apply(spec.server, head, None, deltas, weights)
    assert tensors_hash(forgot) != record.param_hash
    info = record.info
    assert info["server"] == spec.server.model_dump(mode="json")


# ------------------------------------------------------------ the documented layout

DOC = Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"


def test_the_optimizer_bytes_and_version_hash_follow_the_documented_vector() -> None:
    """Written from docs/wire-format.md section 9 with struct and hashlib alone."""
    param_hash = bytes.fromhex("a6b6b38708f6291193d0661a60e7dc46285995a5fb53c7283678ebb11182af20")
    lineage = bytes.fromhex("9196a6752d30303031a662616e6b2d610300cb4059000000000000c420")
    lineage += param_hash
    opt = b"\x96" + b"\xa4adam"
    for x in (0.1, 0.9, 0.99, 0.001):
        opt += b"\xcb" + struct.pack(">d", x)
    opt += b"\xc4\x20" + b"\x22" * 32
    task = b"credit"
    preimage = b"fedq-version-v1\x00" + struct.pack("<I", len(task)) + task
    preimage += struct.pack("<Q", 4) + b"\x11" * 32 + param_hash
    preimage += struct.pack("<Q", len(lineage)) + lineage
    preimage += struct.pack("<Q", len(opt)) + opt
    expected = hashlib.sha256(preimage).hexdigest()
    assert expected == "ff20337d30c93ae4539806751e72387b90ec00f2b36fb5857bb6d143c79aa72d"
    mine = optimizer_bytes(
        kind="adam", lr=0.1, beta1=0.9, beta2=0.99, tau=0.001, state_hash=b"\x22" * 32
    )
    assert mine == opt
    vh = version_hash(
        task="credit",
        version=4,
        parent_hash=b"\x11" * 32,
        param_hash=param_hash,
        lineage=lineage,
        optimizer=mine,
    )
    assert vh.hex() == expected
    text = "".join(DOC.read_text(encoding="utf-8").split())
    assert f"versionhash:{expected}" in text


# ------------------------------------------------- every strategy with a server optimizer


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("kind", KINDS)
def test_every_strategy_with_an_optimizer_steps_as_replay_recomputes(name: str, kind: str) -> None:
    """Steps chain through the optimizer state as the service advances it, and each
    step is what :func:`apply` recomputes from the recorded weights (replay's path)."""
    cls = STRATEGIES[name]
    spec = contract_spec(cls).model_copy(update={"server": _spec(kind)})
    strategy = cls.from_spec(spec)
    server = server_optimizer(strategy)
    if server is None:
        assert name != "fedavg", "FedAvg rounds step through the task's server optimizer"
        return  # a strategy without a server optimizer (FedAsync: sgd only)
    gen = torch.Generator().manual_seed(11)
    head = _head(gen)
    deltas: dict[str, Tensors] = {}
    steps = 0
    for i in range(4 * strategy.capacity):
        delta = _deltas(gen, head, 1)[0]
        update = _update(i, delta)
        update = AcceptedUpdate(
            update_id=update.update_id,
            participant=PARTICIPANTS[i % len(PARTICIPANTS)],
            base_version=steps,
            staleness=0,
            num_samples=update.num_samples,
            delta=delta,
            content_hash=update.content_hash,
        )
        deltas[update.update_id] = delta
        step = strategy.offer(head, head, update)
        if step is None:
            continue
        assert step.state is not None and step.state.spec == _spec(kind)
        params, state = apply(
            _spec(kind),
            head,
            server.state,
            [deltas[e.update_id] for e in step.lineage],
            [e.weight for e in step.lineage],
        )
        assert state is not None and state.digest() == step.state.digest()
        assert all(torch.equal(params[k], step.params[k]) for k in head)
        server.advance(step.state)  # what the service does after the commit
        head, steps = step.params, steps + 1
    assert steps >= 3
