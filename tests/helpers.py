"""Helpers shared by test modules: import them from here, never from another test module.

This is a plain module (no ``test_`` functions, so pytest collects nothing here);
fixtures stay in conftest.py. tests/test_test_layout.py fails if a ``tests/test_*.py``
imports from another one. Helpers for the private, killable servers are in
tests/servers.py; the strategy contract's cases are in tests/strategy_contract.py.

- The shared servers: :data:`REDIS_URL`, :data:`AMQP_URL`, and :func:`delete_queues`
  and :func:`forget_task` to remove what a test left on them.
- :func:`wait_for`: poll a condition of the system under test.
- The aggregator service: :func:`service_spec` and :func:`encoded_update`.
- The model store: :data:`CREDIT_TASK`, :func:`lineage_entry`, :func:`model_params`
  and :func:`init_task`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import Callable

import aio_pika
import redis.asyncio as aioredis
import torch

from aggregator.store import RedisModelStore
from common.agreement import AgreementKey
from common.hashing import LineageEntry
from common.models import build_task_model, model_tensors
from common.signing import SigningKey
from common.spec import AsyncSettings, IdentitySpec, NumericFeature, TargetSpec, TaskSpec
from common.transport.names import (
    audit_stream,
    dead_queue,
    head_queue,
    model_stream,
    receipt_queue,
    work_queue,
)
from common.wire import Tensors, UpdateEnvelope, encode_update

__all__ = [
    "AMQP_URL",
    "CREDIT_TASK",
    "REDIS_URL",
    "delete_queues",
    "encoded_update",
    "forget_task",
    "init_task",
    "lineage_entry",
    "model_params",
    "service_spec",
    "wait_for",
]

# ------------------------------------------------------------------ the shared servers

#: The shared Redis (never a private one: see tests/servers.py).
REDIS_URL = os.environ.get("FEDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
#: The shared RabbitMQ.
AMQP_URL = os.environ.get("FEDQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def party_key(name: str) -> SigningKey:
    """A fixed Ed25519 key per party name (tests only: the seed is public)."""
    return SigningKey.from_seed(hashlib.sha256(f"fedq-test-key:{name}".encode()).digest())


def signed_identity(
    participants: tuple[str, ...], aggregator: str = "fedq-aggregator"
) -> IdentitySpec:
    """A spec identity that requires signatures, with :func:`party_key` keys."""
    return IdentitySpec(
        require_signatures=True,
        aggregator_key=party_key(aggregator).public.text,
        participant_keys={p: party_key(p).public.text for p in participants},
    )


def secagg_identity(
    participants: tuple[str, ...], aggregator: str = "fedq-aggregator"
) -> IdentitySpec:
    """:func:`signed_identity` plus each participant's agreement key, derived from its
    :func:`party_key` (what secure aggregation needs)."""
    return IdentitySpec(
        require_signatures=True,
        aggregator_key=party_key(aggregator).public.text,
        participant_keys={p: party_key(p).public.text for p in participants},
        agreement_keys={
            p: AgreementKey.from_signing_key(party_key(p)).public.text for p in participants
        },
    )


async def delete_queues(task: str, participants: tuple[str, ...]) -> None:
    """Delete a task's queues on the shared RabbitMQ: work, audit, dead, head, the
    model stream, receipts."""
    conn = await aio_pika.connect(AMQP_URL)
    try:
        names = [work_queue(task), audit_stream(task), dead_queue(task), head_queue(task)]
        names.append(model_stream(task))
        names += [receipt_queue(task, p) for p in participants]
        ch = await conn.channel()
        for name in names:
            try:
                await ch.queue_delete(name)
            except aio_pika.exceptions.AMQPError:
                if ch.is_closed:  # the broker closed it on this one: go on with another
                    ch = await conn.channel()
        if not ch.is_closed:
            await ch.close()
    finally:
        await conn.close()


async def forget_task(task: str, participants: tuple[str, ...], prefix: str = "fedq") -> None:
    """Delete what a run left on the shared servers: the task's queues and Redis keys."""
    await delete_queues(task, participants)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:{{{task}}}:*")]
        if keys:
            await client.delete(*keys)
        await client.srem(f"{prefix}:tasks", task)
    finally:
        await client.aclose()


async def wait_for(cond: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll a condition of the system under test (tests may poll; services may not)."""
    async with asyncio.timeout(seconds):
        while not cond():
            await asyncio.sleep(0.02)


# ------------------------------------------------------------- the aggregator service


def service_spec(**async_kw: object) -> TaskSpec:
    """A fresh two-bank task (a new id each call); ``async_kw`` sets its async settings."""
    return TaskSpec(
        task_id=f"svc{uuid.uuid4().hex[:10]}",
        features=tuple(NumericFeature(name=f"x{i}") for i in range(3)),
        target=TargetSpec(name="y"),
        participants=("bank-a", "bank-b"),
        **{"async": AsyncSettings.model_validate({"max_staleness": 2, **async_kw})},
    )


def encoded_update(
    spec: TaskSpec,
    *,
    base: int,
    participant: str = "bank-a",
    scale: float = 0.1,
    update_id: str | None = None,
) -> tuple[str, bytes]:
    """An encoded update of ``spec``'s model, every value ``scale``: (update id, body)."""
    delta = {k: torch.full_like(v, scale) for k, v in model_tensors(build_task_model(spec)).items()}
    uid = update_id or uuid.uuid4().hex
    body, _ = encode_update(
        UpdateEnvelope(
            task=spec.task_id,
            participant=participant,
            update_id=uid,
            base_version=base,
            num_samples=10,
            tensors=delta,
            spec_hash=spec.spec_hash(),
        )
    )
    return uid, body


# -------------------------------------------------------------------- the model store

#: The task id of conftest's ``task_spec``.
CREDIT_TASK = "credit"


def lineage_entry(
    update_id: str, *, weight: float = 0.5, base: int = 0, staleness: int = 0
) -> LineageEntry:
    """A lineage entry from bank-a with a zero content hash."""
    return LineageEntry(
        update_id=update_id,
        participant="bank-a",
        base_version=base,
        staleness=staleness,
        weight=weight,
        content_hash=bytes(32),
    )


def model_params(task_spec: TaskSpec, shift: float = 0.0) -> Tensors:
    """The task model's initial parameters, each plus ``shift``."""
    return {k: v + shift for k, v in model_tensors(build_task_model(task_spec)).items()}


async def init_task(store: RedisModelStore, task_spec: TaskSpec) -> Tensors:
    """Register ``task_spec`` (whose id is :data:`CREDIT_TASK`) and commit its genesis."""
    await store.register_task(task_spec)
    params = model_params(task_spec)
    await store.create_genesis(CREDIT_TASK, params, info={"strategy": "genesis"})
    return params
