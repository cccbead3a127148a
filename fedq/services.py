"""Running the long-lived processes: the aggregator service and a participant worker.

The CLI builds the config objects; this module connects to the servers, wires the
pieces, serves the health probe, and turns SIGTERM / SIGINT into a clean drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import tomllib
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from common.errors import ConfigError, SpecError
from common.spec import TaskSpec

if TYPE_CHECKING:
    # The aggregator's modules (Redis, Prometheus, aiohttp) are imported by
    # run_aggregator alone: a bank's participant worker installs none of them.
    from aggregator.service import ServiceConfig
    from aggregator.store import StoreConfig
    from common.transport import Chunking
    from participant.worker import WorkerConfig

log = structlog.get_logger("fedq")


def load_spec(path: Path) -> TaskSpec:
    """A task spec from a JSON or TOML file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read task spec {path}: {e}") from e
    if path.suffix.lower() == ".toml":
        try:
            return TaskSpec.parse(tomllib.loads(text))
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"{path} is not valid TOML: {e}") from e
    return TaskSpec.from_json(text)


#: After SIGTERM, how long a service may take to drain (the commit in flight, what it
#: holds returned to the queue) before it is stopped where it is: a server that does
#: not answer must not keep a stopped process alive. Nothing is lost by it: what was
#: not acked goes back to the queue, and a commit is one atomic script.
DRAIN_S = 30.0
#: Then how long closing each connection may take.
CLOSE_S = 10.0

_T = TypeVar("_T")


async def drained(work: Coroutine[Any, Any, _T], stop: asyncio.Event, what: str) -> _T | None:
    """``work``'s result; once ``stop`` is set it has DRAIN_S to finish, after which it
    is cancelled (logged) and None is returned."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            try:
                async with asyncio.timeout(DRAIN_S):
                    return await asyncio.shield(task)
            except TimeoutError:
                log.error("did not stop in time after the signal; stopped", what=what, s=DRAIN_S)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
        return task.result()
    finally:
        stopping.cancel()


async def _closed(close: Coroutine[Any, Any, object], what: str) -> None:
    """Close a connection, for at most CLOSE_S (a server that does not answer)."""
    try:
        async with asyncio.timeout(CLOSE_S):
            await close
    except TimeoutError:
        log.warning("closing took too long; left", what=what, s=CLOSE_S)


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


@dataclass(frozen=True, slots=True)
class AggregatorRunConfig:
    """``fedq aggregator run``."""

    spec: TaskSpec
    amqp_url: str
    redis_url: str
    store: StoreConfig
    service: ServiceConfig
    http_host: str = "0.0.0.0"  # noqa: S104 - a probe for the orchestrator
    http_port: int = 9108


def chunking_for(spec: TaskSpec) -> Chunking:
    """The transport's chunking for a task: the default chunk size, and a largest body
    that lets the task's own updates and models through (a masked update under secure
    aggregation is i64: twice the float32 size)."""
    from common.chunks import DEFAULT_MAX_TOTAL, ChunkLimits
    from common.models import task_tensor_specs
    from common.transport import Chunking
    from common.wire import limits_for

    expected = task_tensor_specs(spec)
    largest = limits_for(expected).max_message_bytes
    if spec.secure_aggregation is not None:
        largest *= 2
    return Chunking(limits=ChunkLimits(max_total=max(DEFAULT_MAX_TOTAL, largest)))


#: glibc's ``mallopt`` parameter M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3
#: With a chunked model, every allocation of this size or more gets its own memory map.
MMAP_THRESHOLD = 1 << 20


def tune_memory(spec: TaskSpec) -> bool:
    """For a model whose bodies travel in chunks (docs/chunking.md): allocations of
    MMAP_THRESHOLD or more are each their own memory map, given back to the system when
    freed. glibc otherwise raises that threshold by itself after a large free (up to 32
    MiB), and the chunk-sized buffers of every update and announcement (8 MiB) then stay
    in the heap once freed: with a 100M-parameter model the aggregator's floor grew by
    about 60 MiB per version (bench/large_model.py). Small models keep glibc's default
    (a map and its page faults per allocation would cost them). Returns whether the
    setting was made (glibc only)."""
    from common.models import task_tensor_specs
    from common.transport import Chunking
    from common.wire import raw_bytes

    if raw_bytes(task_tensor_specs(spec)) <= Chunking().chunk_size:
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc
        return False


async def run_aggregator(config: AggregatorRunConfig) -> None:
    """Serve until SIGTERM: the commit in flight finishes, unacked updates go back."""
    from aggregator.http import start_http
    from aggregator.metrics import AggregatorMetrics
    from aggregator.service import AggregatorService
    from aggregator.store import RedisModelStore, connect_redis
    from common.transport.amqp import AmqpTransport

    stop = _stop_on_signals()
    tune_memory(config.spec)
    store = RedisModelStore(connect_redis(config.redis_url), config.store)
    transport = await AmqpTransport.connect(
        config.amqp_url,
        name=f"fedq-aggregator-{config.spec.task_id}",
        chunking=chunking_for(config.spec),
    )
    metrics = AggregatorMetrics()
    service = AggregatorService(config.spec, store, transport, config.service, metrics)
    runner = await start_http(
        metrics, service.health, config.http_host, config.http_port, status=service.status
    )
    log.info("health probe listening", port=config.http_port, task=config.spec.task_id)
    try:
        await drained(service.run(stop), stop, "the aggregator")
    finally:
        await _closed(runner.cleanup(), "the health probe")
        await _closed(transport.close(), "the broker connection")
        await _closed(store.close(), "the store connection")


@dataclass(frozen=True, slots=True)
class ParticipantRunConfig:
    """``fedq participant run``."""

    spec: TaskSpec
    amqp_url: str
    data: Path
    worker: WorkerConfig
    #: Serve /metrics on this port (0: off).
    metrics_port: int = 0


async def run_participant(config: ParticipantRunConfig) -> int:
    """Work until SIGTERM or ``max_updates``; returns the number of updates published."""
    from common.transport.amqp import AmqpTransport
    from participant.data import load_table
    from participant.worker import ParticipantWorker

    stop = _stop_on_signals()
    tune_memory(config.spec)
    df = await asyncio.to_thread(load_table, config.data)
    transport = await AmqpTransport.connect(
        config.amqp_url,
        name=f"fedq-participant-{config.worker.participant}",
        chunking=chunking_for(config.spec),
    )
    try:
        worker = ParticipantWorker(config.spec, config.worker, transport, df)
        if config.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(config.metrics_port, registry=worker.metrics.registry)
            log.info("metrics listening", port=config.metrics_port)
        await drained(worker.run(stop), stop, "the participant")
        stats = worker.stats
    finally:
        await _closed(transport.close(), "the broker connection")
    log.info("participant stopped", published=stats.published, last_version=stats.last_version)
    return stats.published
