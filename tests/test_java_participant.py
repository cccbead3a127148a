"""The Java participant (participants/java): its unit tests, and a mixed federation.

(a) ``participants/java/build.sh test`` compiles the client with javac against
Debian's jars and runs its JUnit tests, which read the test vectors out of
docs/protocol.md and docs/wire-format.md.

(b) Two Python banks and one Java bank train on German credit against private
RabbitMQ (TLS only, the shipped users: the Java bank logs in as ``bank-c`` over
amqps) and Redis, asynchronously (FedAsync, the logistic regression) and
synchronously (FedAvg, an MLP). Training is full-batch, which the protocol says
another implementation can match to float rounding; the Java bank keeps every row
for training (``--val-fraction 0``), and so does the Python ``bank-c`` of the
all-Python run it is compared with. Checked: the Java bank's updates are in the
versions' lineage and none of them was refused, its receipts say so, the final
model's pooled test AUC is within 0.01 of the all-Python run's, and
``fedq replay --verify`` passes as the auditor.

(c) The client refuses a task under secure aggregation on one line, and its updates
under the task's lossy compression (top-k with int8 values, zstd, stochastic rounding)
are decoded and accepted by the aggregator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore, connect_redis
from common.evaluation import evaluate
from common.spec import TaskSpec
from common.transport import Transport
from common.transport.amqp import AmqpTransport
from fedq.simulate import SimulationConfig, prepare
from participant.worker import ParticipantWorker, WorkerConfig
from tests.helpers import party_key, signed_identity
from tests.servers import (  # noqa: F401
    AGGREGATOR,
    PrivateRabbit,
    PrivateRedis,
    private_rabbit_fixture,
    private_redis_fixture,
    replay_as_auditor,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
JAVA_DIR = ROOT / "participants" / "java"
BANKS = ("bank-a", "bank-b", "bank-c")
JAVA_BANK = "bank-c"
#: Versions (async) each run goes to before the banks stop; rounds (sync) each bank
#: takes part in (its update cap: a bank stopped in the middle of a round would leave
#: that round open for good, as its quorum is every bank).
ASYNC_VERSIONS = 30
SYNC_ROUNDS = 6
#: A pause after each local training at every bank, Java and Python alike: in async mode
#: a bank's share of the versions follows its pace, and the Java bank trains several
#: times faster than a Python one, which would tilt the model toward its rows.
PACE_S = 0.2


def _java_missing() -> str | None:
    if shutil.which("javac") is None or shutil.which("java") is None:
        return "javac/java (openjdk-17-jdk-headless) is not installed; .ci/run installs it"
    for jar in ("amqp-client", "msgpack-core", "zstd-jni", "jackson-databind", "junit4"):
        if not Path(f"/usr/share/java/{jar}.jar").exists():
            return f"/usr/share/java/{jar}.jar is missing; .ci/run installs the Java packages"
    return None


@pytest.fixture(scope="module")
def java_built() -> Path:
    """The client built by build.sh (once per module); fails, never skips, without a JDK."""
    missing = _java_missing()
    if missing:
        pytest.fail(missing)
    done = subprocess.run(
        [str(JAVA_DIR / "build.sh")], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return JAVA_DIR / "fedq-java"


@pytest.mark.slow
def test_java_unit_tests_pass_against_the_documents() -> None:
    missing = _java_missing()
    if missing:
        pytest.fail(missing)
    done = subprocess.run(
        [str(JAVA_DIR / "build.sh"), "test"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # JUnit's summary: "OK (N tests)"; every vector test class ran.
    assert "OK (" in out, out
    count = int(out.split("OK (", 1)[1].split(" ", 1)[0])
    assert count >= 10, out


@pytest.mark.slow
def test_java_refuses_secure_aggregation_on_one_line(java_built: Path, tmp_path: Path) -> None:
    spec, shards = _task("sync", "java-secagg")
    data = spec.model_dump(mode="json", by_alias=True)
    data["secure_aggregation"] = {"threshold": 2}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(data) + "\n")
    rows = tmp_path / "rows.csv"
    shards[JAVA_BANK].to_csv(rows, index=False)
    done = subprocess.run(
        [str(java_built), "check", "--spec", str(spec_file), "--participant", JAVA_BANK,
         "--data", str(rows)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "secure aggregation" in lines[0], done.stderr
    assert "Exception" not in done.stderr and "\tat " not in done.stderr


# ------------------------------------------------------------ the mixed federation


def _task(mode: str, task_id: str, **extra: Any) -> tuple[TaskSpec, dict[str, pd.DataFrame]]:
    """German credit split over three banks (the shipped bank users), full-batch training."""
    prep = prepare(SimulationConfig(participants=len(BANKS)))
    shards = {
        bank: prep.shards[name] for name, bank in zip(prep.spec.participants, BANKS, strict=True)
    }
    base = prep.spec.model_dump(by_alias=True)
    model = {"kind": "logreg"} if mode == "async" else {"kind": "mlp", "hidden": [8]}
    # Async: enough local steps that each update nears its bank's optimum, so the order
    # in which updates arrive (which differs from run to run) matters little.
    epochs, lr = (20, 1.0) if mode == "async" else (5, 0.5)
    spec = TaskSpec.model_validate(
        {
            **base,
            "task_id": task_id,
            "mode": mode,
            "model": model,
            "participants": BANKS,
            "declared_samples": {bank: len(shard) for bank, shard in shards.items()},
            # Full batch: every step sees every training row, so Java and Python agree.
            "training": {"epochs": epochs, "batch_size": 4096, "lr": lr},
            # max_staleness 1000: no update is refused as stale, however the banks' paces
            # interleave (a refusal would make the Java and Python runs differ); mixing 0.2:
            # each update moves the model a fifth of the way, so no single bank's rows
            # dominate the async model.
            "async": {**prep.spec.async_.model_dump(), "max_staleness": 1000, "mixing": 0.2},
            "identity": signed_identity(BANKS, AGGREGATOR).model_dump(),
            **extra,
        }
    )
    return spec, shards


_PREP: list[Any] = []


def _test_set() -> tuple[Any, Any]:
    if not _PREP:
        _PREP.append(prepare(SimulationConfig(participants=len(BANKS))))
    return _PREP[0].x_test, _PREP[0].y_test


@dataclass
class Run:
    task: str
    head: int
    auc: float
    initial_auc: float
    java: dict[str, Any]
    lineage_participants: dict[str, int]
    refused: dict[str, int]
    #: The parameters of the target version, flattened in the model's order.
    params: list[float]


class _JavaBank:
    """``fedq-java run`` for one bank, as a child process with its own broker user."""

    def __init__(
        self,
        exe: Path,
        spec: TaskSpec,
        shard: pd.DataFrame,
        url: str,
        work: Path,
        extra: list[str] | None = None,
    ):
        work.mkdir(parents=True, exist_ok=True)
        self.spec_file = work / "spec.json"
        self.spec_file.write_text(spec.to_json() + "\n")
        rows = work / f"{JAVA_BANK}.csv"
        shard.to_csv(rows, index=False)
        key = work / f"{JAVA_BANK}.key"
        key.write_bytes(party_key(JAVA_BANK).to_pem())
        key.chmod(0o600)
        self.stats = work / "stats.json"
        self.log = work / "java.log"
        argv = [
            str(exe), "run", "--spec", str(self.spec_file), "--participant", JAVA_BANK,
            "--data", str(rows), "--amqp-url-env", "FEDQ_JAVA_AMQP_URL", "--key", str(key),
            "--seed", "2", "--val-fraction", "0", "--wait-for-model", "0.5", "--delay", str(PACE_S),
            "--stats", str(self.stats),
        ]  # fmt: skip
        if spec.mode == "sync":
            argv += ["--max-updates", str(SYNC_ROUNDS)]
        argv += extra or []
        env = {**os.environ, "FEDQ_JAVA_AMQP_URL": url}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    def published(self) -> list[str]:
        if not self.stats.exists():
            return []
        return list(json.loads(self.stats.read_text())["published_ids"])

    async def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.proc.wait, 60)
        assert code == 0, self.log.read_text()
        stats: dict[str, Any] = json.loads(self.stats.read_text())
        return stats

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _python_bank(
    spec: TaskSpec, index: int, name: str, transport: Transport, shard: pd.DataFrame
) -> ParticipantWorker:
    return ParticipantWorker(
        spec,
        WorkerConfig(
            participant=name,
            seed=index,
            val_fraction=0.0 if name == JAVA_BANK else 0.2,
            wait_for_model_s=0.5,
            delay_s=PACE_S,
            max_updates=SYNC_ROUNDS if spec.mode == "sync" else None,
            signing_key=party_key(name),
        ),
        transport,
        shard,
    )


async def _settled(store: RedisModelStore, task: str, published: list[str]) -> bool:
    """Every published update applied or refused."""
    applied = await store.applied_in(task, published)
    refused = {
        d["update_id"]
        for d in await store.decisions(task)
        if d["decision"] == "refused" and "update_id" in d
    }
    return not set(published) - set(applied) - refused


async def _measure(
    spec: TaskSpec, store: RedisModelStore, target: int, java_stats: dict[str, Any]
) -> Run:
    """The chain verifies; who is in the lineage, who was refused; the AUCs."""
    task = spec.task_id
    head = await store.head(task)
    assert head is not None
    assert (await store.verify_chain(task)).ok
    by_bank: dict[str, int] = {}
    for v in range(1, head + 1):
        for entry in (await store.get_version(task, v)).lineage:
            by_bank[entry.participant] = by_bank.get(entry.participant, 0) + 1
    refused_by: dict[str, int] = {}
    for d in await store.decisions(task):
        if d["decision"] == "refused":
            who = d.get("participant", "?")
            refused_by[who] = refused_by.get(who, 0) + 1
    # Measured at the target version, whatever the wind-down added after it.
    params = (await store.get_params(task, target)).tensors
    initial = (await store.get_params(task, 0)).tensors
    x_test, y_test = _test_set()
    auc = evaluate(spec, params, x_test, y_test)["auc"]
    initial_auc = evaluate(spec, initial, x_test, y_test)["auc"]
    flat = [float(x) for t in params.values() for x in t.flatten().tolist()]
    return Run(task, head, auc, initial_auc, java_stats, by_bank, refused_by, flat)


async def _federate(
    spec: TaskSpec,
    shards: dict[str, pd.DataFrame],
    rabbit: PrivateRabbit,
    redis: PrivateRedis,
    java: Path | None,
    work: Path,
) -> Run:
    """Run one federation to its target, wind it down, and measure it."""
    store = RedisModelStore(connect_redis(redis.url))
    agg: Transport = await AmqpTransport.connect(rabbit.url_for(AGGREGATOR), name="java-agg")
    service = AggregatorService(
        spec, store, agg, ServiceConfig(lease_ttl_s=5, signing_key=party_key(AGGREGATOR))
    )
    stop, bank_stop = asyncio.Event(), asyncio.Event()
    service_task = asyncio.create_task(service.run(stop))
    workers: list[ParticipantWorker] = []
    tasks: list[asyncio.Task[object]] = []
    java_bank: _JavaBank | None = None
    target = ASYNC_VERSIONS if spec.mode == "async" else SYNC_ROUNDS
    try:
        async with asyncio.timeout(30):
            await service.ready.wait()
        for i, name in enumerate(BANKS):
            if name == JAVA_BANK and java is not None:
                java_bank = _JavaBank(java, spec, shards[name], rabbit.url_for(name), work)
                continue
            transport = await AmqpTransport.connect(rabbit.url_for(name), name=f"java-{name}")
            workers.append(_python_bank(spec, i, name, transport, shards[name]))
            tasks.append(asyncio.create_task(workers[-1].run(bank_stop)))

        async def reached() -> bool:
            if java_bank is not None and java_bank.proc.poll() not in (None, 0):
                raise AssertionError(f"the Java bank exited: {java_bank.log.read_text()}")
            return (await store.head(spec.task_id) or 0) >= target

        await wait_until(reached, seconds=60)
        bank_stop.set()
        java_stats = await java_bank.stop() if java_bank is not None else {}
        await asyncio.gather(*tasks)
        published = [u for w in workers for u in w.stats.published_ids]
        published += java_stats.get("published_ids", [])
        await wait_until(lambda: _settled(store, spec.task_id, published), seconds=30)
        stop.set()
        await service_task
        return await _measure(spec, store, target, java_stats)
    finally:
        bank_stop.set()
        stop.set()
        if java_bank is not None:
            java_bank.kill()
        for task in [*tasks, service_task]:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for w in workers:
            await w.transport.close()
        await agg.close()
        await store.close()


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_mixed_federation_with_a_java_bank(
    mode: str,
    java_built: Path,
    private_rabbit: PrivateRabbit,
    private_redis: PrivateRedis,
    tmp_path: Path,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    spec, shards = _task(mode, f"java-{mode}-{suffix}")
    mixed = await _federate(spec, shards, private_rabbit, private_redis, java_built, tmp_path)

    # The Java bank took part: its updates are in the lineage, none refused, and its
    # receipts (signed by the aggregator, checked by the client) say so.
    assert mixed.lineage_participants.get(JAVA_BANK, 0) >= 2, mixed
    assert JAVA_BANK not in mixed.refused, mixed.refused
    assert mixed.java["published"] >= mixed.lineage_participants[JAVA_BANK]
    assert mixed.java["accepted"] == mixed.lineage_participants[JAVA_BANK], mixed.java
    assert mixed.java["refused"] == {} and mixed.java["models_refused"] == {}, mixed.java
    assert mixed.java["receipts_bad_signature"] == 0
    if mode == "sync":  # one update per round from each bank
        assert set(mixed.lineage_participants.values()) == {mixed.head}, mixed

    # The same federation with a Python bank-c instead.
    python_spec, _ = _task(mode, f"python-{mode}-{suffix}")
    python = await _federate(python_spec, shards, private_rabbit, private_redis, None, tmp_path)
    assert abs(mixed.auc - python.auc) <= 0.01, (mixed.auc, python.auc)
    if mode == "sync":
        # Every round is the same three full-batch updates from the same version: the
        # models agree to float32 rounding, not just in AUC.
        gap = max(abs(a - b) for a, b in zip(mixed.params, python.params, strict=True))
        assert gap < 1e-4, gap
    assert mixed.auc > mixed.initial_auc + 0.05, (mixed.auc, mixed.initial_auc)  # it learned

    report = await asyncio.to_thread(replay_as_auditor, private_rabbit, private_redis, mixed.task)
    assert report["checked"] == mixed.head, report


@pytest.mark.real
@pytest.mark.slow
async def test_java_bank_publishes_compressed_updates(
    java_built: Path, private_rabbit: PrivateRabbit, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """The spec's lossy codec (top-k with int8 values, zstd, stochastic rounding, error
    feedback): the aggregator decodes the Java bank's payloads and hashes and accepts them."""
    compression = {
        "codec": "topk8",
        "lossless": "zstd",
        "topk_fraction": 0.25,
        "stochastic_rounding": True,
    }
    spec, shards = _task("async", f"java-topk8-{uuid.uuid4().hex[:8]}", compression=compression)
    store = RedisModelStore(connect_redis(private_redis.url))
    agg: Transport = await AmqpTransport.connect(private_rabbit.url_for(AGGREGATOR), name="agg")
    service = AggregatorService(
        spec, store, agg, ServiceConfig(lease_ttl_s=5, signing_key=party_key(AGGREGATOR))
    )
    stop = asyncio.Event()
    service_task = asyncio.create_task(service.run(stop))
    bank: _JavaBank | None = None
    try:
        async with asyncio.timeout(30):
            await service.ready.wait()
        url = private_rabbit.url_for(JAVA_BANK)
        bank = _JavaBank(java_built, spec, shards[JAVA_BANK], url, tmp_path, ["--max-updates", "3"])
        code = await asyncio.to_thread(bank.proc.wait, 60)
        assert code == 0, bank.log.read_text()
        stats = json.loads(bank.stats.read_text())
        assert stats["published"] == 3 and stats["accepted"] == 3, stats
        applied = await store.applied_in(spec.task_id, stats["published_ids"])
        assert sorted(applied) == sorted(stats["published_ids"])
        assert bank.log.read_text().count("codec topk8+zstd") == 3, bank.log.read_text()
        assert not [d for d in await store.decisions(spec.task_id) if d["decision"] == "refused"]
    finally:
        stop.set()
        if bank is not None:
            bank.kill()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(service_task, 30)
        await agg.close()
        await store.close()
