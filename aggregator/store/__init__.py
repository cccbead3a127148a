"""The model store: every model version of every task, with its lineage, in Redis."""

from aggregator.store.keys import Keys
from aggregator.store.records import (
    CommitOutcome,
    CommitResult,
    GroupCommitResult,
    Lease,
    NewVersion,
    VerifyReport,
    VersionRecord,
)
from aggregator.store.redis_store import RedisModelStore, StoreConfig, connect_redis

__all__ = [
    "CommitOutcome",
    "CommitResult",
    "GroupCommitResult",
    "Keys",
    "Lease",
    "NewVersion",
    "RedisModelStore",
    "StoreConfig",
    "VerifyReport",
    "VersionRecord",
    "connect_redis",
]
