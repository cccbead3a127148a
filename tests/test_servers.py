"""The private-server helpers: durable across kill and restart, isolated from the shared servers."""

from __future__ import annotations

import difflib
import os
import uuid
from pathlib import Path

import aio_pika
import aiormq
import pytest
import redis.asyncio as aioredis

from tests.helpers import AMQP_URL as SHARED_AMQP_URL
from tests.helpers import REDIS_URL as SHARED_REDIS_URL
from tests.servers import (  # noqa: F401
    BROKER_CONFIG,
    PrivateRabbit,
    PrivateRedis,
    private_rabbit_fixture,
    private_redis_fixture,
    shipped_rabbitmq_conf,
    shipped_redis_conf,
)

pytestmark = [pytest.mark.real, pytest.mark.slow]


def _alive(pid: int) -> bool:
    """Whether a PID names a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _beams(exclude: PrivateRabbit | None = None) -> set[tuple[int, str]]:
    """Every beam.smp on the machine but ``exclude``'s, as (PID, start time)."""
    ours = set(exclude.process_tree()) if exclude is not None else set()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat[stat.index("(") + 1 : stat.rindex(")")] == "beam.smp" and int(entry) not in ours:
            found.add((int(entry), stat[stat.rindex(")") + 2 :].split()[19]))
    return found


async def _shared_rabbit_answers() -> None:
    """The shared node accepts an AMQP connection and a channel (fails the test if not)."""
    conn = await aio_pika.connect(SHARED_AMQP_URL, timeout=10)
    try:
        channel = await conn.channel()
        await channel.close()
    finally:
        await conn.close()


async def _publish_confirmed(url: str, queue: str, bodies: list[bytes], quorum: bool) -> None:
    """Declare a durable queue and publish persistent messages, each confirmed by the broker."""
    conn = await aio_pika.connect(url, timeout=10)
    try:
        channel = await conn.channel(publisher_confirms=True)
        args: dict[str, str] = {"x-queue-type": "quorum"} if quorum else {}
        await channel.declare_queue(queue, durable=True, arguments=args)  # type: ignore[arg-type]
        for body in bodies:
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            confirm = await channel.default_exchange.publish(message, routing_key=queue)
            assert isinstance(confirm, aiormq.spec.Basic.Ack)
        await channel.close()
    finally:
        await conn.close()


async def _drain(url: str, queue: str) -> list[bytes]:
    """Get and ack every message of a queue (passive declare: it must exist), then delete it."""
    conn = await aio_pika.connect(url, timeout=10)
    got: list[bytes] = []
    try:
        channel = await conn.channel()
        q = await channel.declare_queue(queue, passive=True)
        while (message := await q.get(no_ack=False, fail=False, timeout=5)) is not None:
            got.append(message.body)
            await message.ack()
        await q.delete(if_unused=False, if_empty=False)
        await channel.close()
    finally:
        await conn.close()
    return got


def _changed_lines(shipped: Path, used: Path) -> tuple[list[str], list[str]]:
    """(lines only in the shipped file, lines only in the file the server runs)."""
    diff = list(
        difflib.ndiff(
            shipped.read_text(encoding="utf-8").splitlines(),
            used.read_text(encoding="utf-8").splitlines(),
        )
    )
    return [d[2:] for d in diff if d.startswith("- ")], [d[2:] for d in diff if d.startswith("+ ")]


# ------------------------------------------------------------- shipped configs


def test_private_redis_runs_the_shipped_config_but_port_and_dir(tmp_path: Path) -> None:
    server = PrivateRedis(base_dir=tmp_path)  # not started: the config is written already
    certs = server.certs
    removed, added = _changed_lines(BROKER_CONFIG / "redis.conf", server.config_file)
    # Only the TLS port and directories: data, the ACL file, the TLS files.
    assert removed == [
        "tls-port 6379",
        "dir /data",
        "aclfile /usr/local/etc/redis/acl/users.acl",
        "tls-cert-file /usr/local/etc/redis/tls/server.crt",
        "tls-key-file /usr/local/etc/redis/tls/server.key",
        "tls-ca-cert-file /usr/local/etc/redis/tls/ca.crt",
    ]
    assert added == [
        f"tls-port {server.port}",
        f'dir "{server.data_dir}"',
        f'aclfile "{server.acl_file}"',
        f'tls-cert-file "{certs.server_cert}"',
        f'tls-key-file "{certs.server_key}"',
        f'tls-ca-cert-file "{certs.ca_cert}"',
    ]
    assert server.config_file.read_text() == shipped_redis_conf(
        server.port, server.data_dir, server.acl_file
    )
    password = server.passwords["fedq-aggregator"]
    assert "change" not in password.lower()
    assert server.url == (
        f"rediss://fedq-aggregator:{password}@127.0.0.1:{server.port}/0"
        f"?ssl_ca_certs={certs.ca_cert}"
    )
    # The operator step: the shipped users with this server's passwords, as hashes only.
    acl = server.acl_file.read_text()
    assert password not in acl
    assert [line.split()[:2] for line in acl.splitlines()] == [
        ["user", name] for name in ("default", "fedq-aggregator", "fedq-auditor", "fedq-health")
    ]
    server.close()


def test_private_rabbit_runs_the_shipped_config_but_port_and_definitions(
    tmp_path: Path,
) -> None:
    node = PrivateRabbit(base_dir=tmp_path)  # not started
    certs = node.certs
    removed, added = _changed_lines(BROKER_CONFIG / "rabbitmq.conf", node.config_file)
    # Only the AMQPS port and paths: definitions.json and the TLS files.
    assert removed == [
        "definitions.local.path = /etc/rabbitmq/definitions.json",
        "listeners.ssl.default = 5671",
        "ssl_options.cacertfile = /etc/rabbitmq/tls/ca.crt",
        "ssl_options.certfile   = /etc/rabbitmq/tls/server.crt",
        "ssl_options.keyfile    = /etc/rabbitmq/tls/server.key",
    ]
    assert added == [
        f"definitions.local.path = {BROKER_CONFIG / 'definitions.json'}",
        f"listeners.ssl.default = {node.port}",
        f"ssl_options.cacertfile = {certs.ca_cert}",
        f"ssl_options.certfile   = {certs.server_cert}",
        f"ssl_options.keyfile    = {certs.server_key}",
    ]
    assert node.config_file.read_text() == shipped_rabbitmq_conf(node.port)
    assert node.url_for("bank-a").startswith("amqps://")
    assert node.url_for("bank-a").endswith(f"@127.0.0.1:{node.port}/fedq?cafile={certs.ca_cert}")
    node.close()


# --------------------------------------------------------------------- Redis


async def test_redis_data_survives_kill_and_restart(private_redis: PrivateRedis) -> None:
    token = uuid.uuid4().hex
    shared_key = f"fedqtest-servers-{token}"
    shared = aioredis.Redis.from_url(SHARED_REDIS_URL)
    try:
        await shared.set(shared_key, token, ex=600)
        assert private_redis.port != 6379
        port, url, data_dir = private_redis.port, private_redis.url, private_redis.data_dir
        assert f"@127.0.0.1:{port}/0?ssl_ca_certs=" in url

        client = aioredis.Redis.from_url(private_redis.url)
        try:
            await client.set("fedq:head", b"v42")
            await client.hset("fedq:version:42", mapping={"parent": "41", "hash": token})
            await client.rpush("fedq:applied", *[f"u{i}" for i in range(100)])
        finally:
            await client.aclose()

        pid = private_redis.pid
        await private_redis.akill()
        assert not private_redis.running
        assert not _alive(pid)
        assert list((data_dir / "appendonlydir").iterdir())  # the AOF is what comes back

        await private_redis.arestart()
        assert (private_redis.port, private_redis.url) == (port, url)
        assert private_redis.pid != pid

        # A graceful stop and start keeps it too.
        private_redis.stop()
        assert not private_redis.running
        private_redis.start()

        client = aioredis.Redis.from_url(private_redis.url)
        try:
            assert await client.get("fedq:head") == b"v42"
            assert await client.hgetall("fedq:version:42") == {
                b"parent": b"41",
                b"hash": token.encode(),
            }
            assert await client.llen("fedq:applied") == 100
            assert await client.lindex("fedq:applied", 99) == b"u99"
        finally:
            await client.aclose()

        # The shared server kept its key and never saw the private ones.
        assert await shared.ping()
        assert await shared.get(shared_key) == token.encode()
        assert await shared.exists(f"fedqtest-servers-none-{token}") == 0
        assert len(private_redis.start_times) == 3
    finally:
        await shared.delete(shared_key)
        await shared.aclose()


def test_redis_close_leaves_no_process_or_file() -> None:
    with PrivateRedis() as server:
        pids = server.process_tree()
        directory = server.dir
        assert pids == [server.pid]
        assert directory.is_dir()
    assert not any(_alive(pid) for pid in pids)
    assert not directory.exists()
    server.close()  # idempotent


# ------------------------------------------------------------------ RabbitMQ


async def test_rabbit_quorum_messages_survive_kill(private_rabbit: PrivateRabbit) -> None:
    node = private_rabbit
    shared_beams = _beams(exclude=node)
    assert shared_beams, "the shared RabbitMQ node's beam.smp should be running"
    await _shared_rabbit_answers()
    assert node.nodename.startswith("fedqtest-")
    assert node.nodename != "rabbit@localhost"
    assert node.port != 5672
    assert node.dist_port != 25672
    assert node.url == (
        f"amqps://fedq-admin:{node.passwords['fedq-admin']}@127.0.0.1:{node.port}/fedq"
        f"?cafile={node.certs.ca_cert}"
    )
    port, url = node.port, node.url

    queue = f"fedqtest-q-{uuid.uuid4().hex[:10]}"
    bodies = [f"update-{i}".encode() for i in range(50)]
    await _publish_confirmed(node.url, queue, bodies, quorum=True)
    # The messages are on disk (confirmed); the queue's Ra id reaches disk within
    # ~500 ms on RabbitMQ 3.10, so a kill right after the declare needs this first.
    node.sync_quorum_directory()

    tree = node.process_tree()
    beam = node.pid
    assert beam in tree
    assert beam not in {pid for pid, _ in shared_beams}
    await node.akill()
    assert not node.running
    assert not any(_alive(pid) for pid in tree)  # beam.smp, erl_child_setup, the script
    await _shared_rabbit_answers()  # the shared node is fine while ours is down

    await node.arestart()
    assert (node.port, node.url) == (port, url)
    assert node.pid != beam
    assert await _drain(node.url, queue) == bodies

    await _shared_rabbit_answers()
    # The shared node's VM is the very same process as before (same PID, same start).
    assert shared_beams <= _beams(exclude=node)


async def test_rabbit_graceful_stop_keeps_messages(private_rabbit: PrivateRabbit) -> None:
    node = private_rabbit
    shared_beams = _beams(exclude=node)
    ping = node.cli("rabbitmq-diagnostics", "ping")
    assert ping.returncode == 0, ping.stderr

    quorum, classic = (f"fedqtest-{kind}-{uuid.uuid4().hex[:10]}" for kind in ("qq", "cq"))
    bodies = [f"model-{i}".encode() for i in range(20)]
    await _publish_confirmed(node.url, quorum, bodies, quorum=True)
    await _publish_confirmed(node.url, classic, bodies, quorum=False)

    listed = node.cli("rabbitmqctl", "list_queues", "-p", node.vhost, "name", "type")
    assert listed.returncode == 0, listed.stderr
    assert f"{quorum}\tquorum" in listed.stdout
    assert f"{classic}\tclassic" in listed.stdout

    await node.astop()
    assert node.process_tree() == []
    node.ensure_running()  # what the fixture does before each test
    assert node.running

    assert await _drain(node.url, quorum) == bodies
    assert await _drain(node.url, classic) == bodies
    await _shared_rabbit_answers()
    assert shared_beams <= _beams(exclude=node)
