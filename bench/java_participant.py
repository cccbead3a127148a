"""The Java participant beside the Python one: per-update training time and bytes.

One bank of German credit (a third of the rows, the split of ``fedq simulate`` with 3
banks), the same task spec, the same version-0 model (a signed envelope as the
aggregator stores it) and the same signing key for both clients; each trains and
encodes ``--updates`` updates from that model, as its worker does for every update:
local training (timed), then the update envelope with its metrics, content hash and
Ed25519 signature (timed), whose length is the update's bytes. The Java side runs
``participants/java/fedq-java bench`` (one JVM: its first update pays for the JIT and is
reported apart); the Python side calls ``participant.training.train_local`` and
``common.wire.encode_update`` in this process. No broker: publishing costs the same
bytes either way. Both keep 20% of the rows for validation (each its own split: the
Python one is torch's), so both train on the same number of rows.

Settings: the logistic regression and an MLP (one hidden layer of 32), each with
full-batch training (5 epochs, one step each; tests/test_java_participant.py trains
full batch too: 20 epochs at lr 1.0 async, 5 at lr 0.5 sync)
and with mini-batches of 32 (2 epochs, fedq simulate's default). Medians over the
updates after the first; ratios Java / Python.

    .venv/bin/python bench/java_participant.py [--quick] [--updates 30] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, envelope, table, write_json

from common.evaluation import evaluate
from common.models import build_task_model, model_tensors
from common.signing import SigningKey
from common.spec import IdentitySpec, TaskSpec
from common.wire import ModelEnvelope, UpdateEnvelope, encode_model, encode_update
from fedq.simulate import SimulationConfig, prepare
from participant.data import encode, train_val_split
from participant.training import train_local

ROOT = Path(__file__).resolve().parent.parent
JAVA = ROOT / "participants" / "java"
BANK = "bank-c"
BANKS = ("bank-a", "bank-b", BANK)
MODELS: dict[str, dict[str, Any]] = {
    "logreg": {"kind": "logreg"},
    "MLP 32": {"kind": "mlp", "hidden": [32]},
}
TRAINING: dict[str, dict[str, Any]] = {
    "full batch": {"epochs": 5, "batch_size": 4096, "lr": 0.5},
    "batches of 32": {"epochs": 2, "batch_size": 32, "lr": 0.1},
}


def _spec(model: dict[str, Any], training: dict[str, Any], key: SigningKey) -> tuple[TaskSpec, Any]:
    prep = prepare(SimulationConfig(participants=len(BANKS)))
    shards = dict(zip(BANKS, prep.shards.values(), strict=True))
    spec = TaskSpec.model_validate(
        {
            **prep.spec.model_dump(by_alias=True),
            "task_id": f"bench-java-{uuid.uuid4().hex[:8]}",
            "model": model,
            "training": training,
            "participants": BANKS,
            "declared_samples": {b: len(s) for b, s in shards.items()},
            "identity": IdentitySpec(
                require_signatures=False, participant_keys={BANK: key.public.text}
            ).model_dump(),
        }
    )
    return spec, shards[BANK]


def _python(
    spec: TaskSpec, shard: Any, model: ModelEnvelope, key: SigningKey, n: int
) -> dict[str, Any]:
    """What the Python worker does per update, timed the same way."""
    x, y = encode(shard, spec)
    train_idx, val_idx = train_val_split(len(y), 0.2, 0)
    x_train, y_train = x[train_idx], y[train_idx]
    # The worker scores each received model on its validation rows once, into every
    # update's metrics (not timed here, nor in the Java client).
    val = {f"val_{k}": v for k, v in evaluate(spec, model.tensors, x[val_idx], y[val_idx]).items()}
    spec_hash = spec.spec_hash()
    train_ms, encode_ms, sizes = [], [], []
    for k in range(n):
        seed = int.from_bytes(hashlib.sha256(f"0:{BANK}:{k}".encode()).digest()[:4], "little")
        t0 = time.perf_counter()
        delta, metrics = train_local(spec, model.tensors, x_train, y_train, seed=seed)
        t1 = time.perf_counter()
        body, _ = encode_update(
            UpdateEnvelope(
                task=spec.task_id,
                participant=BANK,
                update_id=uuid.uuid4().hex,
                base_version=0,
                num_samples=len(y_train),
                tensors=delta,
                metrics={**metrics, **val},
                codec="raw",
                created_at=time.time(),
                spec_hash=spec_hash,
            ),
            key,
        )
        t2 = time.perf_counter()
        train_ms.append((t1 - t0) * 1e3)
        encode_ms.append((t2 - t1) * 1e3)
        sizes.append(len(body))
    return {
        "training_rows": len(y_train),
        "train_ms": train_ms,
        "encode_ms": encode_ms,
        "update_bytes": sizes,
    }


def _java(spec: TaskSpec, shard: Any, model_body: bytes, key: SigningKey, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedqbench-java-") as tmp:
        d = Path(tmp)
        (d / "spec.json").write_text(spec.to_json() + "\n")
        shard.to_csv(d / "rows.csv", index=False)
        (d / "model.msgpack").write_bytes(model_body)
        (d / "bank.key").write_bytes(key.to_pem())
        (d / "bank.key").chmod(0o600)
        argv = [str(JAVA / "fedq-java"), "bench", "--spec", str(d / "spec.json")]
        argv += ["--participant", BANK, "--data", str(d / "rows.csv")]
        argv += ["--model", str(d / "model.msgpack"), "--key", str(d / "bank.key")]
        argv += ["--updates", str(n), "--val-fraction", "0.2"]
        done = subprocess.run(  # noqa: S603 - our own script, fixed arguments
            argv, capture_output=True, text=True, timeout=600, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"fedq-java bench failed: {done.stderr.strip()}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result


def _median_after_first(values: list[float]) -> float:
    return statistics.median(values[1:]) if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="5 updates per setting")
    ap.add_argument("--updates", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS / "java_participant.json")
    args = ap.parse_args()
    n = 5 if args.quick else args.updates
    torch.set_num_threads(1)
    built = subprocess.run(  # noqa: S603 - our own build script
        [str(JAVA / "build.sh")], capture_output=True, text=True, check=False
    )
    if built.returncode != 0:
        raise SystemExit(f"participants/java/build.sh failed: {built.stderr.strip()}")
    key = SigningKey.generate()
    rows: list[list[Any]] = []
    figures: dict[str, Any] = {}
    for model_name, model in MODELS.items():
        for training_name, training in TRAINING.items():
            spec, shard = _spec(model, training, key)
            tensors = model_tensors(build_task_model(spec))
            body, _ = encode_model(
                ModelEnvelope(task=spec.task_id, version=0, tensors=tensors, codec="raw")
            )
            env = ModelEnvelope(task=spec.task_id, version=0, tensors=tensors, codec="raw")
            py = _python(spec, shard, env, key, n)
            jv = _java(spec, shard, body, key, n)
            assert py["training_rows"] == jv["training_rows"], (
                py["training_rows"],
                jv["training_rows"],
            )
            name = f"{model_name}, {training_name}"
            py_train, jv_train = (
                _median_after_first(py["train_ms"]),
                _median_after_first(jv["train_ms"]),
            )
            py_enc, jv_enc = (
                _median_after_first(py["encode_ms"]),
                _median_after_first(jv["encode_ms"]),
            )
            py_bytes, jv_bytes = (
                statistics.median(py["update_bytes"]),
                statistics.median(jv["update_bytes"]),
            )
            figures[name] = {
                "python": py,
                "java": jv,
                "python_train_ms": py_train,
                "java_train_ms": jv_train,
                "java_first_train_ms": jv["train_ms"][0],
                "python_encode_ms": py_enc,
                "java_encode_ms": jv_enc,
                "python_bytes": py_bytes,
                "java_bytes": jv_bytes,
                "train_ratio": jv_train / py_train,
                "bytes_ratio": jv_bytes / py_bytes,
            }
            rows.append([name, py["training_rows"], py_train, jv_train, jv_train / py_train])
            rows[-1] += [jv["train_ms"][0], py_enc, jv_enc, int(py_bytes), int(jv_bytes)]
    headers = ["setting", "rows", "Python train ms", "Java train ms", "Java / Python"]
    headers += ["Java 1st ms", "Python encode ms", "Java encode ms", "Python bytes", "Java bytes"]
    title = f"per update, median of {n - 1} after the first (one bank of German credit)"
    print(table(headers, rows, title=title))
    write_json(args.out, envelope("java_participant", args.quick, figures, updates=n))


if __name__ == "__main__":
    main()
