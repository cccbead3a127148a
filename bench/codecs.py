"""What lossy update codecs save and cost: wire bytes per update against raw float32,
final AUC against raw on German credit, and encode/decode time for a 1M-parameter model.

Quality: embedded ``fedq simulate`` runs (in-process broker and store, signed updates),
German credit, 5 banks, sync rounds (FedAvg), the logistic regression (75 parameters)
and an MLP (one hidden layer of 32: 2,433 parameters), over several split seeds; per
seed the split and the baselines are made once and every variant runs on them, the
task spec's ``compression`` set to the variant's (docs/wire-format.md, section 6.1).
Patience 0: every run stops at the same round. Every update the banks publish is
counted: the whole message and its tensor payloads (the ``b`` of each tensor), against
the raw float32 payload (4 bytes a parameter) and the raw run's mean message. ``zstd``
(lossless, the same values as raw) is not run: the raw run's updates are re-encoded
with it, signatures kept. Top-k runs with float32 values (``topk``) and with int8
values (``topk8``: a byte a kept entry). Raw and top-k at 3% and 1% also run for
``--long`` (3) times the rounds, each compared with raw over as many rounds: whether
top-k with error feedback catches up when given more (much smaller) updates.

Speed: one delta of about 1M parameters (a 1000 x 999 weight and a 1000 bias, N(0,
1e-3)), ``encode_update`` (with the lossy encoding and the decode of its own payload
that the content hash needs) and ``decode_update`` under each codec, medians; the
bytes of that update.

    .venv/bin/python bench/codecs.py [--quick] [--seeds 5] [--rounds 20] [--only quality|speed]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack
import torch
from _common import RESULTS, envelope, table, write_json

from common.codecs import Codec, get_codec, lossy_codec
from common.logging import configure_logging
from common.spec import TaskSpec
from common.transport.memory import MemoryTransport
from common.wire import UpdateEnvelope, decode_update, encode_tensors, encode_update
from fedq.simulate import Prepared, SimulationConfig, fit_baselines, prepare, run_simulation

MODELS: dict[str, dict[str, Any]] = {
    "logreg": {"kind": "logreg"},
    "MLP 32": {"kind": "mlp", "hidden": [32]},
}
BANKS = 5


@dataclass(frozen=True)
class Variant:
    """One row: a label and the spec's ``compression`` (None: raw, the default)."""

    label: str
    compression: dict[str, Any] | None

    @property
    def wire(self) -> str:
        c = self.compression
        if c is None:
            return "raw"
        return c["codec"] + ("+zstd" if c.get("lossless") else "")


def _topk(
    fraction: float, *, zstd: bool = False, feedback: bool = True, codec: str = "topk"
) -> Variant:
    label = (
        f"{codec} {100 * fraction:g}%"
        + (" +zstd" if zstd else "")
        + ("" if feedback else ", no EF")
    )
    comp: dict[str, Any] = {"codec": codec, "topk_fraction": fraction, "error_feedback": feedback}
    if zstd:
        comp["lossless"] = "zstd"
    return Variant(label, comp)


#: Error feedback is on (the spec's default) unless the label says "no EF".
VARIANTS: tuple[Variant, ...] = (
    Variant("raw", None),
    Variant("f16", {"codec": "f16"}),
    Variant("f16+zstd", {"codec": "f16", "lossless": "zstd"}),
    Variant("bf16", {"codec": "bf16"}),
    Variant("bf16+zstd", {"codec": "bf16", "lossless": "zstd"}),
    Variant("int8", {"codec": "int8"}),
    Variant("int8+zstd", {"codec": "int8", "lossless": "zstd"}),
    Variant("int8 stochastic", {"codec": "int8", "stochastic_rounding": True}),
    Variant("int8c", {"codec": "int8c"}),
    Variant("int8c+zstd", {"codec": "int8c", "lossless": "zstd"}),
    _topk(0.1),
    _topk(0.03),
    _topk(0.01),
    _topk(0.01, zstd=True),
    _topk(0.1, feedback=False),
    _topk(0.01, feedback=False),
    _topk(0.02, codec="topk8"),
    _topk(0.03, codec="topk8"),
    _topk(0.05, codec="topk8"),
    _topk(0.08, codec="topk8"),
    _topk(0.05, codec="topk8", zstd=True),
)
QUICK_VARIANTS = ("raw", "int8", "topk 10%", "topk8 5%")
#: Also run for ``--long`` times the rounds: does top-k with error feedback catch up?
LONG_VARIANTS = ("raw", "topk 3%", "topk 1%")

#: The issue's targets: (variant label, payload ratio at most, AUC loss at most).
TARGETS: tuple[tuple[str, float, float], ...] = (
    ("int8", 0.26, 0.005),
    ("topk 1%", 0.03, 0.01),
    ("topk 3%", 0.03, 0.01),
    ("topk8 3%", 0.03, 0.01),
    ("topk8 5%", 0.03, 0.01),
    ("topk8 8%", 0.03, 0.01),
    ("f16", 0.5, 0.001),
)


# --------------------------------------------------------------------------- quality


@contextlib.contextmanager
def _counting() -> Iterator[list[bytes]]:
    """Every update body published through the in-process broker, while open."""
    seen: list[bytes] = []
    original = MemoryTransport.publish_update

    async def publish_update(
        self: MemoryTransport, task: str, participant: str, body: bytes, *, message_id: str
    ) -> None:
        seen.append(body)
        await original(self, task, participant, body, message_id=message_id)

    MemoryTransport.publish_update = publish_update  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        MemoryTransport.publish_update = original  # type: ignore[method-assign]


def _sizes(body: bytes) -> tuple[int, int, int]:
    """(whole message, tensor payloads, raw float32 payload) of one update."""
    doc = msgpack.unpackb(body)
    payload = sum(len(t["b"]) for t in doc["ts"])
    raw = sum(4 * math.prod(t["s"]) for t in doc["ts"])
    return len(body), payload, raw


def _as_zstd(body: bytes) -> tuple[int, int, int]:
    """The sizes of the same update under zstd (its signature still verifies: it covers
    the content hash, which the codec does not change)."""
    env = decode_update(body)
    return _sizes(encode_update(replace(env, codec="zstd"))[0])


def _with_compression(prep: Prepared, compression: dict[str, Any] | None) -> Prepared:
    if compression is None:
        return prep
    doc = prep.spec.model_dump(mode="json", by_alias=True)
    doc["compression"] = compression
    return replace(prep, spec=TaskSpec.parse(doc))


def _mean_sizes(sizes: list[tuple[int, int, int]]) -> dict[str, float]:
    return {
        "message_bytes": statistics.fmean(s[0] for s in sizes),
        "payload_bytes": statistics.fmean(s[1] for s in sizes),
        "raw_payload_bytes": statistics.fmean(s[2] for s in sizes),
    }


def _key(label: str, rounds: int, base_rounds: int) -> str:
    return label if rounds == base_rounds else f"{label}, {rounds} rounds"


def _quality(
    models: dict[str, dict[str, Any]],
    variants: tuple[Variant, ...],
    seeds: int,
    rounds: int,
    long_rounds: int,
) -> list[dict[str, Any]]:
    """Per model and variant: the final test AUC of every seed and the update sizes."""
    plan = [(v, rounds) for v in variants]
    if long_rounds:
        plan += [(v, long_rounds) for v in variants if v.label in LONG_VARIANTS]
    out: list[dict[str, Any]] = []
    for model_name, model in models.items():
        keys = [_key(v.label, r, rounds) for v, r in plan]
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in [keys[0], "zstd", *keys[1:]]}
        started = time.perf_counter()
        for seed in range(seeds):
            config = SimulationConfig(
                participants=BANKS,
                mode="sync",
                versions=rounds,
                patience=0,
                seconds=600,
                seed=seed,
                base_delay_s=0.0,
                baseline_epochs=20,
                spec_overrides={"model": model},
            )
            prep = prepare(config)
            base = fit_baselines(prep, config)
            for v, cap in plan:
                run = replace(config, versions=cap)
                with _counting() as seen:
                    result = asyncio.run(
                        run_simulation(run, None, _with_compression(prep, v.compression), base)
                    )
                sizes = [_sizes(b) for b in seen]
                assert result.versions == cap, (v.label, result.stopped_by)
                codecs = {decode_update(b).codec for b in seen}
                assert codecs == {v.wire}, (v.label, codecs)
                row = {
                    "seed": seed,
                    "rounds": cap,
                    "auc": result.final_auc,
                    "updates": len(seen),
                    "refused": result.updates_refused,
                    **_mean_sizes(sizes),
                }
                runs[_key(v.label, cap, rounds)].append(row)
                if v.compression is None and cap == rounds:  # lossless: the raw run re-encoded
                    runs["zstd"].append({**row, **_mean_sizes([_as_zstd(b) for b in seen])})
            print(
                f"{model_name} seed {seed}: "
                + ", ".join(f"{k} {r[-1]['auc']:.4f}" for k, r in runs.items()),
                flush=True,
            )
        params = runs["raw"][0]["raw_payload_bytes"] / 4
        for label, rows in runs.items():
            raw = runs[_key("raw", rows[0]["rounds"], rounds)]
            diffs = [r["auc"] - b["auc"] for r, b in zip(rows, raw, strict=True)]
            out.append(
                {
                    "model": model_name,
                    "variant": label,
                    "rounds": rows[0]["rounds"],
                    "params": params,
                    "auc_mean": statistics.fmean(r["auc"] for r in rows),
                    "auc_diff_mean": statistics.fmean(diffs),
                    "auc_diff_max_abs": max(abs(d) for d in diffs),
                    "message_bytes": statistics.fmean(r["message_bytes"] for r in rows),
                    "payload_bytes": statistics.fmean(r["payload_bytes"] for r in rows),
                    "payload_ratio": statistics.fmean(r["payload_bytes"] for r in rows)
                    / raw[0]["raw_payload_bytes"],
                    "message_ratio": statistics.fmean(r["message_bytes"] for r in rows)
                    / statistics.fmean(b["message_bytes"] for b in raw),
                    "refused": sum(r["refused"] for r in rows),
                    "runs": rows,
                }
            )
        print(f"{model_name}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


# --------------------------------------------------------------------------- speed


def _delta(params: int) -> dict[str, torch.Tensor]:
    """About ``params`` parameters: a (rows x cols) weight and a bias of ``rows``."""
    rows = max(1, round(math.sqrt(params)))
    cols = max(1, (params - rows) // rows)
    g = torch.Generator().manual_seed(0)
    return {
        "net.0.weight": torch.randn(rows, cols, generator=g) * 1e-3,
        "net.0.bias": torch.randn(rows, generator=g) * 1e-3,
    }


def _speed_codecs(variants: tuple[Variant, ...]) -> list[tuple[str, Codec]]:
    out: list[tuple[str, Codec]] = [("raw", get_codec("raw")), ("zstd", get_codec("zstd"))]
    for v in variants:
        c = v.compression
        if c is None or not c.get("error_feedback", True):
            continue  # raw above; error feedback does not change one update's cost
        codec = lossy_codec(
            c["codec"],
            zstd=bool(c.get("lossless")),
            stochastic=bool(c.get("stochastic_rounding")),
            topk_fraction=c.get("topk_fraction"),
        )
        out.append((v.label, codec))
    return out


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _speed(params: int, variants: tuple[Variant, ...], repeats: int) -> list[dict[str, Any]]:
    delta = _delta(params)
    count = sum(t.numel() for t in delta.values())
    out: list[dict[str, Any]] = []
    for label, codec in _speed_codecs(variants):
        env = UpdateEnvelope(
            task="bench",
            participant="bank-a",
            update_id="u-1",
            base_version=0,
            num_samples=100,
            tensors=delta,
            codec=codec.name,
            spec_hash=bytes(32),
        )

        def encode(env: UpdateEnvelope = env, codec: Codec = codec) -> bytes:
            encoded = encode_tensors(delta, codec, seed=1)
            return encode_update(env, encoded=encoded)[0]

        body = encode()
        whole, payload, raw = _sizes(body)
        decoded = decode_update(body)
        error = max(float((decoded.tensors[k] - delta[k]).abs().max()) for k in delta)
        out.append(
            {
                "codec": label,
                "wire": codec.name,
                "params": count,
                "encode_ms": _median_ms(encode, repeats),
                "decode_ms": _median_ms(lambda body=body: decode_update(body), repeats),
                "message_bytes": whole,
                "payload_bytes": payload,
                "payload_ratio": payload / raw,
                "max_abs_error": error,
            }
        )
        print(
            f"speed {label}: {out[-1]['encode_ms']:.1f} ms / {out[-1]['decode_ms']:.1f} ms",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- tables


def _targets(quality: list[dict[str, Any]], speed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of the issue, per model: whether the payload ratio and the AUC hold."""
    out = []
    big = {r["codec"]: r for r in speed}
    for label, ratio, loss in TARGETS:
        for r in quality:
            longer = r["variant"] == f"{label}, {r['rounds']} rounds"
            if r["variant"] != label and not longer:
                continue
            auc_ok = (
                abs(r["auc_diff_mean"]) <= loss if label == "f16" else r["auc_diff_mean"] >= -loss
            )
            out.append(
                {
                    "variant": r["variant"],
                    "model": r["model"],
                    "rounds": r["rounds"],
                    "payload_ratio": r["payload_ratio"],
                    "message_ratio": r["message_ratio"],
                    "ratio_target": ratio,
                    "payload_holds": r["payload_ratio"] <= ratio,
                    "message_holds": r["message_ratio"] <= ratio,
                    "auc_diff_mean": r["auc_diff_mean"],
                    "auc_target": loss,
                    "auc_holds": auc_ok,
                    "payload_ratio_1m": big[label]["payload_ratio"] if label in big else None,
                }
            )
    return out


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def _tables(figures: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if "quality" in figures:
        out.append(
            table(
                [
                    "model",
                    "codec",
                    "AUC",
                    "- raw (mean)",
                    "max |diff|",
                    "message B",
                    "x raw",
                    "payload B",
                    "x raw fp32",
                ],
                [
                    [
                        r["model"],
                        r["variant"],
                        f"{r['auc_mean']:.4f}",
                        f"{r['auc_diff_mean']:+.4f}",
                        f"{r['auc_diff_max_abs']:.4f}",
                        r["message_bytes"],
                        f"{r['message_ratio']:.3f}",
                        r["payload_bytes"],
                        f"{r['payload_ratio']:.3f}",
                    ]
                    for r in figures["quality"]
                ],
                title=f"German credit, {BANKS} banks, {settings['rounds']} sync rounds (unless "
                f"the row says more; compared with raw over as many), mean over "
                f"{settings['seeds']} split seeds; bytes: the mean update (whole signed message, "
                "and its tensor payloads against 4 bytes a parameter); error feedback on unless "
                "'no EF'",
            )
        )
    if "speed" in figures:
        out.append(
            table(
                [
                    "codec",
                    "encode ms",
                    "decode ms",
                    "message B",
                    "payload x raw fp32",
                    "max |error|",
                ],
                [
                    [
                        r["codec"],
                        r["encode_ms"],
                        r["decode_ms"],
                        r["message_bytes"],
                        f"{r['payload_ratio']:.4f}",
                        r["max_abs_error"],
                    ]
                    for r in figures["speed"]
                ],
                title=f"one update of {figures['speed'][0]['params']:,} parameters (N(0, 1e-3)): "
                f"encode_update (lossy encoding, the decode the hash needs, packing) and "
                f"decode_update, medians of {settings['repeats']}",
            )
        )
    if "targets" in figures:
        out.append(
            table(
                [
                    "codec",
                    "model",
                    "rounds",
                    "payload x",
                    "message x",
                    "target",
                    "payload",
                    "message",
                    "speed model payload x",
                    "AUC - raw",
                    "AUC target",
                    "AUC",
                ],
                [
                    [
                        t["variant"],
                        t["model"],
                        t["rounds"],
                        f"{t['payload_ratio']:.3f}",
                        f"{t['message_ratio']:.3f}",
                        f"<= {t['ratio_target']}",
                        _yes(t["payload_holds"]),
                        _yes(t["message_holds"]),
                        None if t["payload_ratio_1m"] is None else f"{t['payload_ratio_1m']:.4f}",
                        f"{t['auc_diff_mean']:+.4f}",
                        ("|diff| <= " if t["variant"] == "f16" else "loss <= ")
                        + str(t["auc_target"]),
                        _yes(t["auc_holds"]),
                    ]
                    for t in figures["targets"]
                ],
                title="the issue's targets (ratios against raw: payload = tensor bytes, message = "
                "the whole signed update)",
            )
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, logreg, 3 variants, 100k params")
    p.add_argument("--only", choices=["quality", "speed"], action="append")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=20, help="sync rounds per run")
    p.add_argument(
        "--long",
        type=int,
        default=3,
        help=f"also run {', '.join(LONG_VARIANTS)} for this many times the rounds (0: not)",
    )
    p.add_argument("--params", type=int, default=1_000_000, help="model size of the speed part")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per codec")
    p.add_argument("--out", type=Path, default=RESULTS / "codecs.json")
    args = p.parse_args()
    configure_logging("error", "console")
    quick = args.quick
    variants = tuple(v for v in VARIANTS if not quick or v.label in QUICK_VARIANTS)
    models = {"logreg": MODELS["logreg"]} if quick else MODELS
    settings: dict[str, Any] = {
        "seeds": 1 if quick else args.seeds,
        "rounds": 5 if quick else args.rounds,
        "long_rounds": 0 if quick else args.long * args.rounds,
        "params": 100_000 if quick else args.params,
        "repeats": 1 if quick else args.repeats,
        "banks": BANKS,
        "models": models,
        "variants": [{"label": v.label, "compression": v.compression} for v in variants],
    }
    only = set(args.only or ["quality", "speed"])
    figures: dict[str, Any] = {}
    if "speed" in only:
        figures["speed"] = _speed(settings["params"], variants, settings["repeats"])
    if "quality" in only:
        figures["quality"] = _quality(
            models, variants, settings["seeds"], settings["rounds"], settings["long_rounds"]
        )
    if "quality" in figures and "speed" in figures:
        figures["targets"] = _targets(figures["quality"], figures["speed"])
    tables = _tables(figures, settings)
    for t in tables:
        print(t)
    doc = envelope("codecs", quick, figures, settings=settings)
    write_json(args.out, doc)
    md = args.out.with_suffix(".md")
    header = (
        f"# Lossy codecs: `{doc['command']}`\n\n"
        f"{doc['date']}, commit {doc['git']}, {doc['machine']['cpu']}, "
        f"{doc['machine']['cores']} cores, load average at start "
        f"{', '.join(f'{x:.2f}' for x in doc['machine']['load_avg_at_start'])}\n"
    )
    md.write_text(header + "\n".join(tables) + "\n")
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
