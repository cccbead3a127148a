"""Servers restarted mid-run: everyone reconnects, nothing committed or acked is lost.

Both servers are private instances running the shipped broker_config/ files, only
their port and directories changed (tests/servers.py): the ACL users of redis.conf,
and the vhost, users and permissions of definitions.json. The aggregator runs as
``fedq-aggregator``, each bank as its own broker user (the service checks that the
broker-validated ``user_id`` is the participant), and ``fedq replay --verify`` runs
as ``fedq-auditor`` with read-only access to both servers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from aggregator.store import RedisModelStore, connect_redis
from tests.servers import (  # noqa: F401
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


async def _committed(store: RedisModelStore, task: str) -> dict[int, bytes]:
    """Every version in the store: version -> its chained hash."""
    head = await store.head(task) or 0
    return {v: (await store.get_version(task, v)).version_hash for v in range(head + 1)}


async def _still_there(store: RedisModelStore, task: str, versions: Mapping[int, bytes]) -> None:
    assert versions, "nothing was committed before the restart"
    assert (await store.head(task) or 0) >= max(versions)
    for v, version_hash in versions.items():
        assert (await store.get_version(task, v)).version_hash == version_hash, v


# --------------------------------------------------------------------- Redis


def test_redis_transactions_survive_sigkill_with_the_shipped_acl(
    private_redis: PrivateRedis,
) -> None:
    # The reproduction: on Redis 7.0, loading the AOF re-checks each logged
    # MULTI/EXEC against the default user; with a PING-only default user every
    # transaction was dropped on restart ("NOPERM ACLs rules changed ... 'exec'").
    with private_redis.client() as c, c.pipeline(transaction=True) as pipe:
        pipe.set("fedq:a", b"1")
        pipe.hset("fedq:h", "x", b"1")
        assert pipe.execute() == [True, 1]
    private_redis.restart(hard=True)  # SIGKILL, start on the same port and directory
    with private_redis.client() as c:
        assert c.get("fedq:a") == b"1"
        assert c.hget("fedq:h", "x") == b"1"
    log = private_redis.logfile.read_text(errors="replace")
    assert "NOPERM" not in log
    assert "DB loaded from append only file" in log


@pytest.mark.timeout(240)
async def test_redis_restarted_mid_run(
    private_redis: PrivateRedis, private_rabbit: PrivateRabbit
) -> None:
    spec, shards = bank_task()
    fed = Federation(spec, RedisModelStore(connect_redis(private_redis.url)), private_rabbit)
    try:
        await fed.start(shards)
        await wait_until(lambda: fed.head_at_least(15))
        versions = await _committed(fed.store, fed.task)
        applied = set(await fed.store.applied_in(fed.task, fed.published()))
        await private_redis.akill()
        await asyncio.sleep(2.0)  # the aggregator waits: it must not crash meanwhile
        assert not fed.tasks[0].done()
        down_head = fed.aggregator.head_version
        await private_redis.astart()
        # Nothing committed before the kill is lost (AOF, appendfsync always, and the
        # ACL of the shipped file lets the AOF's transactions load).
        await _still_there(fed.store, fed.task, versions)
        assert await fed.head_at_least(down_head)
        assert applied <= set(await fed.store.applied_in(fed.task, list(applied)))
        await wait_until(lambda: fed.head_at_least(down_head + 15), 120)
        await fed.wind_down()
        head = await fed.accounted()
        report = await asyncio.to_thread(replay_as_auditor, private_rabbit, private_redis, fed.task)
        assert report["checked"] == head
        print(f"redis restart: head {max(versions)} before the kill, {head} at the end")
    finally:
        await fed.close()


# ------------------------------------------------------------------ RabbitMQ


@pytest.mark.timeout(300)
async def test_rabbitmq_restarted_mid_run(
    private_redis: PrivateRedis, private_rabbit: PrivateRabbit
) -> None:
    spec, shards = bank_task()
    fed = Federation(spec, RedisModelStore(connect_redis(private_redis.url)), private_rabbit)
    try:
        await fed.start(shards)
        await asyncio.to_thread(private_rabbit.sync_quorum_directory)
        await wait_until(lambda: fed.head_at_least(15))
        before = await _committed(fed.store, fed.task)
        await private_rabbit.arestart(hard=True)  # SIGKILL the broker, start it again
        # The passwords set after the first boot survive it (definitions.skip_if_unchanged).
        await wait_until(lambda: fed.head_at_least(max(before) + 15), 120)
        await _still_there(fed.store, fed.task, before)
        await fed.wind_down()
        head = await fed.accounted()
        # Every update in a version is still in the audit stream after the kill.
        report = await asyncio.to_thread(replay_as_auditor, private_rabbit, private_redis, fed.task)
        assert report["checked"] == head
        print(f"rabbit restart: head {max(before)} before the kill, {head} at the end")
    finally:
        await fed.close()
