"""The writer lease: one active aggregator per task, a standby waiting, fencing tokens.

A lease is ``owner:token`` in Redis with a TTL; each new lease gets a larger token
(the fence), and every commit checks its lease inside the transaction. The keeper
takes the lease (waiting as a standby while another writer holds it), renews it,
takes it again when it merely expired (Redis restarted and nobody else took it),
and reports when it was lost to another writer (fenced) or when its token went
backwards (the store lost data).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import structlog

from aggregator.retry import store_retry
from aggregator.store import Lease, RedisModelStore
from common.errors import FedqError, StoreRegressedError, StoreUnavailableError

log = structlog.get_logger("fedq.aggregator")


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
        self.log = log.bind(task=task)

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
        while not stop.is_set():
            try:
                lease = await self.store.acquire_lease(self.task, self.config.owner, self.ttl_ms)
            except StoreUnavailableError as e:
                self.log.warning("store unavailable; waiting", error=str(e))
                lease = None
            if lease is not None:
                self.log.info("writer lease acquired", owner=lease.owner, fence=lease.token)
                self.current = lease
                return lease
            if not announced:
                self.log.info("standby: another aggregator holds the writer lease")
                announced = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.ttl_s / 3):
                    await stop.wait()
        return None

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
        try:
            await self.store.release_lease(self.current, self.task)
        except FedqError as e:
            self.log.warning("lease not released; it expires by itself", error=str(e))

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
        self.lost.set()
