"""One enum of refusal reasons, the docs' tables, and admission's rules in their order."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from aggregator.admission import Admission, AdmissionConfig, Admitted, Redelivered, Refused
from aggregator.strategies import AcceptedUpdate
from common.errors import DecodeError
from common.models import build_task_model, model_tensors, tensor_specs
from common.refusals import Refusal
from common.spec import NumericFeature, TargetSpec, TaskSpec
from common.wire import DEFAULT_LIMITS, Tensors, UpdateEnvelope, encode_update

WIRE_DOC = Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"


def _reason_tables() -> set[str]:
    """Every backticked first cell of the docs' reason tables (sections 10 and 11)."""
    text = WIRE_DOC.read_text()
    found: set[str] = set()
    for table in re.findall(r"\| reason \| meaning \|\n\| --- \| --- \|\n((?:\|.*\n)+)", text):
        for row in table.splitlines():
            first = row.split("|")[1]
            found.update(re.findall(r"`([a-z_]+)`", first))
    return found


def test_the_docs_list_exactly_the_refusal_reasons() -> None:
    assert _reason_tables() == {r.value for r in Refusal}


def test_a_decode_error_takes_only_a_known_reason() -> None:
    e = DecodeError("malformed", "x")
    assert e.reason is Refusal.MALFORMED
    assert str(e) == "malformed: x"
    with pytest.raises(ValueError, match="not a valid Refusal"):
        DecodeError("nonsense")


# ------------------------------------------------------------- admission, without I/O


class State:
    """An AdmissionState in memory."""

    def __init__(self, head: int = 3) -> None:
        self.head_version = head
        self.holding: dict[str, bool] = {}
        self.round: list[AcceptedUpdate] = []
        self.applied: dict[str, int] = {}
        self.kept: set[int] = set(range(head + 1))
        self.params: Tensors = {}

    def held(self, update_id: str) -> bool | None:
        return self.holding.get(update_id)

    def pending(self) -> Sequence[AcceptedUpdate]:
        return self.round

    async def applied_in(self, update_id: str, base_version: int, participant: str) -> int | None:
        return self.applied.get(update_id)

    async def base(self, version: int) -> Tensors | None:
        return self.params if version in self.kept else None


def _spec(mode: str = "async", **kw: object) -> TaskSpec:
    return TaskSpec.model_validate(
        {
            "task_id": "adm",
            "features": (NumericFeature(name="x0"), NumericFeature(name="x1")),
            "target": TargetSpec(name="y"),
            "participants": ("bank-a", "bank-b"),
            "mode": mode,
            **{("async" if k == "async_" else k): v for k, v in kw.items()},
        }
    )


def _admission(spec: TaskSpec, *, sender_check: bool = True) -> Admission:
    expected = tensor_specs(model_tensors(build_task_model(spec)))
    return Admission(spec, AdmissionConfig(DEFAULT_LIMITS, sender_check), expected, uses_base=True)


def _body(
    spec: TaskSpec,
    *,
    participant: str = "bank-a",
    base: int = 3,
    n: int = 10,
    uid: str | None = None,
    task: str | None = None,
) -> bytes:
    delta = {k: torch.zeros_like(v) for k, v in model_tensors(build_task_model(spec)).items()}
    body, _ = encode_update(
        UpdateEnvelope(
            task=task or spec.task_id,
            participant=participant,
            update_id=uid or uuid.uuid4().hex,
            base_version=base,
            num_samples=n,
            tensors=delta,
            spec_hash=spec.spec_hash(),
        )
    )
    return body


async def _reason(admission: Admission, body: bytes, state: State, sender: str = "bank-a") -> str:
    outcome = await admission.admit(body, sender, state)
    assert isinstance(outcome, Refused), outcome
    return outcome.reason.value


async def test_each_rule_refuses_with_its_reason() -> None:
    # Staleness in versions here, so that head 3 and base 0 is 3 > 2.
    spec = _spec(max_samples=100, async_={"max_staleness": 2, "staleness_unit": "versions"})
    adm, state = _admission(spec), State()
    assert await _reason(adm, b"\xc1", state) == Refusal.MALFORMED
    assert await _reason(adm, _body(spec, task="other"), state) == Refusal.UNKNOWN_TASK
    zed = _body(spec, participant="bank-z")
    assert await _reason(adm, zed, state, "bank-z") == Refusal.UNKNOWN_PARTICIPANT
    assert await _reason(adm, _body(spec), state, "bank-b") == Refusal.SENDER_MISMATCH
    assert await _reason(adm, _body(spec, n=101), state) == Refusal.TOO_MANY_SAMPLES
    assert await _reason(adm, _body(spec, base=4), state) == Refusal.FUTURE_BASE
    assert await _reason(adm, _body(spec, base=0), state) == Refusal.TOO_STALE
    state.applied["done"] = 2
    assert await _reason(adm, _body(spec, uid="done"), state) == Refusal.DUPLICATE
    state.kept.discard(2)
    assert await _reason(adm, _body(spec, base=2), state) == Refusal.BASE_UNAVAILABLE
    admitted = await adm.admit(_body(spec, base=1), "bank-a", state)
    assert isinstance(admitted, Admitted)
    assert admitted.update.staleness == 2


async def test_the_first_failing_rule_decides() -> None:
    spec = _spec(max_samples=100)
    adm, state = _admission(spec), State()
    # Wrong sender and too many samples and from the future: the sender is checked first.
    body = _body(spec, n=10_000, base=99)
    assert await _reason(adm, body, state, "bank-b") == Refusal.SENDER_MISMATCH
    assert await _reason(adm, body, state) == Refusal.TOO_MANY_SAMPLES


async def test_a_held_update_is_a_redelivery_or_a_duplicate() -> None:
    spec = _spec()
    adm, state = _admission(spec), State()
    state.holding["u1"] = False  # its channel was lost
    outcome = await adm.admit(_body(spec, uid="u1"), "bank-a", state)
    assert outcome == Redelivered("u1")
    state.holding["u1"] = True  # still live: a second copy
    assert await _reason(adm, _body(spec, uid="u1"), state) == Refusal.DUPLICATE


async def test_sync_rules_use_the_sync_settings() -> None:
    spec = _spec("sync")
    adm, state = _admission(spec), State()
    assert await _reason(adm, _body(spec, base=2), state) == Refusal.STALE_ROUND
    first = await adm.admit(_body(spec), "bank-a", state)
    assert isinstance(first, Admitted)
    state.round.append(first.update)
    assert await _reason(adm, _body(spec), state) == Refusal.DUPLICATE_IN_ROUND
