"""The participant worker: receive the global model, train locally, publish the delta.

Its only connection is the transport (AMQP with the bank's own credentials); it
never talks to Redis. It holds the newest model delivery unacked while it trains
on it and acks it only when a newer one arrives, so a worker that restarts finds
the current head waiting in its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import pandas as pd
import structlog

from common.errors import DecodeError, TransportError
from common.evaluation import evaluate
from common.hooks import Stages, untimed
from common.models import build_task_model, model_tensors, tensor_specs
from common.spec import TaskSpec
from common.transport import ModelDelivery, Subscription, Transport, next_or_none
from common.wire import ModelEnvelope, UpdateEnvelope, decode_model, encode_update
from participant.data import encode, train_val_split
from participant.training import train_local

log = structlog.get_logger("fedq.participant")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How one participant works."""

    participant: str
    val_fraction: float = 0.2
    seed: int = 0
    #: Stop after publishing this many updates (None: until stopped).
    max_updates: int | None = None
    #: Extra pause after each local training (seconds): a slower bank, or a pace limit.
    delay_s: float = 0.0
    #: After publishing, how long to wait for a newer model before training again on the
    #: one it has (a version usually follows soon: waiting keeps staleness low).
    wait_for_model_s: float = 5.0
    codec: str = "zstd"


@dataclass(slots=True)
class WorkerStats:
    """What a worker did, for reports and tests."""

    published: int = 0
    #: The newest published update ids (bounded).
    published_ids: deque[str] = field(default_factory=lambda: deque(maxlen=1024))
    models_seen: int = 0
    first_version: int = -1
    last_version: int = -1


class ParticipantWorker:
    """One bank's worker for one task."""

    def __init__(
        self,
        spec: TaskSpec,
        config: WorkerConfig,
        transport: Transport,
        data: pd.DataFrame,
        stages: Stages = untimed,
    ) -> None:
        self.spec = spec
        #: A named hook around each stage of the loop (benchmarks time them).
        self.stages = stages
        self.config = config
        self.transport = transport
        x, y = encode(data, spec)
        train_idx, val_idx = train_val_split(len(x), config.val_fraction, config.seed)
        self.x_train, self.y_train = x[train_idx], y[train_idx]
        self.x_val, self.y_val = x[val_idx], y[val_idx]
        self.expected = tensor_specs(model_tensors(build_task_model(spec)))
        self.stats = WorkerStats()
        self.log = log.bind(task=spec.task_id, participant=config.participant)

    async def run(self, stop: asyncio.Event) -> WorkerStats:
        """Work until ``stop`` is set or ``max_updates`` are published."""
        cfg = self.config
        sub = await self._subscribe(stop)
        if sub is None:
            return self.stats
        held: ModelDelivery | None = None
        current: ModelEnvelope | None = None
        trained_on = -1
        sync = self.spec.mode == "sync"
        val_metrics: dict[str, float] = {}
        try:
            while not stop.is_set():
                # Sync: train once per round, then wait for the next one. Async: if no
                # newer version comes within wait_for_model_s, train again on this one.
                if current is None or (sync and trained_on == current.version):
                    wait: float | None = None
                elif trained_on == current.version:
                    wait = cfg.wait_for_model_s
                else:
                    wait = 0.0
                with self.stages("worker: wait for the newest model"):
                    newest = await self._newest_model(sub, wait, stop)
                if newest is not None:
                    with self.stages("worker: decode the model"):
                        model = await self._decode(newest)
                    if model is None or (current is not None and model.version <= current.version):
                        await self._ack(newest)
                    else:
                        if held is not None:
                            await self._ack(held)
                        held, current = newest, model
                        self.stats.models_seen += 1
                        if self.stats.first_version < 0:
                            self.stats.first_version = model.version
                        self.stats.last_version = model.version
                        val_metrics = await asyncio.to_thread(
                            evaluate, self.spec, model.tensors, self.x_val, self.y_val
                        )
                if current is None or stop.is_set() or (sync and trained_on == current.version):
                    continue
                with self.stages("worker: train, encode, publish"):
                    await self._train_and_publish(current, val_metrics)
                trained_on = current.version
                if cfg.max_updates is not None and self.stats.published >= cfg.max_updates:
                    break
        finally:
            await sub.close()  # a held model goes back to the queue for the next start
        return self.stats

    async def _subscribe(self, stop: asyncio.Event) -> Subscription[ModelDelivery] | None:
        """Subscribe to the model queue; until the aggregator has declared it, wait and retry."""
        delay = 0.1
        while not stop.is_set():
            try:
                return await self.transport.consume_models(
                    self.spec.task_id, self.config.participant
                )
            except TransportError as e:
                self.log.warning("model queue not available yet; retrying", error=str(e))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
            delay = min(delay * 2, 10.0)
        return None

    async def _newest_model(
        self, sub: Subscription[ModelDelivery], wait: float | None, stop: asyncio.Event
    ) -> ModelDelivery | None:
        """Wait up to ``wait`` seconds (forever if None) for a model; take the newest queued."""
        newest = await next_or_none(sub, stop, wait)
        if newest is None:
            return None
        while True:  # drain what is already there (no waiting); keep the newest
            try:
                async with asyncio.timeout(0):
                    nxt = await sub.get()
            except TimeoutError:
                return newest
            if nxt.version >= newest.version:
                await self._ack(newest)
                newest = nxt
            else:
                await self._ack(nxt)

    async def _ack(self, delivery: ModelDelivery) -> None:
        """Ack a model we are done with. After a reconnect the old channel is gone and
        the broker has requeued it already: a failed ack is harmless, so it is ignored."""
        try:
            await delivery.ack()
        except TransportError as e:
            self.log.info(
                "model ack skipped (channel gone)", version=delivery.version, error=str(e)
            )

    async def _decode(self, delivery: ModelDelivery) -> ModelEnvelope | None:
        try:
            model = await asyncio.to_thread(decode_model, delivery.body, expected=self.expected)
        except DecodeError as e:
            self.log.warning("model refused", reason=e.reason, detail=e.detail)
            return None
        if model.task != self.spec.task_id:
            self.log.warning("model for another task refused", model_task=model.task)
            return None
        return model

    async def _train_and_publish(self, model: ModelEnvelope, val_metrics: dict[str, float]) -> None:
        cfg = self.config
        key = f"{cfg.seed}:{cfg.participant}:{self.stats.published}".encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:4], "little")
        started = time.perf_counter()
        delta, train_metrics = await asyncio.to_thread(
            train_local, self.spec, model.tensors, self.x_train, self.y_train, seed=seed
        )
        if cfg.delay_s > 0:
            await asyncio.sleep(cfg.delay_s)
        metrics = {**train_metrics, **{f"val_{k}": v for k, v in val_metrics.items()}}
        update_id = uuid.uuid4().hex
        body, _ = await asyncio.to_thread(
            encode_update,
            UpdateEnvelope(
                task=self.spec.task_id,
                participant=cfg.participant,
                update_id=update_id,
                base_version=model.version,
                num_samples=len(self.x_train),
                tensors=delta,
                metrics=metrics,
                codec=cfg.codec,
                created_at=time.time(),
            ),
        )
        await self.transport.publish_update(
            self.spec.task_id, cfg.participant, body, message_id=update_id
        )
        self.stats.published += 1
        self.stats.published_ids.append(update_id)
        self.log.info(
            "update published",
            version=model.version,
            update_id=update_id,
            bytes=len(body),
            seconds=round(time.perf_counter() - started, 3),
            val_auc=val_metrics.get("auc"),
        )
