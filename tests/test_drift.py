"""Drift statistics, the monitoring reference in the spec, and the two report messages
on the wire (docs/drift.md)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from common.drift import (
    EVALUATION_METRICS,
    FLOOR,
    binned_ks,
    over_threshold,
    psi,
    quantile_edges,
    score_drift,
    shares,
    two_sample_ks,
)
from common.errors import ConfigError, DecodeError, EncodeError, SpecError
from common.models import initial_tensors
from common.refusals import Refusal
from common.signing import SigningKey
from common.spec import TaskSpec
from common.wire import (
    DriftSummary,
    Evaluation,
    FeatureDrift,
    ModelEnvelope,
    decode_drift,
    decode_evaluation,
    decode_report,
    encode_drift,
    encode_evaluation,
)
from fedq.simulate import bundled_data
from participant.data import encode_features, infer_features, load_table
from participant.drift import feature_drift, reference_of
from participant.monitor import Monitor

# ----------------------------------------------------------------------- statistics


def test_psi_is_zero_for_the_same_shares_and_the_textbook_sum_otherwise() -> None:
    assert psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0
    e, a = [0.5, 0.5], [0.9, 0.1]
    assert psi(e, a) == pytest.approx(0.4 * math.log(0.9 / 0.5) - 0.4 * math.log(0.1 / 0.5))
    # An empty bin is floored, never infinite.
    assert psi([0.5, 0.5], [1.0, 0.0]) == pytest.approx(
        0.5 * math.log(1.0 / 0.5) + (FLOOR - 0.5) * math.log(FLOOR / 0.5)
    )
    with pytest.raises(ValueError, match="bins"):
        psi([0.5, 0.5], [1.0])


def test_shares_put_an_edge_value_in_the_bin_below_and_missing_last() -> None:
    values = np.array([0.0, 1.0, 1.5, 2.0, 3.0, np.nan])
    assert shares(values, (1.0, 2.0)).tolist() == pytest.approx([2 / 6, 2 / 6, 1 / 6, 1 / 6])
    assert quantile_edges(np.arange(100.0), 4) == (24.75, 49.5, 74.25)
    # Repeated values give fewer bins; an edge at the maximum is dropped.
    assert quantile_edges(np.array([1.0] * 95 + [2.0] * 5), 10) == (1.0,)
    assert quantile_edges(np.array([np.nan]), 10) == ()


def test_the_ks_statistics_match_their_definitions() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1, 300), rng.normal(0.5, 1, 200)
    grid = np.sort(np.concatenate([a, b]))
    brute = max(abs((a <= x).mean() - (b <= x).mean()) for x in grid)
    assert two_sample_ks(a, b) == pytest.approx(brute)
    assert two_sample_ks(a, a) == 0.0
    assert two_sample_ks(a, np.array([])) == 0.0
    assert binned_ks([0.25, 0.25, 0.5], [0.5, 0.25, 0.25]) == pytest.approx(0.25)
    psi_same, ks_same = score_drift(a, a)
    psi_moved, ks_moved = score_drift(a, a + 2)
    assert psi_same == ks_same == 0.0
    assert psi_moved > 1 and ks_moved > 0.6


def test_drift_needs_enough_rows_and_a_psi_over_the_threshold() -> None:
    psis = {"a": 0.3, "b": 0.1, "score": 0.26}
    assert over_threshold(psis, 0.25, rows=100, min_rows=100) == ["a", "score"]
    assert over_threshold(psis, 0.25, rows=99, min_rows=100) == []
    assert over_threshold(psis, 0.5, rows=100, min_rows=1) == []


# ------------------------------------------------------------------ the spec


def _credit() -> tuple[pd.DataFrame, TaskSpec]:
    df = load_table(bundled_data())
    schema = infer_features(df, "creditability")
    spec = TaskSpec.parse(
        {
            "task_id": "drift",
            "features": schema.features,
            "target": {"name": "creditability", "positive": "bad"},
            "participants": ["bank-a", "bank-b"],
        }
    )
    return df, spec


def _monitored(spec: TaskSpec, df: pd.DataFrame, **extra: object) -> TaskSpec:
    doc = spec.model_dump(mode="json", by_alias=True)
    doc["monitoring"] = {
        "reference": [r.model_dump(mode="json") for r in reference_of(df, spec.features)],
        **extra,
    }
    return TaskSpec.parse(doc)


def test_the_reference_describes_every_feature_and_round_trips_in_the_spec() -> None:
    df, spec = _credit()
    monitored = _monitored(spec, df)
    assert monitored.monitoring is not None
    for ref, feature in zip(monitored.monitoring.reference, spec.features, strict=True):
        assert ref.name == feature.name
        assert math.fsum(ref.proportions) == pytest.approx(1.0, abs=1e-6)
        if feature.kind == "numeric":
            assert len(ref.proportions) == len(ref.edges) + 2
        else:
            assert len(ref.proportions) == len(feature.vocabulary) + 1
    assert TaskSpec.from_json(monitored.to_json()) == monitored
    # Without monitoring the canonical JSON, and so the spec hash, is what it was.
    assert '"monitoring"' not in spec.to_json()
    assert monitored.spec_hash() != spec.spec_hash()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: m["reference"].reverse(), "every feature, in their order"),
        (lambda m: m["reference"][1]["proportions"].append(0.0), "proportions must sum|len"),
        (lambda m: m["reference"][0].update(edges=[1.0]), "categorical feature needs no edges"),
        (lambda m: m["reference"][1].update(edges=[3.0, 2.0] + [9.0] * 5), "increasing"),
        (lambda m: m.update(psi_threshold=0), "psi_threshold"),
    ],
)
def test_a_broken_reference_is_refused_with_its_reason(change: object, reason: str) -> None:
    df, spec = _credit()
    doc = _monitored(spec, df).model_dump(mode="json", by_alias=True)
    change(doc["monitoring"])  # type: ignore[operator]
    with pytest.raises(SpecError, match=reason):
        TaskSpec.parse(doc)


def test_monitoring_is_refused_beside_privacy_at_the_bank() -> None:
    df, spec = _credit()
    doc = _monitored(spec, df).model_dump(mode="json", by_alias=True)
    doc["privacy"] = {"laplace": {"epsilon": 1.0, "clip_l1": 1.0}}
    with pytest.raises(SpecError, match="no noise or mask covers"):
        TaskSpec.parse(doc)


def test_feature_drift_names_the_shifted_features_only() -> None:
    df, spec = _credit()
    monitored = _monitored(spec, df)
    same = feature_drift(df, monitored)
    assert max(p for p, _ in same.values()) < 1e-3
    moved = df.copy()
    moved["age_in_years"] = moved["age_in_years"] + 15
    moved["purpose"] = "car (new)"
    drift = feature_drift(moved, monitored)
    assert sorted(n for n, (p, _) in drift.items() if p > 0.25) == ["age_in_years", "purpose"]
    assert drift["purpose"][1] is None  # no KS for a categorical feature
    assert drift["age_in_years"][1] is not None and drift["age_in_years"][1] > 0.3


# ------------------------------------------------------------------ the wire


def _summary(**kw: object) -> DriftSummary:
    fields: dict[str, object] = {
        "task": "credit",
        "participant": "bank-a",
        "summary_id": uuid.uuid4().hex,
        "spec_hash": bytes(range(32)),
        "version": 4,
        "rows": 250,
        "features": {"age": FeatureDrift(0.31, 0.2), "purpose": FeatureDrift(0.02)},
        "score": FeatureDrift(0.05, 0.1),
        "created_at": 1.5,
    }
    return DriftSummary(**(fields | kw))  # type: ignore[arg-type]


def _evaluation(**kw: object) -> Evaluation:
    fields: dict[str, object] = {
        "task": "credit",
        "participant": "bank-a",
        "evaluation_id": uuid.uuid4().hex,
        "spec_hash": bytes(range(32)),
        "version": 4,
        "version_hash": bytes(32),
        "rows": 250,
        "metrics": {"auc": 0.71, "brier": 0.2},
        "created_at": 2.5,
    }
    return Evaluation(**(fields | kw))  # type: ignore[arg-type]


def test_reports_round_trip_and_their_signatures_cover_every_number() -> None:
    key = SigningKey.from_seed(bytes(32))
    s = _summary()
    got = decode_report(encode_drift(s, key))
    assert isinstance(got, DriftSummary) and got.signature is not None
    assert (got.features, got.score, got.rows, got.version) == (s.features, s.score, 250, 4)
    assert key.public.verify(got.signature, got.signing_message())
    forged = _summary(
        summary_id=s.summary_id, features={**s.features, "age": FeatureDrift(0.01, 0.2)}
    )
    assert not key.public.verify(got.signature, forged.signing_message())
    e = _evaluation()
    back = decode_report(encode_evaluation(e, key))
    assert isinstance(back, Evaluation) and back.signature is not None
    assert back.metrics == e.metrics and back.version_hash == e.version_hash
    assert key.public.verify(back.signature, back.signing_message())
    other = _evaluation(evaluation_id=e.evaluation_id, metrics={"auc": 0.99, "brier": 0.2})
    assert not key.public.verify(back.signature, other.signing_message())


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ({"f": {"age": {"psi": -1.0}}}, Refusal.INVALID_FIELD),
        ({"f": {"age": {"psi": 0.1, "ks": 1.5}}}, Refusal.INVALID_FIELD),
        ({"f": {"age": {"psi": 1}}}, Refusal.INVALID_FIELD),
        ({"f": [0.1, 0.2]}, Refusal.INVALID_FIELD),
        ({"s": {"ks": 0.1}}, Refusal.INVALID_FIELD),
        ({"id": "not an id"}, Refusal.INVALID_FIELD),
        ({"rows": 3}, Refusal.UNKNOWN_FIELD),
        ({"fv": 2}, Refusal.UNSUPPORTED_VERSION),
    ],
)
def test_a_bad_drift_summary_is_refused_with_its_reason(
    patch: dict[str, object], reason: Refusal
) -> None:
    import msgpack

    doc = msgpack.unpackb(encode_drift(_summary()), raw=False)
    doc.update(patch)
    with pytest.raises(DecodeError) as e:
        decode_drift(msgpack.packb(doc, use_bin_type=True))
    assert e.value.reason == reason


def test_an_update_is_not_a_report_and_bad_numbers_are_not_encoded() -> None:
    import msgpack

    doc = msgpack.unpackb(encode_evaluation(_evaluation()), raw=False)
    del doc["vh"]
    with pytest.raises(DecodeError) as e:
        decode_evaluation(msgpack.packb(doc, use_bin_type=True))
    assert e.value.reason == Refusal.MISSING_FIELD
    with pytest.raises(DecodeError) as e:
        decode_report(msgpack.packb({"fv": 1, "k": "u"}))
    assert e.value.reason == Refusal.WRONG_KIND
    with pytest.raises(EncodeError, match="psi"):
        encode_drift(_summary(score=FeatureDrift(math.nan)))
    with pytest.raises(EncodeError, match="finite"):
        encode_evaluation(_evaluation(metrics={"auc": math.inf}))


# ------------------------------------------------------------- the doc's test vector

DRIFT_DOC = Path(__file__).resolve().parent.parent / "docs" / "drift.md"


def _vector() -> dict[str, Any]:
    text = DRIFT_DOC.read_text()
    block = re.search(r"```json drift-vector\n(.*?)```", text, re.S)
    assert block is not None, "docs/drift.md has no drift-vector block"
    doc: dict[str, Any] = json.loads(block.group(1))
    return doc


def _text(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("<H", len(raw)) + raw


def _entry(d: dict[str, float]) -> bytes:
    if "ks" in d:
        return struct.pack("<d", d["psi"]) + b"\x01" + struct.pack("<d", d["ks"])
    return struct.pack("<d", d["psi"]) + b"\x00"


def test_the_doc_vector_is_what_the_formulas_and_fedq_sign() -> None:
    vec = _vector()
    key = SigningKey.from_seed(bytes.fromhex(vec["key_seed"]))
    d = vec["drift"]
    body = hashlib.sha256(struct.pack("<I", len(d["f"])))
    for name in sorted(d["f"], key=str.encode):
        body.update(_text(name) + _entry(d["f"][name]))
    body.update(_entry(d["s"]))
    message = b"".join(
        [
            b"fedq-drift-sig-v1\x00",
            _text(d["t"]),
            _text(d["p"]),
            _text(d["id"]),
            struct.pack("<Q", d["v"]),
            bytes.fromhex(d["sh"]),
            struct.pack("<Q", d["n"]),
            body.digest(),
        ]
    )
    assert hashlib.sha256(message).hexdigest() == vec["drift_message_sha256"]
    assert key.sign(message).hex() == vec["drift_signature"]
    summary = DriftSummary(
        task=d["t"],
        participant=d["p"],
        summary_id=d["id"],
        spec_hash=bytes.fromhex(d["sh"]),
        version=d["v"],
        rows=d["n"],
        features={n: FeatureDrift(f["psi"], f.get("ks")) for n, f in d["f"].items()},
        score=FeatureDrift(d["s"]["psi"], d["s"]["ks"]),
        created_at=0.0,
    )
    assert summary.signing_message() == message
    assert decode_drift(encode_drift(summary, key)).signature == bytes.fromhex(
        vec["drift_signature"]
    )

    e = vec["evaluation"]
    metrics = sorted((k.encode(), v) for k, v in e["m"].items())
    digest = hashlib.sha256(struct.pack("<H", len(metrics)))
    for name, value in metrics:
        digest.update(struct.pack("<H", len(name)) + name + struct.pack("<d", value))
    message = b"".join(
        [
            b"fedq-evaluation-sig-v1\x00",
            _text(e["t"]),
            _text(e["p"]),
            _text(e["id"]),
            struct.pack("<Q", e["v"]),
            bytes.fromhex(e["vh"]),
            bytes.fromhex(e["sh"]),
            struct.pack("<Q", e["n"]),
            digest.digest(),
        ]
    )
    assert hashlib.sha256(message).hexdigest() == vec["evaluation_message_sha256"]
    assert key.sign(message).hex() == vec["evaluation_signature"]
    evaluation = Evaluation(
        task=e["t"],
        participant=e["p"],
        evaluation_id=e["id"],
        spec_hash=bytes.fromhex(e["sh"]),
        version=e["v"],
        version_hash=bytes.fromhex(e["vh"]),
        rows=e["n"],
        metrics=e["m"],
        created_at=0.0,
    )
    assert evaluation.signing_message() == message


# ------------------------------------------------------------------ a bank's pass


def test_a_bank_publishes_nothing_from_fewer_rows_than_the_floor(tmp_path: Path) -> None:
    df, spec = _credit()
    monitored = _monitored(spec, df, min_rows=50)
    model = ModelEnvelope(
        spec.task_id, 3, initial_tensors(monitored), version_hash=bytes(range(32))
    )
    x_train = encode_features(df, monitored)
    recent = tmp_path / "recent.csv"
    df.iloc[:49].to_csv(recent, index=False)
    monitor = Monitor(monitored, "bank-a", recent, SigningKey.from_seed(bytes(32)))
    floor = r"49 rows, fewer than the task.s monitoring\.min_rows 50"
    with pytest.raises(ConfigError, match=floor):
        monitor.reports(model, x_train)
    df.iloc[:50].to_csv(recent, index=False)
    reports = monitor.reports(model, x_train)
    assert reports.drift.rows == 50 and reports.drift.version == 3
    assert reports.evaluation is not None and reports.evaluation.version_hash == bytes(range(32))
    assert decode_drift(reports.drift_body).summary_id == reports.drift.summary_id
    # Without the target column: a drift summary, no evaluation.
    df.iloc[:50].drop(columns=["creditability"]).to_csv(recent, index=False)
    assert monitor.reports(model, x_train).evaluation is None


def test_what_a_bank_publishes_is_rounded_and_only_labelled_rows_are_evaluated(
    tmp_path: Path,
) -> None:
    df, spec = _credit()
    monitored = _monitored(spec, df, min_rows=50)
    model = ModelEnvelope(spec.task_id, 0, initial_tensors(monitored), version_hash=bytes(32))
    x_train = encode_features(df, monitored)
    recent = tmp_path / "recent.csv"
    window = df.iloc[:137].copy()
    # Outcomes not known yet for the newest 80 rows: 57 labelled, the floor is 50.
    window.loc[window.index[57:], "creditability"] = None
    window.to_csv(recent, index=False)
    reports = Monitor(monitored, "bank-a", recent, None).reports(model, x_train)
    assert reports.drift.rows == 130  # 137 rows, published down to a multiple of 10
    figures = [reports.drift.score.psi, reports.drift.score.ks]
    figures += [v for f in reports.drift.features.values() for v in (f.psi, f.ks) if v is not None]
    assert reports.evaluation is not None
    assert reports.evaluation.rows == 50  # 57 labelled rows
    figures += list(reports.evaluation.metrics.values())
    assert set(reports.evaluation.metrics) <= set(EVALUATION_METRICS)
    assert all(round(v, 2) == v for v in figures if v is not None), figures
    expected = round(float((df.iloc[:57]["creditability"] == "bad").mean()), 2)
    assert reports.evaluation.metrics["positive_rate"] == expected
    # Fewer labelled rows than the floor: the drift summary only.
    window.loc[window.index[40:], "creditability"] = None
    window.to_csv(recent, index=False)
    assert Monitor(monitored, "bank-a", recent, None).reports(model, x_train).evaluation is None
