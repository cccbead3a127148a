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
model, "what would the model be without this bank".

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
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from aggregator import privacy, server_opt
from aggregator.privacy import VersionPrivacy
from aggregator.server_opt import ServerState
from aggregator.store import RedisModelStore, VersionRecord
from aggregator.store.redis_store import STATE_LIMITS
from aggregator.strategies import Strategy, strategy_class
from common.errors import (
    BlobPrunedError,
    DecodeError,
    EncodeError,
    FedqError,
    SpecError,
    StoreError,
)
from common.hashing import LineageEntry, lineage_bytes, version_hash
from common.models import build_task_model, model_tensors, tensor_specs
from common.signing import PublicKey
from common.spec import IdentitySpec, TaskSpec
from common.wire import (
    DEFAULT_LIMITS,
    Tensors,
    TensorSpec,
    UpdateEnvelope,
    decode_model,
    decode_update,
    peek_header,
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
    excluded: str | None = None
    #: Updates of the excluded participant that were left out.
    left_out: int = 0
    params: Tensors = field(default_factory=dict)
    param_hash: bytes = b""
    #: The server optimizer state after the last version replayed (None if it has none).
    state: ServerState | None = None
    #: Updates whose signature was verified under their participant's key.
    signatures: int = 0
    #: Versions replayed that were made with bank-level DP (recorded seed and bound).
    private_versions: int = 0

    @property
    def note(self) -> str:
        """What a reader of a counterfactual of a DP run must know ("" otherwise)."""
        if self.excluded is None or not self.private_versions:
            return ""
        return (
            f"{self.private_versions} versions were made with bank-level DP: the "
            "counterfactual reuses their recorded noise seeds, bounds and noise, so it is "
            "another noisy model (what the same noise draws give without "
            f"{self.excluded}), not the noiseless difference {self.excluded} made"
        )

    @property
    def ok(self) -> bool:
        """Whether every replayed version matched the store."""
        return self.first_bad_version is None


def index_updates(bodies: list[bytes]) -> dict[str, bytes]:
    """Retained messages by update id (unreadable ones are skipped: they were refused)."""
    out: dict[str, bytes] = {}
    for body in bodies:
        try:
            head = peek_header(body, DEFAULT_LIMITS)
        except DecodeError:
            continue
        uid = head.get("id")
        if isinstance(uid, str):
            out.setdefault(uid, body)
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
    exclude: str | None = None,
    on_version: Callable[[int], None] | None = None,
) -> ReplayReport:
    """Replay versions ``from_version + 1 .. to_version`` and check them (unless excluding)."""
    spec = await store.get_spec(task)
    last = await _last_version(store, task, from_version, to_version)
    report = ReplayReport(task, from_version, last, excluded=exclude)
    start = await store.get_version(task, from_version)
    try:
        env = await store.get_params(task, from_version)
        state = await store.get_state(task, from_version)
    except BlobPrunedError as err:
        raise ReplayError(f"{err}; start from a version whose parameters are kept") from err
    except StoreError as err:
        report.first_bad_version, report.reason = from_version, str(err)
        return report
    if env.content_hash != start.param_hash:
        report.first_bad_version, report.reason = (
            from_version,
            "stored parameters differ from their recorded hash",
        )
        return report
    expected = tensor_specs(model_tensors(build_task_model(spec)))
    identities = Identities(await store.spec_history(task), spec)
    records = [await store.get_version(task, v) for v in range(from_version + 1, last + 1)]
    bases = _Bases(store, task, records, from_version, env.tensors, exclude)
    parent, parent_hash = env.tensors, start.version_hash
    try:
        private = _privacy_of(start)
    except ReplayError as err:
        report.first_bad_version, report.reason = from_version, str(err)
        return report
    for rec in records:
        strategy = _strategy(str(rec.info.get("strategy", "")))
        entries = rec.lineage if exclude is None else strategy.without(rec.lineage, exclude)
        report.left_out += len(rec.lineage) - len(entries)
        deltas: dict[str, Tensors] = {}
        problem = _decode_all(updates, entries, expected, deltas, identities.at(rec.version))
        if problem is None:
            problem = _check_privacy_settings(rec, identities.spec(rec.version))
        if problem is None:
            report.signatures += sum(1 for e in entries if e.update_id in identities.signed)
            of = {x.base_version: await bases.get(x.base_version) for x in entries}
            params, state, private, problem = await asyncio.to_thread(
                _recompute_version, strategy, rec, parent, state, of, entries, deltas, private
            )
            if problem is None and exclude is None:
                problem, parent_hash = await _verify_version(store, rec, params, state, parent_hash)
                report.params = params
        if problem is not None:
            report.first_bad_version, report.reason = rec.version, problem
            return report
        bases.keep(rec.version, params)
        parent = params
        report.checked += 1
        report.private_versions += int(private is not None)
        if on_version is not None:
            on_version(rec.version)
    report.params, report.state = parent, state
    report.param_hash = tensors_hash(parent)
    return report


def _recompute_version(
    strategy: type[Strategy],
    rec: VersionRecord,
    parent: Tensors,
    state: ServerState | None,
    bases: Mapping[int, Tensors],
    entries: tuple[LineageEntry, ...],
    deltas: Mapping[str, Tensors],
    parent_private: VersionPrivacy | None,
) -> tuple[Tensors, ServerState | None, VersionPrivacy | None, str | None]:
    """A version's parameters, optimizer state, privacy record and the problem found
    (None if none): through its recorded server optimizer when it has one, through
    bank-level DP when it has a privacy record (:func:`_recompute_private`), else
    through its strategy (no state)."""
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
    return strategy.recompute(parent, bases.__getitem__, entries, deltas), None, None, None


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
    """Replayed parameters kept while a later update still names them as its base."""

    def __init__(
        self,
        store: RedisModelStore,
        task: str,
        records: Sequence[VersionRecord],
        from_version: int,
        start: Tensors,
        exclude: str | None,
    ) -> None:
        self.store, self.task, self.exclude = store, task, exclude
        self.last_use: dict[int, int] = {}
        for rec in records:
            for e in rec.lineage:
                self.last_use[e.base_version] = rec.version
        self.history: dict[int, Tensors] = {from_version: start}

    async def get(self, v: int) -> Tensors:
        if v in self.history:
            return self.history[v]
        if self.exclude is not None:
            raise ReplayError(f"base version {v} precedes --from-version; start earlier")
        return (await self.store.get_params(self.task, v)).tensors

    def keep(self, v: int, params: Tensors) -> None:
        self.history[v] = params
        for old in [k for k in self.history if k != v and self.last_use.get(k, -1) <= v]:
            del self.history[old]


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
    if body is None:
        return f"update {e.update_id} ({e.participant}) is not in the audit stream"
    try:
        env = decode_update(body, DEFAULT_LIMITS, expected)
    except DecodeError as err:
        return f"retained update {e.update_id} does not decode ({err.reason}: {err.detail})"
    if env.content_hash != e.content_hash:
        return f"retained update {e.update_id} differs from the one recorded (content hash)"
    if (env.participant, env.base_version) != (e.participant, e.base_version):
        return f"retained update {e.update_id} names another participant or base version"
    problem = _check_identity(env, identity)
    if problem is not None:
        return f"retained update {e.update_id} ({e.participant}): {problem}"
    deltas[e.update_id] = env.tensors
    return None


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
