"""Bank-level DP at the aggregator: clipping, sensitivity, noise, adaptive clipping, the
accountant, and replay of a private run bit for bit (aggregator/privacy.py)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import uuid
from typing import Any

import fakeredis
import pytest
import torch
from click.testing import CliRunner

from aggregator import aggregate, privacy
from aggregator.audit.lineage import version_lineage
from aggregator.audit.replay import index_updates, replay
from aggregator.service import AggregatorService
from aggregator.store import RedisModelStore
from aggregator.strategies.fedasync import FedAsync
from common.errors import ConfigError
from common.hashing import LineageEntry
from common.models import build_task_model, model_tensors
from common.privacy import gaussian_epsilon
from common.spec import (
    AsyncSettings,
    BankPrivacy,
    NumericFeature,
    PrivacySpec,
    SyncSettings,
    TargetSpec,
    TaskSpec,
)
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import Tensors, UpdateEnvelope, encode_update
from fedq.cli import main

BANKS = ("bank-a", "bank-b", "bank-c")


def _entry(uid: str, participant: str, weight: float) -> LineageEntry:
    return LineageEntry(
        update_id=uid,
        participant=participant,
        base_version=0,
        staleness=0,
        weight=weight,
        content_hash=bytes(32),
    )


# ------------------------------------------------------------------ the pure functions


def test_clip_delta_scales_to_the_bound_by_the_joint_norm() -> None:
    delta = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # joint norm 5
    clipped, norm = privacy.clip_delta(delta, 1.0)
    assert norm == 5.0
    assert all(t.dtype == torch.float64 for t in clipped.values())
    scale = 1.0 / 5.0  # min(1, bound / norm), each element times it
    assert torch.equal(clipped["a"], torch.tensor([3.0 * scale, 0.0], dtype=torch.float64))
    assert torch.equal(clipped["b"], torch.tensor([[4.0 * scale]], dtype=torch.float64))
    assert math.isclose(privacy.delta_norm(clipped), 1.0, rel_tol=1e-15)
    # Within the bound: unchanged (in float64).
    same, norm = privacy.clip_delta(delta, 5.0)
    assert norm == 5.0
    assert all(torch.equal(same[k], delta[k].double()) for k in delta)


def test_sensitivity_is_the_bound_times_the_largest_bank_coefficient() -> None:
    # FedAsync: one update mixed in with a_t.
    a_t = FedAsync(AsyncSettings(mixing=0.6)).mixing_weight(0)
    assert privacy.sensitivity(2.0, [_entry("u", "bank-a", a_t)]) == 2.0 * 0.6
    # FedBuff: server_lr * s_i / K per update, summed per bank (bank-a has two).
    w = aggregate.buffer_weights(0.5, [1.0, 1.0, 1.0])  # fresh updates, K = 3
    buffer = [_entry("u1", "bank-a", w[0]), _entry("u2", "bank-b", w[1])]
    buffer.append(_entry("u3", "bank-a", w[2]))
    assert privacy.sensitivity(1.5, buffer) == 1.5 * (0.5 / 3 + 0.5 / 3)
    assert privacy.most_updates(buffer) == 2
    # FedAvg (sgd): the normalised sample weights, one update per bank.
    round_ = [_entry("u1", "bank-a", 0.25), _entry("u2", "bank-b", 0.75)]
    assert privacy.sensitivity(1.0, round_) == 0.75
    assert privacy.sensitivity(1.0, []) == 0.0


def test_noise_is_determined_by_its_seed() -> None:
    shapes = {"w": torch.Size([3, 4]), "b": torch.Size([3])}
    one = privacy.noise(shapes, 0.5, 123)
    two = privacy.noise(shapes, 0.5, 123)
    other = privacy.noise(shapes, 0.5, 124)
    assert list(one) == ["w", "b"]
    assert all(t.dtype == torch.float64 for t in one.values())
    assert all(torch.equal(one[k], two[k]) for k in shapes)
    assert not torch.equal(one["w"], other["w"])
    # The count's noise comes after the parameters', from the same stream.
    drawn, count = privacy.draw(shapes, 0.5, 123, count_std=2.0)
    assert all(torch.equal(drawn[k], one[k]) for k in shapes)
    assert count is not None and count == privacy.draw(shapes, 0.5, 123, count_std=2.0)[1]


def test_the_adaptive_split_keeps_the_total_noise_multiplier() -> None:
    z, k = 1.3, 2
    main = privacy.main_multiplier(z, adaptive=True)
    count = privacy.count_noise_std(z, k)
    # Andrew et al. (2021), Theorem 1, the count's sensitivity being k / 2.
    assert math.isclose(main**-2 + (k / (2 * count)) ** 2, z**-2, rel_tol=1e-12)
    assert privacy.main_multiplier(z, adaptive=False) == z


def test_private_version_clips_adds_the_seed_noise_and_accounts() -> None:
    head = {"w": torch.zeros(4), "b": torch.zeros(1)}
    deltas = {"u1": {"w": torch.full((4,), 10.0), "b": torch.zeros(1)}}
    lineage = [_entry("u1", "bank-a", 0.5)]
    settings = BankPrivacy(clip=1.0, noise_multiplier=0.8, delta=1e-5)
    params, rec = privacy.private_version(
        FedAsync, head, lambda _: head, lineage, deltas, settings=settings, clip=1.0, seed=7,
        parent=None,
    )  # fmt: skip
    expected = {k: 0.5 * (v.double()) for k, v in privacy.clip_delta(deltas["u1"], 1.0)[0].items()}
    n = privacy.noise({k: t.shape for k, t in head.items()}, 0.8 * 0.5, 7)
    assert all(torch.equal(params[k], (expected[k] + n[k]).float()) for k in head)
    assert (rec.clip, rec.next_clip, rec.noise_std, rec.sensitivity) == (1.0, 1.0, 0.4, 0.5)
    assert rec.clipped_fraction == 1.0 and rec.versions == 1
    assert rec.epsilon == gaussian_epsilon(0.8, 1, 1e-5)
    _, again = privacy.private_version(
        FedAsync, head, lambda _: head, lineage, deltas, settings=settings, clip=1.0, seed=8,
        parent=rec,
    )  # fmt: skip
    assert again.versions == 2 and again.epsilon == gaussian_epsilon(0.8, 2, 1e-5)
    assert again.epsilon > rec.epsilon
    assert privacy.check_version(again, again, rec) is None
    assert privacy.VersionPrivacy.from_json(json.loads(json.dumps(again.to_json()))) == again


# ------------------------------------------------------------------ an embedded federation


def _spec(settings: dict[str, Any], bank: BankPrivacy) -> TaskSpec:
    return TaskSpec.model_validate(
        {
            "task_id": f"dp{uuid.uuid4().hex[:10]}",
            "features": [NumericFeature(name=f"x{i}") for i in range(3)],
            "target": TargetSpec(name="y"),
            "participants": BANKS,
            "privacy": PrivacySpec(bank=bank),
            **settings,
        }
    )


def _body(spec: TaskSpec, participant: str, base: int, scale: float, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    model = model_tensors(build_task_model(spec))
    delta: Tensors = {k: torch.randn(v.shape, generator=g) * scale for k, v in model.items()}
    body, _ = encode_update(
        UpdateEnvelope(
            task=spec.task_id,
            participant=participant,
            update_id=uuid.uuid4().hex,
            base_version=base,
            num_samples=10 + seed % 7,
            tensors=delta,
            spec_hash=spec.spec_hash(),
        )
    )
    return body


STRATEGIES = {
    "fedasync": ({"mode": "async", "async": AsyncSettings(strategy="fedasync")}, 1),
    "fedbuff": ({"mode": "async", "async": AsyncSettings(strategy="fedbuff", buffer_size=2)}, 2),
    "fedavg": ({"mode": "sync", "sync": SyncSettings()}, 3),
}


async def _run(
    spec: TaskSpec, per_version: int, versions: int, scale: float, store: RedisModelStore
) -> MemoryTransport:
    """Commit ``versions`` private versions; each from ``per_version`` updates of the
    banks in turn, trained on the head."""
    broker = MemoryBroker()
    agg = MemoryTransport(broker, "fedq-aggregator")
    service = AggregatorService(spec, store, agg)
    assert service.privacy is not None
    counter = itertools.count(1)
    service.privacy.seeds = lambda: next(counter)  # fixed seeds: the test is deterministic
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    banks = {b: MemoryTransport(broker, b) for b in BANKS}
    turn = itertools.cycle(BANKS)
    async with asyncio.timeout(30):
        await service.ready.wait()
        for v in range(versions):
            head = service.head_version
            for i in range(per_version):
                bank = next(turn)
                body = _body(spec, bank, head, scale, seed=v * 10 + i)
                await banks[bank].publish_update(spec.task_id, bank, body, message_id=f"{v}-{i}")
            while service.head_version < head + 1:
                await asyncio.sleep(0.005)
    stop.set()
    await running
    return agg


def _store() -> tuple[RedisModelStore, fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    return RedisModelStore(client), client


@pytest.mark.parametrize("name", list(STRATEGIES))
async def test_replay_reproduces_every_private_version(name: str) -> None:
    settings, per_version = STRATEGIES[name]
    bank = BankPrivacy(clip=0.5, noise_multiplier=1.1, delta=1e-5)
    spec = _spec(settings, bank)
    store, client = _store()
    agg = await _run(spec, per_version, 5, 0.3, store)
    task = spec.task_id
    updates = index_updates([b async for b in agg.read_audit(task)])
    head = await store.head(task)
    assert head == 5
    records = [await store.get_version(task, v) for v in range(1, head + 1)]
    docs = [r.info["privacy"] for r in records]
    assert [d["versions"] for d in docs] == [1, 2, 3, 4, 5]
    assert [d["seed"] for d in docs] == [1, 2, 3, 4, 5]
    for n, d in enumerate(docs, start=1):
        assert d["epsilon"] == gaussian_epsilon(1.1, n, 1e-5)
        assert d["clip"] == d["next_clip"] == 0.5 and d["noise_multiplier"] == 1.1
        assert d["noise_std"] == 1.1 * privacy.sensitivity(0.5, records[n - 1].lineage) > 0
    assert docs[0]["epsilon"] < docs[-1]["epsilon"]
    assert any(d["clipped_fraction"] > 0 for d in docs)
    report = await replay(store, updates, task)
    assert report.ok, report.reason
    assert report.checked == head
    window = await replay(store, updates, task, from_version=2, to_version=4)
    assert window.ok and window.checked == 2, window.reason

    # An altered seed or clip bound of version 3 is named.
    key = store.keys.meta(task, 3)
    original = await client.get(key)
    reasons = {}
    for field, value in (("seed", 99), ("clip", 0.25), ("noise_multiplier", 2.0)):
        meta = json.loads(original or b"{}")
        meta["info"]["privacy"][field] = value
        await client.set(key, json.dumps(meta))
        bad = await replay(store, updates, task)
        assert bad.first_bad_version == 3, (field, bad.reason)
        reasons[field] = bad.reason
    assert "replayed parameters differ" in reasons["seed"]
    assert "not the spec's" in reasons["noise_multiplier"]
    meta = json.loads(original or b"{}")
    del meta["info"]["privacy"]
    await client.set(key, json.dumps(meta))
    bad = await replay(store, updates, task)
    assert bad.first_bad_version == 3 and "spec requires it" in bad.reason
    await client.set(key, original or b"")
    assert (await replay(store, updates, task)).ok

    # The counterfactual reuses the recorded seeds: another noisy model.
    without = await replay(store, updates, task, exclude="bank-a")
    assert without.ok and without.left_out > 0, without.reason
    assert without.param_hash != report.param_hash
    assert without.private_versions == head and "another noisy model" in without.note
    assert report.note == ""
    await store.close()


async def test_a_restarted_aggregator_carries_the_bound_and_the_count_on() -> None:
    settings, per_version = STRATEGIES["fedbuff"]
    bank = BankPrivacy(clip=1.0, noise_multiplier=0.2, adaptive=True, clip_lr=0.5)
    spec = _spec(settings, bank)
    store, _ = _store()
    first = await _run(spec, per_version, 4, 1e-4, store)
    second = await _run(spec, per_version, 3, 1e-4, store)
    task = spec.task_id
    records = [await store.get_version(task, v) for v in range(1, 8)]
    docs = [r.info["privacy"] for r in records]
    assert [d["versions"] for d in docs] == list(range(1, 8))
    # Tiny updates: all within the bound, which shrinks towards the median's.
    assert all(d["clipped_fraction"] == 0.0 for d in docs)
    clips = [d["clip"] for d in docs]
    assert clips[0] == 1.0
    assert all(b == a["next_clip"] for a, b in zip(docs, clips[1:], strict=False))
    assert clips[-1] < 0.5 * clips[0]
    assert all(d["adaptive"] and d["count_noise_std"] > 0 for d in docs)
    z_main = privacy.main_multiplier(0.2, adaptive=True)
    assert all(d["main_noise_multiplier"] == z_main for d in docs)
    assert docs[-1]["epsilon"] == gaussian_epsilon(0.2, 7, bank.delta)
    audit = [b async for b in first.read_audit(task)] + [b async for b in second.read_audit(task)]
    report = await replay(store, index_updates(audit), task)
    assert report.ok and report.checked == 7, report.reason
    await store.close()


async def test_a_forged_next_bound_is_named() -> None:
    settings, per_version = STRATEGIES["fedasync"]
    bank = BankPrivacy(clip=1.0, noise_multiplier=0.3, adaptive=True)
    spec = _spec(settings, bank)
    store, client = _store()
    agg = await _run(spec, per_version, 3, 1e-3, store)
    task = spec.task_id
    updates = index_updates([b async for b in agg.read_audit(task)])
    assert (await replay(store, updates, task)).ok
    key = store.keys.meta(task, 1)
    meta = json.loads(await client.get(key) or b"{}")
    meta["info"]["privacy"]["next_clip"] = 5.0
    await client.set(key, json.dumps(meta))
    bad = await replay(store, updates, task)
    assert bad.first_bad_version == 1 and "next clip bound" in bad.reason
    await store.close()


def test_audit_show_gives_the_privacy_record(monkeypatch: pytest.MonkeyPatch) -> None:
    settings, per_version = STRATEGIES["fedavg"]
    spec = _spec(settings, BankPrivacy(clip=0.5, noise_multiplier=1.0))
    server = fakeredis.FakeServer()

    async def federate() -> dict[str, Any]:
        store = RedisModelStore(fakeredis.FakeAsyncRedis(server=server))
        await _run(spec, per_version, 2, 0.3, store)
        doc = await version_lineage(store, spec.task_id, 2)
        await store.close()
        return doc

    doc = asyncio.run(federate())
    assert doc["privacy"]["epsilon"] == gaussian_epsilon(1.0, 2, 1e-5)
    import aggregator.store

    monkeypatch.setattr(
        aggregator.store, "connect_redis", lambda _: fakeredis.FakeAsyncRedis(server=server)
    )
    args = ["audit", "show", "--task", spec.task_id, "--version", "2", "--redis-url", "redis://x"]
    shown = CliRunner().invoke(main, [*args, "--json"])
    assert shown.exit_code == 0, shown.output
    privacy_doc = json.loads(shown.output)["privacy"]
    assert privacy_doc == doc["privacy"]
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0, text.output
    assert f"epsilon {doc['privacy']['epsilon']:.6g}" in text.output
    assert "noise multiplier 1" in text.output and "clip bound 0.5" in text.output


def test_fedavg_weights_enter_the_sensitivity_as_recorded() -> None:
    # FedAvg's round weights are the normalised sample counts (server sgd: no lr).
    w = aggregate.round_weights([10.0, 30.0])
    lineage = [_entry("u1", "bank-a", w[0]), _entry("u2", "bank-b", w[1])]
    assert privacy.sensitivity(2.0, lineage) == 2.0 * 0.75


async def test_bank_level_dp_cannot_be_turned_on_over_versions_made_without_it() -> None:
    settings, _ = STRATEGIES["fedasync"]
    private = _spec(settings, BankPrivacy(noise_multiplier=1.0))
    plain = private.model_copy(update={"privacy": PrivacySpec()})
    store, _ = _store()
    broker = MemoryBroker()
    service = AggregatorService(plain, store, MemoryTransport(broker, "fedq-aggregator"))
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    async with asyncio.timeout(30):
        await service.ready.wait()
        body = _body(plain, "bank-a", 0, 1e-3, seed=1)
        await MemoryTransport(broker, "bank-a").publish_update(
            plain.task_id, "bank-a", body, message_id="m1"
        )
        while service.head_version < 1:
            await asyncio.sleep(0.005)
    stop.set()
    await running
    # Version 1 released bank-a's update without noise: no epsilon can cover it now.
    later = AggregatorService(private, store, MemoryTransport(broker, "fedq-aggregator"))
    with pytest.raises(ConfigError, match="made without bank-level DP"):
        await later.prepare()
    await store.close()
