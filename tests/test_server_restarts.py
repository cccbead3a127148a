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
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, connect_redis
from common.spec import TaskSpec
from common.transport import Transport
from common.transport.amqp import AmqpTransport
from fedq.cli_audit import replay
from fedq.simulate import SimulationConfig, prepare
from participant.worker import ParticipantWorker, WorkerConfig
from tests.servers import PrivateRabbit, PrivateRedis, private_rabbit_fixture, private_redis_fixture  # noqa: F401

pytestmark = [pytest.mark.real, pytest.mark.slow]

AGGREGATOR = "fedq-aggregator"
AUDITOR = "fedq-auditor"
#: Broker users of definitions.json: participant ids must be broker user names.
BANKS = ("bank-a", "bank-b")


async def _until(cond: Callable[[], Awaitable[bool]], seconds: float = 90.0) -> None:
    async with asyncio.timeout(seconds):
        while not await cond():
            await asyncio.sleep(0.1)


def _task(banks: tuple[str, ...] = BANKS) -> tuple[TaskSpec, dict[str, pd.DataFrame]]:
    """A simulation task whose participants are the shipped bank users, with their shards."""
    prep = prepare(SimulationConfig(participants=len(banks)))
    shards = {
        bank: prep.shards[name] for name, bank in zip(prep.spec.participants, banks, strict=True)
    }
    spec = TaskSpec.model_validate(
        {
            **prep.spec.model_dump(by_alias=True),
            "participants": banks,
            "declared_samples": {bank: len(shard) for bank, shard in shards.items()},
            "async": {**prep.spec.async_.model_dump(), "max_staleness": 1000},
        }
    )
    return spec, shards


class Federation:
    """An aggregator and one worker per bank, each with its own broker credentials."""

    def __init__(self, spec: TaskSpec, store: RedisModelStore, rabbit: PrivateRabbit) -> None:
        self.spec, self.store, self.rabbit = spec, store, rabbit
        self.task = spec.task_id
        self.stop, self.bank_stop = asyncio.Event(), asyncio.Event()
        self.tasks: list[asyncio.Task[object]] = []
        self.workers: list[ParticipantWorker] = []
        self.service: AggregatorService | None = None

    async def start(self, shards: Mapping[str, pd.DataFrame]) -> None:
        agg: Transport = await AmqpTransport.connect(
            self.rabbit.url_for(AGGREGATOR), name="restart-aggregator"
        )
        # require_sender_match stays True: the banks publish with their own user_id.
        self.service = AggregatorService(self.spec, self.store, agg, ServiceConfig(lease_ttl_s=5))
        self.tasks.append(asyncio.create_task(_run(self.service, self.stop)))
        async with asyncio.timeout(30):
            await self.service.ready.wait()
        for i, name in enumerate(self.spec.participants):
            t = await AmqpTransport.connect(self.rabbit.url_for(name), name=f"restart-{name}")
            w = ParticipantWorker(
                self.spec,
                WorkerConfig(participant=name, seed=i, delay_s=0.05, wait_for_model_s=0.5),
                t,
                shards[name],
            )
            self.workers.append(w)
            self.tasks.append(asyncio.create_task(_work(w, self.bank_stop)))

    @property
    def aggregator(self) -> AggregatorService:
        assert self.service is not None
        return self.service

    def published(self) -> list[str]:
        """Update ids the broker confirmed to the banks so far."""
        return [uid for w in self.workers for uid in w.stats.published_ids]

    async def head_at_least(self, n: int) -> bool:
        return (await self.store.head(self.task) or 0) >= n

    async def wind_down(self) -> None:
        """Stop the banks, let the aggregator settle every update they sent, then stop it."""
        self.bank_stop.set()
        await asyncio.gather(*self.tasks[1:])
        async with asyncio.timeout(60):
            while await self._unsettled():
                await asyncio.sleep(0.2)
        self.stop.set()
        await self.tasks[0]

    async def _unsettled(self) -> set[str]:
        """Confirmed update ids neither applied nor refused (yet)."""
        confirmed = self.published()
        applied = await self.store.applied_in(self.task, confirmed)
        return set(confirmed) - set(applied) - await self._refused()

    async def _refused(self) -> set[str]:
        return {
            d["update_id"]
            for d in await self.store.decisions(self.task)
            if d["decision"] == "refused" and "update_id" in d
        }

    async def accounted(self) -> int:
        """Every confirmed update applied exactly once or refused; the chain verifies."""
        head = await self.store.head(self.task)
        assert head is not None
        applied: list[str] = []
        for v in range(1, head + 1):
            record = await self.store.get_version(self.task, v)
            assert record.parent == v - 1
            applied += [e.update_id for e in record.lineage]
        assert len(applied) == len(set(applied))
        confirmed = set(self.published())
        assert confirmed, "the banks published nothing"
        assert all(w.stats.published > 0 for w in self.workers)
        missing = confirmed - set(applied) - await self._refused()
        assert not missing, f"{len(missing)} confirmed updates neither applied nor refused"
        assert (await self.store.verify_chain(self.task)).ok
        return head

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for w in self.workers:
            await w.transport.close()
        if self.service is not None:
            await self.service.transport.close()
        await self.store.close()


async def _run(service: AggregatorService, stop: asyncio.Event) -> object:
    await service.run(stop)
    return None


async def _work(worker: ParticipantWorker, stop: asyncio.Event) -> object:
    return await worker.run(stop)


async def _committed(store: RedisModelStore, task: str) -> dict[int, bytes]:
    """Every version in the store: version -> its chained hash."""
    head = await store.head(task) or 0
    return {v: (await store.get_version(task, v)).version_hash for v in range(head + 1)}


async def _still_there(store: RedisModelStore, task: str, versions: Mapping[int, bytes]) -> None:
    assert versions, "nothing was committed before the restart"
    assert (await store.head(task) or 0) >= max(versions)
    for v, version_hash in versions.items():
        assert (await store.get_version(task, v)).version_hash == version_hash, v


def replay_as_auditor(rabbit: PrivateRabbit, redis: PrivateRedis, task: str) -> dict[str, Any]:
    """``fedq replay --verify --json`` with the auditor's read-only credentials."""
    result = CliRunner().invoke(
        replay,
        [
            "--task",
            task,
            "--verify",
            "--json",
            "--amqp-url",
            rabbit.url_for(AUDITOR),
            "--redis-url",
            redis.url_for(AUDITOR),
        ],
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["ok"] is True, report
    return report


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
    spec, shards = _task()
    fed = Federation(spec, RedisModelStore(connect_redis(private_redis.url)), private_rabbit)
    try:
        await fed.start(shards)
        await _until(lambda: fed.head_at_least(15))
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
        await _until(lambda: fed.head_at_least(down_head + 15), 120)
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
    spec, shards = _task()
    fed = Federation(spec, RedisModelStore(connect_redis(private_redis.url)), private_rabbit)
    try:
        await fed.start(shards)
        await asyncio.to_thread(private_rabbit.sync_quorum_directory)
        await _until(lambda: fed.head_at_least(15))
        before = await _committed(fed.store, fed.task)
        await private_rabbit.arestart(hard=True)  # SIGKILL the broker, start it again
        # The passwords set after the first boot survive it (definitions.skip_if_unchanged).
        await _until(lambda: fed.head_at_least(max(before) + 15), 120)
        await _still_there(fed.store, fed.task, before)
        await fed.wind_down()
        head = await fed.accounted()
        # Every update in a version is still in the audit stream after the kill.
        report = await asyncio.to_thread(replay_as_auditor, private_rabbit, private_redis, fed.task)
        assert report["checked"] == head
        print(f"rabbit restart: head {max(before)} before the kill, {head} at the end")
    finally:
        await fed.close()
