"""What went into a version, and what was refused while it was being made."""

from __future__ import annotations

from typing import Any

from aggregator.store import RedisModelStore


async def version_lineage(store: RedisModelStore, task: str, version: int) -> dict[str, Any]:
    """A version's record, its contributing updates and the refusals in its window.

    The window of version N is the time the head was N - 1: refusals recorded with
    ``head == N - 1`` are the updates offered for N and turned away.
    """
    rec = await store.get_version(task, version)
    refusals = [
        {
            k: d[k]
            for k in (
                "participant",
                "update_id",
                "reason",
                "detail",
                "message_id",
                "body_sha256",
                "at",
            )
            if k in d
        }
        for d in await store.decisions(task)
        if d.get("decision") == "refused" and d.get("head") == str(version - 1)
    ]
    return {
        "task": task,
        "version": version,
        "parent": rec.parent,
        "created_at": rec.created_at,
        "param_hash": rec.param_hash.hex(),
        "version_hash": rec.version_hash.hex(),
        "strategy": rec.info.get("strategy"),
        "settings": rec.info.get("settings"),
        "optimizer": None if rec.optimizer is None else rec.optimizer.model_dump(mode="json"),
        "state_hash": None if rec.state_hash is None else rec.state_hash.hex(),
        #: Bank-level DP (aggregator.privacy.VersionPrivacy): seed, clip bound, noise,
        #: cumulative epsilon; None for a version made without it.
        "privacy": rec.info.get("privacy"),
        "updates": [
            {
                "participant": e.participant,
                "update_id": e.update_id,
                "base_version": e.base_version,
                "staleness": e.staleness,
                "weight": e.weight,
                "content_hash": e.content_hash.hex(),
            }
            for e in rec.lineage
        ],
        "refusals": refusals,
    }
