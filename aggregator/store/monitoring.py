"""What the banks report besides updates, and the task's training pause, in Redis
(docs/drift.md). Each write is one MULTI transaction; key names in keys.py."""

from __future__ import annotations

import json
from typing import Any, Final

import redis.asyncio as aioredis

from aggregator.store.keys import Keys
from aggregator.store.redis_store import _redis_errors

#: Drift summaries kept in the task's drift log (the newest; Redis trims older ones).
DRIFT_LOG_LEN: Final = 10_000


class MonitoringStore:
    """Drift summaries, evaluations, retraining signals and the pause of each task."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._r = redis
        self.keys = keys

    async def save_drift(
        self,
        task: str,
        participant: str,
        summary: dict[str, Any],
        signal: dict[str, Any] | None,
        *,
        resume: bool,
    ) -> None:
        """Keep ``summary`` as ``participant``'s newest and in the log; record ``signal``
        (once per summary id) and, with ``resume``, end a pause, all in one transaction."""
        text = json.dumps(summary, sort_keys=True)
        async with _redis_errors("saving a drift summary"):
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(self.keys.drift(task), participant, text)
            pipe.xadd(
                self.keys.drift_log(task), {"summary": text}, maxlen=DRIFT_LOG_LEN, approximate=True
            )
            if signal is not None:
                pipe.hsetnx(self.keys.retrain(task), str(signal["summary_id"]), json.dumps(signal))
                if resume:
                    pipe.delete(self.keys.paused(task))
            await pipe.execute()

    async def drift(self, task: str) -> dict[str, dict[str, Any]]:
        """Each bank's newest drift summary, by participant."""
        async with _redis_errors("reading drift summaries"):
            raw = await self._r.hgetall(self.keys.drift(task))
        return {_text(k): json.loads(v) for k, v in sorted(raw.items())}

    async def drift_log(self, task: str, count: int = 1000) -> list[dict[str, Any]]:
        """The newest ``count`` drift summaries taken, oldest first."""
        async with _redis_errors("reading the drift log"):
            entries: list[Any] = list(
                await self._r.xrevrange(self.keys.drift_log(task), count=count) or []
            )
        return [json.loads(fields[b"summary"]) for _, fields in reversed(entries)]

    async def save_evaluation(
        self, task: str, version: int, participant: str, evaluation: dict[str, Any]
    ) -> None:
        """Keep ``participant``'s newest evaluation of ``version``."""
        async with _redis_errors("saving an evaluation"):
            await self._r.hset(
                self.keys.evaluations(task),
                f"{version}:{participant}",
                json.dumps(evaluation, sort_keys=True),
            )

    async def evaluations(self, task: str) -> list[dict[str, Any]]:
        """Every bank's newest evaluation of every version, by version then bank."""
        async with _redis_errors("reading evaluations"):
            raw = await self._r.hgetall(self.keys.evaluations(task))
        out = [json.loads(v) for v in raw.values()]
        return sorted(out, key=lambda e: (int(e["version"]), str(e["participant"])))

    async def retrain_signals(self, task: str) -> list[dict[str, Any]]:
        """Every retraining signal recorded, oldest first."""
        async with _redis_errors("reading retraining signals"):
            raw = await self._r.hgetall(self.keys.retrain(task))
        return sorted((json.loads(v) for v in raw.values()), key=lambda s: float(s["at"]))

    async def pause(self, task: str, info: dict[str, Any]) -> bool:
        """Pause the task's training; False when it was paused already (kept as it was)."""
        async with _redis_errors("pausing training"):
            return bool(await self._r.set(self.keys.paused(task), json.dumps(info), nx=True))

    async def resume(self, task: str) -> bool:
        """End the task's pause; False when it was not paused."""
        async with _redis_errors("resuming training"):
            return bool(await self._r.delete(self.keys.paused(task)))

    async def paused(self, task: str) -> dict[str, Any] | None:
        """The task's pause (since, version, by), or None while it trains."""
        async with _redis_errors("reading the pause"):
            raw = await self._r.get(self.keys.paused(task))
        return None if raw is None else dict(json.loads(raw))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
