"""docs/protocol.md against the code: its test vectors, refusal order, names and links.

The vectors are read out of the page's fenced blocks tagged ``protocol-vector:<name>``
and recomputed with the participant's own code (``participant.data``,
``common.models``, ``participant.training``), so the page cannot drift from it.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aggregator.admission import Admission, AdmissionConfig, Admitted, Refused
from aggregator.strategies import AcceptedUpdate
from common.models import build_task_model, model_tensors, tensor_specs
from common.refusals import PERMANENT, Refusal
from common.spec import TaskSpec
from common.transport import names
from common.wire import DEFAULT_LIMITS, Tensors, UpdateEnvelope, encode_update
from participant.data import encode, load_table
from participant.training import train_local

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocol.md"
WIRE_DOC = ROOT / "docs" / "wire-format.md"
TEXT = DOC.read_text()


def _vectors() -> dict[str, str]:
    found = re.findall(r"^```\w+ protocol-vector:([\w-]+)\n(.*?)^```$", TEXT, re.M | re.S)
    blocks = dict(found)
    assert len(blocks) == len(found), "a protocol-vector tag is used twice"
    return blocks


VECTORS = _vectors()


def _json(name: str) -> Any:
    return json.loads(VECTORS[name])


def _spec(**override: object) -> TaskSpec:
    return TaskSpec.parse({**_json("spec"), **override})


def _encoded(tmp_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    rows = tmp_path / "rows.csv"
    rows.write_text(VECTORS["rows"])
    return encode(load_table(rows), _spec())


def _bits(values: Any) -> list[list[str]]:
    return [[f"{v:08x}" for v in row] for row in np.asarray(values, np.float32).view(np.uint32)]


def test_every_vector_is_there() -> None:
    assert set(VECTORS) == {"spec", "rows", "encoded", "tensors", "delta"}


def test_feature_encoding_vector(tmp_path: Path) -> None:
    x, y = _encoded(tmp_path)
    want = _json("encoded")
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    assert x.shape == (3, _spec().input_dim) == (3, len(want["x_bits"][0]))
    assert _bits(x.numpy()) == want["x_bits"]  # bit for bit
    assert _bits(want["x"]) == want["x_bits"]  # the decimals read back as those bits
    assert y.tolist() == want["y"]


def test_the_float32_shortcut_the_page_warns_about_differs() -> None:
    # (61.7 - 50) / 20 in float32 arithmetic is one ulp off the float64-then-round value.
    f32 = (np.float32(61.7) - np.float32(50.0)) / np.float32(20.0)
    assert _bits([[f32]]) == [["3f15c290"]]
    assert _bits([[(61.7 - 50.0) / 20.0]]) == [[_json("encoded")["x_bits"][0][0]]]


def test_model_tensor_vector() -> None:
    for case in _json("tensors"):
        tensors = model_tensors(build_task_model(_spec(model=case["model"])))
        got = [[name, list(t.shape)] for name, t in tensors.items()]
        assert got == case["tensors"], case["model"]
        assert {t.dtype for t in tensors.values()} == {torch.float32}


def _reference(
    x: torch.Tensor, y: torch.Tensor, received: dict[str, Any], settings: dict[str, Any]
) -> tuple[np.ndarray[Any, Any], float, float]:
    """The page's formulas in float64: full-batch SGD on the weighted BCE plus prox."""
    xs, ys = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    w0 = np.asarray(received["0.weight"], np.float64)[0]
    b0 = float(received["0.bias"][0])
    w, b = w0.copy(), b0
    pw, mu, lr = settings["positive_weight"], settings["prox_mu"], settings["lr"]
    losses = []
    for _ in range(settings["epochs"]):
        s = 1.0 / (1.0 + np.exp(-(xs @ w + b)))
        bce = -(pw * ys * np.log(s) + (1 - ys) * np.log(1 - s))
        prox = float(((w - w0) ** 2).sum() + (b - b0) ** 2)
        losses.append(float(bce.mean()) + 0.5 * mu * prox)
        g = ((pw * ys + 1 - ys) * s - pw * ys) / len(ys)
        w, b = w - lr * (xs.T @ g + mu * (w - w0)), b - lr * (float(g.sum()) + mu * (b - b0))
    return w - w0, b - b0, float(np.mean(losses))


def test_delta_vector(tmp_path: Path) -> None:
    x, y = _encoded(tmp_path)
    vector = _json("delta")
    received = {k: torch.tensor(v, dtype=torch.float32) for k, v in vector["received"].items()}
    tol = vector["tolerance"]
    for case in vector["cases"]:
        settings = case["training"]
        assert settings["batch_size"] >= len(x), "the vector must stay full-batch"
        spec = _spec(training=settings)
        want_w = np.asarray(case["delta"]["0.weight"])
        want_b = np.asarray(case["delta"]["0.bias"])
        for seed in (0, 1):  # full batch: the shuffle changes rounding only
            delta, metrics = train_local(spec, received, x, y, seed=seed)
            assert list(delta) == list(received)
            assert all(t.dtype == torch.float32 for t in delta.values())
            np.testing.assert_allclose(delta["0.weight"].numpy(), want_w, rtol=0, atol=tol)
            np.testing.assert_allclose(delta["0.bias"].numpy(), want_b, rtol=0, atol=tol)
            assert metrics["train_loss"] == pytest.approx(case["train_loss"], rel=0, abs=tol)
        ref_w, ref_b, ref_loss = _reference(x, y, vector["received"], settings)
        np.testing.assert_allclose(ref_w, want_w[0], rtol=0, atol=tol)
        assert ref_b == pytest.approx(float(want_b[0]), rel=0, abs=tol)
        assert ref_loss == pytest.approx(case["train_loss"], rel=0, abs=tol)


# ------------------------------------------------------------- refusals


def _table(header: str) -> list[list[str]]:
    """The rows (cells) of the page's table whose header row is ``header``."""
    start = TEXT.index(header + "\n")
    lines = TEXT[start:].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


REFUSAL_TABLE = "| step | reason | refused when | permanent? |"


def _documented_order() -> list[str]:
    """Reasons of the refusal table, in order; step 1 (decoding) as one entry."""
    out: list[str] = []
    for step, reason, *_ in _table(REFUSAL_TABLE):
        if step == "1":
            out += [] if out else ["decoding"]
        else:
            out += re.findall(r"`([a-z_]+)`", reason)
    return out


def _documented_reasons() -> set[str]:
    return {n for row in _table(REFUSAL_TABLE) for n in re.findall(r"`([a-z_]+)`", row[1])}


def test_the_refusal_table_names_only_real_reasons() -> None:
    assert _documented_reasons() <= {r.value for r in Refusal}


def test_the_permanent_column_is_common_refusals_permanent() -> None:
    for _, reason, _, permanent in _table(REFUSAL_TABLE):
        for name in re.findall(r"`([a-z_]+)`", reason):
            assert (Refusal(name) in PERMANENT) == (permanent == "yes"), name


def test_every_reason_the_code_gives_is_documented() -> None:
    sources = [
        "common/wire.py",
        "common/codecs.py",
        "aggregator/admission.py",
        "aggregator/service.py",
    ]
    used = {
        Refusal[m].value
        for path in sources
        for m in re.findall(r"Refusal\.([A-Z_]+)", (ROOT / path).read_text())
    }
    missing = (used | {Refusal.DELIVERY_LIMIT.value}) - _documented_reasons()
    assert not missing, f"docs/protocol.md section 9.1 lacks {sorted(missing)}"


ORDER = [
    "decoding",
    "duplicate",
    "unknown_task",
    "unknown_participant",
    "sender_mismatch",
    "unsigned",
    "bad_signature",
    "spec_mismatch",
    "too_many_samples",
    "future_base",
    "stale_round",
    "duplicate_in_round",
    "too_stale",
    "duplicate",
    "base_unavailable",
    "training_paused",
    "over_cap",
    "outlier",
    "not_masked",
    "cohort_closed",
    "invalid_update",
    "non_finite_result",
    "delivery_limit",
]


def test_the_documented_order_is_the_one_checked_below() -> None:
    assert _documented_order() == ORDER


class _State:
    """An AdmissionState in memory: head 3, every version kept."""

    def __init__(self) -> None:
        self.head_version = 3
        self.holding: dict[str, bool] = {}
        self.round: list[AcceptedUpdate] = []
        self.applied: dict[str, int] = {}
        self.kept = {0, 1, 2, 3}

    def held(self, update_id: str) -> bool | None:
        return self.holding.get(update_id)

    def pending(self) -> Sequence[AcceptedUpdate]:
        return self.round

    async def applied_in(self, update_id: str, base_version: int, participant: str) -> int | None:
        return self.applied.get(update_id)

    async def base(self, version: int) -> Tensors | None:
        return {} if version in self.kept else None


def _admission(**override: object) -> tuple[Admission, TaskSpec]:
    spec = _spec(participants=["bank-a", "bank-b"], max_samples=100, **override)
    expected = tensor_specs(model_tensors(build_task_model(spec)))
    config = AdmissionConfig(DEFAULT_LIMITS, require_sender_match=True)
    return Admission(spec, config, expected, uses_base=True), spec


def _body(
    spec: TaskSpec,
    *,
    task: str = "demo",
    p: str = "bank-a",
    uid: str = "",
    bv: int = 3,
    n: int = 10,
) -> bytes:
    zeros = {k: torch.zeros_like(v) for k, v in model_tensors(build_task_model(spec)).items()}
    env = UpdateEnvelope(
        task=task,
        participant=p,
        update_id=uid or uuid.uuid4().hex,
        base_version=bv,
        num_samples=n,
        tensors=zeros,
        codec="raw",
        spec_hash=spec.spec_hash(),
    )
    return encode_update(env)[0]


async def _first(adm: Admission, body: bytes, state: _State, sender: str = "bank-a") -> str:
    outcome = await adm.admit(body, sender, state)
    assert isinstance(outcome, Refused), outcome
    return outcome.reason.value


async def test_each_step_comes_before_the_next() -> None:
    """For consecutive steps that one update can fail together, the earlier one wins."""
    adm, spec = _admission(**{"async": {"max_staleness": 2, "staleness_unit": "versions"}})
    state = _State()
    state.holding["held"] = True
    state.applied["done"] = 2
    body = _body(spec, task="other", uid="held")
    assert await _first(adm, body[:-1], state) == "malformed"  # decoding first
    assert await _first(adm, body, state) == "duplicate"  # held, before the task
    assert await _first(adm, _body(spec, task="other", p="bank-z"), state, "x") == "unknown_task"
    assert await _first(adm, _body(spec, p="bank-z"), state) == "unknown_participant"
    assert await _first(adm, _body(spec, n=101), state, "bank-b") == "sender_mismatch"
    assert await _first(adm, _body(spec, n=101, bv=9), state) == "too_many_samples"
    assert await _first(adm, _body(spec, bv=9, uid="done"), state) == "future_base"
    assert await _first(adm, _body(spec, bv=0, uid="done"), state) == "too_stale"
    state.kept.discard(2)
    assert await _first(adm, _body(spec, bv=2, uid="done"), state) == "duplicate"  # applied
    assert await _first(adm, _body(spec, bv=2), state) == "base_unavailable"


async def test_sync_steps_come_in_order() -> None:
    refuse, spec = _admission(mode="sync")
    state = _State()
    member = await refuse.admit(_body(spec), "bank-a", state)
    assert isinstance(member, Admitted), member
    state.round.append(member.update)
    assert await _first(refuse, _body(spec, bv=2), state) == "stale_round"
    late, spec = _admission(mode="sync", sync={"late": "stale", "max_staleness": 0})
    assert await _first(late, _body(spec, bv=2), state) == "duplicate_in_round"


# ------------------------------------------------------------- names and links


def test_names_match_the_code() -> None:
    for value in (
        names.UPDATES_EXCHANGE,
        names.MODELS_EXCHANGE,
        names.CONTENT_TYPE,
        names.VERSION_HEADER,
        names.FENCE_HEADER,
        names.VERSION_HASH_HEADER,
        names.update_key("<task>", "<participant>"),
        names.model_key("<task>"),
        names.model_key("<task>", "<participant>"),
        names.model_stream("<task>"),
        names.model_binding("<task>"),
        names.work_queue("<task>"),
        names.audit_stream("<task>"),
        names.dead_key("<task>"),
        names.dead_queue("<task>"),
        names.DEAD_LETTER_EXCHANGE,
        names.REASON_HEADER,
        names.DETAIL_HEADER,
    ):
        assert f"`{value}`" in TEXT, value


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_links_resolve() -> None:
    own, wire = _anchors(TEXT), _anchors(WIRE_DOC.read_text())
    links = re.findall(r"\]\(([^)]*)\)", TEXT)
    assert links
    for link in links:
        target, _, anchor = link.partition("#")
        if target == "":
            assert anchor in own, link
        else:
            assert (DOC.parent / target).is_file(), link
            if anchor:
                assert target == "wire-format.md" and anchor in wire, link


def test_named_files_exist() -> None:
    paths = set(re.findall(r"`([\w./-]+/[\w.-]+\.(?:py|md|json|conf|toml|yaml))`", TEXT))
    assert paths
    assert sorted(p for p in paths if not (ROOT / p).is_file()) == []
