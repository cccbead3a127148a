"""Bad input through the real broker: every refusal has its reason, the model never moves."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator

import msgpack
import pytest
import redis.asyncio as aioredis
import torch
import zstandard

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, StoreConfig
from common.hashing import TensorHasher
from common.models import build_task_model, model_tensors
from common.refusals import Refusal
from common.spec import NumericFeature, TargetSpec, TaskSpec
from common.transport.amqp import AmqpTransport
from common.wire import DecodeLimits, UpdateEnvelope, encode_update
from tests.helpers import AMQP_URL, REDIS_URL, delete_queues

pytestmark = [pytest.mark.real, pytest.mark.slow]


def _spec() -> TaskSpec:
    return TaskSpec(
        task_id=f"bad{uuid.uuid4().hex[:8]}",
        features=tuple(NumericFeature(name=f"x{i}") for i in range(4)),
        target=TargetSpec(name="y"),
        participants=("bank-a", "bank-b"),
    )


class Rig:
    def __init__(
        self,
        spec: TaskSpec,
        service: AggregatorService,
        store: RedisModelStore,
        agg: AmqpTransport,
        bank: AmqpTransport,
        running: asyncio.Task[None],
        stop: asyncio.Event,
    ) -> None:
        self.spec, self.service, self.store = spec, service, store
        self.agg, self.bank, self.running, self.stop = agg, bank, running, stop


@pytest.fixture
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    spec = _spec()
    prefix = f"fedqtest-{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(REDIS_URL)
    store = RedisModelStore(client, StoreConfig(prefix=prefix))
    agg = await AmqpTransport.connect(AMQP_URL, name="bad-input-aggregator")
    bank = await AmqpTransport.connect(AMQP_URL, name="bad-input-bank")
    sender_check = getattr(request, "param", False)
    limits = DecodeLimits(max_message_bytes=256 * 1024, max_tensor_bytes=1024 * 1024)
    service = AggregatorService(
        spec, store, agg, ServiceConfig(require_sender_match=sender_check, limits=limits)
    )
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    async with asyncio.timeout(30):
        await service.ready.wait()
    yield Rig(spec, service, store, agg, bank, running, stop)
    stop.set()
    await running
    await agg.close()
    await bank.close()
    await delete_queues(spec.task_id, spec.participants)
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await store.close()


def _valid(
    spec: TaskSpec,
    *,
    participant: str = "bank-a",
    base: int = 0,
    task: str | None = None,
    uid: str | None = None,
    scale: float = 0.01,
) -> bytes:
    delta = {k: torch.full_like(v, scale) for k, v in model_tensors(build_task_model(spec)).items()}
    body, _ = encode_update(
        UpdateEnvelope(
            task=task or spec.task_id,
            participant=participant,
            update_id=uid or uuid.uuid4().hex,
            base_version=base,
            num_samples=10,
            tensors=delta,
            spec_hash=spec.spec_hash(),
        )
    )
    return body


def _raw(
    spec: TaskSpec, entries: list[tuple[str, str, list[int], bytes]], codec: str = "raw"
) -> bytes:
    """An update whose tensors are given as raw (or codec) payloads, hash computed honestly."""
    h = TensorHasher()
    ts = []
    for name, dtype, shape, payload in entries:
        raw = payload if codec == "raw" else b"\x00" * (4 * int(torch.tensor(shape).prod()))
        h.add(name, dtype, tuple(shape), raw)
        ts.append({"n": name, "d": dtype, "s": shape, "b": payload})
    doc = {
        "fv": 1,
        "k": "u",
        "t": spec.task_id,
        "p": "bank-a",
        "id": uuid.uuid4().hex,
        "bv": 0,
        "n": 10,
        "m": {},
        "c": codec,
        "ts": ts,
        "h": h.digest(),
    }
    return bytes(msgpack.packb(doc, use_bin_type=True))


async def _dead(rig: Rig, n: int, seconds: float = 60) -> list[str]:
    reasons: list[str] = []
    async with asyncio.timeout(seconds):
        while len(reasons) < n:
            reasons += [
                d.reason for d in await rig.agg.dead_letters(rig.spec.task_id, limit=10_000)
            ]
            if len(reasons) < n:
                await asyncio.sleep(0.1)
    return reasons


async def test_each_kind_of_bad_input_is_refused_with_its_reason(rig: Rig) -> None:
    spec, task = rig.spec, rig.spec.task_id
    shapes = model_tensors(build_task_model(spec))
    w_name, w = next(iter(shapes.items()))
    b_name, b = list(shapes.items())[1]
    good = _valid(spec)
    await rig.bank.publish_update(task, "bank-a", good, message_id="good")
    async with asyncio.timeout(20):
        while rig.service.head_version < 1:
            await asyncio.sleep(0.05)
    before = (await rig.store.get_params(task, 1)).content_hash
    nan = torch.full_like(w, float("nan"))
    f64 = w.to(torch.float64)
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 * 1024 * 1024))
    cases = {
        "malformed": b"\xc1\xc1 not msgpack at all",
        "truncated": good[: len(good) // 2],
        "unknown_task": _valid(spec, task="someone-else"),
        "unknown_participant": _valid(spec, participant="bank-z"),
        "wrong_shape": _raw(
            spec,
            [(w_name, "f32", [1, 99], bytes(4 * 99)), (b_name, "f32", list(b.shape), bytes(4))],
        ),
        "wrong_dtype": _raw(
            spec,
            [
                (w_name, "f64", list(w.shape), f64.numpy().tobytes()),
                (b_name, "f32", list(b.shape), bytes(4)),
            ],
        ),
        "nan": _raw(
            spec,
            [
                (w_name, "f32", list(w.shape), nan.numpy().tobytes()),
                (b_name, "f32", list(b.shape), bytes(4)),
            ],
        ),
        "oversized": b"\x00" * (300 * 1024),
        "bomb": _raw(
            spec,
            [(w_name, "f32", list(w.shape), bomb), (b_name, "f32", list(b.shape), bytes(4))],
            codec="zstd",
        ),
        "duplicate": good,  # the same update republished
        "future_base": _valid(spec, base=99),
    }
    for i, body in enumerate(cases.values()):
        await rig.bank.publish_update(task, "bank-a", body, message_id=f"bad-{i}")
    reasons = await _dead(rig, len(cases))
    assert sorted(reasons) == sorted(
        [
            Refusal.MALFORMED,
            Refusal.MALFORMED,
            Refusal.UNKNOWN_TASK,
            Refusal.UNKNOWN_PARTICIPANT,
            Refusal.TENSOR_MISMATCH,
            Refusal.TENSOR_MISMATCH,
            Refusal.NON_FINITE,
            Refusal.TOO_LARGE,
            Refusal.SIZE_MISMATCH,
            Refusal.DUPLICATE,
            Refusal.FUTURE_BASE,
        ]
    )
    assert not rig.running.done()  # still serving
    assert (await rig.service.health())["ok"] is True
    assert await rig.store.head(task) == 1  # the model did not move
    assert (await rig.store.get_params(task, 1)).content_hash == before
    metrics = rig.service.metrics.render().decode()
    for reason in set(reasons):
        assert f'fedq_updates_refused_total{{reason="{reason}",task="{task}"}}' in metrics
    refused = [d for d in await rig.store.decisions(task) if d["decision"] == "refused"]
    assert len(refused) == len(cases)


@pytest.mark.parametrize("rig", [True], indirect=True)
async def test_ten_thousand_mutated_messages_never_move_the_model(rig: Rig) -> None:
    """Fuzz through the real broker. The sender check is on and the broker user is
    guest, so every message must be refused, whatever the mutation did to it."""
    spec, task = rig.spec, rig.spec.task_id
    rng = random.Random(11)
    seeds = [_valid(spec), _valid(spec, participant="bank-b", base=0), _valid(spec, base=3)]
    before = (await rig.store.get_params(task, 0)).content_hash
    total = 10_000

    def mutate(body: bytes) -> bytes:
        data = bytearray(body)
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            i = rng.randrange(len(data))
            if op < 0.6:
                data[i] ^= rng.randint(1, 255)
            elif op < 0.8:
                data.insert(i, rng.randint(0, 255))
            elif len(data) > 1:
                del data[i]
        if rng.random() < 0.1:
            data = data[: rng.randrange(1, len(data))]
        return bytes(data)

    sem = asyncio.Semaphore(64)

    async def send(i: int) -> None:
        async with sem:
            await rig.bank.publish_update(
                task, "bank-a", mutate(rng.choice(seeds)), message_id=f"f{i}"
            )

    await asyncio.gather(*(send(i) for i in range(total)))
    reasons = await _dead(rig, total, seconds=300)
    assert len(reasons) == total
    assert not rig.running.done()
    assert await rig.store.head(task) == 0
    assert (await rig.store.get_params(task, 0)).content_hash == before
    assert rig.service.stats.accepted == 0
    assert rig.service.stats.refused_total == total
