"""Waiting out a store that is unreachable: reads and lease calls are retried."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from common.errors import StoreUnavailableError

T = TypeVar("T")

#: The first and the longest pause between tries (seconds); pauses double.
FIRST_DELAY = 0.2
MAX_DELAY = 5.0


async def store_retry(what: str, op: Callable[[], Awaitable[T]], log: Any) -> T:
    """Run a store call; while Redis is unreachable, log, wait and try again."""
    delay = FIRST_DELAY
    while True:
        try:
            return await op()
        except StoreUnavailableError as e:
            log.warning("store unavailable; waiting", during=what, error=str(e))
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_DELAY)
