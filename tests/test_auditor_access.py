"""An independent auditor: read-only users of the shipped broker_config/, on real servers.

After a real aggregator made some versions, ``fedq replay --verify`` and ``fedq audit
show`` run with only the ``fedq-auditor`` credentials of redis.conf and definitions.json,
and every write the auditor tries is refused by the servers themselves.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
import pytest
import redis
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from click.testing import CliRunner

from aggregator.store import RedisModelStore, connect_redis
from common.errors import TransportError
from common.transport.amqp import AmqpTransport
from common.transport.names import UPDATES_EXCHANGE, dead_queue, model_stream, work_queue
from fedq.cli_audit import audit
from tests.servers import (  # noqa: F401
    AUDITOR,
    Federation,
    PrivateRabbit,
    PrivateRedis,
    bank_task,
    private_rabbit_fixture,
    private_redis_fixture,
    replay_as_auditor,
    wait_until,
)

pytestmark = [pytest.mark.real, pytest.mark.slow]


def _audit_show(redis_url: str, task: str, version: int) -> dict[str, object]:
    result = CliRunner().invoke(
        audit,
        ["show", "--task", task, "--version", str(version), "--json", "--redis-url", redis_url],
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


def _redis_refuses_the_auditor(server: PrivateRedis, task: str) -> None:
    spec_key = f"fedq:{{{task}}}:spec"
    with server.client(AUDITOR) as c:
        assert c.ping()
        assert c.get(spec_key) is not None  # reads work
        writes: list[tuple[str, ...]] = [
            ("SET", spec_key, "forged"),
            ("DEL", spec_key),
            ("SET", "fedq:new", "x"),
            ("HSET", f"fedq:{{{task}}}:applied", "u", "1"),
            ("XADD", f"fedq:{{{task}}}:decisions", "*", "decision", "forged"),
            ("EXPIRE", spec_key, "1"),
            ("PUBLISH", "fedq:events", "x"),
        ]
        for write in writes:
            with pytest.raises(redis.exceptions.NoPermissionError):
                c.execute_command(*write)
        with c.pipeline() as pipe:
            pipe.set(spec_key, b"forged")
            with pytest.raises(redis.exceptions.NoPermissionError):
                pipe.execute()
        for dangerous in (("FLUSHALL",), ("KEYS", "*"), ("CONFIG", "GET", "*"), ("INFO",)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                c.execute_command(*dangerous)
    with server.client() as c:
        assert c.get(spec_key) != b"forged"
    # Nobody gets in without credentials, nor as the default user (it is off).
    with (
        redis.Redis(host="127.0.0.1", port=server.port, **server.tls_kwargs()) as anonymous,
        pytest.raises(redis.exceptions.AuthenticationError),
    ):
        anonymous.ping()
    with (
        pytest.raises(redis.exceptions.AuthenticationError),
        redis.Redis(
            host="127.0.0.1",
            port=server.port,
            username="default",
            password="x",
            **server.tls_kwargs(),
        ) as d,
    ):
        d.ping()
    # The healthcheck user may PING, with any password, and nothing else.
    with redis.Redis(
        host="127.0.0.1",
        port=server.port,
        username="fedq-health",
        password="any",
        **server.tls_kwargs(),
    ) as health:
        assert health.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            health.get(spec_key)


async def _refused(url: str, action: Callable[[AbstractChannel], Awaitable[object]]) -> None:
    conn = await aio_pika.connect(url, timeout=10)
    try:
        channel = await conn.channel(publisher_confirms=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await action(channel)
    finally:
        await conn.close()


async def _publish(channel: AbstractChannel, exchange: str, key: str) -> None:
    ex = await channel.get_exchange(exchange, ensure=False)
    await ex.publish(aio_pika.Message(b"forged", user_id=AUDITOR), routing_key=key)


async def _ignore(message: AbstractIncomingMessage) -> None:
    """A consumer that takes nothing away (never acks)."""


async def _consume(channel: AbstractChannel, queue: str) -> None:
    q = await channel.get_queue(queue, ensure=True)  # passive: needs no permission
    await q.consume(_ignore)


async def _rabbit_refuses_the_auditor(node: PrivateRabbit, task: str, bank: str) -> None:
    url = node.url_for(AUDITOR)
    await _refused(url, lambda ch: _publish(ch, UPDATES_EXCHANGE, f"update.{task}.{bank}"))
    await _refused(url, lambda ch: _publish(ch, "fedq.models", f"model.{task}.all"))
    await _refused(url, lambda ch: _publish(ch, "", work_queue(task)))  # amq.default
    await _refused(url, lambda ch: _consume(ch, work_queue(task)))
    await _refused(url, lambda ch: _consume(ch, model_stream(task)))
    await _refused(url, lambda ch: ch.declare_queue(f"fedq.audit.{task}-copy", durable=True))
    # The dead-letter queue may be read (consumed; acking would remove a dead letter).
    conn = await aio_pika.connect(url, timeout=10)
    try:
        channel = await conn.channel()
        q = await channel.get_queue(dead_queue(task), ensure=True)
        tag = await q.consume(_ignore, no_ack=False)
        await q.cancel(tag)
    finally:
        await conn.close()
    # A bank cannot read the audit stream (only the aggregator and the auditor can).
    bank_transport = await AmqpTransport.connect(node.url_for(bank), name="bank-reads-audit")
    try:
        with pytest.raises(TransportError, match="ACCESS_REFUSED"):
            _ = [b async for b in bank_transport.read_audit(task)]
    finally:
        await bank_transport.close()


@pytest.mark.timeout(180)
async def test_auditor_replays_with_read_only_access(
    private_redis: PrivateRedis, private_rabbit: PrivateRabbit
) -> None:
    spec, shards = bank_task()
    fed = Federation(spec, RedisModelStore(connect_redis(private_redis.url)), private_rabbit)
    try:
        await fed.start(shards)
        await wait_until(lambda: fed.head_at_least(6))
        await fed.wind_down()
        head = await fed.accounted()

        report = await asyncio.to_thread(replay_as_auditor, private_rabbit, private_redis, fed.task)
        assert (report["from_version"], report["to_version"], report["checked"]) == (0, head, head)
        shown = await asyncio.to_thread(_audit_show, private_redis.url_for(AUDITOR), fed.task, head)
        assert shown["version"] == head
        updates = shown["updates"]
        assert isinstance(updates, list) and updates
        assert {u["participant"] for u in updates} <= set(spec.participants)

        await asyncio.to_thread(_redis_refuses_the_auditor, private_redis, fed.task)
        await _rabbit_refuses_the_auditor(private_rabbit, fed.task, spec.participants[0])
        # Still intact, and still verifiable, after everything the auditor tried.
        assert (await fed.store.verify_chain(fed.task)).ok
        assert await fed.store.head(fed.task) == head
        await asyncio.to_thread(replay_as_auditor, private_rabbit, private_redis, fed.task)
    finally:
        await fed.close()
