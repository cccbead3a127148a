"""Audit: replay reproduces every version bit for bit, tampering is named, counterfactuals."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import fakeredis
import msgpack
import pandas as pd
import pytest
import redis.asyncio as aioredis
import torch
from click.testing import CliRunner

from aggregator.audit.export import export_version, load_exported
from aggregator.audit.lineage import version_lineage
from aggregator.audit.replay import index_updates, replay
from aggregator.service import AggregatorService
from aggregator.store import RedisModelStore
from common.errors import FedqError
from common.signing import SigningKey
from common.spec import AsyncSettings, ServerOptimizerSpec, SyncSettings, TaskSpec
from common.transport.amqp import AmqpTransport
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import ModelEnvelope, UpdateEnvelope, decode_update, encode_model, encode_update
from fedq.cli import main
from fedq.simulate import SimulationConfig, prepare, run_simulation
from participant.worker import ParticipantWorker, WorkerConfig
from tests.bank_users import shared_bank_urls
from tests.helpers import AMQP_URL, REDIS_URL, forget_task

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parent.parent / "fedq" / "data" / "german_credit.csv"


async def _federation(
    spec: TaskSpec,
    shards: Mapping[str, pd.DataFrame],
    versions: int,
    store: RedisModelStore | None = None,
) -> tuple[RedisModelStore, MemoryTransport]:
    """Run an embedded federation of ``spec`` to ``versions``; return its store and broker."""
    broker = MemoryBroker()
    store = store or RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    agg = MemoryTransport(broker, "fedq-aggregator")
    service = AggregatorService(spec, store, agg)
    stop, bank_stop = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    workers = [
        asyncio.create_task(
            ParticipantWorker(
                spec,
                WorkerConfig(participant=n, seed=i, delay_s=0.005, wait_for_model_s=0.2),
                MemoryTransport(broker, n),
                shards[n],
            ).run(bank_stop)
        )
        for i, n in enumerate(spec.participants)
    ]
    async with asyncio.timeout(60):
        while service.head_version < versions:
            await asyncio.sleep(0.01)
    bank_stop.set()
    await asyncio.gather(*workers)
    stop.set()
    await running
    return store, agg


async def _audit(transport: MemoryTransport | AmqpTransport, task: str) -> list[bytes]:
    return [b async for b in transport.read_audit(task)]


@pytest.mark.parametrize(
    "settings",
    [
        {"mode": "async", "async": AsyncSettings(strategy="fedasync")},
        {"mode": "async", "async": AsyncSettings(strategy="fedbuff", buffer_size=3)},
        {"mode": "sync", "sync": SyncSettings()},
        {"mode": "sync", "sync": SyncSettings(quorum=2, late="stale")},
    ],
    ids=["fedasync", "fedbuff", "fedavg", "fedavg-late-stale"],
)
async def test_embedded_replay_matches_every_strategy(settings: dict[str, object]) -> None:
    prep = prepare(SimulationConfig(participants=3))
    spec = prep.spec.model_copy(
        update={k if k != "async" else "async_": v for k, v in settings.items()}
    )
    store, transport = await _federation(spec, prep.shards, 12)
    updates = index_updates(await _audit(transport, spec.task_id))
    report = await replay(store, updates, spec.task_id)
    assert report.ok, report.reason
    assert report.checked == await store.head(spec.task_id)
    # A window of the chain replays too, from a later start.
    part = await replay(store, updates, spec.task_id, from_version=5, to_version=9)
    assert part.ok, part.reason
    assert part.checked == 4


@pytest.mark.parametrize("kind", ["momentum", "adam", "yogi"])
async def test_replay_verifies_a_sync_run_with_a_server_optimizer(kind: str) -> None:
    prep = prepare(SimulationConfig(participants=3))
    server = ServerOptimizerSpec.model_validate({"kind": kind, "lr": 0.1, "tau": 0.01})
    spec = prep.spec.model_copy(update={"mode": "sync", "sync": SyncSettings(), "server": server})
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    store, transport = await _federation(spec, prep.shards, 6, RedisModelStore(client))
    task = spec.task_id
    updates = index_updates(await _audit(transport, task))
    head = await store.head(task)
    assert head is not None
    records = [await store.get_version(task, v) for v in range(1, head + 1)]
    assert all(r.optimizer == server and r.state_hash is not None for r in records)
    report = await replay(store, updates, task)
    assert report.ok, report.reason
    assert report.checked == head
    assert report.state is not None and report.state.digest() == records[-1].state_hash
    # A window starts from the stored state of its first version.
    part = await replay(store, updates, task, from_version=3, to_version=5)
    assert part.ok and part.checked == 2, part.reason
    assert (await store.verify_chain(task)).ok

    # A stored state, consistently re-encoded with one value changed, is named.
    key = store.keys.state(task, 4)
    original = await client.get(key)
    stored = await store.get_state(task, 4)
    assert stored is not None
    tensors = {k: v.clone() for k, v in stored.tensors().items()}
    tensors[next(iter(tensors))].view(-1)[0] += 1e-9
    forged, _ = encode_model(
        ModelEnvelope(task=task, version=4, tensors=tensors, version_hash=records[3].version_hash)
    )
    await client.set(key, forged)
    bad = await replay(store, updates, task)
    assert bad.first_bad_version == 4
    assert "stored optimizer state differs" in bad.reason
    start = await replay(store, updates, task, from_version=4)
    assert start.first_bad_version == 4 and "optimizer state" in start.reason
    await client.set(key, original or b"")
    # A recorded state hash changed (in the metadata) is named.
    meta_key = store.keys.meta(task, 2)
    original_meta = await client.get(meta_key)
    meta = json.loads(original_meta or b"{}")
    meta["state_hash"] = "ab" * 32
    await client.set(meta_key, json.dumps(meta))
    bad = await replay(store, updates, task)
    assert bad.first_bad_version == 2
    assert "replayed optimizer state differs from the recorded state hash" in bad.reason
    # The optimizer's settings are bound too: another learning rate is another version.
    meta["state_hash"] = records[1].state_hash.hex() if records[1].state_hash else ""
    meta["optimizer"]["lr"] = 0.2
    await client.set(meta_key, json.dumps(meta))
    bad = await replay(store, updates, task)
    assert bad.first_bad_version == 2
    await client.set(meta_key, original_meta or b"")
    assert (await replay(store, updates, task)).ok

    # The counterfactual carries its own optimizer state.
    without = await replay(store, updates, task, exclude=spec.participants[0])
    assert without.ok and without.left_out > 0
    assert without.state is not None and without.state.digest() != report.state.digest()
    assert without.param_hash != report.param_hash
    await store.close()


@pytest.mark.real
@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_replay_after_simulate_on_the_real_servers(
    mode: Literal["async", "sync"], tmp_path: Path
) -> None:
    result = await run_simulation(
        SimulationConfig(
            mode=mode,
            participants=4,
            versions=30 if mode == "async" else 8,
            amqp_url=AMQP_URL,
            bank_urls=shared_bank_urls(4),
            redis_url=REDIS_URL,
            seconds=60,
        )
    )
    task = result.task
    try:
        store = RedisModelStore(aioredis.Redis.from_url(REDIS_URL))
        transport = await AmqpTransport.connect(AMQP_URL)
        bodies = await _audit(transport, task)
        updates = index_updates(bodies)
        report = await replay(store, updates, task)
        assert report.ok, report.reason
        assert report.checked == result.versions
        # The command line says the same, with exit status 0.
        cli = await asyncio.to_thread(
            CliRunner().invoke,
            main,
            [
                "replay",
                "--task",
                task,
                "--verify",
                "--amqp-url",
                AMQP_URL,
                "--redis-url",
                REDIS_URL,
            ],
        )
        assert cli.exit_code == 0, cli.output
        assert f"verified versions 1..{result.versions}" in cli.output

        # Tampering with one retained update: re-encoded with one weight changed.
        victim_version = 3
        victim = (await store.get_version(task, victim_version)).lineage[0]
        env = decode_update(updates[victim.update_id])
        forged = {k: v.clone() for k, v in env.tensors.items()}
        first = next(iter(forged))
        forged[first].view(-1)[0] += 0.5
        forged_body, _ = encode_update(
            UpdateEnvelope(
                task=env.task,
                participant=env.participant,
                update_id=env.update_id,
                base_version=env.base_version,
                num_samples=env.num_samples,
                tensors=forged,
                spec_hash=env.spec_hash,
            )
        )
        bad = await replay(store, {**updates, victim.update_id: forged_body}, task)
        assert bad.first_bad_version == victim_version
        assert "differs from the one recorded" in bad.reason
        original = updates[victim.update_id]
        payload = msgpack.unpackb(original)["ts"][0]["b"]
        flipped = bytearray(original)
        flipped[original.find(payload) + len(payload) // 2] ^= 1
        bad = await replay(store, {**updates, victim.update_id: bytes(flipped)}, task)
        assert bad.first_bad_version == victim_version
        assert "does not decode" in bad.reason
        # The stored update's signature altered (content intact): named, with the bank.
        assert env.signature is not None
        resigned = bytearray(original)
        resigned[original.find(env.signature)] ^= 1
        bad = await replay(store, {**updates, victim.update_id: bytes(resigned)}, task)
        assert bad.first_bad_version == victim_version
        assert victim.update_id in bad.reason
        assert f"signature does not verify under {victim.participant}'s key" in bad.reason
        # Signed again, by a key that is not the bank's: the same.
        other, _ = encode_update(env, SigningKey.generate())
        bad = await replay(store, {**updates, victim.update_id: other}, task)
        assert bad.first_bad_version == victim_version
        assert "signature does not verify" in bad.reason

        # Tampering with a stored blob (consistently re-encoded) and with a lineage entry.
        client = aioredis.Redis.from_url(REDIS_URL)
        blob_key, lineage_key = store.keys.blob(task, 5), store.keys.lineage(task, 6)
        original_blob, original_lineage = await client.get(blob_key), await client.get(lineage_key)
        stored = await store.get_params(task, 5)
        tensors = {k: v.clone() for k, v in stored.tensors.items()}
        tensors[first].view(-1)[0] += 1e-3
        blob, _ = encode_model(
            ModelEnvelope(task=task, version=5, tensors=tensors, version_hash=stored.version_hash)
        )
        await client.set(blob_key, blob)
        bad = await replay(store, updates, task)
        assert bad.first_bad_version == 5
        assert "stored parameters differ" in bad.reason
        cli = await asyncio.to_thread(
            CliRunner().invoke,
            main,
            [
                "replay",
                "--task",
                task,
                "--verify",
                "--amqp-url",
                AMQP_URL,
                "--redis-url",
                REDIS_URL,
            ],
        )
        assert cli.exit_code == 1
        assert "version 5 diverges" in cli.output
        await client.set(blob_key, original_blob or b"")
        lineage = json.loads(original_lineage or b"[]")
        lineage[0]["weight"] = lineage[0]["weight"] * 1.001
        await client.set(lineage_key, json.dumps(lineage))
        bad = await replay(store, updates, task)
        assert bad.first_bad_version == 6
        assert "differ" in bad.reason
        await client.set(lineage_key, original_lineage or b"")
        assert (await replay(store, updates, task)).ok
        await client.aclose()

        # Counterfactual: the same chain without one bank, with metrics beside the real one.
        cli = await asyncio.to_thread(
            CliRunner().invoke,
            main,
            [
                "replay",
                "--task",
                task,
                "--exclude",
                "bank-02",
                "--data",
                str(DATA),
                "--json",
                "--out",
                str(tmp_path / "without.safetensors"),
                "--amqp-url",
                AMQP_URL,
                "--redis-url",
                REDIS_URL,
            ],
        )
        assert cli.exit_code == 0, cli.output
        doc = json.loads(cli.stdout[cli.stdout.index("{") :])
        assert doc["differs"] is True
        assert doc["updates_left_out"] > 0
        assert set(doc["metrics"]) == {"with_all", "without_bank-02"}
        assert 0.5 < doc["metrics"]["without_bank-02"]["auc"] <= 1.0
        assert doc["metrics"]["with_all"]["auc"] != doc["metrics"]["without_bank-02"]["auc"]
        assert (tmp_path / "without.safetensors").exists()
        await transport.close()
        await store.close()
    finally:
        await forget_task(task, tuple(result.participants))


async def test_audit_show_lists_updates_and_the_refusals_of_the_window(tmp_path: Path) -> None:
    prep = prepare(SimulationConfig(participants=2))
    spec = prep.spec
    store, transport = await _federation(spec, prep.shards, 3)
    head = await store.head(spec.task_id)
    assert head is not None
    assert head >= 3
    # A refusal while the head is h belongs to version h+1's window.
    service = AggregatorService(spec, store, transport)
    await service.prepare()

    class Delivery:
        def __init__(self, body: bytes) -> None:
            self.body, self.user_id, self.message_id, self.redelivered = (
                body,
                "bank-01",
                "m-1",
                False,
            )
            self.live = True

        async def ack(self) -> None: ...

        async def dead_letter(self, reason: str, detail: str = "") -> None: ...

    await service.handle(Delivery(b"\xc1junk"))
    zeros = {k: torch.zeros_like(v) for k, v in service.head_params.items()}
    body, _ = encode_update(
        UpdateEnvelope(
            task=spec.task_id,
            participant="bank-01",
            update_id="u-next",
            base_version=head,
            num_samples=5,
            tensors=zeros,
            spec_hash=spec.spec_hash(),
        )
    )
    await service.handle(Delivery(body))
    doc = await version_lineage(store, spec.task_id, head + 1)
    assert doc["parent"] == head
    assert doc["strategy"] == "fedasync"
    (u,) = doc["updates"]
    assert u["update_id"] == "u-next"
    assert set(u) == {
        "participant",
        "update_id",
        "base_version",
        "staleness",
        "weight",
        "content_hash",
    }
    assert [r["reason"] for r in doc["refusals"]] == ["malformed"]
    assert doc["refusals"][0]["message_id"] == "m-1"  # no participant: the bytes did not decode
    assert len(doc["refusals"][0]["body_sha256"]) == 64
    assert (await version_lineage(store, spec.task_id, head))["refusals"] == []
    accepted = [d for d in await store.decisions(spec.task_id) if d["decision"] == "accepted"]
    assert len(accepted) == head + 1
    assert accepted[0]["version"] == "1"
    # Export the head for serving and load it back.
    out = tmp_path / "model.safetensors"
    meta = await export_version(store, spec.task_id, head, out)
    loaded_spec, module, tensors = load_exported(out)
    assert loaded_spec == spec
    stored = (await store.get_params(spec.task_id, head)).tensors
    assert all(torch.equal(tensors[k], stored[k]) for k in stored)
    assert meta["version_hash"] == (await store.get_version(spec.task_id, head)).version_hash.hex()
    x = torch.zeros(2, spec.input_dim)
    assert module(x).shape == (2, 1)
    # A changed file is refused on load.
    from safetensors.torch import save_file

    tensors[next(iter(tensors))].view(-1)[0] += 1
    save_file(tensors, str(out), metadata=meta)
    with pytest.raises(FedqError, match="do not match"):
        load_exported(out)
