"""What secure aggregation costs: model quality, seconds per sync round, and the
pieces (masking, answering, unmasking) in isolation, each against the plain path.

Quality: embedded ``fedq simulate`` runs on German credit, 5 banks, the logistic
regression and an MLP (one hidden layer of 32), over several split seeds; per seed
the split and the baselines are made once and four runs share them: sync rounds
(FedAvg) and FedBuff (staleness weights, a buffer of the 5-bank minimum cohort, 3),
each without and with ``secure_aggregation={}``. Patience 0: every run stops at the
same version cap. Under secure aggregation a masked update that arrives after its
cohort closed is refused (``cohort_closed``); the refused fraction is reported.

Seconds per round: embedded sync runs (in-process broker and store) of 5, 10 and 20
banks of German credit, plain and secure alternating, medians; one more pair per
size runs under the timing hook (common/hooks.py) for where the time goes.

Pieces: for each cohort size and a 75- (German credit's logistic regression) and a
10,000-parameter model, one bank's ``Masker.masked``, one survivor's
``Revealer.answer``, the aggregator's ``secure_step`` and ``unmasked_sum`` with no
bank and with 30% of the banks dropped, against plain FedAvg of the same deltas;
the bytes of a signed masked update against a signed plain (zstd) one; the largest
difference between the secure and the plain aggregate against the stated bound.

    .venv/bin/python bench/secagg.py [--quick] [--seeds 5] [--only quality|rounds|pieces]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import RESULTS, envelope, table, write_json

from aggregator import aggregate
from aggregator.secagg import OpenCohort, quantization_error, ring_of, secure_step, shares_of
from aggregator.strategies.base import AcceptedUpdate
from common.agreement import AgreementKey
from common.hooks import Stages
from common.logging import configure_logging
from common.models import build_task_model, model_tensors
from common.secagg import Cohort, expand, share, unmasked_sum
from common.signing import SigningKey
from common.spec import (
    IdentitySpec,
    NumericFeature,
    SecureAggregationSpec,
    SyncSettings,
    TargetSpec,
    TaskSpec,
)
from common.wire import (
    UpdateEnvelope,
    decode_unmask_answer,
    encode_unmask_request,
    encode_update,
)
from fedq.simulate import (
    Progress,
    SimulationConfig,
    SimulationResult,
    fit_baselines,
    prepare,
    run_simulation,
)
from participant.secagg import Masker, Revealer

MODELS: dict[str, dict[str, Any]] = {
    "logreg": {"kind": "logreg"},
    "MLP 32": {"kind": "mlp", "hidden": [32]},
}
BANKS = 5
#: FedBuff as the secure runs get it by default (fedq/simulate.py ``_secured``): staleness
#: weights and a buffer of the minimum cohort (a majority of 5 banks: 3); the plain runs
#: are given the same settings.
BUFFER = SecureAggregationSpec().resolved_min_cohort(BANKS)
FEDBUFF = {"strategy": "fedbuff", "weighting": "staleness", "buffer_size": BUFFER}
#: The issue's bound on the mean AUC difference, secure against plain.
AUC_TARGET = 0.005
DROP = 0.3


# --------------------------------------------------------------------------- quality


def _row(result: SimulationResult, staleness: list[float]) -> dict[str, Any]:
    decided = result.updates_accepted + result.updates_refused
    return {
        "auc": result.final_auc,
        # the mean staleness of the updates in each version, averaged over the versions
        "mean_staleness": statistics.fmean(staleness) if staleness else 0.0,
        "versions": result.versions,
        "stopped_by": result.stopped_by,
        "accepted": result.updates_accepted,
        "refused": result.updates_refused,
        "refused_by_reason": result.refused_by_reason,
        "refused_fraction": result.updates_refused / decided if decided else 0.0,
        "per_bank": {
            n: {"accepted": p["updates_accepted"], "refused": p["updates_refused"]}
            for n, p in result.participants.items()
        },
        "wall_seconds": result.wall_seconds,
    }


def _recorder(into: list[float]) -> Callable[[Progress], None]:
    """An ``on_progress`` that keeps each version's mean staleness."""
    return lambda progress: into.append(progress.staleness)


def _quality(seeds: int, rounds: int) -> list[dict[str, Any]]:
    """Per model, mode and seed: the final test AUC without and with secure aggregation."""
    versions = {"sync": rounds, "async": math.ceil(rounds * BANKS / BUFFER)}
    out: list[dict[str, Any]] = []
    for model_name, model in MODELS.items():
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            m: {"plain": [], "secure": []} for m in versions
        }
        started = time.perf_counter()
        for seed in range(seeds):
            config = SimulationConfig(
                participants=BANKS,
                mode="sync",
                versions=rounds,
                patience=0,
                seconds=300,
                seed=seed,
                base_delay_s=0.0,
                baseline_epochs=40,
                spec_overrides={"model": model, "async": FEDBUFF},
            )
            prep = prepare(config)
            base = fit_baselines(prep, config)
            for mode, cap in versions.items():
                for kind, sa in (("plain", None), ("secure", {})):
                    run = replace(config, mode=mode, versions=cap, secure_aggregation=sa)  # type: ignore[arg-type]
                    staleness: list[float] = []
                    result = asyncio.run(run_simulation(run, _recorder(staleness), prep, base))
                    runs[mode][kind].append({"seed": seed, **_row(result, staleness)})
            print(
                f"{model_name} seed {seed}: "
                + ", ".join(
                    f"{m} {k} {runs[m][k][-1]['auc']:.4f}" for m in versions for k in runs[m]
                ),
                flush=True,
            )
        for mode, cap in versions.items():
            plain, secure = runs[mode]["plain"], runs[mode]["secure"]
            diffs = [s["auc"] - p["auc"] for p, s in zip(plain, secure, strict=True)]
            out.append(
                {
                    "model": model_name,
                    "mode": mode,
                    "versions": cap,
                    "plain_auc_mean": statistics.fmean(r["auc"] for r in plain),
                    "secure_auc_mean": statistics.fmean(r["auc"] for r in secure),
                    "diff_mean": statistics.fmean(diffs),
                    "diff_max_abs": max(abs(d) for d in diffs),
                    "within_target": abs(statistics.fmean(diffs)) <= AUC_TARGET,
                    "plain_refused_fraction": statistics.fmean(
                        r["refused_fraction"] for r in plain
                    ),
                    "secure_refused_fraction": statistics.fmean(
                        r["refused_fraction"] for r in secure
                    ),
                    "plain_mean_staleness": statistics.fmean(r["mean_staleness"] for r in plain),
                    "secure_mean_staleness": statistics.fmean(r["mean_staleness"] for r in secure),
                    "all_stopped_by_versions": all(
                        r["stopped_by"] == "versions" for r in plain + secure
                    ),
                    "plain": plain,
                    "secure": secure,
                    "seconds": time.perf_counter() - started,
                }
            )
    return out


# --------------------------------------------------------------------------- seconds per round


def _stage_timers() -> tuple[dict[str, float], Stages]:
    totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            totals[name] += time.perf_counter() - t

    return totals, stage


def _per_round(result: SimulationResult) -> float:
    """Seconds per round between the first and the last committed round (sync_rounds.py)."""
    ends = [s for s, v, _ in result.curve if v > 0]
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def _rounds(sizes: list[int], rounds: int, repeats: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n in sizes:
        config = SimulationConfig(
            participants=n,
            mode="sync",
            versions=rounds,
            patience=0,
            seconds=300,
            base_delay_s=0.0,
            baseline_epochs=20,
        )
        prep = prepare(config)
        base = fit_baselines(prep, config)
        spr: dict[str, list[float]] = {"plain": [], "secure": []}
        wall: dict[str, list[float]] = {"plain": [], "secure": []}
        for _ in range(repeats):  # alternating, so both see the same machine
            for kind, sa in (("plain", None), ("secure", {})):
                result = asyncio.run(
                    run_simulation(replace(config, secure_aggregation=sa), None, prep, base)
                )
                assert result.versions == rounds, (n, kind, result.stopped_by)
                spr[kind].append(_per_round(result))
                wall[kind].append(result.wall_seconds / rounds)
        stages: dict[str, dict[str, float]] = {}
        for kind, sa in (("plain", None), ("secure", {})):
            totals, hook = _stage_timers()
            cfg = replace(config, secure_aggregation=sa, stages=hook)
            asyncio.run(run_simulation(cfg, None, prep, base))
            stages[kind] = {k: 1000 * v / rounds for k, v in totals.items()}
        plain, secure = statistics.median(spr["plain"]), statistics.median(spr["secure"])
        out.append(
            {
                "participants": n,
                "rows_per_bank": min(len(s) for s in prep.shards.values()),
                "plain_ms": 1000 * plain,
                "secure_ms": 1000 * secure,
                "ratio": secure / plain,
                "plain_ms_runs": [1000 * v for v in spr["plain"]],
                "secure_ms_runs": [1000 * v for v in spr["secure"]],
                "plain_wall_ms_per_round": 1000 * statistics.median(wall["plain"]),
                "secure_wall_ms_per_round": 1000 * statistics.median(wall["secure"]),
                "stages_ms_per_round": stages,
            }
        )
        print(f"{n} banks: {1000 * plain:.1f} ms plain, {1000 * secure:.1f} ms secure", flush=True)
    return out


# --------------------------------------------------------------------------- the pieces


def _cohort_spec(n: int, params: int) -> tuple[TaskSpec, dict[str, SigningKey], SigningKey]:
    """A sync task of ``n`` banks whose logistic regression has ``params`` parameters,
    with fresh keys (signatures required, agreement keys) and secure aggregation on."""
    names = tuple(f"bank-{i + 1:02d}" for i in range(n))
    keys = {p: SigningKey.generate() for p in names}
    aggregator = SigningKey.generate()
    identity = IdentitySpec(
        require_signatures=True,
        aggregator_key=aggregator.public.text,
        participant_keys={p: k.public.text for p, k in keys.items()},
        agreement_keys={p: AgreementKey.from_signing_key(k).public.text for p, k in keys.items()},
    )
    spec = TaskSpec(
        task_id=f"benchsa-{uuid.uuid4().hex[:8]}",
        features=tuple(NumericFeature(name=f"x{i}") for i in range(params - 1)),
        target=TargetSpec(name="y"),
        participants=names,
        mode="sync",
        sync=SyncSettings(min_updates=2),
        identity=identity,
        secure_aggregation=SecureAggregationSpec(),
    )
    return spec, keys, aggregator


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


_HASHES: dict[str, bytes] = {}


def _spec_hash(spec: TaskSpec) -> bytes:
    """The spec's hash, once per task (a bank computes it once; hashing a spec of
    10,000 features takes ~50 ms, which would swamp the encode times)."""
    if spec.task_id not in _HASHES:
        _HASHES[spec.task_id] = spec.spec_hash()
    return _HASHES[spec.task_id]


def _encoded(spec: TaskSpec, name: str, key: SigningKey, tensors: Any, **kw: Any) -> bytes:
    """A signed update as a bank sends it (no metrics; the spec's hash given)."""
    env = UpdateEnvelope(
        task=spec.task_id,
        participant=name,
        update_id=uuid.uuid4().hex,
        base_version=0,
        num_samples=150,
        tensors=tensors,
        spec_hash=_spec_hash(spec),
        **kw,
    )
    return encode_update(env, key)[0]


def _bank_side(
    spec: TaskSpec, keys: dict[str, SigningKey], deltas: dict[str, Any], repeats: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every bank masks (the cohort's updates) and one bank's costs, timed."""
    names = spec.participants
    maskers = {p: Masker(spec, p, keys[p]) for p in names}
    made = {p: maskers[p].masked(deltas[p], 0, 0, 150) for p in names}
    me = names[0]
    masked, block = made[me]
    sa = spec.secure_aggregation
    assert sa is not None
    cohort = Cohort.of(spec, 0)
    size = sum(t.numel() for t in deltas[me].values())
    seeds = [2**254 + i for i in range(len(names))]
    xs = [cohort.x(m) for m in cohort.members]
    plain_body = _encoded(spec, me, keys[me], deltas[me])
    masked_body = _encoded(spec, me, keys[me], masked, codec="raw", secagg=block)
    numbers = {
        "mask_ms": _median_ms(lambda: maskers[me].masked(deltas[me], 0, 0, 150), repeats),
        "one_expansion_ms": _median_ms(lambda: expand(12345, size), repeats),
        # the n seeds (b_i and the n - 1 pair seeds) shared to the n members
        "shamir_share_ms": _median_ms(lambda: share(seeds, xs, cohort.threshold), repeats),
        "encode_plain_zstd_ms": _median_ms(
            lambda: _encoded(spec, me, keys[me], deltas[me]), repeats
        ),
        "encode_masked_raw_ms": _median_ms(
            lambda: _encoded(spec, me, keys[me], masked, codec="raw", secagg=block), repeats
        ),
        "plain_update_bytes": len(plain_body),
        "masked_update_bytes": len(masked_body),
        "share_ciphertext_bytes": len(block.shares[me]),
    }
    return numbers, made


def _answering(revealer: Revealer, body: bytes) -> Callable[[], object]:
    return lambda: revealer.answer(body)


def _aggregator_side(
    spec: TaskSpec,
    keys: dict[str, SigningKey],
    aggregator: SigningKey,
    deltas: dict[str, Any],
    made: dict[str, Any],
    dropped: int,
    repeats: int,
) -> dict[str, Any]:
    """One cohort with the last ``dropped`` banks gone: answers, the sum, the error."""
    names = spec.participants
    survivors = names[: len(names) - dropped]
    head = model_tensors(build_task_model(spec))
    oc = OpenCohort(spec, number=0, capacity=len(names))
    for p in survivors:
        masked, block = made[p]
        update = AcceptedUpdate(
            update_id=uuid.uuid4().hex,
            participant=p,
            base_version=0,
            staleness=0,
            num_samples=150,
            delta=masked,
            content_hash=bytes(32),
        )
        assert oc.refusal(update, block) is None
        oc.add(update, block, now=0.0)
    oc.decision = oc.close()
    requests = {r.recipient: encode_unmask_request(r, aggregator) for r in oc.requests(0.0)}
    answer_ms: list[float] = []
    answer_bytes = 0
    for p, body in requests.items():
        revealer = Revealer(spec, p, keys[p], aggregator.public)
        answer_ms.append(_median_ms(_answering(revealer, body), repeats))
        _, _, answer_body = revealer.answer(body)
        answer_bytes = max(answer_bytes, len(answer_body))
        answer = decode_unmask_answer(answer_body)
        assert oc.answer_refusal(answer, _spec_hash(spec), keys[p].public) is None
        oc.answers[p] = answer
    assert oc.ready
    # The service unmasks as soon as t answers are in (the rest are acked unused): time
    # that, and the sum from every survivor's answer (each one past t is checked).
    everyone = dict(oc.answers)
    oc.answers = {p: everyone[p] for p in sorted(everyone)[: oc.cohort.threshold]}
    step = secure_step(spec, head, oc)[0]
    step_t_ms = _median_ms(lambda: secure_step(spec, head, oc), repeats)
    ring = {p: ring_of(made[p][0]) for p in survivors}
    shares = [shares_of(a) for a in oc.chosen()]
    gone = oc.decision.dropped
    sum_t_ms = _median_ms(lambda: unmasked_sum(oc.cohort, ring, shares, gone), repeats)
    oc.answers = everyone
    step_all_ms = _median_ms(lambda: secure_step(spec, head, oc), repeats)
    plain_deltas = [deltas[p] for p in survivors]
    weights = aggregate.round_weights([150.0] * len(survivors))
    plain = aggregate.weighted_sum(head, plain_deltas, weights)
    error = max((step.params[k].double() - plain[k].double()).abs().max().item() for k in head)
    largest = max(plain[k].abs().max().item() for k in head)
    bound = quantization_error(spec, len(survivors), [150.0] * len(survivors))
    return {
        "dropped": dropped,
        "survivors": len(survivors),
        "answer_ms": statistics.median(answer_ms),
        "request_bytes": max(len(b) for b in requests.values()),
        "answer_bytes": answer_bytes,
        "secure_step_ms": step_t_ms,
        "unmasked_sum_ms": sum_t_ms,
        "secure_step_all_answers_ms": step_all_ms,
        "plain_fedavg_ms": _median_ms(
            lambda: aggregate.weighted_sum(head, plain_deltas, weights), repeats
        ),
        "max_error": error,
        # the rounding bound, plus one float32 spacing: the step is cast back to float32
        "error_bound": bound + float(np.spacing(np.float32(largest))),
    }


def _pieces(sizes: list[int], params: list[int], repeats: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for d in params:
        for n in sizes:
            spec, keys, aggregator = _cohort_spec(n, d)
            g = torch.Generator().manual_seed(n * 100_003 + d)
            like = model_tensors(build_task_model(spec))
            deltas = {
                p: {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in like.items()}
                for p in spec.participants
            }
            bank, made = _bank_side(spec, keys, deltas, repeats)
            cohorts = [
                _aggregator_side(spec, keys, aggregator, deltas, made, k, repeats)
                for k in (0, int(DROP * n + 0.5))
            ]
            out.append(
                {
                    "participants": n,
                    "params": d,
                    "threshold": Cohort.of(spec, 0).threshold,
                    **bank,
                    "cohorts": cohorts,
                }
            )
            print(f"pieces: {n} banks, {d} parameters: mask {bank['mask_ms']:.2f} ms", flush=True)
    return out


# --------------------------------------------------------------------------- tables


def _tables(figures: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if "quality" in figures:
        q = figures["quality"]
        out.append(
            table(
                [
                    "model",
                    "mode",
                    "versions",
                    "AUC plain",
                    "AUC secure",
                    "secure - plain (mean)",
                    "max |diff| (seed)",
                    "refused plain",
                    "refused secure",
                    "staleness plain",
                    "staleness secure",
                ],
                [
                    [
                        r["model"],
                        "sync (FedAvg)" if r["mode"] == "sync" else f"async (FedBuff K={BUFFER})",
                        r["versions"],
                        f"{r['plain_auc_mean']:.4f}",
                        f"{r['secure_auc_mean']:.4f}",
                        f"{r['diff_mean']:+.5f}",
                        f"{r['diff_max_abs']:.5f}",
                        f"{100 * r['plain_refused_fraction']:.1f}%",
                        f"{100 * r['secure_refused_fraction']:.1f}%",
                        f"{r['plain_mean_staleness']:.2f}",
                        f"{r['secure_mean_staleness']:.2f}",
                    ]
                    for r in q
                ],
                title=f"final test AUC, German credit, {BANKS} banks, mean over "
                f"{settings['seeds']} split seeds (target |secure - plain| <= {AUC_TARGET}); "
                "staleness: the mean staleness of a version's updates",
            )
        )
        rows = []
        for r in q:
            for p, s in zip(r["plain"], r["secure"], strict=True):
                rows.append(
                    [
                        r["model"],
                        r["mode"],
                        p["seed"],
                        f"{p['auc']:.4f}",
                        f"{s['auc']:.4f}",
                        f"{s['auc'] - p['auc']:+.5f}",
                        f"{s['refused']} / {s['accepted'] + s['refused']}",
                    ]
                )
        out.append(
            table(
                ["model", "mode", "seed", "AUC plain", "AUC secure", "diff", "secure refused"],
                rows,
                title="per seed (secure refused: cohort_closed refusals / updates decided)",
            )
        )
    if "rounds" in figures:
        out.append(
            table(
                ["banks", "rows per bank", "plain ms/round", "secure ms/round", "secure / plain"],
                [
                    [
                        r["participants"],
                        r["rows_per_bank"],
                        r["plain_ms"],
                        r["secure_ms"],
                        f"{r['ratio']:.2f}x",
                    ]
                    for r in figures["rounds"]
                ],
                title=f"embedded sync rounds, German credit, {settings['rounds']} rounds, "
                f"medians of {settings['repeats']} alternating runs",
            )
        )
        stage_rows = []
        for r in figures["rounds"]:
            st = r["stages_ms_per_round"]
            for name in sorted(set(st["plain"]) | set(st["secure"])):
                a, b = st["plain"].get(name), st["secure"].get(name)
                if max(a or 0.0, b or 0.0) >= 1.0:
                    stage_rows.append([r["participants"], name, a, b])
        out.append(
            table(
                ["banks", "stage", "plain ms/round", "secure ms/round"],
                stage_rows,
                title="where the round's time goes (timing hook; stages nest and overlap, "
                "summed per round; stages under 1 ms left out)",
            )
        )
    if "pieces" in figures:
        p = figures["pieces"]
        out.append(
            table(
                [
                    "banks",
                    "params",
                    "t",
                    "mask ms",
                    "1 PRG ms",
                    "Shamir ms",
                    "encode plain ms",
                    "encode masked ms",
                    "plain B",
                    "masked B",
                    "masked / plain",
                ],
                [
                    [
                        r["participants"],
                        r["params"],
                        r["threshold"],
                        r["mask_ms"],
                        r["one_expansion_ms"],
                        r["shamir_share_ms"],
                        r["encode_plain_zstd_ms"],
                        r["encode_masked_raw_ms"],
                        r["plain_update_bytes"],
                        r["masked_update_bytes"],
                        f"{r['masked_update_bytes'] / r['plain_update_bytes']:.1f}x",
                    ]
                    for r in p
                ],
                title="one bank: Masker.masked (quantize, n PRG expansions, 2n - 1 X25519, "
                "Shamir sharing, n AES-GCM) and the signed update's bytes (medians)",
            )
        )
        out.append(
            table(
                [
                    "banks",
                    "params",
                    "dropped",
                    "answer ms",
                    "request B",
                    "answer B",
                    "secure_step ms",
                    "of which unmasked_sum",
                    "secure_step, all answers",
                    "plain FedAvg ms",
                    "max error",
                    "bound",
                ],
                [
                    [
                        r["participants"],
                        r["params"],
                        c["dropped"],
                        c["answer_ms"],
                        c["request_bytes"],
                        c["answer_bytes"],
                        c["secure_step_ms"],
                        c["unmasked_sum_ms"],
                        c["secure_step_all_answers_ms"],
                        c["plain_fedavg_ms"],
                        c["max_error"],
                        c["error_bound"],
                    ]
                    for r in p
                    for c in r["cohorts"]
                ],
                title="one cohort: a survivor's Revealer.answer; the aggregator's sum from t "
                "answers (as the service does) and from every survivor's, against plain FedAvg "
                "of the same deltas (medians); error: largest |secure - plain|",
            )
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=["quality", "rounds", "pieces"], action="append")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=20, help="sync rounds per run")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per cohort size")
    p.add_argument("--participants", default="5,10,20", help="cohort sizes, comma-separated")
    p.add_argument("--params", default="75,10000", help="model sizes of the pieces")
    p.add_argument("--out", type=Path, default=RESULTS / "secagg.json")
    args = p.parse_args()
    configure_logging("error", "console")
    quick = args.quick
    settings: dict[str, Any] = {
        "seeds": 2 if quick else args.seeds,
        "rounds": 10 if quick else args.rounds,
        "repeats": 1 if quick else args.repeats,
        "participants": [int(x) for x in args.participants.split(",")],
        "params": [int(x) for x in args.params.split(",")],
        "pieces_repeats": 3 if quick else 15,
        "banks": BANKS,
        "fedbuff": FEDBUFF,
        "base_delay_s": 0.0,
        "dropped_fraction": DROP,
    }
    only = set(args.only or ["quality", "rounds", "pieces"])
    figures: dict[str, Any] = {}
    if "pieces" in only:
        figures["pieces"] = _pieces(
            settings["participants"], settings["params"], settings["pieces_repeats"]
        )
    if "rounds" in only:
        figures["rounds"] = _rounds(
            settings["participants"], settings["rounds"], settings["repeats"]
        )
    if "quality" in only:
        figures["quality"] = _quality(settings["seeds"], settings["rounds"])
    tables = _tables(figures, settings)
    for t in tables:
        print(t)
    doc = envelope("secagg", quick, figures, settings=settings)
    write_json(args.out, doc)
    md = args.out.with_suffix(".md")
    header = (
        f"# Secure aggregation: `{doc['command']}`\n\n"
        f"{doc['date']}, commit {doc['git']}, {doc['machine']['cpu']}, "
        f"{doc['machine']['cores']} cores, load average at start "
        f"{', '.join(f'{x:.2f}' for x in doc['machine']['load_avg_at_start'])}\n"
    )
    md.write_text(header + "\n".join(tables) + "\n")
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
