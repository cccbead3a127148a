"""Secure aggregation's arithmetic and messages (common/secagg.py, aggregator/secagg.py,
participant/secagg.py): masks cancel, dropouts are recovered, nothing single is revealed."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from aggregator import aggregate
from aggregator.secagg import OpenCohort, secure_params, secure_step
from aggregator.strategies.base import AcceptedUpdate
from common.agreement import AgreementKey
from common.errors import ConfigError, SecAggError
from common.models import build_task_model, model_tensors
from common.secagg import (
    Cohort,
    agreement_keys,
    combine,
    dequantize,
    element_bytes,
    mask,
    quantization_bound,
    quantize,
    reveal,
    share,
    unmasked_sum,
)
from common.signing import PublicKey
from common.spec import NumericFeature, SecureAggregationSpec, SyncSettings, TargetSpec, TaskSpec
from common.wire import (
    MaskedBlock,
    UnmaskAnswer,
    UnmaskRequest,
    UpdateEnvelope,
    decode_unmask_answer,
    decode_update,
    encode_unmask_request,
    encode_update,
    peek_kind,
    update_signing_message,
)
from fedq.cli import main
from participant.secagg import Masker, Revealer
from tests.helpers import party_key, secagg_identity

AGGREGATOR = "fedq-aggregator"


def secagg_spec(n: int = 10, **sa: object) -> TaskSpec:
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


def deltas_for(spec: TaskSpec, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    like = model_tensors(build_task_model(spec))
    return {
        p: {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in like.items()}
        for p in spec.participants
    }


def run_cohort(
    spec: TaskSpec,
    deltas: dict[str, dict[str, torch.Tensor]],
    samples: dict[str, int],
    *,
    arrive: list[str],
    answer: list[str] | None = None,
) -> tuple[OpenCohort, dict[str, torch.Tensor]]:
    """Every bank masks (so every bank has 'shared keys'); only ``arrive`` send; the
    survivors in ``answer`` (default all) answer the unmask requests."""
    head = model_tensors(build_task_model(spec))
    oc = OpenCohort(spec, number=0, capacity=len(spec.participants))
    for p in spec.participants:
        masked, block = Masker(spec, p, party_key(p)).masked(deltas[p], 0, 0, samples[p])
        if p not in arrive:
            continue  # dropped out after masking and sharing: its update never arrives
        update = AcceptedUpdate(
            update_id=uuid.uuid4().hex,
            participant=p,
            base_version=0,
            staleness=0,
            num_samples=samples[p],
            delta=masked,
            content_hash=bytes(32),
        )
        assert oc.refusal(update, block) is None
        oc.add(update, block, now=0.0)
    oc.decision = oc.close()
    aggregator = party_key(AGGREGATOR)
    for request in oc.requests(created_at=0.0):
        if answer is not None and request.recipient not in answer:
            continue
        body = encode_unmask_request(request, aggregator)
        revealer = Revealer(
            spec, request.recipient, party_key(request.recipient), aggregator.public
        )
        _, _, answer_body = revealer.answer(body)
        decoded = decode_unmask_answer(answer_body)
        key = PublicKey.parse(spec.identity.participant_keys[request.recipient])
        assert oc.answer_refusal(decoded, spec.spec_hash(), key) is None
        oc.answers[decoded.participant] = decoded
    return oc, head


def test_ten_banks_three_drop_out_after_sharing_keys_the_round_is_the_plain_fedavg_of_seven() -> (
    None
):
    spec = secagg_spec(10)
    deltas = deltas_for(spec)
    samples = {p: 50 + 13 * i for i, p in enumerate(spec.participants)}
    stayed = list(spec.participants[:4] + spec.participants[7:])
    oc, head = run_cohort(spec, deltas, samples, arrive=stayed)
    assert oc.decision is not None and oc.decision.dropped == spec.participants[4:7]
    assert oc.ready
    step, record, _ = secure_step(spec, head, oc)
    # The plain FedAvg of the seven that stayed, from their unmasked deltas.
    raw = [float(samples[p]) for p in sorted(stayed)]
    plain = aggregate.weighted_sum(
        head, [deltas[p] for p in sorted(stayed)], aggregate.round_weights(raw)
    )
    sa = spec.secure_aggregation
    assert sa is not None
    bound = quantization_bound(len(stayed), sa.fraction_bits) * record.scale
    for name in head:
        diff = (step.params[name].double() - plain[name].double()).abs().max().item()
        ulp = float(np.spacing(np.float32(plain[name].abs().max().item())))
        assert diff <= bound + ulp, (name, diff, bound)
    assert [e.participant for e in step.lineage] == sorted(stayed)
    assert sum(e.weight for e in step.lineage) == pytest.approx(1.0)
    assert record.decision.survivors == tuple(sorted(stayed))


def test_the_aggregator_view_of_each_update_is_uniform_noise_while_the_sum_is_exact() -> None:
    spec = secagg_spec(5)
    sa = spec.secure_aggregation
    assert sa is not None
    cohort = Cohort.of(spec, 3)
    keys = agreement_keys(spec)
    rng = np.random.default_rng(7)
    d = 20_000
    truth = {p: rng.normal(0, 0.05, d) for p in spec.participants}
    quantized, outs = {}, {}
    for p in spec.participants:
        x = quantize({"w": torch.from_numpy(truth[p])}, 1.0, sa)
        quantized[p] = x
        outs[p] = mask(cohort, p, AgreementKey.from_signing_key(party_key(p)), keys, x)
    for p in spec.participants:
        seen = outs[p].masked.astype(np.float64) / 2.0**64  # the aggregator's view, in [0, 1)
        r = np.corrcoef(seen, truth[p])[0, 1]
        assert abs(r) < 0.03, (p, r)  # ~ N(0, 1/sqrt(d)): about 0.007
        # uniform on [0, 1): mean 1/2, variance 1/12, the sign bit fair
        assert abs(seen.mean() - 0.5) < 0.01
        assert abs(seen.var() - 1 / 12) < 0.005
        top = (outs[p].masked >> np.uint64(63)).astype(np.float64)
        assert abs(top.mean() - 0.5) < 0.02
        # the unmasked quantized update is far from uniform (values near 0 or 2^64)
        plain = quantized[p].astype(np.float64) / 2.0**64
        assert abs(plain.var() - 1 / 12) > 0.05
    # The sum, unmasked from t answers (no dropout: only the self masks go), is the
    # exact integer sum of the quantized inputs, and within the stated bound of the
    # true sum of the float deltas.
    answers = [
        reveal(
            cohort,
            p,
            AgreementKey.from_signing_key(party_key(p)),
            keys,
            {s: outs[s].shares[p] for s in spec.participants},
            (),
        )
        for p in spec.participants[: cohort.threshold]
    ]
    total = unmasked_sum(cohort, {p: outs[p].masked for p in spec.participants}, answers, ())
    expected = np.zeros(d, dtype=np.uint64)
    for p in spec.participants:
        expected += quantized[p]
    assert np.array_equal(total, expected)
    error = np.abs(dequantize(total, sa.fraction_bits) - sum(truth.values())).max()
    assert error <= quantization_bound(5, sa.fraction_bits)
    assert error > 0  # the bound is not vacuous: rounding does change the values


def test_any_t_survivors_answering_suffice_and_fewer_reveal_nothing() -> None:
    spec = secagg_spec(10)
    deltas = deltas_for(spec, seed=1)
    samples = dict.fromkeys(spec.participants, 100)
    stayed = list(spec.participants[:8])
    t = Cohort.of(spec, 0).threshold
    assert t == 6
    # two survivors go silent during unmasking: six answers are enough
    oc, head = run_cohort(spec, deltas, samples, arrive=stayed, answer=stayed[2:])
    assert len(oc.answers) == t and oc.ready
    step, _, _ = secure_step(spec, head, oc)
    full, _, _ = secure_step(spec, head, run_cohort(spec, deltas, samples, arrive=stayed)[0])
    for name in head:  # the same sum, bit for bit, whichever t answered
        assert torch.equal(step.params[name], full.params[name])
    # with t - 1 answers the cohort is not ready and the step refuses
    oc5, _ = run_cohort(spec, deltas, samples, arrive=stayed, answer=stayed[3:])
    assert not oc5.ready
    with pytest.raises(SecAggError, match="not ready"):
        secure_step(spec, head, oc5)


@pytest.mark.parametrize("position", [0, -1])
def test_a_wrong_share_among_more_than_t_answers_is_caught(position: int) -> None:
    """With more than t answers every share is checked against the others: a wrong one
    anywhere (among the first t or after them) fails the sum, blaming no one (which of
    the disagreeing shares is wrong cannot be told)."""
    spec = secagg_spec(6)  # t = 4; five survivors answer
    deltas = deltas_for(spec, seed=2)
    samples = dict.fromkeys(spec.participants, 10)
    oc, head = run_cohort(spec, deltas, samples, arrive=list(spec.participants[:5]))
    assert len(oc.answers) == 5 > oc.cohort.threshold
    liar = sorted(oc.answers)[position]
    bad = oc.answers[liar]
    victim = sorted(bad.b)[0]
    flipped = bytes([bad.b[victim][0] ^ 1]) + bad.b[victim][1:]
    oc.answers[liar] = dataclasses.replace(bad, b={**bad.b, victim: flipped})
    with pytest.raises(SecAggError, match="inconsistent") as err:
        secure_step(spec, head, oc)
    assert "member" not in str(err.value)


def test_a_bank_answers_one_cohort_once_and_refuses_a_different_question() -> None:
    spec = secagg_spec(4)
    cohort = Cohort.of(spec, 0)
    keys = agreement_keys(spec)
    sa = spec.secure_aggregation
    assert sa is not None
    outs = {
        p: mask(
            cohort,
            p,
            AgreementKey.from_signing_key(party_key(p)),
            keys,
            quantize({"w": torch.ones(8)}, 1.0, sa),
        )
        for p in spec.participants
    }
    me = spec.participants[0]
    aggregator = party_key(AGGREGATOR)
    revealer = Revealer(spec, me, party_key(me), aggregator.public)

    def request(survivors: tuple[str, ...]) -> bytes:
        dropped = tuple(p for p in spec.participants if p not in survivors)
        return encode_unmask_request(
            UnmaskRequest(
                spec.task_id,
                me,
                0,
                survivors,
                dropped,
                {s: outs[s].shares[me] for s in survivors},
                0.0,
            ),
            aggregator,
        )

    first = request(spec.participants[:3])
    id1, _, body1 = revealer.answer(first)
    id2, _, body2 = revealer.answer(first)  # asked again (a restarted aggregator)
    assert id1 == id2
    a1, a2 = decode_unmask_answer(body1), decode_unmask_answer(body2)
    assert (a1.b, a1.s) == (a2.b, a2.s)
    # the same cohort with bank 2 now "dropped": its pair seeds would unmask it
    with pytest.raises(SecAggError, match="refused"):
        revealer.answer(request(spec.participants[:2] + spec.participants[3:]))
    # a cohort below the minimum (a majority of 4: 3) is never unmasked by an honest bank
    small = Revealer(spec, me, party_key(me), aggregator.public)
    with pytest.raises(SecAggError, match="below the minimum cohort"):
        small.answer(request(spec.participants[:2]))
        # a request the aggregator did not sign
    other = Revealer(spec, me, party_key(me), aggregator.public)
    unsigned = encode_unmask_request(
        UnmaskRequest(
            spec.task_id,
            me,
            0,
            spec.participants[:3],
            spec.participants[3:],
            {s: outs[s].shares[me] for s in spec.participants[:3]},
            0.0,
        )
    )
    with pytest.raises(SecAggError, match="not signed"):
        other.answer(unsigned)


def test_masked_update_wire_round_trip_and_signature_covers_the_shares() -> None:
    spec = secagg_spec(3)
    p = spec.participants[0]
    delta = deltas_for(spec)[p]
    masked, block = Masker(spec, p, party_key(p)).masked(delta, 5, 4, 70)
    assert all(t.dtype == torch.int64 for t in masked.values())
    env = UpdateEnvelope(
        task=spec.task_id,
        participant=p,
        update_id=uuid.uuid4().hex,
        base_version=4,
        num_samples=70,
        tensors=masked,
        spec_hash=spec.spec_hash(),
        secagg=block,
    )
    body, _ = encode_update(env, party_key(p))
    assert peek_kind(body) == "u"
    got = decode_update(body)
    assert got.secagg == block
    key = PublicKey.parse(spec.identity.participant_keys[p])
    assert got.signature is not None
    assert key.verify(got.signature, update_signing_message(got))
    swapped = dataclasses.replace(
        got,
        secagg=MaskedBlock(block.cohort, block.weight, {**block.shares, p: b"x" * 40}),
    )
    assert not key.verify(got.signature, update_signing_message(swapped))
    heavier = dataclasses.replace(got, secagg=MaskedBlock(block.cohort, 2.0, block.shares))
    assert not key.verify(got.signature, update_signing_message(heavier))


def test_shamir_draws_fresh_coefficients_for_every_secret() -> None:
    """If two secrets shared one polynomial's coefficients, one holder's two shares
    would give their difference away (b - s_ij); each secret gets its own."""
    xs = [1, 2, 3, 4, 5]
    points = share([0, 0, 0], xs, 3)
    for x in xs:
        first, second, third = points[x]
        assert len({first, second, third}) == 3  # equal secrets, different shares


def test_shamir_reconstructs_from_any_t_points() -> None:
    secret = 123456789**5
    points = share([secret], [1, 2, 3, 4, 5], 3)
    for chosen in ([1, 2, 3], [2, 4, 5], [5, 3, 1]):
        assert combine([(x, points[x][0]) for x in chosen]) == secret
    assert combine([(x, points[x][0]) for x in (1, 2)]) != secret


def test_a_sum_beyond_what_bounded_inputs_give_is_refused() -> None:
    """A bank that skips the norm bound before masking is caught in the sum."""
    spec = secagg_spec(4, norm_bound=0.05)
    sa = spec.secure_aggregation
    assert sa is not None
    cohort = Cohort.of(spec, 0)
    keys = agreement_keys(spec)
    deltas = deltas_for(spec, seed=4)  # norms about 0.25: honest banks scale them to 0.05

    def sum_with(cheat: float) -> None:
        outs = {}
        for i, p in enumerate(spec.participants):
            x = quantize(deltas[p], 1.0, sa, cheat if i == 0 else 0.05)
            outs[p] = mask(cohort, p, AgreementKey.from_signing_key(party_key(p)), keys, x)
        answers = []
        for p in spec.participants[: cohort.threshold]:
            a = reveal(
                cohort,
                p,
                AgreementKey.from_signing_key(party_key(p)),
                keys,
                {s: outs[s].shares[p] for s in spec.participants},
                (),
            )
            answers.append(
                UnmaskAnswer(
                    spec.task_id,
                    p,
                    f"ua-{p}",
                    0,
                    spec.spec_hash(),
                    a.x,
                    {k: element_bytes(v) for k, v in a.b.items()},
                    {k: {j: element_bytes(v) for j, v in m.items()} for k, m in a.s.items()},
                    0.0,
                )
            )
        masked = {
            p: {"all": torch.from_numpy(outs[p].masked.view("<i8").copy())}
            for p in spec.participants
        }
        head = {"all": torch.zeros(outs[spec.participants[0]].masked.size)}
        weights = dict.fromkeys(spec.participants, 1.0)
        secure_params(spec, head, cohort, masked, weights, answers, ())

    sum_with(0.05)  # every bank within the bound: the sum is taken
    with pytest.raises(SecAggError, match="L2 norm"):
        sum_with(100.0)


def test_an_answer_with_a_share_outside_the_field_is_refused_alone() -> None:
    spec = secagg_spec(6)
    deltas = deltas_for(spec, seed=5)
    samples = dict.fromkeys(spec.participants, 10)
    oc, _ = run_cohort(spec, deltas, samples, arrive=list(spec.participants[:5]))
    name = sorted(oc.answers)[0]
    bad = oc.answers[name]
    first = sorted(bad.b)[0]
    forged = dataclasses.replace(bad, b={**bad.b, first: b"\xff" * 32})
    why = oc.answer_refusal(forged, spec.spec_hash(), None)
    assert why is not None and "field element" in why


def test_secure_aggregation_takes_at_most_256_participants() -> None:
    names = tuple(f"b{i:03d}" for i in range(257))
    with pytest.raises(ValueError, match="at most 256 participants"):
        TaskSpec(
            task_id="big",
            features=(NumericFeature(name="x"),),
            target=TargetSpec(name="y"),
            participants=names,
            mode="sync",
            identity=secagg_identity(names, AGGREGATOR),
            secure_aggregation=SecureAggregationSpec(max_weight=1024),
        )


def test_a_restarted_bank_still_refuses_a_second_question(tmp_path: Path) -> None:
    spec = secagg_spec(4)
    cohort = Cohort.of(spec, 2)
    keys = agreement_keys(spec)
    sa = spec.secure_aggregation
    assert sa is not None
    outs = {
        p: mask(
            cohort,
            p,
            AgreementKey.from_signing_key(party_key(p)),
            keys,
            quantize({"w": torch.ones(8)}, 1.0, sa),
        )
        for p in spec.participants
    }
    me = spec.participants[1]
    aggregator = party_key(AGGREGATOR)

    def request(survivors: tuple[str, ...]) -> bytes:
        dropped = tuple(p for p in spec.participants if p not in survivors)
        ciphertexts = {s: outs[s].shares[me] for s in survivors}
        return encode_unmask_request(
            UnmaskRequest(spec.task_id, me, 2, survivors, dropped, ciphertexts, 0.0),
            aggregator,
        )

    state = tmp_path / "secagg.json"
    first = Revealer(spec, me, party_key(me), aggregator.public, state)
    first.answer(request(spec.participants[:3]))
    assert state.exists()
    again = Revealer(spec, me, party_key(me), aggregator.public, state)  # restarted
    again.answer(request(spec.participants[:3]))  # the same question: answered
    with pytest.raises(SecAggError, match="refused"):
        again.answer(request(spec.participants[1:]))
    # a state file of another bank or task is not silently taken
    other = spec.participants[2]
    with pytest.raises(ConfigError, match="belongs to"):
        Revealer(spec, other, party_key(other), aggregator.public, state)


def test_a_bank_of_a_secure_task_must_keep_its_answers(tmp_path: Path) -> None:
    spec = secagg_spec(3)
    path = tmp_path / "task.json"
    path.write_text(spec.to_json() + "\n")
    data = tmp_path / "bank.csv"
    data.write_text("x0\n1\n")
    result = CliRunner().invoke(
        main,
        [
            *("participant", "run", "--spec", str(path), "--participant", "bank-00"),
            *("--data", str(data), "--amqp-url", "amqp://bank-00:pw@127.0.0.1:5672/"),
        ],
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: task {spec.task_id!r} uses secure aggregation: give --secagg-state FILE, "
        "so that the unmask questions this bank answered survive restarts"
    ]


def _request_for(
    spec: TaskSpec, me: str, number: int, survivors: tuple[str, ...], shares: dict[str, bytes]
) -> bytes:
    dropped = tuple(p for p in spec.participants if p not in survivors)
    return encode_unmask_request(
        UnmaskRequest(
            spec.task_id,
            me,
            number,
            survivors,
            dropped,
            {s: shares[s] for s in survivors},
            0.0,
        ),
        party_key(AGGREGATOR),
    )


def _shares_for(spec: TaskSpec, number: int, me: str) -> dict[str, bytes]:
    cohort = Cohort.of(spec, number)
    keys = agreement_keys(spec)
    sa = spec.secure_aggregation
    assert sa is not None
    return {
        p: mask(
            cohort,
            p,
            AgreementKey.from_signing_key(party_key(p)),
            keys,
            quantize({"w": torch.ones(4)}, 1.0, sa),
        ).shares[me]
        for p in spec.participants
    }


def test_the_same_lists_with_other_shares_are_another_question() -> None:
    """A bank that masked twice for one cohort (two updates, the same pair masks) must
    not reveal the self seeds of both: a request carrying other shares is refused."""
    spec = secagg_spec(4)
    me = spec.participants[0]
    revealer = Revealer(spec, me, party_key(me), party_key(AGGREGATOR).public)
    survivors = spec.participants[:3]
    revealer.answer(_request_for(spec, me, 0, survivors, _shares_for(spec, 0, me)))
    with pytest.raises(SecAggError, match="other shares"):
        revealer.answer(_request_for(spec, me, 0, survivors, _shares_for(spec, 0, me)))


def test_a_question_must_name_every_member_once() -> None:
    spec = secagg_spec(4)
    me = spec.participants[0]
    revealer = Revealer(spec, me, party_key(me), party_key(AGGREGATOR).public)
    shares = _shares_for(spec, 0, me)
    partial = encode_unmask_request(
        UnmaskRequest(
            spec.task_id,
            me,
            0,
            spec.participants[:3],
            (),  # the fourth member named neither survivor nor dropped
            {s: shares[s] for s in spec.participants[:3]},
            0.0,
        ),
        party_key(AGGREGATOR),
    )
    with pytest.raises(SecAggError, match="not exactly the members"):
        revealer.answer(partial)


def test_a_forgotten_cohort_is_never_answered(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Once a bank no longer remembers how it answered a cohort, it answers nothing
    more about it: a second question could otherwise unmask a bank."""
    import participant.secagg as module

    monkeypatch.setattr(module, "REMEMBER", 2)
    spec = secagg_spec(4)
    me = spec.participants[0]
    state = tmp_path / "state.json"
    revealer = Revealer(spec, me, party_key(me), party_key(AGGREGATOR).public, state)
    everyone = spec.participants
    for number in range(3):  # cohort 0 falls out of the memory
        revealer.answer(_request_for(spec, me, number, everyone, _shares_for(spec, number, me)))
    assert revealer.forgotten == 0
    other = everyone[:3]  # names the fourth bank dropped this time
    with pytest.raises(SecAggError, match="older than the cohorts"):
        revealer.answer(_request_for(spec, me, 0, other, _shares_for(spec, 0, me)))
    again = Revealer(spec, me, party_key(me), party_key(AGGREGATOR).public, state)
    with pytest.raises(SecAggError, match="older than the cohorts"):
        again.answer(_request_for(spec, me, 0, other, _shares_for(spec, 0, me)))


def test_a_bank_never_masks_twice_for_one_cohort(tmp_path: Path) -> None:
    spec = secagg_spec(3)
    me = spec.participants[0]
    state = tmp_path / "state.json"
    revealer = Revealer(spec, me, party_key(me), party_key(AGGREGATOR).public, state)
    revealer.note_masked(4)
    restarted = Revealer(spec, me, party_key(me), party_key(AGGREGATOR).public, state)
    assert restarted.masked == 4
    with pytest.raises(SecAggError, match="already masked"):
        restarted.note_masked(4)
    restarted.note_masked(5)
