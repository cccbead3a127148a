"""Any version's parameters, kept or not: checkpoints plus lineage.

With ``StoreConfig.checkpoint_every`` (or ``keep_blobs``) the store keeps the
parameters of some versions only (:meth:`aggregator.store.StoreConfig.keeps`); every
version keeps its record (metadata, lineage, hashes). :func:`rebuild` returns the
parameters of any version:

- kept: the stored blob, checked against the version's recorded parameter hash and
  version hash;
- pruned: from the nearest kept version ``c`` below it (lower still when an update of
  ``c + 1 .. v`` made by a strategy that reads its base, FedAsync, names a base version
  before ``c``), versions ``c + 1 .. v`` are recomputed from their retained updates by
  replay's own machinery (:class:`aggregator.audit.replay.Chain`: the strategies'
  ``recompute``, server optimizer states, bank-level DP's recorded seeds, robust clip
  factors, secure aggregation, failed cohorts), each checked against its recorded
  parameter hash, state hash, chained version hash and signatures. The first that does
  not match is a :class:`RebuildError` naming it: unverified parameters are never
  returned.

The retained updates are the audit stream's (``Transport.read_audit(task)``): given
as :func:`~aggregator.audit.replay.index_updates` of it (with
:func:`~aggregator.audit.replay.index_answers` for secure aggregation), or as the
stream itself (an async or plain iterable of message bodies), which is read only when
a rebuild is needed and of which only the updates the rebuild uses (and the unmask
answers) are held.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from aggregator.audit.replay import (
    READ_LIMITS,
    Chain,
    Identities,
    ReplayError,
    ReplayReport,
    Start,
    index_answers,
    index_updates,
    stored_start,
    uses_base,
)
from aggregator.server_opt import ServerState
from aggregator.store import RedisModelStore, VersionRecord
from common.errors import (
    BlobPrunedError,
    DecodeError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
)
from common.models import task_tensor_specs
from common.wire import (
    KIND_UNMASK_ANSWER,
    Tensors,
    peek_header,
    peek_kind,
    tensors_hash,
)

__all__ = ["RebuildError", "Rebuilt", "Retained", "rebuild"]

#: The retained updates: by update id (``index_updates`` of the audit stream), or the
#: audit stream's message bodies, oldest first (``Transport.read_audit(task)``).
Retained = Mapping[str, bytes] | AsyncIterable[bytes] | Iterable[bytes]

#: Records read per round trip.
_BATCH = 512


class RebuildError(ReplayError):
    """A version's parameters cannot be rebuilt: ``bad_version`` (the version asked
    for, or one recomputed on the way) does not match its record, or its inputs are
    missing; ``reason`` says why."""

    def __init__(self, task: str, version: int, bad_version: int, reason: str) -> None:
        self.task, self.version, self.bad_version, self.reason = task, version, bad_version, reason
        where = "" if bad_version == version else f": version {bad_version}"
        super().__init__(f"cannot rebuild {task!r} version {version}{where}: {reason}")


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """A version's parameters, checked against its record."""

    record: VersionRecord
    params: Tensors
    #: The server optimizer's state after the version (None when it has none).
    state: ServerState | None
    #: The kept version the parameters were recomputed from (the version itself when
    #: its parameters are kept).
    checkpoint: int

    @property
    def version(self) -> int:
        """The version rebuilt."""
        return self.record.version

    @property
    def recomputed(self) -> int:
        """How many versions were recomputed (0: the stored parameters)."""
        return self.record.version - self.checkpoint


async def rebuild(
    store: RedisModelStore,
    task: str,
    version: int,
    updates: Retained,
    *,
    answers: Mapping[str, Sequence[bytes]] | None = None,
) -> Rebuilt:
    """The parameters of ``version`` of ``task``: stored, or recomputed from the nearest
    kept version below it and the retained ``updates`` (by update id, or the audit
    stream's bodies; ``answers``, by answer id, for versions made by secure aggregation
    when ``updates`` is a mapping), every version checked against its record.

    NotFoundError when the task has no such version, StoreUnavailableError when Redis
    cannot be reached (try again); RebuildError when the parameters cannot be rebuilt
    (a stored blob, a retained update, a lineage entry or a record that does not
    match, an update missing from the stream, no kept version below).
    """
    try:
        start = await stored_start(store, task, version)
    except BlobPrunedError:
        pass
    except (NotFoundError, StoreUnavailableError):
        raise
    except (StoreError, ReplayError) as err:
        raise RebuildError(task, version, version, str(err)) from err
    else:
        return Rebuilt(start.record, start.params, start.state, version)
    start, records = await _checkpoint(store, task, version)
    if isinstance(updates, Mapping):
        by_id, by_answer = updates, answers or {}
    else:
        by_id, by_answer = await _collect(updates, records)
    spec = await store.get_spec(task)
    chain = Chain(
        store,
        by_id,
        by_answer,
        Identities(await store.spec_history(task), spec),
        task_tensor_specs(spec),
        _load_pruned,
    )
    report = ReplayReport(task, start.record.version, version)
    params, state = await chain.run(records, start, report)
    if report.first_bad_version is not None:
        raise RebuildError(task, version, report.first_bad_version, report.reason)
    record = records[-1]
    if report.checked != len(records) or tensors_hash(params) != record.param_hash:
        raise RebuildError(task, version, version, "rebuilt parameters differ from the record")
    return Rebuilt(record, params, state, start.record.version)


async def _checkpoint(
    store: RedisModelStore, task: str, version: int
) -> tuple[Start, list[VersionRecord]]:
    """The kept version to rebuild ``version`` from and the records after it: the
    nearest kept version below ``version``, lowered while a base version that a later
    update reads precedes it, or while its blob or state turns out pruned meanwhile
    (the aggregator's retention runs concurrently)."""
    top = version - 1
    cached: dict[int, VersionRecord] = {}
    while True:
        c = await store.kept_below(task, top)
        if c is None:
            raise RebuildError(
                task, version, version, f"no version up to {max(top, 0)} keeps its parameters"
            )
        records = await _records(store, task, c + 1, version, cached)
        low = min((e.base_version for r in records if uses_base(r) for e in r.lineage), default=c)
        if low < c:
            top = low
            continue
        try:
            return await stored_start(store, task, c), records
        except BlobPrunedError:
            top = c - 1
        except StoreUnavailableError:
            raise
        except (StoreError, ReplayError) as err:
            raise RebuildError(task, version, c, str(err)) from err


async def _records(
    store: RedisModelStore, task: str, first: int, last: int, cached: dict[int, VersionRecord]
) -> list[VersionRecord]:
    """The records of ``first .. last``, read in batches (those not in ``cached``)."""
    wanted = [v for v in range(first, last + 1) if v not in cached]
    for at in range(0, len(wanted), _BATCH):
        for r in await store.get_versions(task, wanted[at : at + _BATCH]):
            cached[r.version] = r
    return [cached[v] for v in range(first, last + 1)]


async def _collect(
    stream: AsyncIterable[bytes] | Iterable[bytes], records: Sequence[VersionRecord]
) -> tuple[dict[str, bytes], dict[str, list[bytes]]]:
    """From the audit stream's bodies: the updates ``records`` name, by id, and every
    unmask answer, by answer id (the rest is not held)."""
    wanted = {e.update_id for r in records for e in r.lineage}
    kept: list[bytes] = []

    def take(body: bytes) -> None:
        if peek_kind(body) == KIND_UNMASK_ANSWER:
            kept.append(body)
            return
        try:
            uid = peek_header(body, READ_LIMITS).get("id")
        except DecodeError:
            return
        if uid in wanted:
            kept.append(body)

    if isinstance(stream, AsyncIterable):
        async for body in stream:
            take(body)
    else:
        for body in stream:
            take(body)
    return index_updates(kept), index_answers(kept)


async def _load_pruned(task: str, version: int) -> Tensors:
    """Never called: :func:`_checkpoint` starts below every base version read."""
    raise ReplayError(f"base version {version} of {task!r} precedes the checkpoint")
