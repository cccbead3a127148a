"""Announcing new models off the commit path: the newest version only, retried.

Participants take only the newest model they received from the task's model stream,
so a version superseded before it was sent need not be published. Each announcement
carries the version hash and the writer's fencing token; the broker keeps the last one
(the head queue) for the store check at start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from common.hooks import Stages, untimed
from common.segments import Segments
from common.transport import Transport

log = structlog.get_logger("fedq.aggregator")


#: An announcement's body, or how to make it (signed when sent, for the newest only).
#: A model announcement (common/segments.py: a large model's bytes are not joined), or
#: how to make it when it is sent.
Body = bytes | Segments | Callable[[], bytes | Segments]


@dataclass(frozen=True, slots=True)
class _Slot:
    version: int
    blob: Body
    version_hash: bytes


class Announcer:
    """Sends the newest queued version; a failed send is retried every ``retry_s``."""

    def __init__(
        self,
        transport: Transport,
        task: str,
        fence: Callable[[], int | None],
        *,
        retry_s: float = 1.0,
        flush_timeout_s: float = 30.0,
        repeat_s: float | None = None,
        stages: Stages = untimed,
    ) -> None:
        self.transport = transport
        self.task = task
        self._fence = fence
        self.retry_s = retry_s
        self.flush_timeout_s = flush_timeout_s
        #: Announce the last version again after this long without a new one (None:
        #: never), so that a participant that refused the head (e.g. signed under a spec
        #: it did not have yet) gets it again without a new commit.
        self.repeat_s = repeat_s
        self.stages = stages
        self._slot: _Slot | None = None
        self._last: _Slot | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._runner: asyncio.Task[None] | None = None
        self.log = log.bind(task=task)

    async def send_now(self, version: int, blob: Body, version_hash: bytes) -> None:
        """Announce at once and wait for the broker's confirm (the head at start)."""
        self._last = _Slot(version, blob, version_hash)
        with self.stages("announce"):
            # Made when sent (the newest only), off the event loop: the stored blob is
            # copied with the signed fields appended (4 MB at 1M parameters).
            body = await asyncio.to_thread(blob) if callable(blob) else blob
            await self.transport.announce_model(
                self.task, version, body, fence=self._fence(), version_hash=version_hash
            )

    def announce(self, version: int, blob: Body, version_hash: bytes) -> None:
        """Queue a version, replacing one not yet sent."""
        self._slot = _Slot(version, blob, version_hash)
        # The version announced before is not repeated any more: let it go now (a large
        # model's parameters are not held for it while the next one is made and sent).
        self._last = None
        self._wake.set()

    def start(self) -> None:
        """Start sending in the background."""
        self._runner = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Send the last queued announcement (for at most ``flush_timeout_s``), then stop."""
        if self._runner is None:
            return
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(self.flush_timeout_s):
                await self._runner
        except TimeoutError:
            self.log.error("last announcement not confirmed", timeout_s=self.flush_timeout_s)

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.repeat_s):
                    await self._wake.wait()
            except TimeoutError:
                if self._slot is None and self._last is not None:
                    self._slot = self._last  # quiet for repeat_s: announce the head again
            self._wake.clear()
            slot, self._slot = self._slot, None
            if slot is not None:
                try:
                    await self.send_now(slot.version, slot.blob, slot.version_hash)
                except Exception as e:  # noqa: BLE001 - the announcer must outlive any failure
                    self.log.error(
                        "announcement failed; will retry", version=slot.version, error=str(e)
                    )
                    if self._slot is None:  # nothing newer meanwhile: retry this one
                        self._slot = slot
                    if not self._closing:
                        await asyncio.sleep(self.retry_s)
                    self._wake.set()
                    if self._closing:
                        return
            if self._closing and self._slot is None:
                return
