"""Secure aggregation in the task spec (common/spec.py), agreement keys in the identity,
and the CLI that produces them (fedq keys, fedq task init)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from common.agreement import AgreementKey
from common.errors import SpecError
from common.signing import SigningKey
from common.spec import IdentitySpec, SecureAggregationSpec, TaskSpec
from fedq.cli import main
from tests.helpers import party_key, secagg_identity

BANKS = ("bank-a", "bank-b", "bank-c")


def _doc(**changes: Any) -> dict[str, Any]:
    """A valid secure-aggregation spec (FedBuff, staleness weighting) as a mapping."""
    doc: dict[str, Any] = {
        "task_id": "sa1",
        "features": [{"name": "x", "kind": "numeric"}],
        "target": {"name": "y"},
        "participants": list(BANKS),
        "async": {"strategy": "fedbuff", "weighting": "staleness", "buffer_size": 3},
        "identity": secagg_identity(BANKS).model_dump(),
        "secure_aggregation": {},
    }
    doc.update(changes)
    return doc


def _refused(reason: str, **changes: Any) -> str:
    with pytest.raises(SpecError, match=re.escape(reason)) as err:
        TaskSpec.parse(_doc(**changes))
    assert "\n" not in str(err.value)
    return str(err.value)


def _agreement(name: str) -> str:
    return AgreementKey.from_signing_key(party_key(name)).public.text


# ------------------------------------------------------------------------ the spec


def test_a_valid_spec_round_trips_and_resolves_its_defaults() -> None:
    spec = TaskSpec.parse(_doc())
    sa = spec.secure_aggregation
    assert sa == SecureAggregationSpec()
    assert TaskSpec.from_json(spec.to_json()) == spec
    assert sa.resolved_threshold(3) == 2 and sa.resolved_min_cohort(3) == 2
    assert sa.resolved_threshold(2) == 2 and sa.resolved_threshold(7) == 4
    sized = SecureAggregationSpec(threshold=3, min_cohort=4)
    assert sized.resolved_threshold(9) == 3 and sized.resolved_min_cohort(9) == 4
    assert SecureAggregationSpec(threshold=3).resolved_min_cohort(9) == 3
    sync = TaskSpec.parse(_doc(mode="sync", secure_aggregation={"threshold": 3}))
    assert sync.secure_aggregation is not None and sync.secure_aggregation.threshold == 3


def test_agreement_keys_are_canonical_in_the_spec() -> None:
    keys = {p: _agreement(p) for p in reversed(BANKS)}
    shouting = {p: "x25519:" + k.removeprefix("x25519:").upper() for p, k in keys.items()}
    identity = IdentitySpec(agreement_keys=shouting)
    assert list(identity.agreement_keys) == sorted(BANKS)
    assert identity.agreement_keys == keys
    doc = _doc()
    doc["identity"]["agreement_keys"] = shouting
    assert TaskSpec.parse(doc).spec_hash() == TaskSpec.parse(_doc()).spec_hash()


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("ed25519:" + "11" * 32, "does not start with 'x25519:'"),
        ("X25519:" + "11" * 32, "does not start with 'x25519:'"),
        ("x25519:" + "11" * 31, "expected 64 hex digits"),
        ("x25519:" + "00" * 32, "all-zero"),
        ("x25519:01" + "00" * 31, "low order"),
    ],
)
def test_a_bad_agreement_key_is_refused(key: str, reason: str) -> None:
    with pytest.raises(SpecError, match=reason):
        TaskSpec.parse(_doc(identity={"agreement_keys": {"bank-a": key}}, secure_aggregation=None))


def test_two_parties_may_not_share_an_agreement_key() -> None:
    same = _agreement("bank-a")
    keys = {"bank-a": same, "bank-b": same.upper().replace("X25519:", "x25519:")}
    with pytest.raises(SpecError, match="two parties share an agreement key"):
        TaskSpec.parse(_doc(identity={"agreement_keys": keys}, secure_aggregation=None))


def test_agreement_keys_of_non_participants_are_refused() -> None:
    identity = {"agreement_keys": {"bank-z": _agreement("bank-z")}}
    with pytest.raises(SpecError, match=r"agreement_keys names non-participants: \['bank-z'\]"):
        TaskSpec.parse(_doc(identity=identity, secure_aggregation=None))


def test_secure_aggregation_needs_two_participants() -> None:
    _refused(
        "at least 2 participants",
        participants=["bank-a"],
        identity=secagg_identity(("bank-a",)).model_dump(),
    )


def test_secure_aggregation_needs_signatures_and_every_key() -> None:
    unsigned = secagg_identity(BANKS).model_dump() | {"require_signatures": False}
    _refused("needs identity.require_signatures", identity=unsigned)
    no_key = secagg_identity(BANKS).model_dump()
    del no_key["participant_keys"]["bank-b"]
    _refused("identity.participant_keys for every participant; missing: bank-b", identity=no_key)
    no_agreement = secagg_identity(BANKS).model_dump()
    del no_agreement["agreement_keys"]["bank-a"], no_agreement["agreement_keys"]["bank-c"]
    _refused(
        "identity.agreement_keys for every participant; missing: bank-a, bank-c",
        identity=no_agreement,
    )


def test_secure_aggregation_refuses_late_updates_in_sync_rounds() -> None:
    _refused("sync.late 'refuse'", mode="sync", sync={"late": "stale"})


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"strategy": "fedasync", "weighting": "staleness"}, "'fedasync', 'staleness'"),
        ({"strategy": "fedbuff", "weighting": "balanced"}, "'fedbuff', 'balanced'"),
        ({"strategy": "fedbuff", "weighting": "samples"}, "'fedbuff', 'samples'"),
    ],
)
def test_secure_aggregation_in_async_mode_needs_fedbuff_by_staleness(
    settings: dict[str, str], named: str
) -> None:
    message = _refused(
        "async.strategy 'fedbuff' and async.weighting 'staleness'", **{"async": settings}
    )
    assert named in message


def test_secure_aggregation_needs_a_plain_server_step() -> None:
    _refused("server.kind 'sgd', not 'adam'", server={"kind": "adam"})


def test_secure_aggregation_takes_bank_level_dp_with_a_fixed_clip_only() -> None:
    spec = TaskSpec.parse(_doc(privacy={"bank": {"noise_multiplier": 1.0}}))
    assert spec.privacy.bank is not None and spec.secure_aggregation is not None
    message = _refused(
        "cannot adapt privacy.bank's clip",
        privacy={"bank": {"noise_multiplier": 1.0, "adaptive": True}},
    )
    assert "masked updates" in message


def test_threshold_and_cohort_must_fit_the_participants() -> None:
    _refused("threshold 4 is more than the 3 participants", secure_aggregation={"threshold": 4})
    _refused("min_cohort 4 is more than the 3 participants", secure_aggregation={"min_cohort": 4})
    _refused(
        "min_cohort 2 is below the threshold 3",
        secure_aggregation={"threshold": 3, "min_cohort": 2},
    )
    _refused("greater than or equal to 2", secure_aggregation={"threshold": 1})
    assert TaskSpec.parse(_doc(secure_aggregation={"threshold": 3, "min_cohort": 3}))


def test_an_aggregate_that_could_overflow_is_refused() -> None:
    big = {"max_weight": 2**30, "clip": 65536, "fraction_bits": 24}
    message = _refused("could round inexactly or overflow", secure_aggregation=big)
    assert "lower max_weight, clip or fraction_bits" in message
    # At the bound: 2^20 * 8 * 2^30 = 2^53 is fine (exact in float64), 2^54 is not.
    assert TaskSpec.parse(_doc(secure_aggregation={"fraction_bits": 30}))
    _refused(
        "max_weight 1048576 x clip 8 x 2^31 is above 2^53",
        secure_aggregation={"fraction_bits": 31},
    )


def test_specs_without_secure_aggregation_are_unaffected() -> None:
    doc = _doc(secure_aggregation=None, identity={})
    doc["async"] = {"strategy": "fedasync"}
    spec = TaskSpec.parse(doc)
    assert spec.secure_aggregation is None and spec.identity.agreement_keys == {}


# ------------------------------------------------------------------------ the CLI


def test_keys_show_and_generate_print_the_agreement_key(tmp_path: Path) -> None:
    out = tmp_path / "bank-a.key"
    generated = CliRunner().invoke(main, ["keys", "generate", "--out", str(out)])
    assert generated.exit_code == 0, generated.output
    expected = AgreementKey.from_signing_key(SigningKey.load(out)).public.text
    assert f"agreement key: {expected}" in generated.output.splitlines()
    shown = CliRunner().invoke(main, ["keys", "show", str(out)])
    assert shown.exit_code == 0, shown.output
    assert f"agreement key: {expected}" in shown.output.splitlines()
    assert not (tmp_path / "bank-a.key.agreement").exists()  # no second file


def _init_args(tmp_path: Path, *, agreement: tuple[str, ...] = ("bank-a", "bank-b")) -> list[str]:
    data = tmp_path / "ref.csv"
    data.write_text("x,y\n1,0\n2,1\n3,0\n4,1\n")
    args = ["task", "init", "--data", str(data), "--target", "y", "--task-id", "sa1"]
    args += ["--participants", "bank-a,bank-b", "--strategy", "fedbuff"]
    args += ["--weighting", "staleness", "--aggregator-key", party_key("agg").public.text]
    for bank in ("bank-a", "bank-b"):
        args += ["--participant-key", f"{bank}={party_key(bank).public.text}"]
    for bank in agreement:
        args += ["--agreement-key", f"{bank}={_agreement(bank)}"]
    return args


def test_task_init_writes_a_secure_aggregation_spec(tmp_path: Path) -> None:
    out = tmp_path / "spec.json"
    args = [*_init_args(tmp_path), "--secure-aggregation", "--secagg-threshold", "2"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    spec = TaskSpec.from_json(out.read_text())
    assert spec.secure_aggregation == SecureAggregationSpec(threshold=2)
    assert spec.identity.agreement_keys == {b: _agreement(b) for b in ("bank-a", "bank-b")}
    plain = CliRunner().invoke(main, _init_args(tmp_path))
    assert plain.exit_code == 0, plain.output
    assert TaskSpec.from_json(plain.stdout).secure_aggregation is None


def test_task_init_without_every_agreement_key_is_one_line(tmp_path: Path) -> None:
    args = [*_init_args(tmp_path, agreement=("bank-a",)), "--secure-aggregation"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid task spec")
    assert "identity.agreement_keys for every participant; missing: bank-b" in lines[0]
    assert "Traceback" not in result.output


def test_task_init_refuses_a_threshold_without_secure_aggregation(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [*_init_args(tmp_path), "--secagg-threshold", "2"])
    assert result.exit_code == 2
    assert "needs --secure-aggregation" in result.output
    bad = CliRunner().invoke(main, [*_init_args(tmp_path), "--agreement-key", "bank-a"])
    assert bad.exit_code == 2 and "is not NAME=KEY" in bad.output
