"""Audit of secure aggregation: replay recomputes each secure version from the masked
updates and the unmask answers of the audit stream, bit for bit; it finds a bank whose
update the answers could unmask on its own; a counterfactual without a survivor is
refused, in one line."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
import torch
from click.testing import CliRunner

import aggregator.store
from aggregator.audit.replay import ReplayError, index_answers, index_updates, replay
from aggregator.privacy import BankAggregation
from aggregator.secagg import OpenCohort, SecureRecord, secure_step
from aggregator.store import RedisModelStore
from aggregator.strategies.base import AcceptedUpdate
from common.agreement import AgreementKey
from common.hashing import LineageEntry
from common.models import build_task_model, model_tensors
from common.secagg import Cohort, agreement_keys, element_bytes, reveal
from common.spec import (
    BankPrivacy,
    NumericFeature,
    PrivacySpec,
    SecureAggregationSpec,
    SyncSettings,
    TargetSpec,
    TaskSpec,
)
from common.transport.amqp import AmqpTransport
from common.wire import (
    MaskedBlock,
    Tensors,
    UnmaskAnswer,
    UnmaskRequest,
    UpdateEnvelope,
    decode_unmask_answer,
    encode_unmask_answer,
    encode_unmask_request,
    encode_update,
    peek_kind,
)
from fedq.cli import main
from participant.secagg import Masker, Revealer
from tests.helpers import party_key, secagg_identity

AGGREGATOR = "fedq-aggregator"


def secagg_spec(n: int = 10, **sa: object) -> TaskSpec:
    """A sync task of ``n`` banks with secure aggregation (``sa``: its settings)."""
    names = tuple(f"bank-{i:02d}" for i in range(n))
    return TaskSpec(
        task_id=f"sa{uuid.uuid4().hex[:10]}",
        features=tuple(NumericFeature(name=f"x{i}") for i in range(24)),
        target=TargetSpec(name="y"),
        participants=names,
        mode="sync",
        sync=SyncSettings(min_updates=2),
        identity=secagg_identity(names, AGGREGATOR),
        secure_aggregation=SecureAggregationSpec.model_validate(sa),
    )


@dataclass
class Chain:
    """Secure versions committed to a store, and the audit stream that made them."""

    spec: TaskSpec
    store: RedisModelStore
    #: The audit stream: every masked update and every unmask answer, in order.
    bodies: list[bytes] = field(default_factory=list)
    #: Per cohort: its open cohort (blocks of the banks that sent an update).
    cohorts: dict[int, OpenCohort] = field(default_factory=dict)
    #: Per cohort: every bank's block (also of those that dropped after masking).
    blocks: dict[int, dict[str, MaskedBlock]] = field(default_factory=dict)
    revealers: dict[str, Revealer] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.spec.task_id

    async def replay(self, bodies: list[bytes] | None = None, **kw: Any) -> Any:
        stream = self.bodies if bodies is None else bodies
        return await replay(
            self.store, index_updates(stream), self.task, answers=index_answers(stream), **kw
        )


def _deltas(spec: TaskSpec, seed: int) -> dict[str, Tensors]:
    g = torch.Generator().manual_seed(seed)
    like = model_tensors(build_task_model(spec))
    return {
        p: {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in like.items()}
        for p in spec.participants
    }


async def _secure_version(
    chain: Chain,
    number: int,
    arrive: list[str],
    answer: list[str] | None = None,
    bank: BankAggregation | None = None,
    lax: bool = False,
    fail: str | None = None,
) -> None:
    """Cohort ``number``: every bank masks, ``arrive`` send their masked update (signed,
    into the audit stream), the survivors in ``answer`` (default all) answer; the step
    is committed as version ``number + 1``. ``lax``: the banks answer whatever they
    are asked (:func:`_answer_anyway`). ``fail``: the sum is not trusted, for that
    reason; version ``number + 1`` is committed as the service commits a failed cohort
    (the head's parameters, an empty lineage, ``secagg_failed``)."""
    spec, store = chain.spec, chain.store
    head = (await store.get_params(chain.task, number)).tensors
    deltas = _deltas(spec, seed=number)
    samples = {p: 40 + 11 * i for i, p in enumerate(spec.participants)}
    oc = OpenCohort(spec, number=number, capacity=len(spec.participants))
    chain.blocks[number] = {}
    for p in spec.participants:
        masked, block = Masker(spec, p, party_key(p)).masked(deltas[p], number, number, samples[p])
        chain.blocks[number][p] = block
        if p not in arrive:
            continue  # dropped out after masking and sharing
        uid = uuid.uuid4().hex
        body, digest = encode_update(
            UpdateEnvelope(
                task=spec.task_id,
                participant=p,
                update_id=uid,
                base_version=number,
                num_samples=samples[p],
                tensors=masked,
                spec_hash=spec.spec_hash(),
                secagg=block,
            ),
            party_key(p),
        )
        chain.bodies.append(body)
        update = AcceptedUpdate(uid, p, number, 0, samples[p], masked, digest)
        assert oc.refusal(update, block) is None
        oc.add(update, block, now=0.0)
    oc.decision = oc.close()
    for request in oc.requests(created_at=0.0):
        if answer is not None and request.recipient not in answer:
            continue
        revealer = chain.revealers.setdefault(
            request.recipient,
            Revealer(spec, request.recipient, party_key(request.recipient), None),
        )
        if lax:
            body = _answer_anyway(spec, request)
        else:
            _, _, body = revealer.answer(encode_unmask_request(request, party_key(AGGREGATOR)))
        chain.bodies.append(body)
        decoded = decode_unmask_answer(body)
        oc.answers[decoded.participant] = decoded
    chain.cohorts[number] = oc
    if fail is not None:
        await _commit_failed(chain, number, head, oc.decision.to_json(), fail, bank)
        return
    step, record, noise = secure_step(spec, head, oc, bank)
    info: dict[str, Any] = {
        "strategy": "fedavg",
        "settings": {"weighted": True},
        "owner": AGGREGATOR,
        "fence": 1,
        "secagg": record.to_json(),
    }
    if noise is not None:
        info["privacy"] = noise.to_json()
    result = await store.commit(
        chain.task, parent=number, params=step.params, lineage=step.lineage, info=info
    )
    assert result.record is not None
    if bank is not None and noise is not None:
        bank.advance(noise)


async def _commit_failed(
    chain: Chain,
    number: int,
    params: Tensors,
    decision: dict[str, object] | None,
    reason: str,
    bank: BankAggregation | None,
    lineage: tuple[LineageEntry, ...] = (),
) -> None:
    """Version ``number + 1`` for a cohort whose sum is not trusted, as the service
    commits it (``_cohort_failed``): ``params`` (the head's, unless a test tampers),
    ``lineage`` (empty, unless a test tampers), the record, and with bank-level DP the
    record of an empty secure version (no noise drawn)."""
    failed: dict[str, object] = {"cohort": number, "reason": reason}
    if decision is not None:
        failed.update(decision)
    info: dict[str, Any] = {
        "strategy": "fedavg",
        "settings": {"weighted": True},
        "secagg_failed": failed,
        "owner": AGGREGATOR,
        "fence": None,
    }
    record = bank.secure(()) if bank is not None else None
    if record is not None:
        info["privacy"] = record.to_json()
    result = await chain.store.commit(
        chain.task, parent=number, params=params, lineage=lineage, info=info
    )
    assert result.record is not None
    if bank is not None and record is not None:
        bank.advance(record)


def _answer_anyway(spec: TaskSpec, request: UnmaskRequest) -> bytes:
    """What a bank that checks nothing answers to ``request`` (its own answer id, signed):
    the honest Revealer refuses a cohort below the minimum or a second question."""
    me = request.recipient
    shares = reveal(
        Cohort.of(spec, request.cohort),
        me,
        AgreementKey.from_signing_key(party_key(me)),
        agreement_keys(spec),
        request.ciphertexts,
        request.dropped,
    )
    answer = UnmaskAnswer(
        task=spec.task_id,
        participant=me,
        answer_id=Revealer(spec, me, party_key(me), None).answer_id(request.cohort),
        cohort=request.cohort,
        spec_hash=spec.spec_hash(),
        x=shares.x,
        b={k: element_bytes(v) for k, v in shares.b.items()},
        s={k: {j: element_bytes(v) for j, v in m.items()} for k, m in shares.s.items()},
        created_at=0.0,
    )
    return encode_unmask_answer(answer, party_key(me))


async def _chain(server: fakeredis.FakeServer | None = None) -> Chain:
    """Three secure versions of ten banks: all send; three drop (04, 05, 06); two drop
    (05, 09) and only six of the eight survivors answer (the threshold)."""
    spec = secagg_spec(10)
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=server or fakeredis.FakeServer()))
    await store.register_task(spec)
    await store.create_genesis(
        spec.task_id, model_tensors(build_task_model(spec)), info={"strategy": "genesis"}
    )
    chain = Chain(spec, store)
    names = list(spec.participants)
    await _secure_version(chain, 0, names)
    await _secure_version(chain, 1, [p for p in names if p not in names[4:7]])
    stayed = [p for p in names if p not in ("bank-05", "bank-09")]
    await _secure_version(chain, 2, stayed, answer=stayed[2:])
    return chain


@pytest.fixture
async def chain() -> AsyncIterator[Chain]:
    built = await _chain()
    yield built
    await built.store.close()


async def test_replay_verifies_every_secure_version_bit_for_bit(chain: Chain) -> None:
    # Answers are indexed apart from updates, never as updates.
    kinds = [peek_kind(b) for b in chain.bodies]
    assert kinds.count("ua") == 10 + 7 + 6
    updates, answers = index_updates(chain.bodies), index_answers(chain.bodies)
    assert len(updates) == 10 + 7 + 8
    assert all(peek_kind(b) == "u" for b in updates.values())
    assert len(answers) == 10 + 7 + 6
    report = await chain.replay()
    assert report.ok, report.reason
    assert report.checked == report.secure_versions == 3
    assert report.signatures == 25  # every masked update's signature
    assert report.answer_signatures == 23  # every answer used
    assert report.cohorts_checked == 3
    assert report.individually_unmasked == [] and report.cohort_problems == []
    assert report.note == ""
    head = await chain.store.get_version(chain.task, 3)
    assert report.param_hash == head.param_hash
    # The record of the version with three dropped: survivors, dropped, answers used.
    v2 = await chain.store.get_version(chain.task, 2)
    record = SecureRecord.from_json(v2.info["secagg"])
    assert record.decision.dropped == ("bank-04", "bank-05", "bank-06")
    assert [e.participant for e in v2.lineage] == list(record.decision.survivors)
    assert all(e.weight == record.scale * record.weights[e.participant] for e in v2.lineage)
    # A window replays too.
    part = await chain.replay(from_version=1, to_version=2)
    assert part.ok and part.checked == 1, part.reason
    # Without the answers, the version cannot be recomputed: named like a missing update.
    bare = await replay(chain.store, index_updates(chain.bodies), chain.task)
    assert bare.first_bad_version == 1
    assert "is not in the audit stream" in bare.reason and "unmask answer" in bare.reason
    # A missing masked update is named too.
    victim = v2.lineage[3]
    without = [b for b in chain.bodies if b != updates[victim.update_id]]
    gone = await chain.replay(without)
    assert gone.first_bad_version == 2
    assert f"update {victim.update_id} ({victim.participant}) is not in the audit stream" in (
        gone.reason
    )


def _tampered(body: bytes, victim: str) -> bytes:
    """The answer with its share of ``victim``'s self seed changed, re-signed by its bank."""
    a = decode_unmask_answer(body)
    share = a.b[victim]
    changed = dataclasses.replace(a, b={**a.b, victim: bytes([share[0] ^ 1]) + share[1:]})
    return encode_unmask_answer(changed, party_key(a.participant))


@pytest.mark.parametrize("number", [1, 2], ids=["more-than-t-answers", "exactly-t-answers"])
async def test_a_tampered_answer_resigned_by_its_bank_fails_the_version(
    chain: Chain, number: int
) -> None:
    oc = chain.cohorts[number]
    assert oc.decision is not None
    liar = sorted(oc.answers)[1]
    original = next(
        b
        for b in chain.bodies
        if peek_kind(b) == "ua" and decode_unmask_answer(b).answer_id == oc.answers[liar].answer_id
    )
    forged = _tampered(original, oc.decision.survivors[0])
    bodies = [forged if b == original else b for b in chain.bodies]
    report = await chain.replay(bodies)
    assert not report.ok
    assert report.first_bad_version == number + 1
    assert "unmask" in report.reason or "sum hash" in report.reason, report.reason
    assert report.checked == number
    # Not signed by the bank: named as such.
    unsigned = dataclasses.replace(decode_unmask_answer(forged), signature=None)
    bodies = [encode_unmask_answer(unsigned) if b == original else b for b in chain.bodies]
    report = await chain.replay(bodies)
    assert report.first_bad_version == number + 1
    assert f"({liar}): unsigned" in report.reason


def _second_question(chain: Chain, number: int, victim: str, me: str) -> bytes:
    """``me``'s answer (as a bank that checks nothing gives it) to a second question in
    cohort ``number`` that names the survivor ``victim`` dropped: ``me``'s shares of
    ``victim``'s pair seeds, under the same answer id as its first answer."""
    oc = chain.cohorts[number]
    assert oc.decision is not None
    survivors = tuple(p for p in oc.decision.survivors if p != victim)
    dropped = tuple(sorted((*oc.decision.dropped, victim)))
    request = UnmaskRequest(
        chain.task,
        me,
        number,
        survivors,
        dropped,
        {s: chain.blocks[number][s].shares[me] for s in survivors},
        0.0,
    )
    return _answer_anyway(chain.spec, request)


#: Cohort 1's survivors but bank-07: six, the threshold of ten banks.
SIX = ["bank-00", "bank-01", "bank-02", "bank-03", "bank-08", "bank-09"]


async def test_answers_revealing_a_survivors_pair_seeds_are_reported(chain: Chain) -> None:
    # Cohort 1 had 04, 05, 06 dropped. A second question to a survivor names bank-07
    # dropped too, though it survived: a bank that answers it (the honest Revealer
    # refuses) gives its shares of bank-07's pair seeds, while the first answers gave
    # shares of bank-07's self seed. With t = 6 banks doing so, bank-07's update could
    # be unmasked; with fewer, it could not.
    assert Cohort.of(chain.spec, 1).threshold == 6
    extras = [_second_question(chain, 1, "bank-07", me) for me in SIX]
    aid = decode_unmask_answer(extras[0]).answer_id
    assert aid == chain.cohorts[1].answers["bank-00"].answer_id  # the id of its first answer
    assert len(index_answers([*chain.bodies, *extras])[aid]) == 2
    fewer = await chain.replay([*chain.bodies, *extras[:5]])
    assert fewer.individually_unmasked == [] and fewer.cohort_problems == [], fewer.note
    assert fewer.ok, fewer.reason
    report = await chain.replay([*chain.bodies, *extras])
    # Every version is still recomputed bit for bit (the answer the version used is the
    # one that answers its decision), but the promise was broken.
    assert report.first_bad_version is None and report.checked == 3, report.reason
    assert report.individually_unmasked == [
        "cohort 1: bank-07 (seed shares from bank-00, bank-01, bank-02, bank-03, bank-07, "
        "bank-08, bank-09; pair-seed shares from bank-00, bank-01, bank-02, bank-03, "
        "bank-08, bank-09)"
    ]
    assert report.cohort_problems == []
    assert not report.ok
    assert "cohort 1: bank-07 (seed shares from" in report.note and "unmasked" in report.note


async def test_one_answer_naming_a_bank_both_ways_cannot_frame_the_aggregator(
    chain: Chain,
) -> None:
    # bank-00 alone signs an answer that names bank-07 in b and, with a made-up share,
    # inside s: one bank's word cannot unmask anything (t shares of each kind are
    # needed), but no honest bank gives that answer.
    original = next(
        b
        for b in chain.bodies
        if peek_kind(b) == "ua"
        and decode_unmask_answer(b).answer_id == chain.cohorts[1].answers["bank-00"].answer_id
    )
    a = decode_unmask_answer(original)
    assert "bank-07" in a.b
    first = sorted(a.s)[0]
    crafted = dataclasses.replace(
        a, s={**a.s, first: {**a.s[first], "bank-07": element_bytes(12345)}}
    )
    forged = encode_unmask_answer(crafted, party_key("bank-00"))
    report = await chain.replay([*chain.bodies, forged])
    assert report.first_bad_version is None and report.checked == 3, report.reason
    assert report.individually_unmasked == []
    assert report.cohort_problems == [
        "cohort 1: bank-00 answered with shares of both bank-07's self seed and a pair seed "
        "with it (no honest bank gives both)"
    ]
    assert not report.ok
    assert "bank-00 answered with shares of both bank-07's" in report.note


async def test_a_cohort_below_its_minimum_and_an_answer_from_a_non_survivor() -> None:
    spec = secagg_spec(4, threshold=2, min_cohort=3)
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    await store.register_task(spec)
    await store.create_genesis(
        spec.task_id, model_tensors(build_task_model(spec)), info={"strategy": "genesis"}
    )
    chain = Chain(spec, store)
    # two survivors: the service and honest banks would refuse
    await _secure_version(chain, 0, ["bank-00", "bank-01"], lax=True)
    report = await chain.replay()
    assert report.first_bad_version is None and report.checked == 1, report.reason
    assert report.cohort_problems == [
        "cohort 0: 2 survivors made version 1, below the minimum cohort 3"
    ]
    assert not report.ok
    # A dropped bank answers a question that names it a survivor (its own block's
    # shares): it is no survivor of the recorded decision; and its self seed, revealed
    # beside its pair seeds, would unmask its (withheld) update.
    me = "bank-02"
    named = ("bank-00", "bank-01", me)
    request = UnmaskRequest(
        spec.task_id,
        me,
        0,
        named,
        ("bank-03",),
        {s: chain.blocks[0][s].shares[me] for s in named},
        0.0,
    )
    extra = _answer_anyway(spec, request)
    report = await chain.replay([*chain.bodies, extra])
    assert (
        "cohort 0: bank-02 answered, but the recorded decision names it no survivor"
        in report.cohort_problems
    )
    # One share of its self seed (its own): below the threshold 2, nothing unmasked.
    assert report.individually_unmasked == []
    # bank-00 answers the same question: two shares of bank-02's self seed, beside the
    # two shares of its pair seeds that bank-00's and bank-01's first answers gave.
    request = dataclasses.replace(
        request,
        recipient="bank-00",
        ciphertexts={s: chain.blocks[0][s].shares["bank-00"] for s in named},
    )
    second = _answer_anyway(spec, request)
    report = await chain.replay([*chain.bodies, extra, second])
    assert report.individually_unmasked == [
        "cohort 0: bank-02 (seed shares from bank-00, bank-02; pair-seed shares from "
        "bank-00, bank-01)"
    ]
    await store.close()


async def test_secure_versions_with_bank_level_dp_replay_with_their_recorded_noise() -> None:
    settings = BankPrivacy(clip=0.5, noise_multiplier=0.8)
    spec = secagg_spec(6).model_copy(update={"privacy": PrivacySpec(bank=settings)})
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    store = RedisModelStore(client)
    await store.register_task(spec)
    await store.create_genesis(
        spec.task_id, model_tensors(build_task_model(spec)), info={"strategy": "genesis"}
    )
    chain = Chain(spec, store)
    bank = BankAggregation(settings)
    names = list(spec.participants)
    await _secure_version(chain, 0, names, bank=bank)
    await _secure_version(chain, 1, names[:4], bank=bank)
    report = await chain.replay()
    assert report.ok, report.reason
    assert report.secure_versions == report.private_versions == 2
    # Another seed is another noise: the version no longer matches.
    key = store.keys.meta(spec.task_id, 2)
    original = await client.get(key)
    meta = json.loads(original or b"{}")
    meta["info"]["privacy"]["seed"] += 1
    await client.set(key, json.dumps(meta))
    bad = await chain.replay()
    assert bad.first_bad_version == 2
    assert "replayed parameters differ" in bad.reason
    # A recorded noise std that the lineage does not give is named.
    meta["info"]["privacy"]["seed"] -= 1
    meta["info"]["privacy"]["noise_std"] *= 0.5
    await client.set(key, json.dumps(meta))
    bad = await chain.replay()
    assert bad.first_bad_version == 2 and "noise std" in bad.reason, bad.reason
    await client.set(key, original or b"")
    assert (await chain.replay()).ok
    await store.close()


async def test_exclude_refuses_a_survivor_and_rebuilds_around_a_bank_that_dropped(
    chain: Chain,
) -> None:
    with pytest.raises(ReplayError) as err:
        await chain.replay(exclude="bank-01")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("version 1 was made by secure aggregation")
    assert "never saw bank-01's update on its own" in message
    assert "cannot be computed from the masked updates" in message
    assert "only bank-01's own records, or retraining without it, could say" in message
    # bank-05 dropped out of cohorts 1 and 2: from version 1 on, the chain without it is
    # the chain itself (the same unmasked sums on the same parents).
    report = await chain.replay(from_version=1, exclude="bank-05")
    assert report.ok and report.checked == 2 and report.left_out == 0, report.reason
    assert report.param_hash == (await chain.store.get_version(chain.task, 3)).param_hash
    with pytest.raises(ReplayError, match="version 3 was made by secure aggregation"):
        await chain.replay(from_version=2, exclude="bank-00")


async def _failed_chain(dp: bool, server: fakeredis.FakeServer | None = None) -> Chain:
    """Six banks: cohort 0 (five survivors, all answered) fails, version 1 keeps the
    genesis parameters; cohort 1 (bank-00 dropped) makes version 2 by secure
    aggregation. ``dp``: with bank-level DP (version 1 still counts as private)."""
    spec = secagg_spec(6)
    bank: BankAggregation | None = None
    if dp:
        settings = BankPrivacy(clip=0.5, noise_multiplier=0.8)
        spec = spec.model_copy(update={"privacy": PrivacySpec(bank=settings)})
        bank = BankAggregation(settings)
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=server or fakeredis.FakeServer()))
    await store.register_task(spec)
    await store.create_genesis(
        spec.task_id, model_tensors(build_task_model(spec)), info={"strategy": "genesis"}
    )
    chain = Chain(spec, store)
    names = list(spec.participants)
    await _secure_version(chain, 0, names[:5], bank=bank, fail="the share of x is inconsistent")
    await _secure_version(chain, 1, names[1:], bank=bank)
    return chain


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "bank-dp"])
async def test_a_failed_cohort_replays_as_its_parents_parameters(dp: bool) -> None:
    chain = await _failed_chain(dp)
    store, task = chain.store, chain.task
    v0, v1 = await store.get_version(task, 0), await store.get_version(task, 1)
    assert v1.lineage == () and v1.param_hash == v0.param_hash
    assert v1.info["secagg_failed"]["dropped"] == ["bank-05"]
    report = await chain.replay()
    assert report.ok, report.reason
    assert report.checked == 2 and report.failed_cohorts == 1 and report.secure_versions == 1
    assert report.private_versions == (2 if dp else 0)
    # The failed cohort's survivors answered (they were asked): no problem, no minimum.
    assert report.cohort_problems == [] and report.individually_unmasked == []
    assert report.cohorts_checked == 2
    assert report.param_hash == (await store.get_version(task, 2)).param_hash
    # A window starting after it, and one ending on it.
    assert (await chain.replay(from_version=1)).ok
    only = await chain.replay(to_version=1)
    assert only.ok and only.checked == only.failed_cohorts == 1, only.reason
    # bank-00 has no update in version 2 and none (no sum) in version 1: the chain
    # without it is the chain itself.
    without = await chain.replay(exclude="bank-00")
    assert without.ok and without.checked == 2 and without.failed_cohorts == 1, without.reason
    assert without.param_hash == report.param_hash
    await store.close()


async def _tampered_failed(dp: bool, **change: Any) -> Any:
    """Replay of a chain whose failed version 1 was committed with ``change``: other
    ``params`` (a function of the genesis ones), a ``lineage``, or a changed privacy
    record (``privacy``: field -> value)."""
    spec = secagg_spec(4)
    bank: BankAggregation | None = None
    if dp:
        settings = BankPrivacy(clip=0.5, noise_multiplier=0.8)
        spec = spec.model_copy(update={"privacy": PrivacySpec(bank=settings)})
        bank = BankAggregation(settings)
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    store = RedisModelStore(client)
    await store.register_task(spec)
    genesis = model_tensors(build_task_model(spec))
    await store.create_genesis(spec.task_id, genesis, info={"strategy": "genesis"})
    chain = Chain(spec, store)
    names = list(spec.participants)
    params = change.get("params", lambda p: p)(genesis)
    lineage: tuple[LineageEntry, ...] = change.get("lineage", ())
    await _commit_failed(chain, 0, params, None, "sum out of range", bank, lineage)
    if "privacy" in change:
        key = store.keys.meta(spec.task_id, 1)
        meta = json.loads(await client.get(key) or b"{}")
        meta["info"]["privacy"].update(change["privacy"])
        await client.set(key, json.dumps(meta))
    await _secure_version(chain, 1, names, bank=bank)
    try:
        return await chain.replay()
    finally:
        await store.close()


async def test_a_tampered_failed_cohort_version_is_reported() -> None:
    moved = await _tampered_failed(False, params=lambda p: {k: v + 1e-3 for k, v in p.items()})
    assert moved.first_bad_version == 1 and moved.checked == 0
    assert "replayed parameters differ from the recorded parameter hash" in moved.reason
    entry = LineageEntry("u-1", "bank-01", 0, 0, 1.0, b"\x00" * 32)
    named = await _tampered_failed(False, lineage=(entry,))
    assert named.first_bad_version == 1
    assert "records failed cohort 0, but its lineage names 1 updates" in named.reason
    noisy = await _tampered_failed(True, privacy={"noise_std": 0.01})
    assert noisy.first_bad_version == 1 and "noise std" in noisy.reason, noisy.reason
    uncounted = await _tampered_failed(True, privacy={"versions": 0})
    assert uncounted.first_bad_version == 1
    assert "private version count" in uncounted.reason, uncounted.reason
    moved = await _tampered_failed(True, params=lambda p: {k: v + 1e-3 for k, v in p.items()})
    assert moved.first_bad_version == 1
    assert "replayed parameters differ" in moved.reason, moved.reason


async def test_a_failed_cohort_without_dp_under_a_dp_spec_is_reported() -> None:
    spec = secagg_spec(4).model_copy(
        update={"privacy": PrivacySpec(bank=BankPrivacy(clip=0.5, noise_multiplier=0.8))}
    )
    store = RedisModelStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))
    await store.register_task(spec)
    genesis = model_tensors(build_task_model(spec))
    await store.create_genesis(spec.task_id, genesis, info={"strategy": "genesis"})
    chain = Chain(spec, store)
    await _commit_failed(chain, 0, genesis, None, "sum out of range", None)
    report = await chain.replay()
    assert report.first_bad_version == 1
    assert "made without bank-level DP" in report.reason
    await store.close()


class _Stream:
    """A stand-in for the broker: ``fedq replay`` reads the audit stream from it."""

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies = bodies

    async def read_audit(self, task: str) -> AsyncIterator[bytes]:
        for body in self.bodies:
            yield body

    async def close(self) -> None: ...


def test_cli_replay_json_and_audit_show_give_the_secure_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = fakeredis.FakeServer()

    async def build() -> Chain:
        built = await _chain(server)
        await built.store.close()
        return built

    chain = asyncio.run(build())
    stream = _Stream(chain.bodies)

    async def connect(url: str, **kw: Any) -> _Stream:
        return stream

    monkeypatch.setattr(
        aggregator.store, "connect_redis", lambda _: fakeredis.FakeAsyncRedis(server=server)
    )
    monkeypatch.setattr(AmqpTransport, "connect", connect)
    urls = ["--amqp-url", "amqp://x/", "--redis-url", "redis://x"]
    result = CliRunner().invoke(main, ["replay", "--task", chain.task, "--json", *urls])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout[result.stdout.index("{") :])
    assert doc["ok"] is True
    assert doc["secure_versions"] == 3 and doc["cohorts_checked"] == 3
    assert doc["answer_signatures"] == 23
    assert doc["individually_unmasked"] == [] and doc["cohort_problems"] == []
    text = CliRunner().invoke(main, ["replay", "--task", chain.task, *urls])
    assert text.exit_code == 0, text.output
    assert "3 by secure aggregation (23 unmask answers verified" in " ".join(text.output.split())

    # The stream with answers that unmask a bank: exit 1, and the bank named.
    oc = chain.cohorts[1]
    extras = [_second_question(chain, 1, "bank-07", me) for me in SIX]
    stream.bodies = [*chain.bodies, *extras]
    bad = CliRunner().invoke(main, ["replay", "--task", chain.task, "--json", *urls])
    assert bad.exit_code == 1, bad.output
    doc = json.loads(bad.stdout[bad.stdout.index("{") :])
    assert doc["ok"] is False and doc["first_bad_version"] is None
    assert [u.split(" (")[0] for u in doc["individually_unmasked"]] == ["cohort 1: bank-07"]
    assert "cohort 1: bank-07 (seed shares from" in doc["note"]
    text = CliRunner().invoke(main, ["replay", "--task", chain.task, *urls])
    assert text.exit_code == 1
    assert "individually unmasked: cohort 1: bank-07" in " ".join(text.output.split())
    stream.bodies = chain.bodies

    # --exclude a survivor: one line, exit status 2, no traceback.
    refused = CliRunner().invoke(
        main, ["replay", "--task", chain.task, "--exclude", "bank-03", *urls]
    )
    assert refused.exit_code == 2
    assert "Traceback" not in refused.output
    line = " ".join(refused.stderr.split())
    assert line.startswith("error: version 1 was made by secure aggregation")
    assert "the model without bank-03 cannot be computed from the masked updates" in line

    # audit show: cohort, survivors, dropped, answers used, sum hash.
    args = ["audit", "show", "--task", chain.task, "--version", "2", "--redis-url", "redis://x"]
    shown = CliRunner().invoke(main, [*args, "--json"])
    assert shown.exit_code == 0, shown.output
    sa = json.loads(shown.output)["secagg"]
    assert sa["cohort"] == 1
    assert sa["dropped"] == ["bank-04", "bank-05", "bank-06"]
    assert len(sa["survivors"]) == 7 and len(sa["answers"]) == 7
    shown = CliRunner().invoke(main, args)
    assert shown.exit_code == 0, shown.output
    out = " ".join(shown.output.split())
    assert "secure aggregation: cohort 1" in out
    assert "dropped (3) bank-04, bank-05, bank-06" in out
    assert "survivors (7) bank-00, bank-01, bank-02, bank-03, bank-07, bank-08, bank-09" in out
    assert f"answers used (7) bank-00 ({oc.answers['bank-00'].answer_id})" in out
    assert f"sum hash {sa['sum_hash']}" in out


def test_cli_audit_show_and_replay_give_a_failed_cohort(monkeypatch: pytest.MonkeyPatch) -> None:
    server = fakeredis.FakeServer()

    async def build() -> Chain:
        built = await _failed_chain(False, server)
        await built.store.close()
        return built

    chain = asyncio.run(build())
    stream = _Stream(chain.bodies)

    async def connect(url: str, **kw: Any) -> _Stream:
        return stream

    monkeypatch.setattr(
        aggregator.store, "connect_redis", lambda _: fakeredis.FakeAsyncRedis(server=server)
    )
    monkeypatch.setattr(AmqpTransport, "connect", connect)
    urls = ["--amqp-url", "amqp://x/", "--redis-url", "redis://x"]
    result = CliRunner().invoke(main, ["replay", "--task", chain.task, "--json", *urls])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout[result.stdout.index("{") :])
    assert doc["ok"] is True and doc["failed_cohorts"] == 1 and doc["secure_versions"] == 1
    text = CliRunner().invoke(main, ["replay", "--task", chain.task, *urls])
    assert text.exit_code == 0, text.output
    assert "1 failed cohorts (parameters unchanged)" in " ".join(text.output.split())

    args = ["audit", "show", "--task", chain.task, "--version", "1", "--redis-url", "redis://x"]
    shown = CliRunner().invoke(main, [*args, "--json"])
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.output)
    assert doc["secagg"] is None
    # (the decision may also name each survivor's update id: "updates")
    assert {k: v for k, v in doc["secagg_failed"].items() if k != "updates"} == {
        "cohort": 0,
        "reason": "the share of x is inconsistent",
        "survivors": ["bank-00", "bank-01", "bank-02", "bank-03", "bank-04"],
        "dropped": ["bank-05"],
    }
    shown = CliRunner().invoke(main, args)
    assert shown.exit_code == 0, shown.output
    out = " ".join(shown.output.split())
    assert "secure aggregation: cohort 0 FAILED, parameters unchanged (no update)" in out
    assert "reason the share of x is inconsistent" in out
    assert "survivors (5) bank-00, bank-01, bank-02, bank-03, bank-04" in out
    assert "dropped (1) bank-05" in out
    # A version made by secure aggregation has no failed record.
    args[args.index("1")] = "2"
    doc = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert doc["secagg_failed"] is None and doc["secagg"]["cohort"] == 1
