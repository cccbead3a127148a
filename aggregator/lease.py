"""The writer lease: one active aggregator per task, a standby waiting, fencing tokens.

A lease is ``owner:token`` in Redis with a TTL; each new lease gets a larger token
(the fence), and every commit checks its lease inside the transaction. The keeper
takes the lease (waiting as a standby while another writer holds it), renews it,
takes it again when it merely expired (Redis restarted and nobody else took it),
and reports when it was lost to another writer (fenced) or when its token went
backwards (the store lost data).

While it waits, a standby says so in Redis (``Keys.standbys``: its owner, until a
time a TTL ahead, refreshed on every try), so /status can name every standby; the
lease itself names its holder. Neither is ever needed to take or keep the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Literal

import structlog

from aggregator.retry import store_retry
from aggregator.store import Lease, RedisModelStore
from common.errors import FedqError, StoreRegressedError, StoreUnavailableError

log = structlog.get_logger("fedq.aggregator")


#: Where a keeper stands: before its first try, waiting, holding, lost, given back.
LeaseState = Literal["starting", "standby", "active", "lost", "released"]


class FencedOutError(FedqError):
    """Another writer holds this task's lease: this aggregator must stop."""


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    """Who takes the lease and how long it lives unless renewed."""

    owner: str
    ttl_s: float = 10.0


def check_fence(task: str, token: int, before: int) -> None:
    """A new lease's token must exceed every earlier one: raise StoreRegressedError."""
    if token <= before:
        raise StoreRegressedError(
            f"the writer lease's fencing token of {task!r} went back from {before} to {token}"
        )


class WriterLease:
    """Takes, keeps and gives back the writer lease of one task."""

    def __init__(self, store: RedisModelStore, task: str, config: LeaseConfig) -> None:
        self.store = store
        self.task = task
        self.config = config
        self.current: Lease | None = None
        #: Set when the lease is lost for good: ``error`` says why.
        self.lost = asyncio.Event()
        self.error: FedqError | None = None
        self._state: LeaseState = "starting"
        self.log = log.bind(task=task)

    @property
    def state(self) -> LeaseState:
        """Where this keeper stands (``lost`` as soon as a commit was fenced, too)."""
        return "lost" if self.lost.is_set() and self._state == "active" else self._state

    @property
    def held(self) -> bool:
        """Whether this keeper holds the lease now (``fedq_lease_held``)."""
        return self.state == "active"

    @property
    def ttl_ms(self) -> int:
        """The lease's time to live in milliseconds."""
        return int(self.config.ttl_s * 1000)

    @property
    def token(self) -> int | None:
        """The fencing token of the lease held, if any."""
        return self.current.token if self.current else None

    async def acquire(self, stop: asyncio.Event) -> Lease | None:
        """Become the task's writer; as a standby, try again until the lease is free.

        None if ``stop`` was set first.
        """
        announced = False
        try:
            while not stop.is_set():
                try:
                    lease = await self.store.acquire_lease(
                        self.task, self.config.owner, self.ttl_ms
                    )
                except StoreUnavailableError as e:
                    self.log.warning("store unavailable; waiting", error=str(e))
                    lease = None
                if lease is not None:
                    self.log.info("writer lease acquired", owner=lease.owner, fence=lease.token)
                    self.current = lease
                    self._state = "active"
                    return lease
                if not announced:
                    self.log.info("standby: another aggregator holds the writer lease")
                    announced = True
                self._state = "standby"
                await self._present(waiting=True)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.ttl_s / 3):
                        await stop.wait()
            return None
        finally:
            if announced:
                await self._present(waiting=False)

    async def keep(self) -> None:
        """Renew every third of the TTL until lost (then ``lost`` is set) or cancelled."""
        assert self.current is not None
        while True:
            await asyncio.sleep(self.config.ttl_s / 3)
            try:
                if await self.store.renew_lease(self.current, self.task, self.ttl_ms):
                    continue
                # Expired (e.g. Redis restarted): take a new lease if nobody else did.
                fresh = await self.store.acquire_lease(self.task, self.config.owner, self.ttl_ms)
            except StoreUnavailableError as e:
                self.log.warning("store unavailable; lease not renewed", error=str(e))
                continue
            try:
                self._take(fresh, self.current)
            except FedqError as e:
                self._lose(e)
                return

    async def reclaim(self, used: Lease | None) -> bool:
        """After a fenced commit: whether we hold the lease again (renewed meanwhile, or
        expired with nobody else taking it). Safe: without the lease nobody committed.

        Raises StoreRegressedError if the new token is not above the one ``used``.
        """
        if self.current is not used:
            return True
        fresh = await store_retry(
            "re-acquiring the writer lease",
            lambda: self.store.acquire_lease(self.task, self.config.owner, self.ttl_ms),
            self.log,
        )
        if fresh is None:
            return False
        self._take(fresh, used)
        return True

    async def release(self) -> None:
        """Give the lease up on a clean stop (never after it was lost)."""
        if self.current is None or self.lost.is_set():
            return
        self._state = "released"
        try:
            await self.store.release_lease(self.current, self.task)
        except FedqError as e:
            self.log.warning("lease not released; it expires by itself", error=str(e))

    async def holder(self) -> Lease | None:
        """The lease as Redis holds it now: its holder and fencing token (None: free).

        Raises StoreUnavailableError when Redis does not answer."""
        return await self.store.lease_holder(self.task)

    async def standbys(self) -> list[str]:
        """The aggregators waiting for this task's lease now, sorted (see the module).

        Raises StoreUnavailableError when Redis does not answer."""
        return await self.store.standbys(self.task)

    async def _present(self, *, waiting: bool) -> None:
        """Say in Redis that this keeper waits for the lease (until a TTL from now), or
        no longer does. Best effort: the lease never depends on it."""
        try:
            if waiting:
                await self.store.mark_standby(self.task, self.config.owner, self.ttl_ms)
            else:
                await self.store.clear_standby(self.task, self.config.owner)
        except FedqError as e:
            self.log.info("standby presence not recorded", error=str(e))

    def _take(self, fresh: Lease | None, before: Lease | None) -> None:
        if fresh is None:
            self.log.error("writer lease lost to another aggregator; stopping")
            raise FencedOutError(f"another aggregator holds the writer lease of {self.task!r}")
        if before is not None:
            check_fence(self.task, fresh.token, before.token)
        self.log.warning("writer lease had expired; re-acquired", fence=fresh.token)
        self.current = fresh

    def _lose(self, error: FedqError) -> None:
        self.error = error
        self._state = "lost"
        self.lost.set()
