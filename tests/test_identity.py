"""Identity and integrity: signed updates and models, the spec hash, key handling.

The rules run in-process here (admission, the participant's model checks, the key
checks, the document's test vectors, the CLI); tests/test_identity_broker.py runs
the forgeries through a real RabbitMQ loaded with broker_config/definitions.json.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import stat
from pathlib import Path

import fakeredis
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from aggregator.admission import Admission, AdmissionConfig
from aggregator.audit.replay import index_updates, replay
from aggregator.identity import check_signing_key
from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore
from common.errors import ConfigError, SpecError
from common.models import build_task_model, model_tensors, tensor_specs
from common.refusals import Refusal
from common.signing import (
    PublicKey,
    SigningKey,
    metrics_digest,
    model_message,
    receipt_message,
    update_message,
)
from common.spec import IdentitySpec, NumericFeature, TargetSpec, TaskSpec
from common.transport import ModelDelivery, Subscription
from common.transport.memory import MemoryBroker, MemoryTransport
from common.wire import (
    DEFAULT_LIMITS,
    ModelEnvelope,
    UpdateEnvelope,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
    sign_model,
)
from fedq.cli import main
from participant.identity import ModelChecker, check_participant_key
from participant.worker import ParticipantWorker, WorkerConfig
from tests.helpers import party_key, signed_identity

ROOT = Path(__file__).resolve().parent.parent
BANKS = ("bank-a", "bank-b")


def _spec(**identity: object) -> TaskSpec:
    return TaskSpec(
        task_id="credit",
        features=tuple(NumericFeature(name=f"x{i}") for i in range(3)),
        target=TargetSpec(name="y"),
        participants=BANKS,
        identity=signed_identity(BANKS).model_copy(update=identity),
    )


def _update(
    spec: TaskSpec,
    key: SigningKey | None,
    *,
    participant: str = "bank-a",
    value: float = 0.1,
    update_id: str = "u-0001",
    spec_hash: bytes | None = None,
) -> bytes:
    delta = {k: torch.full_like(v, value) for k, v in model_tensors(build_task_model(spec)).items()}
    body, _ = encode_update(
        UpdateEnvelope(
            task=spec.task_id,
            participant=participant,
            update_id=update_id,
            base_version=0,
            num_samples=10,
            tensors=delta,
            metrics={"loss": 0.5},
            spec_hash=spec.spec_hash() if spec_hash is None else spec_hash,
        ),
        key,
    )
    return body


def _admit(spec: TaskSpec, body: bytes, sender: str = "bank-a") -> Refusal | None:
    admission = Admission(
        spec,
        AdmissionConfig(DEFAULT_LIMITS),
        tensor_specs(model_tensors(build_task_model(spec))),
        uses_base=False,
    )
    env = decode_update(body)
    refused = admission.check(env, sender, 0, ())
    return None if refused is None else refused.reason


# ------------------------------------------------------------------ the document's vectors


def _vector_block() -> dict[str, str]:
    text = (ROOT / "docs" / "wire-format.md").read_text()
    block = re.search(r"```signing-vector\n(.*?)```", text, re.S)
    assert block is not None, "docs/wire-format.md has no signing-vector block"
    lines = block.group(1).strip().splitlines()
    out: dict[str, str] = {}
    i = 0
    while i < len(lines):
        label, _, value = lines[i].partition(":")
        if value.strip():
            out[label.strip()] = value.strip()
            i += 1
        else:  # the value is on the next line
            out[label.split(" (")[0].strip()] = lines[i + 1].strip()
            i += 2
    return out


def test_the_documented_signing_vectors_are_what_the_code_computes() -> None:
    doc = _vector_block()
    key = SigningKey.from_seed(bytes(range(32)))
    content = bytes.fromhex("a6b6b38708f6291193d0661a60e7dc46285995a5fb53c7283678ebb11182af20")
    vh = bytes.fromhex("0dac4b3f592b9f2c91cb0a71d3e37c544953a6337cb775158e2f46e9b30579d1")
    spec_hash, metrics = b"\x33" * 32, {"loss": 0.5, "auc": 0.75}
    assert key.public.text == doc["public key"]
    assert key.public.fingerprint == doc["fingerprint"]
    assert metrics_digest(metrics).hex() == doc["metrics digest"]
    assert metrics_digest({}).hex() == doc["empty metrics digest"]
    update = update_message(
        task="credit",
        participant="bank-a",
        update_id="u-0001",
        base_version=3,
        num_samples=100,
        content_hash=content,
        spec_hash=spec_hash,
        metrics=metrics,
    )
    assert update.hex() == doc["update"]
    assert key.sign(update).hex() == doc["update signature"]
    model = model_message(
        task="credit",
        version=4,
        version_hash=vh,
        content_hash=content,
        spec_hash=spec_hash,
        ancestors=[b"\x11" * 32],
    )
    assert model.hex() == doc["model"]
    assert key.sign(model).hex() == doc["model signature"]
    receipt = receipt_message(
        task="credit",
        participant="bank-a",
        update_id="u-0001",
        outcome="accepted",
        version=4,
        weight=0.25,
        reason="",
    )
    assert receipt.hex() == doc["receipt"]
    assert key.sign(receipt).hex() == doc["receipt signature"]
    assert key.public.verify(bytes.fromhex(doc["update signature"]), update)


def test_public_keys_parse_only_in_their_one_text_form() -> None:
    key = party_key("bank-a").public
    assert PublicKey.parse(key.text) == key
    for bad in ("", key.text.upper(), key.text[:-2], "ed448:" + key.text[8:], key.raw.hex()):
        with pytest.raises(SpecError):
            PublicKey.parse(bad)
    with pytest.raises(SpecError, match="identity"):
        TaskSpec.parse(
            {
                "task_id": "t",
                "features": [{"name": "x", "kind": "numeric"}],
                "target": {"name": "y"},
                "participants": ["bank-a"],
                "identity": {"participant_keys": {"bank-a": "ed25519:zz"}},
            }
        )


def test_the_spec_refuses_keys_for_strangers_and_signatures_without_an_aggregator_key() -> None:
    with pytest.raises(ValueError, match="non-participants"):
        _spec(participant_keys={"bank-z": party_key("bank-z").public.text})
    with pytest.raises(ValueError, match="aggregator_key"):
        IdentitySpec(require_signatures=True)


def test_the_spec_hash_covers_the_whole_spec_including_its_keys() -> None:
    spec = _spec()
    assert spec.spec_hash() == TaskSpec.from_json(spec.to_json()).spec_hash()
    rotated = _spec(
        participant_keys={**spec.identity.participant_keys, "bank-a": party_key("x").public.text}
    )
    assert rotated.spec_hash() != spec.spec_hash()


# ------------------------------------------------------------------ the aggregator's rules


def test_a_signed_update_under_the_current_spec_is_admitted() -> None:
    spec = _spec()
    assert _admit(spec, _update(spec, party_key("bank-a"))) is None


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unsigned", Refusal.UNSIGNED),
        ("another bank's key", Refusal.BAD_SIGNATURE),
        ("the aggregator's key", Refusal.BAD_SIGNATURE),
        ("an old signature on new content", Refusal.BAD_SIGNATURE),
        ("more samples claimed", Refusal.BAD_SIGNATURE),
        ("metrics altered", Refusal.BAD_SIGNATURE),
        ("random bytes", Refusal.BAD_SIGNATURE),
        ("256 random bytes", Refusal.BAD_SIGNATURE),
        ("another spec", Refusal.SPEC_MISMATCH),
        ("no spec hash, signed otherwise", Refusal.BAD_SIGNATURE),
    ],
)
def test_forged_and_unsigned_updates_are_refused_with_their_reason(
    case: str, reason: Refusal
) -> None:
    spec = _spec()
    own = party_key("bank-a")
    good = decode_update(_update(spec, own))
    assert good.signature is not None
    if case == "unsigned":
        body = _update(spec, None)
    elif case == "another bank's key":
        body = _update(spec, party_key("bank-b"))
    elif case == "the aggregator's key":
        body = _update(spec, party_key("fedq-aggregator"))
    elif case == "an old signature on new content":
        new = decode_update(_update(spec, None, value=0.2))
        body, _ = encode_update(dataclasses.replace(new, signature=good.signature))
    elif case == "more samples claimed":
        body, _ = encode_update(dataclasses.replace(good, num_samples=11))
    elif case == "metrics altered":
        body, _ = encode_update(dataclasses.replace(good, metrics={"loss": 0.1}))
    elif case in ("random bytes", "256 random bytes"):
        size = 64 if case == "random bytes" else 256
        body, _ = encode_update(dataclasses.replace(good, signature=os.urandom(size)))
    elif case == "another spec":
        body = _update(spec, own, spec_hash=b"\x01" * 32)  # a valid signature over it
    else:
        body, _ = encode_update(dataclasses.replace(good, spec_hash=b""))
    assert _admit(spec, body) == reason


def test_signatures_are_checked_before_the_spec_hash_and_after_the_sender() -> None:
    spec = _spec()
    unsigned_elsewhere = _update(spec, None, spec_hash=b"\x01" * 32)
    assert _admit(spec, unsigned_elsewhere) == Refusal.UNSIGNED
    assert _admit(spec, unsigned_elsewhere, sender="bank-b") == Refusal.SENDER_MISMATCH


def test_without_required_signatures_a_signature_is_still_checked_when_a_key_is_known() -> None:
    spec = _spec(require_signatures=False)
    assert _admit(spec, _update(spec, None)) is None
    assert _admit(spec, _update(spec, party_key("bank-b"))) == Refusal.BAD_SIGNATURE
    revoked = _spec(
        require_signatures=True, participant_keys={"bank-b": party_key("bank-b").public.text}
    )
    assert _admit(revoked, _update(revoked, party_key("bank-a"))) == Refusal.BAD_SIGNATURE


# ------------------------------------------------------------------ the participant's checks


def _announcement(
    spec: TaskSpec,
    version: int,
    key: SigningKey | None,
    *,
    version_hash: bytes,
    ancestors: tuple[bytes, ...] = (),
    spec_hash: bytes | None = None,
) -> ModelEnvelope:
    tensors = model_tensors(build_task_model(spec))
    blob, digest = encode_model(
        ModelEnvelope(
            task=spec.task_id, version=version, tensors=tensors, version_hash=version_hash
        )
    )
    signed = sign_model(
        blob,
        task=spec.task_id,
        version=version,
        version_hash=version_hash,
        content_hash=digest,
        spec_hash=spec.spec_hash() if spec_hash is None else spec_hash,
        ancestors=ancestors,
        signing_key=key,
    )
    return decode_model(signed, expected=tensor_specs(tensors))


def test_the_participant_accepts_signed_models_that_descend_from_what_it_saw() -> None:
    spec = _spec()
    agg = party_key("fedq-aggregator")
    checker = ModelChecker(spec)
    h = [bytes([i]) * 32 for i in range(8)]
    assert checker.check(_announcement(spec, 1, agg, version_hash=h[1], ancestors=(h[0],))) is None
    # Versions 2 and 3 were never delivered (latest-only queue): 4 lists 3, 2, 1, 0.
    model = _announcement(spec, 4, agg, version_hash=h[4], ancestors=(h[3], h[2], h[1], h[0]))
    assert checker.check(model) is None
    assert not checker.unchecked
    # A fork: version 5 whose ancestors do not include the version 4 seen.
    fork = _announcement(spec, 5, agg, version_hash=h[5], ancestors=(h[7], h[2], h[1], h[0]))
    assert checker.check(fork) == (Refusal.NOT_DESCENDANT, fork_detail(checker))
    # Another version 4 than the one seen.
    twin = _announcement(spec, 4, agg, version_hash=h[6], ancestors=(h[3], h[2], h[1], h[0]))
    refused = checker.check(twin)
    assert refused is not None and refused[0] == Refusal.NOT_DESCENDANT
    # Too far to check (more versions than the ancestors carried): accepted, flagged.
    far = _announcement(spec, 7, agg, version_hash=h[7], ancestors=(h[6],))
    assert checker.check(far) is None
    assert checker.unchecked


def fork_detail(checker: ModelChecker) -> str:
    return (
        f"version 5 does not descend from version {checker.previous} "
        f"(hash {checker.previous_hash.hex()[:16]}) seen before"
    )


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unsigned", Refusal.UNSIGNED),
        ("signed by a bank", Refusal.BAD_SIGNATURE),
        ("ancestors altered", Refusal.BAD_SIGNATURE),
        ("another spec", Refusal.SPEC_MISMATCH),
    ],
)
def test_the_participant_refuses_forged_models(case: str, reason: Refusal) -> None:
    spec = _spec()
    agg = party_key("fedq-aggregator")
    h = b"\x05" * 32
    if case == "unsigned":
        model = _announcement(spec, 1, None, version_hash=h)
    elif case == "signed by a bank":
        model = _announcement(spec, 1, party_key("bank-a"), version_hash=h)
    elif case == "ancestors altered":
        model = _announcement(spec, 1, agg, version_hash=h, ancestors=(b"\x01" * 32,))
        model = dataclasses.replace(model, ancestors=(b"\x02" * 32,))
    else:
        model = _announcement(spec, 1, agg, version_hash=h, spec_hash=b"\x07" * 32)
    refused = ModelChecker(spec).check(model)
    assert refused is not None and refused[0] == reason


# ------------------------------------------------------------------ keys at start


def test_each_party_must_hold_the_key_the_spec_names() -> None:
    spec = _spec()
    check_signing_key(spec, party_key("fedq-aggregator"))
    with pytest.raises(ConfigError, match="--signing-key"):
        check_signing_key(spec, None)
    with pytest.raises(ConfigError, match="is not the aggregator key"):
        check_signing_key(spec, party_key("bank-a"))
    check_participant_key(spec, "bank-a", party_key("bank-a"))
    with pytest.raises(ConfigError, match="--signing-key"):
        check_participant_key(spec, "bank-a", None)
    with pytest.raises(ConfigError, match="not the key"):
        check_participant_key(spec, "bank-a", party_key("bank-b"))


# ------------------------------------------------------------------ the command line


def test_keys_generate_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    out = tmp_path / "bank-a.key"
    result = CliRunner().invoke(main, ["keys", "generate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    key = SigningKey.load(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert (tmp_path / "bank-a.key.pub").read_text().strip() == key.public.text
    assert f"fingerprint: {key.public.fingerprint}" in result.output
    again = CliRunner().invoke(main, ["keys", "generate", "--out", str(out)])
    assert again.exit_code == 2
    assert again.output.strip().splitlines() == [
        f"error: {out} exists; pass --force to overwrite it"
    ]
    shown = CliRunner().invoke(main, ["keys", "show", str(out)])
    assert key.public.text in shown.output


def test_a_key_file_that_is_not_a_key_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    result = CliRunner().invoke(main, ["keys", "show", str(bad)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "not an unencrypted PEM private key" in result.output


def test_task_init_writes_the_keys_and_the_canonical_spec(tmp_path: Path) -> None:
    data = tmp_path / "ref.csv"
    data.write_text("x,y\n1,0\n2,1\n3,0\n4,1\n")
    out = tmp_path / "spec.json"
    a, agg = party_key("bank-a").public.text, party_key("fedq-aggregator").public.text
    result = CliRunner().invoke(
        main,
        [
            *("task", "init", "--data", str(data), "--target", "y", "--task-id", "t1"),
            *("--participants", "bank-a", "--participant-key", f"bank-a={a}"),
            *("--aggregator-key", agg, "--out", str(out)),
        ],
    )
    assert result.exit_code == 0, result.output
    text = out.read_text()
    spec = TaskSpec.from_json(text)
    assert spec.identity.require_signatures
    assert spec.identity.participant_keys == {"bank-a": a}
    assert spec.identity.aggregator_key == agg
    # The file is the canonical JSON: its bytes (less the newline) are what is hashed.
    assert text == spec.to_json() + "\n"
    hashed = CliRunner().invoke(main, ["task", "hash", "--spec", str(out)])
    assert hashed.output.strip() == spec.spec_hash().hex()


# ------------------------------------------------------------------ rotation, revocation


async def test_a_rotated_key_applies_from_its_version_and_replay_checks_each_under_its_own() -> (
    None
):
    """bank-a's key is rotated after version 2: its old key is refused from then on, the
    new one accepted; replay verifies every version against the key in force for it."""
    old, new = party_key("bank-a"), SigningKey.from_seed(b"\x42" * 32)
    first = _spec()
    rotated = first.model_copy(
        update={
            "identity": first.identity.model_copy(
                update={
                    "participant_keys": {
                        **first.identity.participant_keys,
                        "bank-a": new.public.text,
                    }
                }
            )
        }
    )
    broker = MemoryBroker()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    bank = MemoryTransport(broker, "bank-a")

    async def run(spec: TaskSpec, sends: list[tuple[str, SigningKey]], head: int) -> None:
        agg = MemoryTransport(broker, "fedq-aggregator")
        service = AggregatorService(
            spec, store, agg, ServiceConfig(signing_key=party_key("fedq-aggregator"))
        )
        stop = asyncio.Event()
        running = asyncio.create_task(service.run(stop))
        async with asyncio.timeout(10):
            await service.ready.wait()
        for i, (uid, key) in enumerate(sends):
            env = decode_update(_update(spec, None, value=0.01 * (i + 1), update_id=uid))
            body, _ = encode_update(
                dataclasses.replace(env, base_version=service.head_version), key
            )
            await bank.publish_update(spec.task_id, "bank-a", body, message_id=uid)
        async with asyncio.timeout(10):
            while service.stats.accepted + service.stats.refused_total < len(sends):
                await asyncio.sleep(0.01)
        stop.set()
        await running
        assert service.head_version == head

    await run(first, [("a1", old), ("a2", old), ("a3", new)], head=2)
    await run(rotated, [("b1", old), ("b2", new), ("b3", new)], head=4)
    decisions = {d["update_id"]: d for d in await store.decisions("credit") if "update_id" in d}
    assert decisions["a3"]["reason"] == Refusal.BAD_SIGNATURE  # the new key, too early
    assert decisions["b1"]["reason"] == Refusal.BAD_SIGNATURE  # the old key, too late
    history = await store.spec_history("credit")
    assert [v for v, _ in history] == [0, 2]
    # Replay checks versions 1-2 under the old key and 3-4 under the new one.
    updates = index_updates([b async for b in bank.read_audit("credit")])
    report = await replay(store, updates, "credit")
    assert report.ok, report.reason
    assert (report.checked, report.signatures) == (4, 4)
    # Revoked: a spec without bank-a's key refuses every update of bank-a.
    revoked = rotated.model_copy(
        update={
            "identity": rotated.identity.model_copy(
                update={"participant_keys": {"bank-b": party_key("bank-b").public.text}}
            )
        }
    )
    assert _admit(revoked, _update(revoked, new)) == Refusal.BAD_SIGNATURE
    await store.close()


def test_weak_and_shared_keys_are_refused_in_a_spec() -> None:
    small_order = "ed25519:" + "00" * 32  # anyone can sign under it
    with pytest.raises(SpecError, match="weak"):
        PublicKey.parse(small_order)
    with pytest.raises(SpecError, match="canonical"):
        PublicKey.parse("ed25519:ed" + "ff" * 30 + "7f")
    with pytest.raises(ValueError, match="weak"):
        IdentitySpec(participant_keys={"bank-a": small_order})
    with pytest.raises(ValueError, match="share a public key"):
        IdentitySpec(
            aggregator_key=party_key("bank-a").public.text,
            participant_keys={"bank-a": party_key("bank-a").public.text},
        )


def test_the_spec_hash_does_not_depend_on_the_order_of_its_maps() -> None:
    spec = _spec()
    keys = spec.identity.participant_keys
    shuffled = spec.model_copy(
        update={
            "identity": spec.identity.model_copy(
                update={"participant_keys": dict(reversed(list(keys.items())))}
            ),
            "declared_samples": {"bank-b": 5, "bank-a": 7},
        }
    )
    ordered = spec.model_copy(update={"declared_samples": {"bank-a": 7, "bank-b": 5}})
    assert shuffled == ordered
    assert shuffled.spec_hash() == ordered.spec_hash()
    assert TaskSpec.from_json(shuffled.to_json()).spec_hash() == shuffled.spec_hash()


async def _models(sub: Subscription[ModelDelivery], n: int) -> list[ModelEnvelope]:
    out = []
    async with asyncio.timeout(10):
        for _ in range(n):
            delivery = await sub.get()
            out.append(decode_model(delivery.body))
            await delivery.ack()
    return out


async def test_announcements_name_every_ancestor_at_start_and_repeat_the_head() -> None:
    spec = _spec()
    broker = MemoryBroker()
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    bank = MemoryTransport(broker, "bank-a")
    config = ServiceConfig(signing_key=party_key("fedq-aggregator"), reannounce_s=0.2)

    async def serve(sends: int) -> tuple[AggregatorService, asyncio.Event, asyncio.Task[None]]:
        service = AggregatorService(spec, store, MemoryTransport(broker, "agg"), config)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        async with asyncio.timeout(10):
            await service.ready.wait()
        for i in range(sends):
            env = decode_update(_update(spec, None, update_id=f"u{i}"))
            body, _ = encode_update(
                dataclasses.replace(env, base_version=service.head_version), party_key("bank-a")
            )
            await bank.publish_update(spec.task_id, "bank-a", body, message_id=f"u{i}")
            async with asyncio.timeout(10):
                while service.head_version < i + 1:
                    await asyncio.sleep(0.01)
        return service, stop, task

    _, stop, task = await serve(3)
    hashes = [(await store.get_version("credit", v)).version_hash for v in range(4)]
    stop.set()
    await task
    sub = await bank.consume_models("credit", "bank-a")
    await _models(sub, 1)  # whatever the first run left
    # A restarted aggregator announces its head 3 with every ancestor: 2, 1 and 0.
    _, stop, task = await serve(0)
    (start,) = await _models(sub, 1)
    assert (start.version, start.ancestors) == (3, (hashes[2], hashes[1], hashes[0]))
    assert ModelChecker(spec).check(start) is None
    # Nothing committed for reannounce_s: the head comes again, the same bytes.
    (again,) = await _models(sub, 1)
    assert (again.version, again.version_hash, again.signature) == (
        3,
        start.version_hash,
        start.signature,
    )
    # A worker whose spec is out of date stops after three models of the current spec.
    outdated = spec.model_copy(update={"training": spec.training.model_copy(update={"lr": 0.5})})
    await sub.close()
    worker = ParticipantWorker(
        outdated,
        WorkerConfig(participant="bank-a", signing_key=party_key("bank-a")),
        bank,
        pd.DataFrame({"x0": [0.0, 1.0] * 10, "x1": [1.0] * 20, "x2": [2.0] * 20, "y": [0, 1] * 10}),
    )
    with pytest.raises(ConfigError, match="spec file is out of date"):
        async with asyncio.timeout(10):
            await worker.run(asyncio.Event())
    assert worker.stats.models_refused == {"spec_mismatch": 3}
    assert worker.stats.published == 0
    stop.set()
    await task
    await store.close()
