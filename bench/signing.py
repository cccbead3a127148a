"""What signatures cost per update: signed against unsigned, side by side in one run.

For each model size, the two ends of an update's path are timed with and without
Ed25519 (common/signing.py), alternating A and B in the same loop so that the
machine's load falls on both alike:

* participant: ``encode_update`` (hash + codec), unsigned vs signed;
* aggregator: ``decode_update`` + ``Admission.check`` (where the signature is
  verified), unsigned vs signed;
* announcement: the stored blob turned into an announcement (``sign_model``: spec hash
  and ancestors appended) without a key vs with one, and the participant's
  ``ModelChecker.check`` (which verifies it) vs a checker without a key.

The whole paths are what one update and one announcement cost in CPU, end to end;
the single steps show where the difference goes.

Sizes: the German credit logistic regression and the MLP 74-32-1 of the benchmarks,
and a 1M-parameter logistic regression. Ratios are signed / unsigned medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, envelope, table, write_json

from aggregator.admission import Admission, AdmissionConfig
from common.models import build_task_model, model_tensors, tensor_specs
from common.signing import SigningKey
from common.spec import IdentitySpec, ModelSpec, NumericFeature, TargetSpec, TaskSpec
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
from participant.identity import ModelChecker

BANKS = ("bank-a", "bank-b")


def _spec(inputs: int, hidden: tuple[int, ...], signed: bool) -> TaskSpec:
    keys = {b: SigningKey.from_seed(bytes([i + 1]) * 32) for i, b in enumerate(BANKS)}
    agg = SigningKey.from_seed(b"\x09" * 32)
    identity = (
        IdentitySpec(
            require_signatures=True,
            aggregator_key=agg.public.text,
            participant_keys={b: k.public.text for b, k in keys.items()},
        )
        if signed
        else IdentitySpec()
    )
    return TaskSpec(
        task_id="bench",
        model=ModelSpec(kind="mlp", hidden=hidden) if hidden else ModelSpec(),
        features=tuple(NumericFeature(name=f"x{i}") for i in range(inputs)),
        target=TargetSpec(name="y"),
        participants=BANKS,
        identity=identity,
    )


def _median_pair(
    a: Callable[[], object], b: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, run alternately ``repeats`` times each."""
    ta: list[float] = []
    tb: list[float] = []
    a(), b()  # warm up
    for _ in range(repeats):
        for f, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def _case(name: str, inputs: int, hidden: tuple[int, ...], repeats: int) -> dict[str, Any]:
    plain_spec, signed_spec = _spec(inputs, hidden, False), _spec(inputs, hidden, True)
    key = SigningKey.from_seed(b"\x01" * 32)  # bank-a's
    agg_key = SigningKey.from_seed(b"\x09" * 32)
    params = model_tensors(build_task_model(plain_spec))
    gen = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in params.items()}
    expected = tensor_specs(params)
    size = sum(v.numel() for v in params.values())

    def env(spec: TaskSpec) -> UpdateEnvelope:
        return UpdateEnvelope(
            task="bench",
            participant="bank-a",
            update_id="u-0001",
            base_version=0,
            num_samples=100,
            tensors=delta,
            metrics={"loss": 0.5, "val_auc": 0.75},
            spec_hash=spec.spec_hash(),
        )

    plain_env, signed_env = env(plain_spec), env(signed_spec)
    enc = _median_pair(
        lambda: encode_update(plain_env), lambda: encode_update(signed_env, key), repeats
    )
    plain_body, _ = encode_update(plain_env)
    signed_body, _ = encode_update(signed_env, key)

    def admit(spec: TaskSpec) -> Callable[[], object]:
        admission = Admission(spec, AdmissionConfig(DEFAULT_LIMITS), expected, uses_base=False)
        body = signed_body if spec is signed_spec else plain_body

        def run() -> object:
            refused = admission.check(
                decode_update(body, DEFAULT_LIMITS, expected), "bank-a", 0, ()
            )
            assert refused is None, refused
            return None

        return run

    agg = _median_pair(admit(plain_spec), admit(signed_spec), repeats)
    # The stored blob (codec raw, as the service keeps it) the announcement is made of.
    blob, digest = encode_model(
        ModelEnvelope(
            task="bench", version=5, tensors=params, version_hash=b"\x05" * 32, codec="raw"
        )
    )
    ancestors = tuple(bytes([i]) * 32 for i in range(64))

    def announce(k: SigningKey | None, spec: TaskSpec) -> Callable[[], bytes]:
        spec_hash = spec.spec_hash()  # the service computes it once
        return lambda: sign_model(
            blob,
            task="bench",
            version=5,
            version_hash=b"\x05" * 32,
            content_hash=digest,
            spec_hash=spec_hash,
            ancestors=ancestors,
            signing_key=k,
        )

    ann = _median_pair(announce(None, plain_spec), announce(agg_key, signed_spec), repeats)
    plain_model = decode_model(announce(None, plain_spec)(), expected=expected)
    signed_model = decode_model(announce(agg_key, signed_spec)(), expected=expected)

    def check(spec: TaskSpec, model: ModelEnvelope) -> Callable[[], object]:
        checker = ModelChecker(spec)  # the worker makes it once

        def run() -> object:
            refused = checker.check(model)
            assert refused is None, refused
            return None

        return run

    chk = _median_pair(check(plain_spec, plain_model), check(signed_spec, signed_model), repeats)

    def update_path(spec: TaskSpec, k: SigningKey | None) -> Callable[[], object]:
        """One update end to end in CPU: encode (and sign), decode, admission (verify)."""
        admission = Admission(spec, AdmissionConfig(DEFAULT_LIMITS), expected, uses_base=False)
        e = signed_env if k is not None else plain_env

        def run() -> object:
            body, _ = encode_update(e, k)
            return admission.check(decode_update(body, DEFAULT_LIMITS, expected), "bank-a", 0, ())

        return run

    def model_path(spec: TaskSpec, k: SigningKey | None) -> Callable[[], object]:
        """One announcement end to end: made (and signed), decoded, checked (verified)."""
        make, checker = announce(k, spec), ModelChecker(spec)
        return lambda: checker.check(decode_model(make(), expected=expected))

    upd = _median_pair(update_path(plain_spec, None), update_path(signed_spec, key), repeats)
    mod = _median_pair(model_path(plain_spec, None), model_path(signed_spec, agg_key), repeats)
    rows = {
        "update, whole path": upd,
        "announcement, whole path": mod,
        "participant: encode": enc,
        "aggregator: decode + admission": agg,
        "aggregator: announcement": ann,
        "participant: model check": chk,
    }
    return {
        "model": name,
        "parameters": size,
        "update_bytes": {"unsigned": len(plain_body), "signed": len(signed_body)},
        "steps": {
            k: {"unsigned_us": 1e6 * a, "signed_us": 1e6 * b, "ratio": b / a}
            for k, (a, b) in rows.items()
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "signing.json")
    p.add_argument("--repeats", type=int, default=None, help="runs per side (small models)")
    args = p.parse_args()
    torch.set_num_threads(1)
    small = args.repeats or (30 if args.quick else 300)
    cases = [
        _case("logreg, 74 inputs (German credit)", 74, (), small),
        _case("MLP 74-32-1", 74, (32,), small),
        _case("logreg, 1M inputs", 1_000_000, (), 5 if args.quick else 30),
    ]
    rows = [
        [
            c["model"],
            step,
            s["unsigned_us"],
            s["signed_us"],
            s["signed_us"] - s["unsigned_us"],
            s["ratio"],
        ]
        for c in cases
        for step, s in c["steps"].items()
    ]
    print(
        table(
            ["model", "step", "unsigned us", "signed us", "added us", "signed / unsigned"],
            rows,
            title="Ed25519 signatures per update (medians, alternating runs, 1 torch thread)",
        )
    )
    for c in cases:
        b = c["update_bytes"]
        print(f"{c['model']}: update {b['unsigned']} bytes unsigned, {b['signed']} signed")
    write_json(args.out, envelope("signing", args.quick, {"cases": cases}))


if __name__ == "__main__":
    main()
