"""The model store on Redis (redis.asyncio), or in-process on fakeredis.

A commit is one Lua script (aggregator/store/commit_script.py), one round trip for a
group of consecutive versions: it names its parent version and succeeds only if the
writer still holds its lease, the parent is still the head and none of its update ids
was applied before. A lost race is an expected outcome, returned, not raised. Other
writes are optimistic transactions (WATCH/MULTI/EXEC). Redis errors are converted to
:class:`~common.errors.StoreError` here.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aggregator.server_opt import ServerState
from aggregator.stats import Stages, untimed
from aggregator.store.blob_io import arg_pieces, read_blob
from aggregator.store.commit_script import COMMIT_LUA, ScriptVersion, commit_call, read_reply
from aggregator.store.keys import Keys
from aggregator.store.piecewise import use_piecewise_connections
from aggregator.store.records import (
    CommitResult,
    GroupCommitResult,
    Info,
    Lease,
    NewVersion,
    VerifyReport,
    VersionRecord,
)
from common.errors import (
    BlobPrunedError,
    DecodeError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
    TaskConflictError,
)
from common.hashing import (
    GENESIS_PARENT,
    LineageEntry,
    lineage_bytes,
    optimizer_bytes,
    version_hash,
)
from common.model_segments import pack_model_segments
from common.segments import Segments
from common.spec import TaskSpec
from common.tls import url_problem
from common.urls import redact_url
from common.wire import DecodeLimits, ModelEnvelope, Tensors, decode_model, tensors_hash

if TYPE_CHECKING:
    from aggregator.store.monitoring import MonitoringStore

#: Blobs are our own, written by us: allow large models, keep every other check.
_BLOB_LIMITS = DecodeLimits(max_message_bytes=4 * 1024**3, max_tensor_bytes=16 * 1024**3)
#: Optimizer states: float64 moments, one (momentum) or two (adam, yogi) per parameter.
STATE_LIMITS = DecodeLimits(max_message_bytes=16 * 1024**3, max_tensor_bytes=64 * 1024**3)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """How the store names its keys and which parameter blobs it keeps."""

    prefix: str = "fedq"
    #: Keep the parameters (and server optimizer states) of the newest N versions
    #: (and always version 0, where replay starts); None keeps all. Metadata and
    #: lineage are never dropped.
    keep_blobs: int | None = None
    #: Checkpoints: keep the parameters (and server optimizer states) of every K-th
    #: version only (0, K, 2K, ...), of the head, and of the newest ``keep_blobs``
    #: versions when that is set too; the others are rebuilt on demand from the
    #: nearest checkpoint below them and the retained updates
    #: (:func:`aggregator.audit.rebuild.rebuild`). None: as ``keep_blobs`` says.
    checkpoint_every: int | None = None
    #: Codec of stored parameter blobs (also what participants receive). raw: float32
    #: parameters compress by only a few percent, so zstd would cost CPU for little.
    blob_codec: str = "raw"
    #: Decisions kept per task (a Redis stream, trimmed approximately past this).
    max_decisions: int = 10_000_000
    #: A commit encodes and hashes a group of fewer parameter elements than this on the
    #: event loop (a thread hand-off would cost more); larger groups in one thread.
    inline_below: int = 1 << 16

    def __post_init__(self) -> None:
        if self.keep_blobs is not None and self.keep_blobs < 1:
            raise ValueError("keep_blobs must be at least 1 (the head) or None")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1 or None")

    def keeps(self, version: int, head: int) -> bool:
        """Whether ``version``'s parameters (and optimizer state) are kept while
        ``head`` is the head: always version 0 and the head; with neither
        ``checkpoint_every`` nor ``keep_blobs``, every version; else every multiple of
        ``checkpoint_every`` (when set) and the newest ``keep_blobs`` versions,
        ``head - keep_blobs + 1 .. head`` (when set)."""
        if version in (0, head):
            return True
        k, n = self.checkpoint_every, self.keep_blobs
        if k is None and n is None:
            return True
        return (k is not None and version % k == 0) or (n is not None and version > head - n)

    def dropped_by(self, parent: int, head: int) -> list[int]:
        """The versions up to ``parent`` whose parameters a commit moving the head from
        ``parent`` to ``head`` drops: kept under :meth:`keeps` with ``parent`` the head,
        not with ``head``: the old head unless it is kept anyway, and the versions
        leaving the ``keep_blobs`` window. (The committed versions ``parent + 1 ..
        head - 1`` that :meth:`keeps` does not keep are never written.)"""
        candidates = {parent}
        if self.keep_blobs is not None:
            candidates.update(
                range(max(1, parent - self.keep_blobs + 1), head - self.keep_blobs + 1)
            )
        return sorted(
            v
            for v in candidates
            if 0 <= v <= parent and self.keeps(v, parent) and not self.keeps(v, head)
        )


def connect_redis(url: str) -> aioredis.Redis:
    """A client for ``url``; ``memory://`` gives a private in-process Redis (fakeredis).

    ``rediss://`` URLs carry the TLS files (``?ssl_ca_certs=&ssl_certfile=&ssl_keyfile=``);
    the server's certificate is always verified (common/tls.py).
    """
    if url.startswith("memory://"):
        import fakeredis  # only embedded runs need it

        return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    problem = url_problem(url)
    if problem is not None:
        raise StoreError(problem)
    try:
        # A pooled connection may be stale after a Redis restart: retry a command a
        # few times on a fresh connection before reporting the store unavailable.
        tls: dict[str, Any] = {}
        if url.lower().startswith("rediss://"):
            # The host name too, whatever the installed redis-py's default is.
            tls = {"ssl_check_hostname": True, "ssl_cert_reqs": "required"}
        client = aioredis.Redis.from_url(
            url,
            **tls,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=30,
        )
    except (ValueError, RedisError) as e:
        raise StoreError(f"invalid Redis URL {redact_url(url)!r}: {e}") from e
    # A large model's commit goes out a piece at a time (aggregator/store/piecewise.py).
    use_piecewise_connections(client)
    return client


@asynccontextmanager
async def _redis_errors(action: str) -> AsyncIterator[None]:
    try:
        yield
    except WatchError:
        raise
    except (RedisConnectionError, RedisTimeoutError) as e:
        raise StoreUnavailableError(f"Redis unavailable while {action}: {e}") from e
    except RedisError as e:
        if "LOADING" in str(e) or "BUSY" in str(e):  # restarting: loading its AOF
            raise StoreUnavailableError(f"Redis not ready while {action}: {e}") from e
        raise StoreError(f"Redis failed while {action}: {type(e).__name__}: {e}") from e


@dataclass(frozen=True, slots=True)
class _Prepared:
    version: int
    #: The parameters as stored: a model envelope as segments (common/model_segments.py),
    #: whose raw payloads view the version's tensors.
    blob: Segments
    param_hash: bytes
    version_hash: bytes
    #: The server optimizer state as stored (a model envelope) and its hash, if any.
    state_blob: Segments | None = None
    state_hash: bytes | None = None


class RedisModelStore:
    """Model versions, lineage and applied update ids of every task."""

    def __init__(
        self, redis: aioredis.Redis, config: StoreConfig | None = None, stages: Stages = untimed
    ) -> None:
        self._r = redis
        self.config = config or StoreConfig()
        self.keys = Keys(self.config.prefix)
        #: A named hook around the commit's stages (benchmarks time them).
        self.stages = stages
        #: The commit: EVALSHA, loaded on NOSCRIPT (aggregator/store/commit_script.py).
        self._commit_script = redis.register_script(COMMIT_LUA)

    @property
    def monitoring(self) -> MonitoringStore:
        """The banks' drift summaries and evaluations, and the task's pause."""
        from aggregator.store.monitoring import MonitoringStore

        return MonitoringStore(self._r, self.keys)

    async def close(self) -> None:
        """Close the Redis connection pool."""
        await self._r.aclose()

    async def ping(self) -> bool:
        """Whether Redis answers."""
        try:
            return bool(await self._r.ping())
        except RedisError:
            return False

    # ------------------------------------------------------------------ tasks

    async def register_task(self, spec: TaskSpec) -> bool:
        """Register a task, or change how it trains; True if the stored spec changed.

        The same spec again is a no-op. A spec that keeps the model, features, target
        and seed (so every stored version stays valid) may change the mode and the
        strategy or training settings between runs: it replaces the stored spec and is
        appended to the spec history with the version it applies from. Anything else
        conflicts.
        """
        key, history = self.keys.spec(spec.task_id), self.keys.spec_history(spec.task_id)
        doc = spec.to_json().encode()
        async with _redis_errors("registering a task"), self._r.pipeline() as pipe:
            try:
                await pipe.watch(key, self.keys.head(spec.task_id))
                existing = await pipe.get(key)
                if existing is not None:
                    old = TaskSpec.from_json(_as_bytes(existing))
                    if old == spec:
                        return False
                    if not same_model(old, spec):
                        raise TaskConflictError(
                            f"task {spec.task_id!r} is registered with another model, feature "
                            "schema, target or seed; its versions would not fit: use a new task id"
                        )
                raw_head = await pipe.get(self.keys.head(spec.task_id))
                entry = json.dumps(
                    {
                        "from_version": 0 if raw_head is None else int(raw_head),
                        "spec": json.loads(doc),
                    }
                )
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(key, doc)
                pipe.rpush(history, entry)
                await pipe.execute()
            except WatchError:
                raise TaskConflictError(
                    f"task {spec.task_id!r} was changed by another writer meanwhile"
                ) from None
        async with _redis_errors("registering a task"):
            # Not in the transaction: the task set has no hash tag (another cluster slot).
            await self._r.sadd(self.keys.tasks(), spec.task_id)
        return True

    async def spec_history(self, task: str) -> list[tuple[int, TaskSpec]]:
        """Every spec the task ran under, with the version it applied from."""
        async with _redis_errors("reading the spec history"):
            items = await self._r.lrange(self.keys.spec_history(task), 0, -1)
        out = []
        for item in items:
            d = json.loads(_as_bytes(item))
            out.append((int(d["from_version"]), TaskSpec.parse(d["spec"])))
        return out

    async def get_spec(self, task: str) -> TaskSpec:
        """The task's spec."""
        async with _redis_errors("reading a task spec"):
            doc = await self._r.get(self.keys.spec(task))
        if doc is None:
            raise NotFoundError(f"task {task!r} is not registered")
        return TaskSpec.from_json(doc)

    async def tasks(self) -> list[str]:
        """Registered task ids, sorted."""
        async with _redis_errors("listing tasks"):
            members = await self._r.smembers(self.keys.tasks())
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    # ------------------------------------------------------------------ reads

    async def head(self, task: str) -> int | None:
        """The head version, or None before version 0 exists."""
        async with _redis_errors("reading the head"):
            raw = await self._r.get(self.keys.head(task))
        return None if raw is None else int(raw)

    async def get_version(self, task: str, version: int) -> VersionRecord:
        """A version's metadata and lineage."""
        async with _redis_errors("reading a version"):
            meta, lineage = await self._r.mget(
                self.keys.meta(task, version), self.keys.lineage(task, version)
            )
        if meta is None or lineage is None:
            raise NotFoundError(f"task {task!r} has no version {version}")
        return VersionRecord.from_json(_as_bytes(meta), _as_bytes(lineage))

    async def get_versions(self, task: str, versions: Sequence[int]) -> list[VersionRecord]:
        """Several versions' metadata and lineage, in the order asked, in one round trip."""
        if not versions:
            return []
        keys = [k for v in versions for k in (self.keys.meta(task, v), self.keys.lineage(task, v))]
        async with _redis_errors("reading versions"):
            found = await self._r.mget(keys)
        records = []
        for v, meta, lineage in zip(versions, found[::2], found[1::2], strict=True):
            if meta is None or lineage is None:
                raise NotFoundError(f"task {task!r} has no version {v}")
            records.append(VersionRecord.from_json(_as_bytes(meta), _as_bytes(lineage)))
        return records

    async def get_head(self, task: str) -> VersionRecord:
        """The head version's record."""
        head = await self.head(task)
        if head is None:
            raise NotFoundError(f"task {task!r} has no versions")
        return await self.get_version(task, head)

    async def get_blob(self, task: str, version: int) -> bytes | bytearray:
        """A version's parameters as stored: a model envelope (docs/wire-format.md).

        A blob over ``blob_io.READ_PIECE_BYTES`` is read in pieces into one bytearray
        (aggregator/store/blob_io.py): the only copy of it in this process."""
        async with _redis_errors("reading parameters"):
            blob = await read_blob(self._r, self.keys.blob(task, version))
            if blob is None:
                exists = await self._r.exists(self.keys.meta(task, version))
        if blob is None:
            if exists:
                raise BlobPrunedError(
                    f"parameters of {task!r} version {version} were dropped by retention"
                )
            raise NotFoundError(f"task {task!r} has no version {version}")
        return blob

    async def kept_below(self, task: str, version: int, *, batch: int = 64) -> int | None:
        """The newest version up to ``version`` whose parameters are stored (not pruned
        by retention), or None when there is none; read-only, ``batch`` EXISTS per round
        trip, newest first."""
        top = version
        while top >= 0:
            numbers = range(top, max(-1, top - batch), -1)
            async with (
                _redis_errors("looking for kept parameters"),
                self._r.pipeline(transaction=False) as p,
            ):
                for v in numbers:
                    p.exists(self.keys.blob(task, v))
                found = await p.execute()
            for v, exists in zip(numbers, found, strict=True):
                if exists:
                    return v
            top -= batch
        return None

    async def get_state_blob(self, task: str, version: int) -> bytes | bytearray | None:
        """A version's server optimizer state as stored (a model envelope of float64
        tensors); None when the version has none (made without a stateful optimizer)."""
        record = await self.get_version(task, version)
        if record.state_hash is None:
            return None
        async with _redis_errors("reading an optimizer state"):
            blob = await read_blob(self._r, self.keys.state(task, version))
        if blob is None:
            raise BlobPrunedError(
                f"optimizer state of {task!r} version {version} was dropped by retention"
            )
        return blob

    async def get_state(self, task: str, version: int) -> ServerState | None:
        """A version's server optimizer state, checked against its recorded hash; None
        when it has none. StoreError when the stored state is corrupt, BlobPrunedError
        when retention dropped it."""
        record = await self.get_version(task, version)
        blob = await self.get_state_blob(task, version)
        if blob is None or record.optimizer is None:
            return None
        try:
            env = await asyncio.to_thread(decode_model, blob, STATE_LIMITS)
            if env.content_hash != record.state_hash:
                raise ValueError("its hash differs from the recorded state hash")
            return ServerState.from_tensors(record.optimizer, env.tensors)
        except (DecodeError, ValueError) as e:
            raise StoreError(
                f"stored optimizer state of {task!r} v{version} is corrupt: {e}"
            ) from e

    async def get_params(self, task: str, version: int) -> ModelEnvelope:
        """A version's parameters, decoded and checked against their content hash (the
        tensors of a large one view the bytearray it was read into: no second copy)."""
        blob = await self.get_blob(task, version)
        try:
            return await asyncio.to_thread(decode_model, blob, _BLOB_LIMITS)
        except DecodeError as e:
            raise StoreError(f"stored parameters of {task!r} v{version} are corrupt: {e}") from e

    async def applied_in(self, task: str, update_ids: Sequence[str]) -> dict[str, int]:
        """For those of ``update_ids`` already applied: the version each went into."""
        if not update_ids:
            return {}
        async with _redis_errors("reading applied update ids"):
            found = await self._r.hmget(self.keys.applied(task), list(update_ids))
        return {u: int(v) for u, v in zip(update_ids, found, strict=True) if v is not None}

    async def recent_applied(self, task: str, head: int, versions: int) -> dict[str, int]:
        """The update ids applied in the newest ``versions`` versions up to ``head``
        (``max(1, head - versions + 1) .. head``), each with its version, in one round
        trip (to seed a service's memory of recently applied ids at start). A version
        without lineage (none written yet) contributes nothing."""
        numbers = range(max(1, head - versions + 1), head + 1)
        if not numbers:
            return {}
        async with _redis_errors("reading recent lineage"):
            found = await self._r.mget([self.keys.lineage(task, v) for v in numbers])
        applied: dict[str, int] = {}
        for v, doc in zip(numbers, found, strict=True):
            if doc is not None:
                applied.update(dict.fromkeys(_lineage_ids(_as_bytes(doc)), v))
        return applied

    # ------------------------------------------------------------------ writes

    async def create_genesis(
        self, task: str, params: Tensors, info: Info | None = None
    ) -> VersionRecord:
        """Create version 0 of a registered task; refuses if any version exists."""
        await self.get_spec(task)
        prepared = await asyncio.to_thread(self._prepare, task, 0, GENESIS_PARENT, params, ())
        record = VersionRecord(
            task=task,
            version=0,
            parent=None,
            param_hash=prepared.param_hash,
            version_hash=prepared.version_hash,
            created_at=time.time(),
            info=dict(info or {}),
        )
        head_key = self.keys.head(task)
        async with _redis_errors("creating version 0"), self._r.pipeline() as pipe:
            try:
                await pipe.watch(head_key)
                if await pipe.get(head_key) is not None:
                    raise TaskConflictError(f"task {task!r} already has versions")
                pipe.multi()  # type: ignore[no-untyped-call]
                self._queue_version(pipe, record, prepared.blob)
                await pipe.execute()
            except WatchError:
                raise TaskConflictError(
                    f"task {task!r} got version 0 from another writer"
                ) from None
        return record

    async def commit(
        self,
        task: str,
        *,
        parent: int,
        params: Tensors,
        lineage: Sequence[LineageEntry],
        info: Info | None = None,
        lease: Lease | None = None,
        parent_hash: bytes | None = None,
        state: ServerState | None = None,
    ) -> CommitResult:
        """Commit version ``parent + 1`` atomically, with its lineage and applied ids,
        and ``state`` (the server optimizer's state after it), whose hash the version
        hash binds.

        Returns LOST_RACE when ``parent`` is not the head (another writer won),
        DUPLICATE when an update id was applied before, and FENCED when ``lease`` is
        no longer the task's lease (the checks and the writes are one script);
        nothing is written then. :meth:`commit_many` with one version.
        """
        group = await self.commit_many(
            task,
            parent=parent,
            versions=[NewVersion(params, lineage, info or {}, state)],
            lease=lease,
            parent_hash=parent_hash,
        )
        if group.committed:
            return CommitResult(
                group.outcome, record=group.records[0], head=group.head, blob=group.blobs[0]
            )
        return CommitResult(group.outcome, head=group.head, duplicates=group.duplicates)

    async def commit_many(
        self,
        task: str,
        *,
        parent: int,
        versions: Sequence[NewVersion],
        lease: Lease | None = None,
        parent_hash: bytes | None = None,
    ) -> GroupCommitResult:
        """Commit versions ``parent + 1 .. parent + len(versions)``, all or none, in one
        round trip: each chained to the one before, with its lineage, applied ids,
        decisions and optimizer state, as :meth:`commit` would one after another.

        The checks (``lease`` still the task's lease, ``parent`` still the head, none of
        the update ids applied before) and the writes are one Lua script; when a check
        fails nothing is written and the result says which (FENCED, LOST_RACE,
        DUPLICATE). ``parent_hash`` is the parent's version hash when the caller knows
        it (else it is read). An update id listed twice in the group is a StoreError.
        """
        if not versions:
            raise StoreError("a commit needs at least one version")
        _check_unique_ids(versions)
        if parent_hash is None:  # the caller may know it (the service keeps its head)
            parent_hash = (await self.get_version(task, parent)).version_hash
        prepared = await self._prepare_group(task, parent, parent_hash, versions)
        now, head = time.time(), parent + len(versions)
        records = tuple(
            VersionRecord(
                task=task,
                version=p.version,
                parent=p.version - 1,
                param_hash=p.param_hash,
                version_hash=p.version_hash,
                created_at=now,
                lineage=tuple(v.lineage),
                info=dict(v.info),
                optimizer=None if v.state is None else v.state.spec,
                state_hash=p.state_hash,
            )
            for v, p in zip(versions, prepared, strict=True)
        )
        call = commit_call(
            self.keys,
            task,
            parent=parent,
            versions=[
                ScriptVersion(
                    r.version,
                    p.blob if self.config.keeps(r.version, head) else None,
                    p.state_blob if self.config.keeps(r.version, head) else None,
                    r.meta_json(),
                    VersionRecord.lineage_json(r.lineage),
                    r.lineage,
                )
                for r, p in zip(records, prepared, strict=True)
            ],
            lease=None if lease is None else lease.value,
            max_decisions=self.config.max_decisions,
            drop=self.config.dropped_by(parent, head),
            at=now,
        )
        with self.stages("store: transaction (Redis)"):
            async with _redis_errors("committing a version"):
                reply = await self._commit_script(keys=call.keys, args=call.args)
        result = read_reply(reply)
        if not result.committed:
            return result
        return replace(result, records=records, blobs=tuple(p.blob for p in prepared))

    async def _prepare_group(
        self, task: str, parent: int, parent_hash: bytes, versions: Sequence[NewVersion]
    ) -> list[_Prepared]:
        """Encode and hash every version of a group, each chained to the one before: on
        the event loop when the group is small, else in one thread."""
        elements = sum(t.numel() for v in versions for t in v.params.values())
        if elements < self.config.inline_below:
            with self.stages("store: encode and hash (inline)"):
                return self._prepare_chain(task, parent, parent_hash, versions)
        with self.stages("store: encode and hash (thread)"):
            return await asyncio.to_thread(self._prepare_chain, task, parent, parent_hash, versions)

    def _prepare_chain(
        self, task: str, parent: int, parent_hash: bytes, versions: Sequence[NewVersion]
    ) -> list[_Prepared]:
        """:meth:`_prepare` each version; version k's parent hash is version k-1's hash."""
        out: list[_Prepared] = []
        for k, v in enumerate(versions, start=1):
            p = self._prepare(task, parent + k, parent_hash, v.params, tuple(v.lineage), v.state)
            out.append(p)
            parent_hash = p.version_hash
        return out

    # ------------------------------------------------------------------ writer lease

    async def acquire_lease(self, task: str, owner: str, ttl_ms: int) -> Lease | None:
        """Take the task's writer lease if nobody holds it; None if another writer does."""
        lease_key, fence_key = self.keys.lease(task), self.keys.fence(task)
        async with _redis_errors("acquiring the writer lease"), self._r.pipeline() as pipe:
            try:
                await pipe.watch(lease_key, fence_key)
                if await pipe.exists(lease_key):
                    return None
                token = int(await pipe.get(fence_key) or 0) + 1
                lease = Lease(owner, token)
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(fence_key, token)
                pipe.set(lease_key, lease.value, px=ttl_ms)
                await pipe.execute()
            except WatchError:
                return None
        return lease

    async def renew_lease(self, lease: Lease, task: str, ttl_ms: int) -> bool:
        """Extend our lease; False if it expired or another writer holds it now."""
        lease_key = self.keys.lease(task)
        async with _redis_errors("renewing the writer lease"), self._r.pipeline() as pipe:
            try:
                await pipe.watch(lease_key)
                held = await pipe.get(lease_key)
                if held is None or _as_bytes(held).decode() != lease.value:
                    return False
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.pexpire(lease_key, ttl_ms)
                await pipe.execute()
            except WatchError:
                return False
        return True

    async def release_lease(self, lease: Lease, task: str) -> None:
        """Give the lease up (on a clean stop), if it is still ours."""
        lease_key = self.keys.lease(task)
        async with _redis_errors("releasing the writer lease"), self._r.pipeline() as pipe:
            try:
                await pipe.watch(lease_key)
                held = await pipe.get(lease_key)
                if held is not None and _as_bytes(held).decode() == lease.value:
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.delete(lease_key)
                    await pipe.execute()
            except WatchError:
                pass

    async def lease_holder(self, task: str) -> Lease | None:
        """The task's writer lease as Redis holds it now (None: free)."""
        async with _redis_errors("reading the writer lease"):
            raw = await self._r.get(self.keys.lease(task))
        if raw is None:
            return None
        owner, _, token = _as_bytes(raw).decode().rpartition(":")
        return Lease(owner, int(token)) if token.isdigit() else None

    async def standbys(self, task: str) -> list[str]:
        """The aggregators waiting for the task's lease now (their presence not expired
        by Redis's clock), sorted."""
        key = self.keys.standbys(task)
        async with _redis_errors("reading the standbys"):
            now = await self._now_ms()
            await self._r.zremrangebyscore(key, "-inf", now)
            members = await self._r.zrangebyscore(key, now, "+inf")
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def mark_standby(self, task: str, owner: str, ttl_ms: int) -> None:
        """Record that ``owner`` waits for the task's lease, until ``ttl_ms`` from now."""
        key = self.keys.standbys(task)
        async with _redis_errors("recording a standby"):
            until = await self._now_ms() + ttl_ms
            await self._r.zadd(key, {owner: until})
            await self._r.pexpire(key, 3 * ttl_ms)

    async def clear_standby(self, task: str, owner: str) -> None:
        """``owner`` no longer waits for the task's lease."""
        async with _redis_errors("clearing a standby"):
            await self._r.zrem(self.keys.standbys(task), owner)

    async def _now_ms(self) -> int:
        """Redis's clock in milliseconds: every aggregator compares against the same one."""
        seconds, micros = await self._r.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def _prepare(
        self,
        task: str,
        version: int,
        parent_hash: bytes,
        params: Tensors,
        lineage: tuple[LineageEntry, ...],
        state: ServerState | None = None,
    ) -> _Prepared:
        """Encode and hash one version (CPU work: in a thread unless it is small).

        The blobs are segments (common/model_segments.py): with the ``raw`` codec their
        payloads view ``params`` (and the state's tensors), nothing is copied. The
        version hash binds the parameter hash and the state hash: the last blob packed
        computes it from its own content hash as it is packed."""
        codec = self.config.blob_codec

        def chain(param_hash: bytes, state_hash: bytes | None) -> bytes:
            opt = None
            if state is not None and state_hash is not None:
                o = state.spec
                opt = optimizer_bytes(
                    kind=o.kind,
                    lr=o.lr,
                    beta1=o.beta1,
                    beta2=o.beta2,
                    tau=o.tau,
                    state_hash=state_hash,
                )
            return version_hash(
                task=task,
                version=version,
                parent_hash=parent_hash,
                param_hash=param_hash,
                lineage=lineage_bytes(lineage),
                optimizer=opt,
            )

        if state is None:
            blob, param_hash = pack_model_segments(
                task, version, lambda h: chain(h, None), params, codec
            )
            return _Prepared(version, blob, param_hash, chain(param_hash, None))
        # The parameters' hash first (a second pass over them, the smaller: the state
        # is float64), then the state packed, float64 as computed, raw: a restart or a
        # replay continues bit for bit.
        param_hash = tensors_hash(params)
        state_blob, state_hash = pack_model_segments(
            task, version, lambda h: chain(param_hash, h), state.tensors(), "raw"
        )
        vh = chain(param_hash, state_hash)
        blob, digest = pack_model_segments(task, version, vh, params, codec)
        if digest != param_hash:  # pragma: no cover - one function of the same tensors
            raise StoreError("the parameters changed while they were stored")
        return _Prepared(version, blob, param_hash, vh, state_blob, state_hash)

    def _queue_version(self, pipe: Any, record: VersionRecord, blob: Segments) -> None:
        """Queue a version's writes in a transaction. A large blob goes in pieces
        (blob_io.arg_pieces: views, not a copy), written in place as the commit script
        writes them: the last piece first (SETRANGE allocates the string once), then
        each other one at its offset."""
        k, task, v = self.keys, record.task, record.version
        pieces = arg_pieces(blob)
        if len(pieces) == 1:
            pipe.set(k.blob(task, v), pieces[0])
        else:
            offsets = list(itertools.accumulate((len(p) for p in pieces), initial=0))
            pipe.delete(k.blob(task, v))
            pipe.setrange(k.blob(task, v), offsets[-2], pieces[-1])
            for at, piece in zip(offsets[:-2], pieces[:-1], strict=True):
                pipe.setrange(k.blob(task, v), at, piece)
        pipe.set(k.meta(task, v), record.meta_json())
        pipe.set(k.lineage(task, v), VersionRecord.lineage_json(record.lineage))
        pipe.set(k.head(task), v)

    def _queue_decision(self, pipe: Any, task: str, fields: dict[str, object]) -> None:
        entry = {k: str(v) for k, v in fields.items() if v is not None}
        entry["at"] = repr(time.time())
        pipe.xadd(
            self.keys.decisions(task), entry, maxlen=self.config.max_decisions, approximate=True
        )

    async def record_refusal(
        self,
        task: str,
        *,
        head: int,
        reason: str,
        detail: str,
        participant: str | None = None,
        update_id: str | None = None,
        message_id: str | None = None,
        body: bytes | bytearray | memoryview = b"",
    ) -> None:
        """Record that an update was refused while ``head`` was the head (for audits)."""
        fields: dict[str, object] = {
            "decision": "refused",
            "head": head,
            "reason": reason,
            "detail": detail[:1024],
            "participant": participant,
            "update_id": update_id,
            "message_id": message_id,
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_bytes": len(body),
        }
        async with _redis_errors("recording a refusal"), self._r.pipeline(transaction=False) as p:
            self._queue_decision(p, task, fields)
            await p.execute()

    async def settle_cohort(self, task: str, cohort: int, decision: str) -> str:
        """Save a secure-aggregation cohort's decision (JSON) unless one is saved: returns
        the one that stands, this one or the earlier (SET NX, one round trip)."""
        key = self.keys.cohort(task, cohort)
        async with (
            _redis_errors("saving a cohort decision"),
            self._r.pipeline(transaction=True) as p,
        ):
            p.set(key, decision, nx=True)
            p.get(key)
            _, stored = await p.execute()
        return _as_bytes(stored).decode()

    async def get_cohort(self, task: str, cohort: int) -> str | None:
        """A cohort's saved decision (JSON), or None if it was never closed."""
        async with _redis_errors("reading a cohort decision"):
            raw = await self._r.get(self.keys.cohort(task, cohort))
        return None if raw is None else _as_bytes(raw).decode()

    async def decisions(self, task: str) -> list[dict[str, str]]:
        """Every recorded decision of a task, oldest first."""
        async with _redis_errors("reading decisions"):
            rows = await self._r.xrange(self.keys.decisions(task))
        return [
            {_as_bytes(k).decode(): _as_bytes(v).decode() for k, v in (fields or {}).items()}
            for _, fields in rows or []
        ]

    # ------------------------------------------------------------------ audit

    async def verify_chain(self, task: str, *, to_version: int | None = None) -> VerifyReport:
        """Recompute every version's parameter hash and chained hash from stored data.

        Parameters are re-hashed from their blobs; pruned blobs fall back to the stored
        parameter hash (reported as unverified). The chain is recomputed to the end
        from recomputed hashes, so ``head_hash`` shows the effect of any divergence;
        the report names the first version that diverges and why.
        """
        head = await self.head(task) if to_version is None else to_version
        if head is None:
            raise NotFoundError(f"task {task!r} has no versions")
        parent_hash = GENESIS_PARENT
        unverified: list[int] = []
        first_bad: int | None = None
        reason = ""
        for v in range(head + 1):
            record = await self.get_version(task, v)
            param_hash, problem = await self._recompute_param_hash(task, record)
            if problem is None and param_hash is None:
                unverified.append(v)
            state_hash, state_problem = await self._recompute_state_hash(task, record)
            problem = problem or state_problem
            recomputed = version_hash(
                task=task,
                version=v,
                parent_hash=parent_hash,
                param_hash=param_hash if param_hash is not None else record.param_hash,
                lineage=lineage_bytes(record.lineage),
                optimizer=record.optimizer_bytes(state_hash),
            )
            if problem is None and recomputed != record.version_hash:
                problem = "version hash differs from the recorded one (lineage or chain altered)"
            if problem is not None and first_bad is None:
                first_bad, reason = v, problem
            parent_hash = recomputed
        return VerifyReport(task, head + 1, parent_hash, first_bad, reason, tuple(unverified))

    async def _recompute_state_hash(
        self, task: str, record: VersionRecord
    ) -> tuple[bytes | None, str | None]:
        """(recomputed optimizer state hash, or None if it has none or it was pruned;
        the problem found or None)."""
        if record.state_hash is None:
            return None, None
        try:
            blob = await self.get_state_blob(task, record.version)
        except BlobPrunedError:
            return None, None
        if blob is None:  # the record changed meanwhile
            return None, "the optimizer state is gone"
        try:
            env = await asyncio.to_thread(decode_model, blob, STATE_LIMITS)
        except DecodeError as e:
            return compute_blob_digest(blob), (
                f"optimizer state does not decode ({e.reason}: {e.detail})"
            )
        if env.content_hash != record.state_hash:
            return env.content_hash, "optimizer state hash differs from the recorded one"
        if env.version_hash != record.version_hash or env.version != record.version:
            return env.content_hash, "optimizer state blob names another version or version hash"
        return env.content_hash, None

    async def _recompute_param_hash(
        self, task: str, record: VersionRecord
    ) -> tuple[bytes | None, str | None]:
        """(recomputed parameter hash or None if pruned, the problem found or None)."""
        try:
            blob = await self.get_blob(task, record.version)
        except BlobPrunedError:
            return None, None
        try:
            env = await asyncio.to_thread(decode_model, blob, _BLOB_LIMITS)
        except DecodeError as e:
            # Still a hash, so the head's recomputed hash shows the damage.
            return compute_blob_digest(blob), f"parameters do not decode ({e.reason}: {e.detail})"
        if env.content_hash != record.param_hash:
            return env.content_hash, "parameter hash differs from the recorded one"
        if env.version_hash != record.version_hash or env.version != record.version:
            return env.content_hash, "parameter blob names another version or version hash"
        return env.content_hash, None


def same_model(a: TaskSpec, b: TaskSpec) -> bool:
    """Whether two specs describe the same parameters (so versions carry over)."""
    return (a.task_id, a.model, a.features, a.target, a.seed) == (
        b.task_id,
        b.model,
        b.features,
        b.target,
        b.seed,
    )


def _check_unique_ids(versions: Sequence[NewVersion]) -> None:
    """StoreError when an update id is listed twice in the lineage of a group."""
    seen: set[str] = set()
    for v in versions:
        for e in v.lineage:
            if e.update_id in seen:
                raise StoreError(f"the lineage lists update id {e.update_id!r} twice")
            seen.add(e.update_id)


def _lineage_ids(doc: bytes) -> list[str]:
    """The update ids of a stored lineage document."""
    try:
        return [str(e["update_id"]) for e in json.loads(doc)]
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"stored lineage is unreadable: {e}") from e


def _as_bytes(value: bytes | str) -> bytes:
    # The client is created without decode_responses, so replies are bytes.
    return value if isinstance(value, bytes) else value.encode()


def compute_blob_digest(blob: bytes | bytearray) -> bytes:
    """SHA-256 of an undecodable blob's bytes (only to propagate damage along the chain)."""
    return hashlib.sha256(blob).digest()
