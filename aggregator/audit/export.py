"""Export a version for serving: safetensors parameters plus the spec to rebuild the module.

Any version can be exported: one whose parameters retention pruned (checkpoints) is
rebuilt from the retained updates first (:mod:`aggregator.audit.rebuild`).

The file's metadata names the task, the version and both hashes, so the deployed
model can be traced to the audited version; :func:`load_exported` checks the
parameter hash on load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from aggregator.audit.rebuild import Retained, rebuild
from aggregator.audit.replay import stored_start
from aggregator.store import RedisModelStore
from common.errors import BlobPrunedError, FedqError
from common.models import build_task_model
from common.spec import TaskSpec
from common.wire import Tensors, tensors_hash


def spec_path(path: Path) -> Path:
    """The spec beside an exported model: ``model.safetensors`` -> ``model.spec.json``."""
    return path.with_suffix(".spec.json")


#: The ``format`` metadata of every model file fedq writes.
MODEL_FORMAT = "fedq-model-1"


def save_model(path: Path, tensors: Tensors, metadata: dict[str, str]) -> dict[str, str]:
    """Write ``tensors`` to ``path`` (safetensors) with ``metadata``; returns what was written."""
    written = {"format": MODEL_FORMAT, **metadata}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=written)
    return written


async def export_version(
    store: RedisModelStore,
    task: str,
    version: int,
    path: Path,
    *,
    updates: Retained | None = None,
    answers: Mapping[str, Sequence[bytes]] | None = None,
) -> dict[str, str]:
    """Write ``path`` (safetensors) and its spec; returns the metadata written.

    The parameters are the stored ones, checked against the version's record; when
    retention pruned them (checkpoints) they are rebuilt from the nearest kept version
    below and the retained ``updates`` (:func:`aggregator.audit.rebuild.rebuild`, every
    version checked), which are then needed: without them that is an error.
    """
    record = await store.get_version(task, version)
    if updates is None:
        try:
            tensors = (await stored_start(store, task, version)).params
        except BlobPrunedError as err:
            raise FedqError(
                f"{err}: rebuilding them needs the retained updates (the audit stream)"
            ) from err
    else:
        tensors = (await rebuild(store, task, version, updates, answers=answers)).params
    spec = await store.get_spec(task)
    metadata = save_model(
        path,
        tensors,
        {
            "task": task,
            "version": str(version),
            "param_hash": record.param_hash.hex(),
            "version_hash": record.version_hash.hex(),
        },
    )
    spec_path(path).write_text(json.dumps(json.loads(spec.to_json()), indent=2) + "\n")
    return metadata


def load_exported(path: Path) -> tuple[TaskSpec, nn.Module, Tensors]:
    """Rebuild the module of an exported version; refuses a file whose parameters changed."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path))
    spec = TaskSpec.from_json(spec_path(path).read_text())
    # Hash in the model's own order (safetensors sorts names on disk).
    module = build_task_model(spec)
    ordered = {k: tensors[k] for k in module.state_dict()}
    if tensors_hash(ordered).hex() != metadata.get("param_hash"):
        raise FedqError(f"{path}: parameters do not match the exported parameter hash")
    module.load_state_dict(ordered)
    return spec, module, ordered
