"""A model envelope as segments: ``pack_model`` without joining the tensors' bytes.

:func:`pack_model_segments` gives the very bytes ``pack_model(task, version,
version_hash, encode_tensors(tensors, codec))`` gives (docs/wire-format.md), cut into
segments (:mod:`common.segments`): the envelope's small msgpack pieces, and each
tensor's payload on its own. With ``raw`` a payload is a memoryview of the tensor's own
memory (a contiguous CPU tensor: no copy of the parameters); with ``zstd`` it is the
compressed frame. The store writes a large model and the announcer sends it without
ever holding a second copy of its parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

import torch

from common.codecs import get_codec
from common.errors import DecodeError, EncodeError
from common.hashing import HASH_SIZE, TensorHasher
from common.segments import Segments
from common.wire import (
    DEFAULT_LIMITS,
    FORMAT_VERSION,
    KIND_MODEL,
    _check_count,
    _check_exact,
    _check_name,
    _checked_tensor,
    _pack_value,
)

__all__ = ["pack_model_segments"]

#: The largest payload msgpack's bin 32 carries.
_MAX_BIN: Final = 2**32 - 1


def pack_model_segments(
    task: str,
    version: int,
    version_hash: bytes | Callable[[bytes], bytes],
    tensors: Mapping[str, torch.Tensor],
    codec: str,
) -> tuple[Segments, bytes]:
    """The model envelope of ``tensors`` as segments, and its content hash.

    ``version_hash``: the version hash, or the function giving it from the content
    hash (a version's hash binds its parameters' hash: one pass over them then).

    ``common.segments.join`` of the segments is byte for byte what
    ``pack_model(task, version, version_hash, encode_tensors(tensors, codec))`` gives,
    and the checks and errors are theirs (EncodeError, NonFiniteError); a lossy codec
    is refused first (a model envelope carries exact parameters). The ``raw`` payloads
    view the tensors' memory: the segments are valid while the tensors are unchanged.
    """
    _check_exact(codec)
    try:
        chosen = get_codec(codec)
    except DecodeError as e:
        raise EncodeError(str(e)) from e
    segments: list[bytes | bytearray | memoryview] = []
    hasher = TensorHasher()
    most = DEFAULT_LIMITS.max_tensors
    if len(tensors) > most:
        raise EncodeError(f"{len(tensors)} tensors, the wire carries at most {most}")
    entries = bytearray(_array_header(len(tensors)))  # the msgpack since the last payload
    for name, t in tensors.items():
        dtype, shape, raw = _checked_tensor(name, t)
        payload: bytes | memoryview = (
            raw if chosen.name == "raw" else chosen.encode_tensor(raw, dtype, shape)
        )
        hasher.add(name, dtype, shape, raw)
        size = memoryview(payload).nbytes
        if size > _MAX_BIN:
            raise EncodeError(f"cannot encode envelope: tensor {name!r} is over 4 GiB encoded")
        entries += (
            b"\x84" + _pack_value("n") + _pack_value(name) + _pack_value("d") + _pack_value(dtype)
        )
        entries += _pack_value("s") + _pack_value(shape) + _pack_value("b") + _bin_header(size)
        if size:
            segments += [bytes(entries), payload]
            entries = bytearray()
    digest = hasher.digest()
    # pack_model's checks, after encode_tensors' (the same order as composing them).
    _check_name("task", task)
    _check_count("version", version, minimum=0)
    if callable(version_hash):
        version_hash = version_hash(digest)
    if version_hash and len(version_hash) != HASH_SIZE:
        raise EncodeError("version_hash must be empty or a 32-byte SHA-256 digest")
    # {"fv", "k", "t", "v", "vh", "c", "ts", "h"}: the map, as pack_model orders it.
    head = bytearray(b"\x88")
    head += (
        _pack_value("fv") + _pack_value(FORMAT_VERSION) + _pack_value("k") + _pack_value(KIND_MODEL)
    )
    head += _pack_value("t") + _pack_value(task) + _pack_value("v") + _pack_value(version)
    head += (
        _pack_value("vh")
        + _pack_value(bytes(version_hash))
        + _pack_value("c")
        + _pack_value(chosen.name)
    )
    head += _pack_value("ts")
    tail = entries + _pack_value("h") + _pack_value(digest)
    if segments:
        segments[0] = bytes(head) + segments[0]
        segments.append(bytes(tail))
    else:
        segments.append(bytes(head + tail))
    return segments, digest


def _array_header(n: int) -> bytes:
    """msgpack's array header for ``n`` items (the smallest form, as msgpack packs)."""
    if n <= 15:
        return bytes([0x90 | n])
    if n <= 0xFFFF:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _bin_header(n: int) -> bytes:
    """msgpack's bin header for ``n`` bytes (the smallest form, as msgpack packs)."""
    if n <= 0xFF:
        return b"\xc4" + n.to_bytes(1, "big")
    if n <= 0xFFFF:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")
