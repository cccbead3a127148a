"""Content hashes of tensors and the chained hashes of model versions.

Both are SHA-256 over a byte layout documented in docs/wire-format.md, so an
auditor can recompute them in any language.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import msgpack

TENSORS_DOMAIN: Final = b"fedq-tensors-v1\x00"
VERSION_DOMAIN: Final = b"fedq-version-v1\x00"
HASH_SIZE: Final = 32
GENESIS_PARENT: Final = bytes(HASH_SIZE)


class TensorHasher:
    """Incremental content hash over an ordered sequence of tensors."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(TENSORS_DOMAIN)

    def add(self, name: str, dtype: str, shape: Sequence[int], raw: bytes | memoryview) -> None:
        """Feed one tensor: its name, wire dtype, shape and raw little-endian bytes."""
        h = self._h
        name_b = name.encode()
        dtype_b = dtype.encode()
        h.update(struct.pack("<I", len(name_b)))
        h.update(name_b)
        h.update(struct.pack("<B", len(dtype_b)))
        h.update(dtype_b)
        h.update(struct.pack(f"<B{len(shape)}Q", len(shape), *shape))
        h.update(struct.pack("<Q", len(raw)))
        h.update(raw)

    def digest(self) -> bytes:
        """The 32-byte SHA-256 digest."""
        return self._h.digest()


@dataclass(frozen=True, slots=True)
class LineageEntry:
    """One update that went into a version, with the weight it was given."""

    update_id: str
    participant: str
    base_version: int
    staleness: int
    weight: float
    content_hash: bytes

    def as_list(self) -> list[object]:
        """The canonical list form hashed into the version hash."""
        return [
            self.update_id,
            self.participant,
            self.base_version,
            self.staleness,
            float(self.weight),
            self.content_hash,
        ]


def lineage_bytes(lineage: Iterable[LineageEntry]) -> bytes:
    """Canonical msgpack encoding of a lineage (arrays only, floats as float64)."""
    packed: bytes = msgpack.packb([e.as_list() for e in lineage], use_bin_type=True)
    return packed


def optimizer_bytes(
    *, kind: str, lr: float, beta1: float, beta2: float, tau: float, state_hash: bytes
) -> bytes:
    """Canonical msgpack of a version's server optimizer: its settings and state hash.

    ``[kind, lr, beta1, beta2, tau, state_hash]``: a str, four float64 and a 32-byte bin.
    """
    if len(state_hash) != HASH_SIZE:
        raise ValueError("the state hash must be a 32-byte SHA-256 digest")
    packed: bytes = msgpack.packb(
        [kind, float(lr), float(beta1), float(beta2), float(tau), bytes(state_hash)],
        use_bin_type=True,
    )
    return packed


def version_hash(
    *,
    task: str,
    version: int,
    parent_hash: bytes,
    param_hash: bytes,
    lineage: bytes,
    optimizer: bytes | None = None,
) -> bytes:
    """Hash of a version: chains the parent's hash, the parameters and the ordered inputs.

    ``optimizer`` (:func:`optimizer_bytes`), only for a version made by a server
    optimizer that keeps state, is appended with its length; without it the hash is
    the one of every version made before server optimizers existed.
    """
    if len(parent_hash) != HASH_SIZE or len(param_hash) != HASH_SIZE:
        raise ValueError("parent and parameter hashes must be 32-byte SHA-256 digests")
    task_b = task.encode()
    h = hashlib.sha256(VERSION_DOMAIN)
    h.update(struct.pack("<I", len(task_b)))
    h.update(task_b)
    h.update(struct.pack("<Q", version))
    h.update(parent_hash)
    h.update(param_hash)
    h.update(struct.pack("<Q", len(lineage)))
    h.update(lineage)
    if optimizer is not None:
        h.update(struct.pack("<Q", len(optimizer)))
        h.update(optimizer)
    return h.digest()
