"""What the store returns: version records, commit outcomes, verification reports."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aggregator.server_opt import ServerState
from common.errors import StoreError
from common.hashing import LineageEntry, optimizer_bytes
from common.segments import Segments
from common.spec import ServerOptimizerSpec
from common.wire import Tensors

#: Free-form, JSON-serialisable facts about how a version was made (strategy, settings).
Info = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """A version's metadata and lineage (everything but its parameters)."""

    task: str
    version: int
    parent: int | None
    param_hash: bytes
    version_hash: bytes
    created_at: float
    lineage: tuple[LineageEntry, ...] = ()
    info: Info = field(default_factory=dict)
    #: The server optimizer that made the version, when it keeps state (not sgd).
    optimizer: ServerOptimizerSpec | None = None
    #: The hash of the optimizer state after this version (with ``optimizer``).
    state_hash: bytes | None = None

    def __post_init__(self) -> None:
        if (self.optimizer is None) != (self.state_hash is None):
            raise StoreError("a version has both an optimizer and a state hash, or neither")

    def optimizer_bytes(self, state_hash: bytes | None = None) -> bytes | None:
        """What the version hash binds of the optimizer (None without one), with
        ``state_hash`` in place of the recorded one when given (verification)."""
        if self.optimizer is None or self.state_hash is None:
            return None
        o = self.optimizer
        return optimizer_bytes(
            kind=o.kind,
            lr=o.lr,
            beta1=o.beta1,
            beta2=o.beta2,
            tau=o.tau,
            state_hash=self.state_hash if state_hash is None else state_hash,
        )

    def meta_json(self) -> bytes:
        """The metadata document stored in Redis."""
        doc: dict[str, Any] = {
            "task": self.task,
            "version": self.version,
            "parent": self.parent,
            "param_hash": self.param_hash.hex(),
            "version_hash": self.version_hash.hex(),
            "created_at": self.created_at,
            "updates": len(self.lineage),
            "info": dict(self.info),
        }
        if self.optimizer is not None and self.state_hash is not None:
            doc["optimizer"] = self.optimizer.model_dump(mode="json")
            doc["state_hash"] = self.state_hash.hex()
        return json.dumps(doc, sort_keys=True).encode()

    @staticmethod
    def lineage_json(lineage: tuple[LineageEntry, ...]) -> bytes:
        """The lineage document stored in Redis."""
        return json.dumps(
            [
                {
                    "update_id": e.update_id,
                    "participant": e.participant,
                    "base_version": e.base_version,
                    "staleness": e.staleness,
                    "weight": e.weight,
                    "content_hash": e.content_hash.hex(),
                }
                for e in lineage
            ]
        ).encode()

    @classmethod
    def from_json(cls, meta: bytes, lineage: bytes) -> VersionRecord:
        """Rebuild a record from its two stored documents."""
        try:
            m = json.loads(meta)
            entries = tuple(
                LineageEntry(
                    update_id=str(e["update_id"]),
                    participant=str(e["participant"]),
                    base_version=int(e["base_version"]),
                    staleness=int(e["staleness"]),
                    weight=float(e["weight"]),
                    content_hash=bytes.fromhex(e["content_hash"]),
                )
                for e in json.loads(lineage)
            )
            return cls(
                task=str(m["task"]),
                version=int(m["version"]),
                parent=None if m["parent"] is None else int(m["parent"]),
                param_hash=bytes.fromhex(m["param_hash"]),
                version_hash=bytes.fromhex(m["version_hash"]),
                created_at=float(m["created_at"]),
                lineage=entries,
                info=dict(m.get("info", {})),
                optimizer=_optimizer(m.get("optimizer")),
                state_hash=None if m.get("state_hash") is None else bytes.fromhex(m["state_hash"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"stored version record is unreadable: {e}") from e


def _optimizer(doc: object) -> ServerOptimizerSpec | None:
    return None if doc is None else ServerOptimizerSpec.model_validate(doc)


class CommitOutcome(enum.Enum):
    """How a commit ended. Only COMMITTED changed anything."""

    COMMITTED = "committed"
    #: The parent is no longer the head: another writer committed first.
    LOST_RACE = "lost_race"
    #: At least one update id was already applied in an earlier version.
    DUPLICATE = "duplicate"
    #: The writer's lease is gone or held by another aggregator: it must stop.
    FENCED = "fenced"


@dataclass(frozen=True, slots=True)
class CommitResult:
    """The outcome of a commit and, when it committed, the new version's record."""

    outcome: CommitOutcome
    record: VersionRecord | None = None
    #: The head seen when the commit was refused as a lost race.
    head: int | None = None
    #: update id -> version it was already applied in (DUPLICATE).
    duplicates: Mapping[str, int] = field(default_factory=dict)
    #: The committed version's parameters as stored: a model envelope, ready to announce,
    #: as segments (``common.segments``; join them for one byte string). Its ``raw``
    #: payloads view the committed tensors' memory: valid while those are unchanged.
    blob: Segments = ()

    @property
    def committed(self) -> bool:
        """Whether the version was written."""
        return self.outcome is CommitOutcome.COMMITTED


@dataclass(frozen=True, slots=True)
class NewVersion:
    """One version to commit in a group (:meth:`RedisModelStore.commit_many`): its
    parameters, lineage and info, and the server optimizer's state after it, if any."""

    params: Tensors
    lineage: Sequence[LineageEntry]
    info: Info
    state: ServerState | None = None


@dataclass(frozen=True, slots=True)
class GroupCommitResult:
    """The outcome of committing a group of consecutive versions: all or none."""

    outcome: CommitOutcome
    #: The committed versions' records, oldest first (COMMITTED).
    records: tuple[VersionRecord, ...] = ()
    #: Their parameters as stored (model envelopes, ready to announce), in the same
    #: order, each as segments (see :attr:`CommitResult.blob`).
    blobs: tuple[Segments, ...] = ()
    #: The head after the commit (COMMITTED), or the head seen when it was refused
    #: (LOST_RACE, DUPLICATE; None when the task has no head). None when FENCED.
    head: int | None = None
    #: update id -> version it was already applied in (DUPLICATE).
    duplicates: Mapping[str, int] = field(default_factory=dict)

    @property
    def committed(self) -> bool:
        """Whether the versions were written."""
        return self.outcome is CommitOutcome.COMMITTED


@dataclass(frozen=True, slots=True)
class Lease:
    """A writer lease: who holds it and its fencing token (larger for every new lease)."""

    owner: str
    token: int

    @property
    def value(self) -> str:
        """What the lease key holds."""
        return f"{self.owner}:{self.token}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of recomputing a task's hash chain from what the store holds."""

    task: str
    checked: int
    #: The recomputed hash of the last version checked.
    head_hash: bytes
    first_bad_version: int | None = None
    reason: str = ""
    #: Versions whose parameters were pruned: their stored parameter hash was trusted.
    unverified_params: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every checked version matched."""
        return self.first_bad_version is None
