"""The commit as one Lua script: every check and every write of a group of versions.

:data:`COMMIT_LUA` commits versions ``parent + 1 .. parent + n`` in one round trip
(redis-py's ``register_script``: EVALSHA, and SCRIPT LOAD then EVALSHA again after a
NOSCRIPT). A script runs atomically, so the checks and the writes cannot interleave
with another writer's, and nothing is written when a check fails.

KEYS (every one shares the ``{task}`` hash tag: a single-slot script in Redis Cluster)::

    KEYS[1]  head              KEYS[2]  applied (hash)
    KEYS[3]  lease             KEYS[4]  decisions (stream)
    KEYS[5 + 4(k-1) .. 8 + 4(k-1)]     version k's blob, state, meta, lineage (k = 1..n)
    KEYS[5 + 4n .. #KEYS]              keys to delete (retention), after every write

ARGV::

    ARGV[1]  parent            ARGV[2]  "1": check the lease, "0": do not
    ARGV[3]  the lease value   ARGV[4]  decisions kept (XADD MAXLEN ~)
    ARGV[5]  n (versions)      ARGV[6]  f (fields of a decision)
    ARGV[7 .. 6 + f]           the decision field names (:data:`DECISION_FIELDS`)
    then, per version k:       blob ("" when not kept), state blob ("" when none or not
                               kept), meta JSON, lineage JSON, m (its accepted
                               updates), then m times: the update id and the f field
                               values of its decision
    then, per version k:       the blob's further pieces: their count x, then x
                               pieces; the same for the state blob

A blob or state blob is the concatenation of its slot and its further pieces. One of
at most ``blob_io.SEGMENTED_ABOVE`` bytes is its slot alone (x = 0); a larger one is
cut into pieces of a few MiB (``blob_io.arg_pieces``: views of the tensors' memory,
so the aggregator never joins a large model into one buffer; the connection sends
them a piece at a time, aggregator/store/piecewise.py), written here into one string
of their total length: SET of the first piece (the script's first write, which a full
Redis refuses under ``noeviction``: after it Redis lets a script's writes through),
SETRANGE of the last piece at its offset (which grows the string to its whole length
once), then SETRANGE of each other piece (one copy; a concatenation
in Lua would copy a large blob several times over and keep Redis busy for seconds). A
script is not rolled back when a command in it fails, so a blob SETRANGE would refuse
(over Redis's 512 MiB string limit) is refused before the call
(``blob_io.MAX_BLOB_BYTES``), as one argument of that size always was.

Checks, in this order: the lease (``GET lease == ARGV[3]``, else ``{"fenced"}``), the
head (``head == parent``, else ``{"lost_race", head}``, head ``-1`` when there is
none), the update ids (none in the applied hash, else ``{"duplicate", head, id1, v1,
id2, v2, ...}``). Then: write every kept blob and state (retention,
:meth:`~aggregator.store.StoreConfig.keeps`: a version of the group that would be
pruned at the new head is not written at all), every meta and lineage; HSET each
update id to its version and XADD its decision; DEL the keys to prune (the blobs and
states of older versions that stop being kept, :meth:`StoreConfig.dropped_by`); SET
the head to ``parent + n``; reply ``{"committed", parent + n}``.

A moved head whose versions ``parent + 1 .. parent + n`` hold exactly this call's
metas (byte for byte: their ``created_at`` is this call's) is this very call, sent
again by redis-py after a reply was lost (it retries a command on a connection
error): the reply is then ``{"committed", parent + n}`` and nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from aggregator.store.blob_io import Arg, arg_pieces
from aggregator.store.keys import Keys
from aggregator.store.records import CommitOutcome, GroupCommitResult
from common.errors import StoreError
from common.hashing import LineageEntry
from common.segments import Segments

__all__ = [
    "COMMIT_LUA",
    "DECISION_FIELDS",
    "ScriptCall",
    "ScriptVersion",
    "commit_call",
    "read_reply",
]

#: The fields of an accepted update's decision, in the order they are stored.
DECISION_FIELDS: Final = (
    "decision",
    "version",
    "head",
    "update_id",
    "participant",
    "base_version",
    "staleness",
    "weight",
    "content_hash",
    "at",
)

#: Keys before the first version's, and keys per version.
_FIXED_KEYS: Final = 4
_KEYS_PER_VERSION: Final = 4

COMMIT_LUA: Final = """
local parent = tonumber(ARGV[1])
local n = tonumber(ARGV[5])
local f = tonumber(ARGV[6])
local first = 7 + f

if ARGV[2] == '1' and redis.call('GET', KEYS[3]) ~= ARGV[3] then
  return {'fenced'}
end

local raw = redis.call('GET', KEYS[1])
local head = -1
if raw then head = tonumber(raw) end
if head ~= parent then
  if head >= parent + n then
    -- This very call, resent after its reply was lost: its metas are there.
    local i, mine = first, true
    for k = 1, n do
      if redis.call('GET', KEYS[7 + 4 * (k - 1)]) ~= ARGV[i + 2] then
        mine = false
        break
      end
      i = i + 5 + tonumber(ARGV[i + 4]) * (1 + f)
    end
    if mine then return {'committed', parent + n} end
  end
  return {'lost_race', head}
end

local dups = {'duplicate', head}
local i = first
for k = 1, n do
  local m = tonumber(ARGV[i + 4])
  i = i + 5
  for _ = 1, m do
    local seen = redis.call('HGET', KEYS[2], ARGV[i])
    if seen then
      dups[#dups + 1] = ARGV[i]
      dups[#dups + 1] = seen
    end
    i = i + 1 + f
  end
end
if #dups > 2 then return dups end

-- SET a blob: its slot, and its further pieces (their count x at ARGV[p], then the
-- pieces), written in place into one string of their total length: the first piece
-- (SET), the last at its offset (SETRANGE grows the string to its length once), then
-- the others at their offsets. "" with no pieces: not written. Returns where the
-- next blob's count is.
local function put(key, slot, p)
  local x = tonumber(ARGV[p])
  if x == 0 then
    if ARGV[slot] ~= '' then redis.call('SET', key, ARGV[slot]) end
    return p + 1
  end
  local last = #ARGV[slot]
  for j = p + 1, p + x - 1 do last = last + #ARGV[j] end
  -- SET first: the script's first write is the one a full Redis refuses (noeviction),
  -- and Redis lets every later write of a script through (DEL is never refused).
  redis.call('SET', key, ARGV[slot])
  redis.call('SETRANGE', key, last, ARGV[p + x])
  local at = #ARGV[slot]
  for j = p + 1, p + x - 1 do
    redis.call('SETRANGE', key, at, ARGV[j])
    at = at + #ARGV[j]
  end
  return p + 1 + x
end

local p = i
i = first
for k = 1, n do
  local base = 4 + 4 * (k - 1)
  local version = tostring(parent + k)
  p = put(KEYS[base + 1], i, p)
  p = put(KEYS[base + 2], i + 1, p)
  redis.call('SET', KEYS[base + 3], ARGV[i + 2])
  redis.call('SET', KEYS[base + 4], ARGV[i + 3])
  local m = tonumber(ARGV[i + 4])
  i = i + 5
  for _ = 1, m do
    redis.call('HSET', KEYS[2], ARGV[i], version)
    local entry = {}
    for j = 1, f do
      entry[2 * j - 1] = ARGV[6 + j]
      entry[2 * j] = ARGV[i + j]
    end
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', unpack(entry))
    i = i + 1 + f
  end
end
for p = 5 + 4 * n, #KEYS do redis.call('DEL', KEYS[p]) end
redis.call('SET', KEYS[1], tostring(parent + n))
return {'committed', parent + n}
"""


@dataclass(frozen=True, slots=True)
class ScriptVersion:
    """What the script writes for one version of the group."""

    version: int
    #: The parameters as stored (a model envelope, whole or as segments), or None when
    #: retention does not keep them (not written).
    blob: Segments | bytes | None
    #: The server optimizer state as stored, or None when the version has none (or
    #: retention does not keep it).
    state_blob: Segments | bytes | None
    meta: bytes
    lineage: bytes
    entries: tuple[LineageEntry, ...]


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """The KEYS and ARGV of one call of :data:`COMMIT_LUA`."""

    keys: list[str]
    args: list[Arg | str]


def commit_call(
    keys: Keys,
    task: str,
    *,
    parent: int,
    versions: Sequence[ScriptVersion],
    lease: str | None,
    max_decisions: int,
    drop: Sequence[int],
    at: float,
) -> ScriptCall:
    """The script's KEYS and ARGV for committing ``versions`` (``parent + 1`` onwards)
    under ``lease`` (None: no lease check), deleting the blobs and states of the
    versions ``drop`` (retention); decisions are stamped ``at``."""
    names = [keys.head(task), keys.applied(task), keys.lease(task), keys.decisions(task)]
    args: list[Arg | str] = [
        str(parent),
        "0" if lease is None else "1",
        lease or "",
        str(max_decisions),
        str(len(versions)),
        str(len(DECISION_FIELDS)),
        *DECISION_FIELDS,
    ]
    further: list[Arg | str] = []  # each blob's pieces after its first, in order
    for v in versions:
        names += [
            keys.blob(task, v.version),
            keys.state(task, v.version),
            keys.meta(task, v.version),
            keys.lineage(task, v.version),
        ]
        blob, state = _pieces(v.blob), _pieces(v.state_blob)
        args += [blob[0], state[0], v.meta, v.lineage, str(len(v.entries))]
        for e in v.entries:
            args += [e.update_id, *_decision(e, v.version, at)]
        further += [str(len(blob) - 1), *blob[1:], str(len(state) - 1), *state[1:]]
    args += further
    for old in drop:
        names += [keys.blob(task, old), keys.state(task, old)]
    return ScriptCall(names, args)


def _pieces(blob: Segments | bytes | None) -> list[Arg]:
    """A blob as script arguments: its slot, then its further pieces (none for a
    small blob); ``[b""]`` when it is not written."""
    return [b""] if blob is None else arg_pieces(blob)


def _decision(e: LineageEntry, version: int, at: float) -> list[bytes | str]:
    """An accepted update's decision: the values of :data:`DECISION_FIELDS`."""
    return [
        "accepted",
        str(version),
        str(version - 1),
        e.update_id,
        e.participant,
        str(e.base_version),
        str(e.staleness),
        repr(e.weight),
        e.content_hash.hex(),
        repr(at),
    ]


def read_reply(reply: object) -> GroupCommitResult:
    """The script's reply as a result (without the records and blobs of a commit)."""
    if not isinstance(reply, list) or not reply or not isinstance(reply[0], bytes | str):
        raise StoreError(f"the commit script replied {reply!r}")
    status = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
    head = int(reply[1]) if len(reply) > 1 and int(reply[1]) >= 0 else None
    if status == "fenced":
        return GroupCommitResult(CommitOutcome.FENCED)
    if status == "lost_race":
        return GroupCommitResult(CommitOutcome.LOST_RACE, head=head)
    if status == "duplicate":
        pairs = reply[2:]
        dups = {_text(u): int(v) for u, v in zip(pairs[::2], pairs[1::2], strict=True)}
        return GroupCommitResult(CommitOutcome.DUPLICATE, head=head, duplicates=dups)
    if status == "committed":
        return GroupCommitResult(CommitOutcome.COMMITTED, head=head)
    raise StoreError(f"the commit script replied {reply!r}")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
