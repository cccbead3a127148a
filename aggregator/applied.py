"""The update ids applied in the most recent versions, kept in memory by the writer.

An update can only go into a version after its base version, so when the ids of
every version after ``since`` are here, an update whose base is at or after
``since`` needs no store round trip to know whether it was applied: if it is not
here, it was not (section "one round trip per commit", docs/reliability.md). The
store stays the authority: its commit script refuses a duplicate id anyway, and
what cannot be answered from here is asked of the store.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping


class RecentlyApplied:
    """Ids of the last versions (at most ``max_ids``, whole versions evicted first)."""

    def __init__(self, max_ids: int) -> None:
        if max_ids < 1:
            raise ValueError("max_ids must be at least 1")
        self.max_ids = max_ids
        self._ids: dict[str, int] = {}
        self._versions: deque[tuple[int, tuple[str, ...]]] = deque()
        #: Every id applied in a version after this one is here (None: nothing known).
        self.since: int | None = None

    def __len__(self) -> int:
        return len(self._ids)

    def load(self, since: int, applied: Mapping[str, int]) -> None:
        """Start over from the ids of versions ``since + 1 ..`` (read from the store)."""
        self._ids.clear()
        self._versions.clear()
        self.since = since
        by_version: dict[int, list[str]] = {}
        for update_id, version in applied.items():
            by_version.setdefault(version, []).append(update_id)
        for version in sorted(by_version):
            self.add(version, by_version[version])

    def add(self, version: int, ids: Iterable[str]) -> None:
        """The ids committed in ``version`` (versions come in increasing order)."""
        kept = tuple(ids)
        for update_id in kept:
            self._ids[update_id] = version
        self._versions.append((version, kept))
        while len(self._ids) > self.max_ids and len(self._versions) > 1:
            old, gone = self._versions.popleft()
            for update_id in gone:
                if self._ids.get(update_id) == old:
                    del self._ids[update_id]
            self.since = old if self.since is None else max(self.since, old)

    def remember(self, update_id: str, version: int) -> None:
        """An id the store reported applied (outside the window): refused at once next time."""
        self._ids[update_id] = version

    def get(self, update_id: str) -> int | None:
        """The version ``update_id`` went into, if it is known here."""
        return self._ids.get(update_id)

    def covers(self, base_version: int) -> bool:
        """Whether every version an update based on ``base_version`` could be in is here."""
        return self.since is not None and base_version >= self.since
