"""Deterministic replay: rebuild versions from the retained updates and check them.

The inputs are independent of the aggregator's memory: the retained update
messages (the audit stream), each version's recorded lineage (ordered update ids,
weights, content hashes) and strategy, and the parameters of the version replay
starts from. Every version is recomputed by the strategy that made it (looked up
by its recorded name in :data:`aggregator.strategies.STRATEGIES`, through its
``recompute``), with the same pure functions the service used and the recorded
weights, and its parameter hash and chained version hash are compared with the
store. The first divergence is named with its reason.

With ``exclude``, the chain is rebuilt without one participant's updates, with
the weights that strategy's ``without`` gives the others: the counterfactual
model, "what would the model be without this bank". ``exclude`` may also name a set
of participants (:mod:`aggregator.audit.contributions` replays every coalition of
banks): each is left out in turn, in name order, by the strategy's ``without``.

A version recorded with a server optimizer (momentum, FedAdam, FedYogi: its record
names the optimizer and its state hash) is recomputed by
:func:`aggregator.server_opt.apply` from the recorded weights and its parent's
replayed optimizer state (from the stored state of the start version), and its
recomputed state is checked against the recorded state hash, the version hash that
binds it and the stored state. A counterfactual carries its own state.

Every retained update that went into a version is also checked against the spec
the task ran under when the version was made (the spec history): its spec hash,
and its Ed25519 signature under the key that spec names for its participant
(required where the spec required signatures), so a third party holding the
retained stream and the store can tell which bank sent which update.

A version made by secure aggregation (``info["secagg"]``, :mod:`aggregator.secagg`)
is recomputed from its survivors' retained masked updates (``i64``) and the retained
unmask answers its record names (each checked against its bank's key and the spec
hash), with :func:`aggregator.secagg.secure_params`, as the service computed it: the
sum's hash and scale must be the recorded ones and the version must match bit for
bit. A version committed for a cohort whose sum could not be trusted
(``info["secagg_failed"]``) has no update: its lineage must be empty, its parameters
its parent's bit for bit, and with bank-level DP its record the one
:func:`aggregator.privacy.secure_record` gives for an empty lineage
(:func:`_check_failed`). Over the whole audit stream, replay also checks that no
cohort's answers ever revealed ``t`` shares of both kinds for one bank (which would
unmask its update), that every secure version had at least the minimum cohort and
that only survivors answered (:func:`check_cohorts`). Such a version has no
counterfactual without one of its survivors: the aggregator never saw that bank's
update on its own.

The recomputation of consecutive versions is :class:`Chain`, which
:mod:`aggregator.audit.rebuild` shares: with checkpoints
(``StoreConfig.checkpoint_every``) a version whose parameters were dropped is rebuilt
from the nearest kept one below it, and a replay that starts at one rebuilds it first.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from aggregator import privacy, server_opt
from aggregator import robust as robust_fns
from aggregator.bounds import apply_clips
from aggregator.privacy import VersionPrivacy
from aggregator.secagg import MASKED_DTYPE, SecureRecord, secure_params
from aggregator.server_opt import ServerState
from aggregator.store import RedisModelStore, VersionRecord
from aggregator.store.redis_store import STATE_LIMITS
from aggregator.strategies import Strategy, strategy_class
from common.dtypes import wire_name
from common.errors import (
    BlobPrunedError,
    DecodeError,
    EncodeError,
    FedqError,
    SecAggError,
    SpecError,
    StoreError,
)
from common.hashing import LineageEntry, lineage_bytes, version_hash
from common.models import task_tensor_specs
from common.secagg import Cohort
from common.signing import PublicKey
from common.spec import IdentitySpec, TaskSpec
from common.wire import (
    KIND_MODEL,
    KIND_RECEIPT,
    KIND_UNMASK_ANSWER,
    KIND_UNMASK_REQUEST,
    REPORT_KINDS,
    DecodeLimits,
    Tensors,
    TensorSpec,
    UnmaskAnswer,
    UpdateEnvelope,
    decode_model,
    decode_unmask_answer,
    decode_update,
    limits_for,
    peek_header,
    peek_kind,
    tensors_hash,
    update_signing_message,
)


class ReplayError(FedqError):
    """Replay cannot start (no such task, the start version's parameters are gone)."""


@dataclass(slots=True)
class ReplayReport:
    """What a replay found."""

    task: str
    from_version: int
    to_version: int
    checked: int = 0
    first_bad_version: int | None = None
    reason: str = ""
    #: The participant left out (several: their names joined by ", "); None when not
    #: excluding.
    excluded: str | None = None
    #: Updates of the excluded participant(s) that were left out.
    left_out: int = 0
    params: Tensors = field(default_factory=dict)
    param_hash: bytes = b""
    #: The server optimizer state after the last version replayed (None if it has none).
    state: ServerState | None = None
    #: Updates whose signature was verified under their participant's key.
    signatures: int = 0
    #: Versions replayed that were made with bank-level DP (recorded seed and bound).
    private_versions: int = 0
    #: Versions replayed that were made by secure aggregation (recomputed from the
    #: masked updates and the unmask answers their records name).
    secure_versions: int = 0
    #: Unmask answers (of those versions) whose signature verified under their bank's key.
    answer_signatures: int = 0
    #: Versions replayed that were committed for a secure aggregation cohort whose sum
    #: could not be trusted (``info["secagg_failed"]``: no update, the parent's
    #: parameters).
    failed_cohorts: int = 0
    #: Secure aggregation cohorts checked for individual unmasking (:func:`check_cohorts`).
    cohorts_checked: int = 0
    #: ``"cohort c: bank (seed shares from ...; pair-seed shares from ...)"`` for each
    #: bank whose update the retained unmask answers of one cohort could unmask on its
    #: own: at least ``t`` banks revealed a share of its self seed and at least ``t`` a
    #: share of a pair seed with it.
    individually_unmasked: list[str] = field(default_factory=list)
    #: Other breaches of secure aggregation's rules: a cohort below its minimum, an
    #: answer from a bank the cohort's recorded decision names no survivor, an answer
    #: that names one bank both survivor and dropped.
    cohort_problems: list[str] = field(default_factory=list)

    @property
    def note(self) -> str:
        """What a reader must know beyond the verdict ("" when nothing): that a
        counterfactual of a DP run is another noisy model; that secure aggregation's
        promise (no individual update unmasked) was broken, and where."""
        notes: list[str] = []
        if self.excluded is not None and self.private_versions:
            notes.append(
                f"{self.private_versions} versions were made with bank-level DP: the "
                "counterfactual reuses their recorded noise seeds, bounds and noise, so it is "
                "another noisy model (what the same noise draws give without "
                f"{self.excluded}), not the noiseless difference {self.excluded} made"
            )
        if self.individually_unmasked:
            notes.append(
                "secure aggregation was broken: the retained unmask answers reveal a "
                "threshold of self-mask shares and of pair-mask shares of one bank in one "
                "cohort, so its update could be unmasked on its own: "
                + ", ".join(self.individually_unmasked)
            )
        if self.cohort_problems:
            notes.append("secure aggregation cohorts: " + "; ".join(self.cohort_problems))
        return ". ".join(notes)

    @property
    def ok(self) -> bool:
        """Whether every replayed version matched the store and no secure aggregation
        cohort broke its rules (no individual unmasking, minimum cohort, survivors only)."""
        return (
            self.first_bad_version is None
            and not self.individually_unmasked
            and not self.cohort_problems
        )


#: Kinds of message that are never updates (the audit stream holds updates and, with
#: secure aggregation, unmask answers; the others are listed for safety).
#: Reading the header of a retained message: it passed the broker, and a task's model
#: may be larger than a message (chunked): only the header is decoded.
READ_LIMITS = DecodeLimits(max_message_bytes=1 << 32, max_tensor_bytes=1 << 32)

_NOT_UPDATES = frozenset(
    {KIND_UNMASK_ANSWER, KIND_UNMASK_REQUEST, KIND_MODEL, KIND_RECEIPT, *REPORT_KINDS}
)


def index_updates(bodies: Sequence[bytes]) -> dict[str, bytes]:
    """Retained updates by update id (unreadable ones are skipped: they were refused).

    Unmask answers (kind ``ua``) are not updates: :func:`index_answers` indexes them;
    drift summaries and evaluations (``ds``, ``ev``: docs/drift.md) are skipped.
    """
    out: dict[str, bytes] = {}
    for body in bodies:
        if peek_kind(body) in _NOT_UPDATES:
            continue
        try:
            head = peek_header(body, READ_LIMITS)
        except DecodeError:
            continue
        uid = head.get("id")
        if isinstance(uid, str):
            out.setdefault(uid, body)
    return out


def index_answers(bodies: Sequence[bytes]) -> dict[str, list[bytes]]:
    """Retained unmask answers (kind ``ua``) by answer id, every distinct body in stream
    order: a bank asked again answers again under the same id (the same shares, another
    time), and a second, different answer under one id must not hide the first."""
    out: dict[str, list[bytes]] = {}
    for body in bodies:
        if peek_kind(body) != KIND_UNMASK_ANSWER:
            continue
        try:
            aid = peek_header(body, READ_LIMITS).get("id")
        except DecodeError:
            continue
        if isinstance(aid, str):
            held = out.setdefault(aid, [])
            if body not in held:
                held.append(body)
    return out


def recompute(
    kind: str,
    parent: Tensors,
    base_of: Callable[[int], Tensors],
    entries: tuple[LineageEntry, ...],
    deltas: Mapping[str, Tensors],
) -> Tensors:
    """One version's parameters from its parent, its lineage and the updates' deltas,
    as the strategy ``kind`` that made it recomputes them."""
    return _strategy(kind).recompute(parent, base_of, entries, deltas)


def _strategy(kind: str) -> type[Strategy]:
    try:
        return strategy_class(kind)
    except SpecError as err:
        raise ReplayError(f"version made by unknown strategy {kind!r} ({err})") from err


async def replay(
    store: RedisModelStore,
    updates: Mapping[str, bytes],
    task: str,
    *,
    from_version: int = 0,
    to_version: int | None = None,
    exclude: str | Collection[str] | None = None,
    on_version: Callable[[int], None] | None = None,
    answers: Mapping[str, Sequence[bytes]] | None = None,
) -> ReplayReport:
    """Replay versions ``from_version + 1 .. to_version`` and check them (unless excluding).

    ``updates`` is :func:`index_updates` of the audit stream, ``answers``
    :func:`index_answers` of it (needed for versions made by secure aggregation; the
    stream-wide cohort checks of :func:`check_cohorts` run when not excluding).
    Excluding a bank that is a survivor of a secure version in the range raises
    ReplayError: that counterfactual cannot be computed (:func:`refuse_secure_exclusion`).
    ``exclude`` names one participant or a collection of them (left out in turn, in
    name order); an empty collection excludes nobody: the chain is replayed and checked.

    The parameters of ``from_version`` (and of a base version before it) that
    retention dropped are rebuilt from the nearest kept version below it
    (:func:`aggregator.audit.rebuild.rebuild`, every version checked): a failed
    rebuild of ``from_version`` is reported as the first bad version; of a base
    version, it raises RebuildError.
    """
    left = excluded_names(exclude)
    spec = await store.get_spec(task)
    last = await _last_version(store, task, from_version, to_version)
    named = exclude if isinstance(exclude, str) else ", ".join(left) or None
    report = ReplayReport(task, from_version, last, excluded=named)
    answers = answers or {}
    start = await _replay_start(store, updates, answers, task, from_version, report)
    if start is None:
        return report
    expected = task_tensor_specs(spec)
    identities = Identities(await store.spec_history(task), spec)
    records = [await store.get_version(task, v) for v in range(from_version + 1, last + 1)]
    if left:
        refuse_secure_exclusion(records, left)
    else:
        await check_cohorts(store, task, answers, identities, records, report)
    chain = Chain(store, updates, answers, identities, expected, _Loader(store, updates, answers))
    parent, state = await chain.run(records, start, report, left=left, on_version=on_version)
    if report.first_bad_version is not None:
        return report
    report.params, report.state = parent, state
    report.param_hash = tensors_hash(parent)
    return report


@dataclass(frozen=True, slots=True)
class Start:
    """Where a replay starts: a version's record, its parameters and the server
    optimizer's state after it (None when it has none), checked against the record."""

    record: VersionRecord
    params: Tensors
    state: ServerState | None


async def stored_start(store: RedisModelStore, task: str, version: int) -> Start:
    """A version's stored parameters and optimizer state, checked against its record:
    BlobPrunedError when retention dropped them, StoreError when they are unreadable,
    ReplayError when they differ from the recorded hashes."""
    record = await store.get_version(task, version)
    env = await store.get_params(task, version)
    state = await store.get_state(task, version)
    if env.content_hash != record.param_hash:
        raise ReplayError("stored parameters differ from their recorded hash")
    if env.version_hash != record.version_hash or env.version != version:
        raise ReplayError("stored parameters name another version or version hash")
    return Start(record, env.tensors, state)


async def _replay_start(
    store: RedisModelStore,
    updates: Mapping[str, bytes],
    answers: Mapping[str, Sequence[bytes]],
    task: str,
    version: int,
    report: ReplayReport,
) -> Start | None:
    """The start of a replay: stored, or rebuilt when retention pruned it; None (with
    the problem in ``report``) when it cannot be had."""
    from aggregator.audit.rebuild import RebuildError, rebuild

    try:
        return await stored_start(store, task, version)
    except BlobPrunedError:
        pass
    except (StoreError, ReplayError) as err:
        report.first_bad_version, report.reason = version, str(err)
        return None
    try:
        rebuilt = await rebuild(store, task, version, updates, answers=answers)
    except RebuildError as err:
        report.first_bad_version, report.reason = err.bad_version, err.reason
        return None
    return Start(rebuilt.record, rebuilt.params, rebuilt.state)


@dataclass(frozen=True, slots=True)
class _Loader:
    """A base version's parameters for a replay that starts after it: stored, or
    rebuilt when retention pruned them (RebuildError when that fails)."""

    store: RedisModelStore
    updates: Mapping[str, bytes]
    answers: Mapping[str, Sequence[bytes]]

    async def __call__(self, task: str, version: int) -> Tensors:
        from aggregator.audit.rebuild import rebuild

        try:
            return (await self.store.get_params(task, version)).tensors
        except BlobPrunedError:
            rebuilt = await rebuild(self.store, task, version, self.updates, answers=self.answers)
            return rebuilt.params


@dataclass(frozen=True, slots=True)
class Chain:
    """Replay's recomputation of consecutive versions, shared by :func:`replay` and
    :func:`aggregator.audit.rebuild.rebuild`: the retained messages (updates by id,
    unmask answers by id), the spec history, the model's tensor layout and how a base
    version before the start is read."""

    store: RedisModelStore
    updates: Mapping[str, bytes]
    answers: Mapping[str, Sequence[bytes]]
    identities: Identities
    expected: Mapping[str, TensorSpec]
    load: Callable[[str, int], Awaitable[Tensors]]

    async def run(
        self,
        records: Sequence[VersionRecord],
        start: Start,
        report: ReplayReport,
        *,
        left: tuple[str, ...] = (),
        on_version: Callable[[int], None] | None = None,
    ) -> tuple[Tensors, ServerState | None]:
        """Recompute ``records`` (the versions after ``start``, in order) from
        ``start``, each by the strategy, server optimizer, bank-level DP or secure
        aggregation that made it, and (not excluding: ``left`` empty) check each
        against its record and the store. Stops at the first problem, which goes to
        ``report`` (``first_bad_version``, ``reason``); returns the last parameters
        and optimizer state recomputed."""
        bases = _Bases(self.load, start.record.task, records, start, bool(left))
        run = _Run(
            self.store,
            self.updates,
            self.answers,
            self.identities,
            self.expected,
            masked_specs(self.expected),
            bases,
            report,
            left,
        )
        parent, parent_hash, state = start.params, start.record.version_hash, start.state
        try:
            private = _privacy_of(start.record)
        except ReplayError as err:
            report.first_bad_version, report.reason = start.record.version, str(err)
            return parent, state
        for rec in records:
            if "secagg_failed" in rec.info:
                params, private, problem, parent_hash = await run.failed(
                    rec, parent, private, parent_hash
                )
                state = None
            elif _is_secure(rec, self.identities.spec(rec.version)):
                params, private, problem, parent_hash = await run.secure(
                    rec, parent, private, parent_hash
                )
                state = None
            else:
                params, state, private, problem, parent_hash = await run.plain(
                    rec, parent, state, private, parent_hash
                )
            if problem is not None:
                report.first_bad_version, report.reason = rec.version, problem
                return parent, state
            bases.keep(rec.version, params)
            parent = params
            report.checked += 1
            report.private_versions += int(private is not None)
            if on_version is not None:
                on_version(rec.version)
        return parent, state


@dataclass(slots=True)
class _Run:
    """What every version's replay reads: the retained messages, the spec history,
    the replayed bases, and the report it adds to."""

    store: RedisModelStore
    updates: Mapping[str, bytes]
    answers: Mapping[str, Sequence[bytes]]
    identities: Identities
    expected: Mapping[str, TensorSpec]
    masked: Mapping[str, TensorSpec]
    bases: _Bases
    report: ReplayReport
    #: The participants left out, in name order (empty: replay and check).
    left: tuple[str, ...] = ()

    async def plain(
        self,
        rec: VersionRecord,
        parent: Tensors,
        state: ServerState | None,
        private: VersionPrivacy | None,
        parent_hash: bytes,
    ) -> tuple[Tensors, ServerState | None, VersionPrivacy | None, str | None, bytes]:
        """A version made from individual updates (by its strategy, server optimizer or
        bank-level DP): (params, state, privacy record, problem, version hash)."""
        exclude, report = self.report.excluded, self.report
        strategy = _strategy(str(rec.info.get("strategy", "")))
        entries = rec.lineage
        for name in self.left:
            entries = strategy.without(entries, name)
        report.left_out += len(rec.lineage) - len(entries)
        deltas: dict[str, Tensors] = {}
        identity = self.identities.at(rec.version)
        problem = _decode_all(self.updates, entries, self.expected, deltas, identity)
        if problem is None:
            problem = _check_privacy_settings(rec, self.identities.spec(rec.version))
        if problem is not None:
            return parent, state, private, problem, parent_hash
        report.signatures += sum(1 for e in entries if e.update_id in self.identities.signed)
        # Updates over the norm bound were offered clipped by the recorded factors.
        deltas = apply_clips(deltas, _clip_factors(rec))
        robust = _robust_kind(self.identities.spec(rec.version), strategy)
        # A strategy that reads no base is offered the head as its base by the service.
        of = {
            x.base_version: await self.bases.get(x.base_version) if strategy.uses_base else parent
            for x in entries
        }
        params, state, private, problem = await asyncio.to_thread(
            _recompute_version, strategy, rec, parent, state, of, entries, deltas, private, robust
        )
        if problem is None and exclude is None:
            problem, parent_hash = await _verify_version(
                self.store, rec, params, state, parent_hash
            )
            report.params = params
        return params, state, private, problem, parent_hash

    async def secure(
        self,
        rec: VersionRecord,
        parent: Tensors,
        parent_private: VersionPrivacy | None,
        parent_hash: bytes,
    ) -> tuple[Tensors, VersionPrivacy | None, str | None, bytes]:
        """A version made by secure aggregation (:func:`_recompute_secure`): (params,
        privacy record, problem, version hash). Excluding, the bank is none of its
        survivors (:func:`refuse_secure_exclusion`): the same sum (and recorded noise)
        is applied to ``parent``."""
        report = self.report
        params, private, problem, verified = await asyncio.to_thread(
            _recompute_secure,
            rec,
            self.identities.spec(rec.version),
            self.identities.at(rec.version),
            parent,
            parent_private,
            self.updates,
            self.answers,
            self.masked,
        )
        if problem is None and report.excluded is None:
            problem, parent_hash = await _verify_version(self.store, rec, params, None, parent_hash)
            report.params = params
        if problem is None:
            report.answer_signatures += verified
            report.signatures += sum(
                1 for e in rec.lineage if e.update_id in self.identities.signed
            )
            report.secure_versions += 1
        return params, private, problem, parent_hash

    async def failed(
        self,
        rec: VersionRecord,
        parent: Tensors,
        parent_private: VersionPrivacy | None,
        parent_hash: bytes,
    ) -> tuple[Tensors, VersionPrivacy | None, str | None, bytes]:
        """A version committed for a cohort whose sum could not be trusted
        (:func:`_check_failed`): (params, privacy record, problem, version hash). Its
        parameters are its parent's (excluding, the counterfactual parent's)."""
        report = self.report
        private, problem = _check_failed(rec, self.identities.spec(rec.version), parent_private)
        if problem is None and report.excluded is None:
            problem, parent_hash = await _verify_version(self.store, rec, parent, None, parent_hash)
            report.params = parent
        if problem is None:
            report.failed_cohorts += 1
        return parent, private, problem, parent_hash


def _recompute_version(
    strategy: type[Strategy],
    rec: VersionRecord,
    parent: Tensors,
    state: ServerState | None,
    bases: Mapping[int, Tensors],
    entries: tuple[LineageEntry, ...],
    deltas: Mapping[str, Tensors],
    parent_private: VersionPrivacy | None,
    robust: tuple[str, float, float] | None = None,
) -> tuple[Tensors, ServerState | None, VersionPrivacy | None, str | None]:
    """A version's parameters, optimizer state, privacy record and the problem found
    (None if none): through its recorded server optimizer when it has one, through
    bank-level DP when it has a privacy record (:func:`_recompute_private`), through
    the spec's coordinate-wise aggregator (``robust``: kind, server_lr, trim) when it
    has one, else through its strategy (no state)."""
    try:
        private = _privacy_of(rec)
    except ReplayError as err:
        return parent, state, None, str(err)
    if private is not None:
        params, problem = _recompute_private(
            strategy, rec, private, parent, bases, entries, deltas, parent_private
        )
        return params, None, private, problem
    if rec.optimizer is not None:
        params, state = server_opt.apply(
            rec.optimizer,
            parent,
            state,
            [deltas[e.update_id] for e in entries],
            [e.weight for e in entries],
        )
        return params, state, None, None
    if robust is not None:
        kind, lr, trim = robust
        params = robust_fns.robust_step(
            parent, [deltas[e.update_id] for e in entries], kind=kind, server_lr=lr, trim=trim
        )
        return params, None, None, None
    return strategy.recompute(parent, bases.__getitem__, entries, deltas), None, None, None


def _clip_factors(rec: VersionRecord) -> dict[str, float]:
    """The clip factor of each update the version's bounds scaled down (``info["robust"]``)."""
    robust = rec.info.get("robust")
    clipped = robust.get("clipped", {}) if isinstance(robust, Mapping) else {}
    if not isinstance(clipped, Mapping):
        raise ReplayError("info.robust.clipped is not a map")
    return {str(k): float(v) for k, v in clipped.items()}


def _robust_kind(spec: TaskSpec, strategy: type[Strategy]) -> tuple[str, float, float] | None:
    """The coordinate-wise aggregator a version of ``strategy`` under ``spec`` was made
    with (kind, server_lr, trim), or None for a weighted sum (mean, multi-Krum)."""
    r = spec.robustness
    if r.aggregator not in ("median", "trimmed_mean") or strategy.name not in ("fedbuff", "fedavg"):
        return None
    lr = float(spec.async_.server_lr) if spec.mode == "async" else 1.0
    return r.aggregator, lr, r.trim_fraction


def _check_privacy_settings(rec: VersionRecord, spec: TaskSpec) -> str | None:
    """A version made under a spec with ``privacy.bank`` must carry a privacy record
    made with that spec's settings (noise multiplier, delta, adaptive clipping)."""
    bank = spec.privacy.bank
    doc = rec.info.get("privacy")
    if bank is None:
        return None
    if not isinstance(doc, dict):
        return "made without bank-level DP, though the task's spec requires it"
    wanted = {
        "noise_multiplier": bank.noise_multiplier,
        "delta": bank.delta,
        "adaptive": bank.adaptive,
        **(
            {"target_quantile": bank.target_quantile, "clip_lr": bank.clip_lr}
            if bank.adaptive
            else {"clip": bank.clip}
        ),
    }
    for name, value in wanted.items():
        if doc.get(name) != value:
            return f"privacy record's {name} {doc.get(name)!r} is not the spec's {value!r}"
    return None


def _privacy_of(rec: VersionRecord) -> VersionPrivacy | None:
    """A version's bank-level DP record (None if it has none)."""
    doc = rec.info.get("privacy")
    if doc is None:
        return None
    try:
        return VersionPrivacy.from_json(doc)
    except (ValueError, TypeError, KeyError) as err:
        raise ReplayError(f"version {rec.version}'s privacy record is unreadable ({err})") from err


def _recompute_private(
    strategy: type[Strategy],
    rec: VersionRecord,
    private: VersionPrivacy,
    parent: Tensors,
    bases: Mapping[int, Tensors],
    entries: tuple[LineageEntry, ...],
    deltas: Mapping[str, Tensors],
    parent_private: VersionPrivacy | None,
) -> tuple[Tensors, str | None]:
    """A bank-level DP version: the retained deltas clipped to the **recorded** bound,
    the step recomputed in float64 and the **recorded** seed's noise added
    (:func:`aggregator.privacy.private_version`, as the service computed it).

    Verifying (``entries`` is the recorded lineage), the noise standard deviation is
    recomputed from the lineage and must be the recorded one exactly; the next bound,
    the private version count and the epsilon are checked too
    (:func:`aggregator.privacy.check_version`). A counterfactual (``entries`` without a
    participant) reuses each version's recorded seed, bound and noise standard
    deviation: it is *another noisy model*, the one the same noise draws would have
    given without that bank, not the noiseless difference the bank made; a version
    made only of the excluded bank's updates keeps its parent's parameters.
    """
    if entries != rec.lineage:
        if not entries:
            return parent, None
        clipped = {
            e.update_id: privacy.clip_delta(deltas[e.update_id], private.clip)[0] for e in entries
        }
        params, _ = privacy.noisy_step(
            strategy, parent, bases.__getitem__, entries, clipped, private.noise_std, private.seed
        )
        return params, None
    params, again = privacy.private_version(
        strategy,
        parent,
        bases.__getitem__,
        entries,
        deltas,
        settings=privacy.settings_of(private),
        clip=private.clip,
        seed=private.seed,
        parent=parent_private,
    )
    return params, privacy.check_version(private, again, parent_private)


async def _last_version(
    store: RedisModelStore, task: str, from_version: int, to_version: int | None
) -> int:
    head = await store.head(task)
    if head is None:
        raise ReplayError(f"task {task!r} has no versions")
    last = head if to_version is None else to_version
    if not 0 <= from_version <= last <= head:
        raise ReplayError(
            f"versions must satisfy 0 <= from ({from_version}) <= to ({last}) <= head ({head})"
        )
    return last


class _Bases:
    """Replayed parameters kept while a later update still names them as its base
    (only updates of a strategy that reads its base, :func:`uses_base`)."""

    def __init__(
        self,
        load: Callable[[str, int], Awaitable[Tensors]],
        task: str,
        records: Sequence[VersionRecord],
        start: Start,
        exclude: bool,
    ) -> None:
        self.load, self.task, self.exclude = load, task, exclude
        self.last_use: dict[int, int] = {}
        for rec in records:
            if uses_base(rec):
                for e in rec.lineage:
                    self.last_use[e.base_version] = rec.version
        self.history: dict[int, Tensors] = {start.record.version: start.params}

    async def get(self, v: int) -> Tensors:
        if v in self.history:
            return self.history[v]
        if self.exclude:
            raise ReplayError(f"base version {v} precedes --from-version; start earlier")
        return await self.load(self.task, v)

    def keep(self, v: int, params: Tensors) -> None:
        self.history[v] = params
        for old in [k for k in self.history if k != v and self.last_use.get(k, -1) <= v]:
            del self.history[old]


def uses_base(rec: VersionRecord) -> bool:
    """Whether the strategy that made ``rec`` reads its updates' base versions (an
    unknown strategy counts as one that does: its replay names the problem)."""
    try:
        return strategy_class(str(rec.info.get("strategy", ""))).uses_base
    except SpecError:
        return True


@dataclass(frozen=True, slots=True)
class _Identity:
    """What one spec of the history says about updates: keys, signatures, spec hash."""

    keys: Mapping[str, PublicKey]
    required: bool
    spec_hash: bytes
    signed: set[str]
    #: Whether the spec has an identity section: then every update must name its spec
    #: hash, as admission requires (chains from before spec hashes have none).
    strict: bool


class Identities:
    """The spec in force for each version, from the spec history: a spec registered
    at head ``h`` governs the versions after ``h`` (a key rotated or revoked there
    applies from version ``h + 1``)."""

    def __init__(self, history: Sequence[tuple[int, TaskSpec]], current: TaskSpec) -> None:
        #: Ids of the updates whose signature verified.
        self.signed: set[str] = set()
        entries = list(history) or [(0, current)]
        self._from = [v for v, _ in entries]
        self._specs = [s for _, s in entries]
        self._ids = [
            _Identity(
                {p: PublicKey.parse(k) for p, k in s.identity.participant_keys.items()},
                s.identity.require_signatures,
                s.spec_hash(),
                self.signed,
                s.identity != IdentitySpec(),
            )
            for _, s in entries
        ]

    def at(self, version: int) -> _Identity:
        """The identity rules version ``version`` was made under."""
        return self._ids[self._index(version)]

    def spec(self, version: int) -> TaskSpec:
        """The spec version ``version`` was made under."""
        return self._specs[self._index(version)]

    def _index(self, version: int) -> int:
        return max(0, bisect.bisect_left(self._from, version) - 1)


def _decode_all(
    updates: Mapping[str, bytes],
    entries: Sequence[LineageEntry],
    expected: Mapping[str, TensorSpec],
    deltas: dict[str, Tensors],
    identity: _Identity,
) -> str | None:
    for entry in entries:
        problem = _check_retained(updates.get(entry.update_id), entry, expected, deltas, identity)
        if problem is not None:
            return problem
    return None


async def _verify_version(
    store: RedisModelStore,
    rec: VersionRecord,
    params: Tensors,
    state: ServerState | None,
    parent_hash: bytes,
) -> tuple[str | None, bytes]:
    problem, version_hash = await asyncio.to_thread(_verify, rec, params, state, parent_hash)
    if problem is None:
        problem = await _check_stored_blob(store, rec)
    if problem is None:
        problem = await _check_stored_state(store, rec)
    return problem, version_hash


def _check_retained(
    body: bytes | None,
    e: LineageEntry,
    expected: Mapping[str, TensorSpec],
    deltas: dict[str, Tensors],
    identity: _Identity,
) -> str | None:
    """Decode one retained update into ``deltas``; or say why it cannot be used."""
    env, problem = _retained(body, e, expected, identity)
    if env is None:
        return problem
    deltas[e.update_id] = env.tensors
    return None


def _retained(
    body: bytes | None,
    e: LineageEntry,
    expected: Mapping[str, TensorSpec],
    identity: _Identity,
) -> tuple[UpdateEnvelope | None, str | None]:
    """One retained update, decoded and checked against its lineage entry and identity;
    or None and why it cannot be used."""
    if body is None:
        return None, f"update {e.update_id} ({e.participant}) is not in the audit stream"
    try:
        env = decode_update(body, limits_for(expected), expected)
    except DecodeError as err:
        return None, f"retained update {e.update_id} does not decode ({err.reason}: {err.detail})"
    if env.content_hash != e.content_hash:
        return None, f"retained update {e.update_id} differs from the one recorded (content hash)"
    if (env.participant, env.base_version) != (e.participant, e.base_version):
        return None, f"retained update {e.update_id} names another participant or base version"
    problem = _check_identity(env, identity)
    if problem is not None:
        return None, f"retained update {e.update_id} ({e.participant}): {problem}"
    return env, None


def _check_identity(env: UpdateEnvelope, identity: _Identity) -> str | None:
    """The update's spec hash and signature, as the spec of its version required them."""
    if not env.spec_hash and identity.strict:
        return "names no spec hash, though the spec of its version has an identity"
    if env.spec_hash and env.spec_hash != identity.spec_hash:
        return (
            f"prepared under spec {env.spec_hash.hex()[:16]}, the version was made under "
            f"{identity.spec_hash.hex()[:16]}"
        )
    key = identity.keys.get(env.participant)
    if env.signature is None:
        return "unsigned, though the task required signatures" if identity.required else None
    if key is None:
        return (
            "signed, but the spec names no key for its participant" if identity.required else None
        )
    try:
        message = update_signing_message(env)
    except EncodeError:
        message = b""
    if not message or not key.verify(env.signature, message):
        return f"signature does not verify under {env.participant}'s key {key.fingerprint}"
    identity.signed.add(env.update_id)
    return None


async def _check_stored_blob(store: RedisModelStore, rec: VersionRecord) -> str | None:
    """The stored parameters (when kept) must be the replayed ones."""
    try:
        env = await store.get_params(rec.task, rec.version)
    except BlobPrunedError:
        return None
    except FedqError as e:
        return f"stored parameters are unreadable ({e})"
    if env.content_hash != rec.param_hash or env.version_hash != rec.version_hash:
        return "stored parameters differ from the replayed ones"
    return None


async def _check_stored_state(store: RedisModelStore, rec: VersionRecord) -> str | None:
    """The stored optimizer state (when the version has one and it is kept) must be
    the replayed one (whose hash :func:`_verify` compared with the record)."""
    if rec.state_hash is None:
        return None
    try:
        blob = await store.get_state_blob(rec.task, rec.version)
    except BlobPrunedError:
        return None
    except FedqError as e:
        return f"stored optimizer state is unreadable ({e})"
    try:
        env = await asyncio.to_thread(decode_model, blob or b"", STATE_LIMITS)
    except DecodeError as e:
        return f"stored optimizer state does not decode ({e.reason}: {e.detail})"
    if env.content_hash != rec.state_hash or env.version_hash != rec.version_hash:
        return "stored optimizer state differs from the replayed one"
    return None


def _verify(
    rec: VersionRecord, params: Tensors, state: ServerState | None, parent_hash: bytes
) -> tuple[str | None, bytes]:
    """Compare a recomputed version with its record; returns (problem, recomputed hash)."""
    param_hash = tensors_hash(params)
    state_hash = None if state is None else state.digest()
    vh = version_hash(
        task=rec.task,
        version=rec.version,
        parent_hash=parent_hash,
        param_hash=param_hash,
        lineage=lineage_bytes(rec.lineage),
        optimizer=rec.optimizer_bytes(state_hash),
    )
    if param_hash != rec.param_hash:
        return "replayed parameters differ from the recorded parameter hash", vh
    if state_hash != rec.state_hash:
        return "replayed optimizer state differs from the recorded state hash", vh
    if vh != rec.version_hash:
        return "version hash differs from the recorded one (lineage or chain altered)", vh
    return None, vh


# --------------------------------------------------------------------------- secure aggregation

#: Versions read per round trip by :func:`check_cohorts`.
_BATCH = 512


def masked_specs(expected: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """What a masked update carries: the model's tensor names and shapes, dtype ``i64``
    (ring elements modulo 2^64, :data:`aggregator.secagg.MASKED_DTYPE`)."""
    dtype = wire_name(MASKED_DTYPE)
    assert dtype is not None
    return {name: TensorSpec(shape=t.shape, dtype=dtype) for name, t in expected.items()}


def secure_record(rec: VersionRecord) -> SecureRecord | None:
    """A version's secure aggregation record (``info["secagg"]``), None if it has none;
    ReplayError if it is unreadable."""
    doc = rec.info.get("secagg")
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise ReplayError(f"version {rec.version}'s secure aggregation record is not a map")
    try:
        return SecureRecord.from_json(doc)
    except SecAggError as err:
        raise ReplayError(f"version {rec.version}: {err}") from err


@dataclass(frozen=True, slots=True)
class FailedCohort:
    """What a version committed for a cohort whose sum could not be trusted records
    (``info["secagg_failed"]``): the cohort, why, and its decision when it had one."""

    cohort: int
    reason: str
    #: The decision (names, ascending), None when the cohort was refused undecided.
    survivors: tuple[str, ...] | None
    dropped: tuple[str, ...] | None


def failed_record(rec: VersionRecord) -> FailedCohort | None:
    """A version's failed cohort record (``info["secagg_failed"]``), None if it has
    none; ReplayError if it is unreadable."""
    if "secagg_failed" not in rec.info:
        return None
    doc = rec.info["secagg_failed"]
    bad = ReplayError(f"version {rec.version}'s failed cohort record is malformed")
    if not isinstance(doc, Mapping):
        raise bad
    cohort, reason = doc.get("cohort"), doc.get("reason", "")
    if isinstance(cohort, bool) or not isinstance(cohort, int) or not isinstance(reason, str):
        raise bad
    names: list[tuple[str, ...] | None] = []
    for key in ("survivors", "dropped"):
        value = doc.get(key)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(n, str) for n in value)
        ):
            raise bad
        names.append(None if value is None else tuple(value))
    survivors, dropped = names
    if (survivors is None) != (dropped is None):
        raise bad
    return FailedCohort(cohort, reason, survivors, dropped)


def _check_failed(
    rec: VersionRecord, spec: TaskSpec, parent_private: VersionPrivacy | None
) -> tuple[VersionPrivacy | None, str | None]:
    """A version committed for a cohort whose sum could not be trusted: its spec uses
    secure aggregation, it records no sum, its cohort makes it, its decision (when it
    has one) splits the task's participants, its lineage is empty and, with bank-level
    DP, its record is :func:`aggregator.privacy.secure_record` of an empty lineage
    (sensitivity and noise 0, still one private version: the service draws no noise).
    Returns its privacy record and the problem (None if none); the caller checks that
    its parameters are its parent's."""
    try:
        failed = failed_record(rec)
        private = _privacy_of(rec)
    except ReplayError as err:
        return None, str(err)
    assert failed is not None
    c = failed.cohort
    if spec.secure_aggregation is None:
        return private, "records a failed cohort, though its spec does not use secure aggregation"
    if "secagg" in rec.info:
        return private, f"records both a sum and a failed cohort {c}"
    if c + 1 != rec.version:
        return private, f"records failed cohort {c}, which would make version {c + 1}"
    if failed.survivors is not None and failed.dropped is not None:
        members = Cohort.of(spec, c).members
        if sorted(failed.survivors + failed.dropped) != list(members) or list(
            failed.survivors
        ) != sorted(failed.survivors):
            return private, f"failed cohort {c}'s decision does not split the task's participants"
    if rec.lineage:
        return private, (
            f"records failed cohort {c}, but its lineage names {len(rec.lineage)} updates "
            "(a failed cohort's version has none)"
        )
    problem = _check_privacy_settings(rec, spec)
    if problem is None and private is not None:
        again = privacy.secure_record(
            privacy.settings_of(private), private.clip, (), private.seed, parent_private
        )
        problem = privacy.check_version(private, again, parent_private)
    return private, problem


def secure_exclusion_message(version: int, bank: str, cohort: int | None = None) -> str:
    """Why ``--exclude bank`` cannot rebuild version ``version`` (made by secure aggregation)."""
    of = "its cohort's" if cohort is None else f"cohort {cohort}'s"
    return (
        f"version {version} was made by secure aggregation: the aggregator never saw "
        f"{bank}'s update on its own, only the sum of {of} masked updates, so the model "
        f"without {bank} cannot be computed from the masked updates (only {bank}'s own "
        "records, or retraining without it, could say)"
    )


def excluded_names(exclude: str | Collection[str] | None) -> tuple[str, ...]:
    """The participants ``exclude`` names (one name, or a collection), in name order."""
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        return (exclude,)
    return tuple(sorted(set(exclude)))


def refuse_secure_exclusion(
    records: Sequence[VersionRecord], exclude: str | Collection[str]
) -> None:
    """Raise ReplayError when ``exclude`` (a participant, or any of a collection of
    them) is a survivor of a version made by secure aggregation among ``records``: its
    update is in that version only inside a masked sum; the first such version, and
    there the first such participant in name order, is named. (A secure version
    ``exclude`` had no update in is rebuilt as it was made: the same unmasked sum
    applied to the counterfactual parent. A failed cohort's version,
    ``info["secagg_failed"]``, has no sum: it keeps the counterfactual parent.)"""
    left = excluded_names(exclude)
    for rec in records:
        if "secagg" not in rec.info or "secagg_failed" in rec.info:
            continue
        cohort: int | None = None
        named = {e.participant for e in rec.lineage}
        try:
            record = secure_record(rec)
        except ReplayError:
            record = None
        if record is not None:
            cohort = record.decision.cohort
            named |= set(record.decision.survivors)
        for bank in left:
            if bank in named:
                raise ReplayError(secure_exclusion_message(rec.version, bank, cohort))


def _is_secure(rec: VersionRecord, spec: TaskSpec) -> bool:
    """Whether a version is (or, by its spec, must be) made by secure aggregation."""
    return "secagg" in rec.info or spec.secure_aggregation is not None


async def check_cohorts(
    store: RedisModelStore,
    task: str,
    answers: Mapping[str, Sequence[bytes]],
    identities: Identities,
    records: Sequence[VersionRecord],
    report: ReplayReport,
) -> None:
    """No individual update was ever unmasked: check every secure aggregation cohort of
    the audit stream and record what breaks the rules in ``report``.

    Every retained unmask answer of the task counts, used by a version or not (whoever
    read the stream got its shares), if its signature verifies under its bank's key in
    the spec of the cohort's version (an answer that does not verify is not that bank's
    word, and is ignored here). Per cohort ``c``, ``t`` its threshold under the spec of
    version ``c + 1`` (``Cohort.of(spec, c).threshold``):

    - a bank's update can be unmasked on its own only with ``t`` shares of its self seed
      and ``t`` shares of its pair seeds: ``individually_unmasked`` gets
      ``"cohort c: bank (seed shares from ...; pair-seed shares from ...)"`` when at
      least ``t`` distinct banks revealed a share of its self seed (it is a key of their
      answer's ``b``) and at least ``t`` distinct banks revealed a share of a pair seed
      with it (it is a key inside their answer's ``s``), naming them. One bank alone
      cannot frame the aggregator: an answer that names one bank in both (which no
      honest bank gives) is a ``cohort_problems`` entry naming its answerer;
    - the cohort's recorded decision (the version it made, when one records it) has at
      least ``secure_aggregation.resolved_min_cohort(n)`` survivors, and only its
      survivors answered: ``cohort_problems`` otherwise. A failed cohort's version
      (``info["secagg_failed"]``) has no sum, so the minimum does not apply; its
      decision, when it has one, names who may have answered.

    The decisions come from the versions in ``records`` and those the answers' cohorts
    made (cohort ``c`` makes version ``c + 1``).
    """
    head = await store.head(task)
    decoded = _verified_answers(answers, task, identities)
    by_version = {r.version: r for r in records}
    wanted = sorted(
        {a.cohort + 1 for a in decoded if head is not None and a.cohort + 1 <= head}
        - set(by_version)
    )
    for at in range(0, len(wanted), _BATCH):
        for r in await store.get_versions(task, wanted[at : at + _BATCH]):
            by_version[r.version] = r
    problems: dict[str, None] = {}
    survivors = _decisions(by_version, identities, problems)
    report.individually_unmasked.extend(_unmasked(decoded, survivors, identities, problems))
    report.cohort_problems.extend(problems)
    report.cohorts_checked = len({a.cohort for a in decoded} | set(survivors))


def _decisions(
    by_version: Mapping[int, VersionRecord], identities: Identities, problems: dict[str, None]
) -> dict[int, tuple[str, ...]]:
    """Each recorded cohort's survivors (of a secure version, or of a failed cohort's
    version that records its decision); a secure version below its minimum cohort is
    added to ``problems`` (a failed cohort's version has no sum: no minimum)."""
    survivors: dict[int, tuple[str, ...]] = {}
    for version, rec in sorted(by_version.items()):
        try:
            failed = failed_record(rec)
            record = None if failed is not None else secure_record(rec)
        except ReplayError:
            continue  # the version's own replay names it
        if failed is not None:
            if failed.survivors is not None:
                survivors[failed.cohort] = failed.survivors
            continue
        if record is None:
            continue
        d = record.decision
        survivors[d.cohort] = d.survivors
        spec = identities.spec(version)
        sa = spec.secure_aggregation
        least = sa.resolved_min_cohort(len(spec.participants)) if sa is not None else 0
        if len(d.survivors) < least:
            problems[
                f"cohort {d.cohort}: {len(d.survivors)} survivors made version {version}, "
                f"below the minimum cohort {least}"
            ] = None
    return survivors


def _unmasked(
    decoded: Sequence[UnmaskAnswer],
    survivors: Mapping[int, tuple[str, ...]],
    identities: Identities,
    problems: dict[str, None],
) -> list[str]:
    """The banks the answers could unmask on their own (``t`` distinct banks revealed
    a share of its self seed and ``t`` a share of a pair seed with it), each with the
    banks that revealed them; an answer that names one bank in both, or that comes
    from a bank the cohort's recorded decision names no survivor, goes to ``problems``."""
    # cohort -> bank -> the banks that revealed a share of its self seed / a pair seed
    seed_from: dict[int, dict[str, set[str]]] = {}
    pair_from: dict[int, dict[str, set[str]]] = {}
    for a in decoded:
        paired = {j for m in a.s.values() for j in m}
        for bank in a.b:
            seed_from.setdefault(a.cohort, {}).setdefault(bank, set()).add(a.participant)
        for bank in paired:
            pair_from.setdefault(a.cohort, {}).setdefault(bank, set()).add(a.participant)
        for bank in sorted(paired & set(a.b)):
            problems[
                f"cohort {a.cohort}: {a.participant} answered with shares of both {bank}'s "
                "self seed and a pair seed with it (no honest bank gives both)"
            ] = None
        named = survivors.get(a.cohort)
        if named is not None and a.participant not in named:
            problems[
                f"cohort {a.cohort}: {a.participant} answered, but the recorded decision "
                "names it no survivor"
            ] = None
    out: list[str] = []
    for c in sorted(seed_from):
        t = _threshold(identities.spec(c + 1), c)
        pairs = pair_from.get(c, {})
        for bank, seeds in sorted(seed_from[c].items()):
            partners = pairs.get(bank, set())
            if len(seeds) >= t and len(partners) >= t:
                out.append(
                    f"cohort {c}: {bank} (seed shares from {', '.join(sorted(seeds))}; "
                    f"pair-seed shares from {', '.join(sorted(partners))})"
                )
    return out


def _threshold(spec: TaskSpec, cohort: int) -> int:
    """Cohort ``cohort``'s Shamir threshold under ``spec``; under a spec without secure
    aggregation, 2, the least any spec may set (the strictest reading)."""
    try:
        return Cohort.of(spec, cohort).threshold
    except SecAggError:
        return 2


def _verified_answers(
    answers: Mapping[str, Sequence[bytes]], task: str, identities: Identities
) -> list[UnmaskAnswer]:
    """The retained answers of ``task`` signed by their bank (under its key in the spec
    of the version their cohort makes), whatever else they say."""
    out: list[UnmaskAnswer] = []
    for bodies in answers.values():
        for body in bodies:
            try:
                a = decode_unmask_answer(body)
            except DecodeError:
                continue
            key = identities.at(a.cohort + 1).keys.get(a.participant)
            if (
                a.task == task
                and key is not None
                and a.signature is not None
                and key.verify(a.signature, a.signing_message())
            ):
                out.append(a)
    return out


def _recompute_secure(
    rec: VersionRecord,
    spec: TaskSpec,
    identity: _Identity,
    parent: Tensors,
    parent_private: VersionPrivacy | None,
    updates: Mapping[str, bytes],
    answers: Mapping[str, Sequence[bytes]],
    expected: Mapping[str, TensorSpec],
) -> tuple[Tensors, VersionPrivacy | None, str | None, int]:
    """A version made by secure aggregation, recomputed from its survivors' retained
    masked updates and the retained answers its record names, as the service did
    (:func:`aggregator.secagg.secure_params` from ``parent``, with the recorded seed's
    noise when the version has a bank-level DP record, whose noise is then recomputed
    from the lineage and checked, :func:`aggregator.privacy.secure_record`); returns the
    parameters, the privacy record, the problem found (None if none) and how many
    answer signatures verified."""
    try:
        private = _privacy_of(rec)
        record = _secure_inputs(rec, spec)
    except ReplayError as err:
        return parent, None, str(err), 0
    assert spec.secure_aggregation is not None
    d = record.decision
    cohort = Cohort.of(spec, d.cohort)
    problem = _check_secure_record(rec, record, cohort, spec.secure_aggregation.fraction_bits)
    if problem is None:
        problem = _check_privacy_settings(rec, spec)
    masked: dict[str, Tensors] = {}
    if problem is None:
        masked, problem = _retained_masked(rec, record, updates, expected, identity)
    chosen: list[UnmaskAnswer] = []
    if problem is None:
        chosen, problem = _retained_answers(record, rec.task, answers, identity)
    if problem is not None:
        return parent, private, problem, 0
    try:
        params, scale, digest = secure_params(
            spec, parent, cohort, masked, record.weights, chosen, d.dropped, private
        )
    except SecAggError as err:
        problem = f"cohort {d.cohort}'s masked updates and answers do not unmask: {err}"
        return parent, private, problem, 0
    if digest != record.sum_hash:
        problem = f"cohort {d.cohort}'s unmasked sum differs from the recorded sum hash"
    elif scale != record.scale:
        problem = f"recomputed scale {scale!r} is not the recorded {record.scale!r}"
    elif private is not None:
        again = privacy.secure_record(
            privacy.settings_of(private), private.clip, rec.lineage, private.seed, parent_private
        )
        problem = privacy.check_version(private, again, parent_private)
    return params, private, problem, len(chosen) if problem is None else 0


def _secure_inputs(rec: VersionRecord, spec: TaskSpec) -> SecureRecord:
    """A secure version's record, which its spec must call for (ReplayError if not)."""
    if spec.secure_aggregation is None:
        raise ReplayError("made by secure aggregation, though its spec does not use it")
    record = secure_record(rec)
    if record is None:
        raise ReplayError("made without secure aggregation, though the task's spec requires it")
    return record


def _retained_masked(
    rec: VersionRecord,
    record: SecureRecord,
    updates: Mapping[str, bytes],
    expected: Mapping[str, TensorSpec],
    identity: _Identity,
) -> tuple[dict[str, Tensors], str | None]:
    """The survivors' retained masked updates (survivor -> tensors), each checked
    against its lineage entry, its identity and the version's record; or the problem."""
    masked: dict[str, Tensors] = {}
    for e in rec.lineage:
        env, problem = _retained(updates.get(e.update_id), e, expected, identity)
        if env is None:
            return masked, problem
        problem = _check_block(env, record)
        if problem is not None:
            return masked, f"retained update {e.update_id} ({e.participant}): {problem}"
        masked[e.participant] = env.tensors
    return masked, None


def _check_secure_record(
    rec: VersionRecord, record: SecureRecord, cohort: Cohort, fraction_bits: int
) -> str | None:
    """A secure version's record against its spec and lineage."""
    d = record.decision
    if d.cohort + 1 != rec.version:
        return f"records cohort {d.cohort}, whose sum makes version {d.cohort + 1}"
    if sorted(d.survivors + d.dropped) != list(cohort.members) or list(d.survivors) != sorted(
        d.survivors
    ):
        return f"cohort {d.cohort}'s decision does not split the task's participants"
    if [e.participant for e in rec.lineage] != list(d.survivors):
        return f"the lineage does not list cohort {d.cohort}'s survivors in name order"
    if record.threshold != cohort.threshold:
        return f"records threshold {record.threshold}, the spec gives {cohort.threshold}"
    if record.fraction_bits != fraction_bits:
        return f"records {record.fraction_bits} fraction bits, the spec gives {fraction_bits}"
    if sorted(record.weights) != list(d.survivors):
        return f"records weights for other banks than cohort {d.cohort}'s survivors"
    for e in rec.lineage:
        if e.weight != record.scale * record.weights[e.participant]:
            return f"the lineage weight of {e.participant} is not the scale times its weight"
    named = [p for p, _ in record.answers]
    if len(set(named)) != len(named) or not set(named) <= set(d.survivors):
        return f"records answers of cohort {d.cohort} from other banks than its survivors"
    return None


def _check_block(env: UpdateEnvelope, record: SecureRecord) -> str | None:
    """A retained masked update's ``sa`` block against the version's record."""
    block = env.secagg
    if block is None:
        return "not masked, though the version was made by secure aggregation"
    if block.cohort != record.decision.cohort:
        return f"masked for cohort {block.cohort}, not {record.decision.cohort}"
    if block.weight != record.weights[env.participant]:
        return f"masked with weight {block.weight!r}, recorded {record.weights[env.participant]!r}"
    return None


def _retained_answers(
    record: SecureRecord,
    task: str,
    answers: Mapping[str, Sequence[bytes]],
    identity: _Identity,
) -> tuple[list[UnmaskAnswer], str | None]:
    """The answers a secure version's record names, in its order, each decoded and
    checked (its bank, cohort, spec hash and signature); or the problem."""
    chosen: list[UnmaskAnswer] = []
    for participant, aid in record.answers:
        bodies = answers.get(aid, ())
        if not bodies:
            return [], f"unmask answer {aid} ({participant}) is not in the audit stream"
        found: list[UnmaskAnswer] = []
        why = ""
        for body in bodies:
            try:
                a = decode_unmask_answer(body)
            except DecodeError as err:
                why = f"does not decode ({err.reason}: {err.detail})"
                continue
            if (a.task, a.participant, a.cohort) != (task, participant, record.decision.cohort):
                why = "names another task, bank or cohort than the version records"
                continue
            problem = _check_answer_identity(a, identity) or _answer_shape(a, record)
            if problem is not None:
                why = problem
                continue
            found.append(a)
        if not found:
            return [], f"retained unmask answer {aid} ({participant}): {why}"
        if len({(a.x, _shares_key(a)) for a in found}) > 1:
            return [], (
                f"retained unmask answer {aid} ({participant}) appears with different shares "
                "for the same question"
            )
        chosen.append(found[0])
    return chosen, None


def _answer_shape(a: UnmaskAnswer, record: SecureRecord) -> str | None:
    """Whether an answer answers the version's decision: shares of exactly the
    survivors' seeds, pair shares exactly with the dropped banks. (Under one id a bank
    may have answered another question too; :func:`check_cohorts` judges that one.)"""
    d = record.decision
    survivors, dropped = list(d.survivors), list(d.dropped)
    if sorted(a.b) != survivors or sorted(a.s) != survivors:
        return f"its shares do not name exactly cohort {d.cohort}'s survivors"
    if any(sorted(m) != dropped for m in a.s.values()):
        return f"its pair shares do not name exactly cohort {d.cohort}'s dropped banks"
    return None


def _shares_key(a: UnmaskAnswer) -> tuple[object, ...]:
    return (
        tuple(sorted(a.b.items())),
        tuple(sorted((k, tuple(sorted(m.items()))) for k, m in a.s.items())),
    )


def _check_answer_identity(a: UnmaskAnswer, identity: _Identity) -> str | None:
    """An answer's spec hash and signature, under the spec of its version."""
    if a.spec_hash != identity.spec_hash:
        return (
            f"prepared under spec {a.spec_hash.hex()[:16]}, the version was made under "
            f"{identity.spec_hash.hex()[:16]}"
        )
    key = identity.keys.get(a.participant)
    if key is None:
        return "the spec names no key for its bank"
    if a.signature is None:
        return "unsigned"
    if not key.verify(a.signature, a.signing_message()):
        return f"signature does not verify under {a.participant}'s key {key.fingerprint}"
    return None
