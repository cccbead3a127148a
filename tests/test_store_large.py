"""Large models in the store: written as pieces, read in pieces, on fakeredis and the
real Redis.

The thresholds are lowered (a few MiB of parameters stand for hundreds of MB): a blob
goes to the commit script as several arguments that the script concatenates, to the
genesis transaction as SET and APPENDs, and comes back by GETRANGE into one bytearray.
What the store holds must be byte for byte what a blob sent whole leaves.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis
import torch
from redis.asyncio.connection import Connection

from aggregator.server_opt import ServerState, initial_state
from aggregator.store import (
    CommitOutcome,
    Lease,
    NewVersion,
    RedisModelStore,
    StoreConfig,
    blob_io,
    connect_redis,
    piecewise,
)
from common.errors import BlobPrunedError, StoreError
from common.segments import Segments, join
from common.spec import ServerOptimizerSpec, TaskSpec
from common.wire import Tensors, encode_tensors, pack_model
from tests.helpers import CREDIT_TASK, REDIS_URL, lineage_entry
from tests.servers import AUDITOR, PrivateRedis, private_redis_fixture  # noqa: F401

#: The lowered thresholds: blobs over 64 KiB go in pieces of 256 KiB, reads too.
SMALL_LIMITS = {"SEGMENTED_ABOVE": 64 << 10, "ARG_PIECE_BYTES": 256 << 10}
READ_PIECE = 256 << 10


@pytest.fixture
def pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lower the store's thresholds, so a model of a few MiB is a large one."""
    for name, value in SMALL_LIMITS.items():
        monkeypatch.setattr(blob_io, name, value)
    monkeypatch.setattr(blob_io, "READ_PIECE_BYTES", READ_PIECE)


@pytest.fixture
async def prefixes(redis_client: aioredis.Redis) -> AsyncIterator[Callable[[], str]]:
    """Make private key prefixes; their keys are deleted afterwards."""
    made: list[str] = []

    def new() -> str:
        made.append(f"fedqtest-{uuid.uuid4().hex[:12]}")
        return made[-1]

    yield new
    for p in made:
        keys = [k async for k in redis_client.scan_iter(match=f"{p}:*", count=1000)]
        if keys:
            await redis_client.delete(*keys)


def _params(seed: int) -> Tensors:
    """About 2.3 MiB: two large tensors, many tiny ones, an empty one, a scalar."""
    gen = torch.Generator().manual_seed(seed)
    params: Tensors = {
        "w1": torch.randn(512, 1024, generator=gen),
        "w2": torch.randn(100_000, generator=gen).bfloat16(),
        "empty": torch.zeros(4, 0),
        "scale": torch.tensor(1.0 + seed),
    }
    params.update({f"b{i}": torch.randn(7, generator=gen) for i in range(40)})
    return params


def _state(params: Tensors, seed: int) -> ServerState:
    spec = ServerOptimizerSpec(kind="adam", lr=0.3, beta1=0.8, beta2=0.95, tau=0.01)
    state = initial_state(spec, params)
    gen = torch.Generator().manual_seed(seed)
    m = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in state.m.items()}
    return ServerState(spec, m, state.v)


def _versions(first: int, n: int, tag: str = "g") -> list[NewVersion]:
    """Versions ``first ..``: two updates each, the odd ones with an optimizer state."""
    return [
        NewVersion(
            _params(v),
            [lineage_entry(f"{tag}{v}-a", base=v - 1), lineage_entry(f"{tag}{v}-b", base=v - 1)],
            {"strategy": "fedbuff"},
            _state(_params(v), v) if v % 2 else None,
        )
        for v in range(first, first + n)
    ]


async def _start(store: RedisModelStore, task_spec: TaskSpec) -> None:
    await store.register_task(task_spec)
    await store.create_genesis(CREDIT_TASK, _params(0), info={"strategy": "genesis"})


async def _values(r: aioredis.Redis, prefix: str) -> dict[str, object]:
    """Every string key under ``prefix`` (named without it), metas without their time."""
    out: dict[str, object] = {}
    async for raw in r.scan_iter(match=f"{prefix}:*", count=1000):
        key = raw.decode() if isinstance(raw, bytes) else raw
        if (await r.type(key)) not in (b"string", "string"):
            continue
        value = await r.get(key)
        assert isinstance(value, bytes)
        out[key[len(prefix) :]] = (
            {k: v for k, v in json.loads(value).items() if k != "created_at"}
            if key.endswith(":meta")
            else value
        )
    return out


class Recorder:
    """The commit script, recording each call's arguments."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.calls: list[list[object]] = []

    async def __call__(self, keys: list[str], args: list[object]) -> object:
        self.calls.append(list(args))
        return await self.script(keys=keys, args=args)


async def test_a_large_group_leaves_what_whole_blobs_leave(
    redis_client: aioredis.Redis,
    prefixes: Callable[[], str],
    task_spec: TaskSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = prefixes(), prefixes()
    whole = RedisModelStore(redis_client, StoreConfig(prefix=b, keep_blobs=2))
    await _start(whole, task_spec)
    await whole.commit_many(CREDIT_TASK, parent=0, versions=_versions(1, 3))

    for name, value in SMALL_LIMITS.items():
        monkeypatch.setattr(blob_io, name, value)
    monkeypatch.setattr(blob_io, "READ_PIECE_BYTES", READ_PIECE)
    store = RedisModelStore(redis_client, StoreConfig(prefix=a, keep_blobs=2))
    await _start(store, task_spec)
    recorder = Recorder(store._commit_script)
    store._commit_script = recorder  # type: ignore[assignment]
    versions = _versions(1, 3)
    result = await store.commit_many(CREDIT_TASK, parent=0, versions=versions)

    assert result.committed and result.head == 3
    assert len(recorder.calls) == 1  # one script call for the group
    args = recorder.calls[0]
    views = [x for x in args if isinstance(x, memoryview)]
    assert views, "the tensors go as views of their memory"
    assert max(len(x) for x in args if isinstance(x, bytes | bytearray | memoryview)) <= (
        256 << 10
    ) + (64 << 10)
    # Byte for byte what whole blobs leave (retention included: 1 is pruned).
    assert await _values(redis_client, a) == await _values(redis_client, b)
    for v, version in zip((1, 2, 3), versions, strict=True):
        record = result.records[v - 1]
        expected = pack_model(
            CREDIT_TASK, v, record.version_hash, encode_tensors(version.params, "raw")
        )
        assert join(result.blobs[v - 1]) == expected
        if v == 1:
            with pytest.raises(BlobPrunedError):
                await store.get_blob(CREDIT_TASK, v)
            continue
        blob = await store.get_blob(CREDIT_TASK, v)
        assert isinstance(blob, bytearray) and blob == expected
        env = await store.get_params(CREDIT_TASK, v)
        assert list(env.tensors) == list(version.params)
        assert all(torch.equal(env.tensors[k], t) for k, t in version.params.items())
    state = await store.get_state(CREDIT_TASK, 3)
    assert state is not None and versions[2].state is not None
    assert all(torch.equal(state.m[k], versions[2].state.m[k]) for k in state.m)
    genesis = await store.get_params(CREDIT_TASK, 0)
    assert all(torch.equal(genesis.tensors[k], t) for k, t in _params(0).items())
    report = await store.verify_chain(CREDIT_TASK)
    assert report.ok, report.reason
    assert report.unverified_params == (1,)


@pytest.mark.usefixtures("pieces")
@pytest.mark.parametrize("refusal", ["fenced", "lost_race", "duplicate"])
async def test_a_refused_large_group_writes_nothing(
    store: RedisModelStore, redis_client: aioredis.Redis, task_spec: TaskSpec, refusal: str
) -> None:
    await _start(store, task_spec)
    lease = await store.acquire_lease(CREDIT_TASK, "agg-a", 60_000)
    assert lease is not None
    assert (await store.commit_many(CREDIT_TASK, parent=0, versions=_versions(1, 1))).committed
    before = await _values(redis_client, store.config.prefix)
    versions, parent = _versions(2, 2, "n"), 1
    if refusal == "fenced":
        lease = Lease("agg-b", lease.token + 1)
    elif refusal == "lost_race":
        parent = 0
    else:
        versions[1] = replace(versions[1], lineage=[lineage_entry("g1-a")])
    result = await store.commit_many(CREDIT_TASK, parent=parent, versions=versions, lease=lease)
    assert result.outcome is CommitOutcome(refusal) and not result.committed
    assert await _values(redis_client, store.config.prefix) == before


@pytest.mark.usefixtures("pieces")
async def test_a_resent_large_commit_reports_its_own_commit_and_writes_once(
    store: RedisModelStore, redis_client: aioredis.Redis, task_spec: TaskSpec
) -> None:
    await _start(store, task_spec)
    script = store._commit_script

    async def twice(keys: list[str], args: list[Any]) -> object:
        await script(keys=keys, args=args)
        return await script(keys=keys, args=args)

    store._commit_script = twice  # type: ignore[assignment]
    versions = _versions(1, 2)
    result = await store.commit_many(CREDIT_TASK, parent=0, versions=versions)
    assert result.committed and result.head == 2
    assert len(await store.decisions(CREDIT_TASK)) == 4
    for v in (1, 2):
        env = await store.get_params(CREDIT_TASK, v)
        assert all(torch.equal(env.tensors[k], t) for k, t in versions[v - 1].params.items())
    store._commit_script = script
    late = await store.commit_many(CREDIT_TASK, parent=0, versions=_versions(1, 2, "x"))
    assert late.outcome is CommitOutcome.LOST_RACE and late.head == 2
    assert (await store.verify_chain(CREDIT_TASK)).ok


async def _reading(
    store: RedisModelStore,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: Callable[[str], Any],
) -> None:
    """Read version 0's blob with ``meanwhile(key)`` run after its first piece."""
    key = store.keys.blob(CREDIT_TASK, 0)
    getrange = redis_client.getrange

    async def interfered(name: str, start: int, end: int) -> object:
        await meanwhile(key)
        return await getrange(name, start, end)

    monkeypatch.setattr(redis_client, "getrange", interfered)


@pytest.mark.usefixtures("pieces")
async def test_a_blob_pruned_while_it_is_read_is_pruned(
    store: RedisModelStore,
    redis_client: aioredis.Redis,
    task_spec: TaskSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await _start(store, task_spec)
    await _reading(store, redis_client, monkeypatch, redis_client.delete)
    with pytest.raises(BlobPrunedError, match="dropped by retention"):
        await store.get_params(CREDIT_TASK, 0)


@pytest.mark.usefixtures("pieces")
async def test_a_blob_changing_length_while_it_is_read_is_an_error(
    store: RedisModelStore,
    redis_client: aioredis.Redis,
    task_spec: TaskSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await _start(store, task_spec)

    async def shorten(key: str) -> None:
        await redis_client.set(key, b"x" * 1000)

    await _reading(store, redis_client, monkeypatch, shorten)
    with pytest.raises(StoreError, match="changed length"):
        await store.get_blob(CREDIT_TASK, 0)


@pytest.mark.usefixtures("pieces")
async def test_a_small_blob_is_one_argument_and_one_reply(
    store: RedisModelStore, task_spec: TaskSpec
) -> None:
    small = {"w": torch.randn(100)}
    await store.register_task(task_spec)
    await store.create_genesis(CREDIT_TASK, small)
    recorder = Recorder(store._commit_script)
    store._commit_script = recorder  # type: ignore[assignment]
    version = NewVersion({"w": torch.randn(100)}, [lineage_entry("s1")], {})
    result = await store.commit_many(CREDIT_TASK, parent=0, versions=[version])
    assert result.committed
    blob = join(result.blobs[0])
    assert blob in recorder.calls[0]  # the slot holds the whole blob
    assert recorder.calls[0][-2:] == ["0", "0"]  # no further pieces: the blob, no state
    stored = await store.get_blob(CREDIT_TASK, 1)
    assert isinstance(stored, bytes) and stored == blob


def test_arg_pieces_join_to_the_blob_and_view_large_segments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(blob_io, "SEGMENTED_ABOVE", 1000)
    monkeypatch.setattr(blob_io, "ARG_PIECE_BYTES", 300_000)
    big = torch.arange(200_000, dtype=torch.int32)
    view = big.numpy().data.cast("B")
    segments: Segments = [b"head", *[bytes([i]) * 10 for i in range(50)], view, b"tail"]
    out = blob_io.arg_pieces(segments)
    assert join(out) == join(segments)
    assert all(len(p) > 0 for p in out)
    sliced = [p for p in out if isinstance(p, memoryview)]
    assert len(sliced) == 3  # 800 000 bytes in pieces of at most 300 000, no copy
    assert all(p.obj is view.obj for p in sliced)
    assert blob_io.arg_pieces([b"ab", b"cd"]) == [b"abcd"]  # small: one argument
    assert blob_io.arg_pieces([]) == [b""]


@pytest.mark.usefixtures("pieces")
async def test_a_blob_over_the_string_limit_is_refused_before_anything_is_written(
    store: RedisModelStore,
    redis_client: aioredis.Redis,
    task_spec: TaskSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await _start(store, task_spec)
    before = await _values(redis_client, store.config.prefix)
    monkeypatch.setattr(blob_io, "MAX_BLOB_BYTES", 1 << 20)  # the model is over 2 MiB
    with pytest.raises(StoreError, match="string limit"):
        await store.commit_many(CREDIT_TASK, parent=0, versions=_versions(1, 2))
    assert await _values(redis_client, store.config.prefix) == before
    assert await store.head(CREDIT_TASK) == 0


def test_writes_regroup_a_command_without_changing_its_bytes() -> None:
    command: Sequence[bytes] = [b"*3\r\n$3\r\nSET", b"x" * 2500, b"\r\n", b"y" * 10]
    batches = list(piecewise._writes(command, 1000))
    assert b"".join(b"".join(bytes(v) for v in batch) for batch in batches) == b"".join(command)
    assert all(sum(v.nbytes for v in batch) <= 1000 for batch in batches)


@pytest.mark.real
async def test_a_real_connection_sends_a_large_commit_a_piece_at_a_time(
    task_spec: TaskSpec, monkeypatch: pytest.MonkeyPatch, pieces: None
) -> None:
    monkeypatch.setattr(piecewise, "WHOLE_BELOW", 128 << 10)
    monkeypatch.setattr(piecewise, "WRITE_PIECE_BYTES", 64 << 10)
    sizes: list[int] = []
    send = Connection.send_packed_command

    async def recording(self: Connection, command: Any, check_health: bool = True) -> None:
        sizes.append(piecewise._size(command))
        await send(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", recording)
    client = connect_redis(REDIS_URL)
    prefix = f"fedqtest-{uuid.uuid4().hex[:12]}"
    store = RedisModelStore(client, StoreConfig(prefix=prefix))
    try:
        await _start(store, task_spec)  # SET and APPENDs, a piece at a time
        sizes.clear()
        versions = _versions(1, 2)
        result = await store.commit_many(CREDIT_TASK, parent=0, versions=versions)
        assert result.committed
        assert len(sizes) > 2 * (2 << 20) // (64 << 10)  # two versions of over 2 MiB
        assert max(sizes) <= 64 << 10
        for v in (0, 1, 2):
            params = _params(0) if v == 0 else versions[v - 1].params
            env = await store.get_params(CREDIT_TASK, v)
            assert all(torch.equal(env.tensors[k], t) for k, t in params.items())
        assert (await store.verify_chain(CREDIT_TASK)).ok
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("pieces")
async def test_large_versions_survive_a_sigkill_and_read_back_as_the_auditor(
    private_redis: PrivateRedis, task_spec: TaskSpec
) -> None:
    """The shipped Redis (TLS, ACL users, AOF with script effects): a large commit in
    pieces is in the AOF, and the read-only auditor reads it back in pieces."""
    store = RedisModelStore(connect_redis(private_redis.url))
    versions = _versions(1, 2)
    try:
        await _start(store, task_spec)
        result = await store.commit_many(CREDIT_TASK, parent=0, versions=versions)
        assert result.committed
    finally:
        await store.close()
    await private_redis.arestart(hard=True)  # SIGKILL: only the AOF is left
    auditor = RedisModelStore(connect_redis(private_redis.url_for(AUDITOR)))
    try:
        for v in (0, 1, 2):
            params = _params(0) if v == 0 else versions[v - 1].params
            env = await auditor.get_params(CREDIT_TASK, v)
            assert all(torch.equal(env.tensors[k], t) for k, t in params.items())
        report = await auditor.verify_chain(CREDIT_TASK)
        assert report.ok, report.reason
    finally:
        await auditor.close()


@pytest.mark.real
@pytest.mark.timeout(60)
def test_a_full_redis_refuses_a_large_commit_as_it_refuses_a_small_one(tmp_path: Any) -> None:
    """``maxmemory-policy noeviction`` (broker_config/redis.conf): a full Redis refuses
    the commit script, whose first write is the one Redis checks. A blob written in
    pieces starts with a SET of its first piece: with a DEL first (never refused) every
    later write went through, 20 MiB past the limit and the head moved."""
    import subprocess
    import time

    import redis as sync_redis

    from aggregator.store.commit_script import COMMIT_LUA, ScriptVersion, commit_call
    from aggregator.store.keys import Keys
    from tests.servers import free_port

    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--maxmemory",
            "3mb",
            "--maxmemory-policy",
            "noeviction",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        r = sync_redis.Redis(port=port)
        for _ in range(100):
            try:
                r.ping()
                break
            except sync_redis.exceptions.ConnectionError:
                time.sleep(0.1)
        full = False
        for i in range(10_000):
            try:
                r.set(f"fill{i}", b"x" * 100_000)
            except sync_redis.exceptions.ResponseError:
                full = True
                break
        assert full
        keys = Keys(prefix="oom")

        def commit(size: int) -> None:
            blob = [b"\x88" + b"z" * (size - 1)]
            version = ScriptVersion(1, blob, None, b"{}", b"[]", ())
            call = commit_call(
                keys,
                "t1",
                parent=0,
                versions=[version],
                lease=None,
                max_decisions=100,
                drop=[],
                at=0.0,
            )
            r.eval(COMMIT_LUA, len(call.keys), *call.keys, *call.args)

        r.config_set("maxmemory", "0")
        r.set(keys.head("t1"), 0)
        r.config_set("maxmemory", "3mb")
        for size in (1 << 20, 20 << 20):  # one SET; pieces of 8 MiB
            with pytest.raises(sync_redis.exceptions.ResponseError, match="maxmemory"):
                commit(size)
            assert r.get(keys.head("t1")) == b"0"
            assert r.exists(keys.blob("t1", 1)) == 0
        r.close()
    finally:
        server.terminate()
        server.wait(10)
