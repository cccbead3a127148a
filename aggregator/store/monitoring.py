"""What the banks report besides updates, and the task's training pause, in Redis
(docs/drift.md). Each write is one Lua script or one command; key names in keys.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aioredis

from aggregator.store.keys import Keys
from aggregator.store.redis_store import _redis_errors

#: Drift summaries and retraining signals kept in their logs (the newest; Redis trims
#: older ones): a bank that sends summaries as fast as it can fills no memory.
LOG_LEN: Final = 10_000

#: Take one drift summary: KEYS drift, drift_log, drift_ids, retrain, retrain_log,
#: paused; ARGV participant, summary id, summary JSON, signal JSON ("" for none),
#: "1" to end a pause, the summary's version, the log length. A summary whose id is
#: the bank's newest taken (a redelivery) changes nothing. A signal ends a pause only
#: when it is new and its summary scored a version at or after the paused one.
#: Returns {taken, resumed}.
_SAVE_DRIFT: Final = """
if redis.call('HGET', KEYS[3], ARGV[1]) == ARGV[2] then
  return {0, 0}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'summary', ARGV[3])
local resumed = 0
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[4])
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', 'signal', ARGV[4])
  if ARGV[5] == '1' then
    local at = redis.call('HGET', KEYS[6], 'version')
    if at and tonumber(ARGV[6]) >= tonumber(at) then
      redis.call('DEL', KEYS[6])
      resumed = 1
    end
  end
end
return {1, resumed}
"""

#: Pause: KEYS paused; ARGV since, version, note. 0 when paused already.
_PAUSE: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'since', ARGV[1], 'version', ARGV[2], 'note', ARGV[3])
return 1
"""


@dataclass(frozen=True, slots=True)
class Taken:
    """What saving a drift summary did: taken (not a redelivery), and ended a pause."""

    taken: bool
    resumed: bool


class MonitoringStore:
    """Drift summaries, evaluations, retraining signals and the pause of each task."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._r = redis
        self.keys = keys
        self._save_drift = redis.register_script(_SAVE_DRIFT)
        self._pause = redis.register_script(_PAUSE)

    async def save_drift(
        self,
        task: str,
        participant: str,
        summary: dict[str, Any],
        signal: dict[str, Any] | None,
        *,
        resume: bool,
    ) -> Taken:
        """Keep ``summary`` as ``participant``'s newest and in the log, and ``signal``
        (with ``resume``, ending a pause), all at once; once per summary id."""
        k = self.keys
        async with _redis_errors("saving a drift summary"):
            taken, resumed = await self._save_drift(
                keys=[
                    k.drift(task),
                    k.drift_log(task),
                    k.drift_ids(task),
                    k.retrain(task),
                    k.retrain_log(task),
                    k.paused(task),
                ],
                args=[
                    participant,
                    str(summary["summary_id"]),
                    json.dumps(summary, sort_keys=True),
                    "" if signal is None else json.dumps(signal, sort_keys=True),
                    "1" if resume else "0",
                    int(summary["version"]),
                    LOG_LEN,
                ],
            )
        return Taken(bool(taken), bool(resumed))

    async def drift(self, task: str) -> dict[str, dict[str, Any]]:
        """Each bank's newest drift summary, by participant."""
        async with _redis_errors("reading drift summaries"):
            raw = await self._r.hgetall(self.keys.drift(task))
        return {_text(k): json.loads(v) for k, v in sorted(raw.items())}

    async def drift_log(self, task: str, count: int = 1000) -> list[dict[str, Any]]:
        """The newest ``count`` drift summaries taken, oldest first."""
        return await self._log(self.keys.drift_log(task), b"summary", count)

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

    async def retrain_signals(self, task: str, count: int = 1000) -> list[dict[str, Any]]:
        """The newest ``count`` retraining signals recorded, oldest first."""
        return await self._log(self.keys.retrain_log(task), b"signal", count)

    async def retrain_count(self, task: str) -> int:
        """How many retraining signals the log holds (at most about LOG_LEN)."""
        async with _redis_errors("counting retraining signals"):
            return int(await self._r.xlen(self.keys.retrain_log(task)))

    async def pause(self, task: str, since: float, version: int, note: str) -> bool:
        """Pause the task's training; False when it was paused already (kept as it was)."""
        async with _redis_errors("pausing training"):
            done = await self._pause(keys=[self.keys.paused(task)], args=[since, version, note])
        return bool(done)

    async def resume(self, task: str) -> bool:
        """End the task's pause; False when it was not paused."""
        async with _redis_errors("resuming training"):
            return bool(await self._r.delete(self.keys.paused(task)))

    async def paused(self, task: str) -> dict[str, Any] | None:
        """The task's pause (since, version, note), or None while it trains."""
        async with _redis_errors("reading the pause"):
            raw = await self._r.hgetall(self.keys.paused(task))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return {
            "since": float(fields.get("since", 0.0)),
            "version": int(fields.get("version", 0)),
            "note": fields.get("note", ""),
        }

    async def _log(self, key: str, field: bytes, count: int) -> list[dict[str, Any]]:
        async with _redis_errors("reading a log"):
            entries: list[Any] = list(await self._r.xrevrange(key, count=count) or [])
        return [json.loads(fields[field]) for _, fields in reversed(entries)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
