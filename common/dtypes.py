"""Tensor element types allowed on the wire, by their wire names."""

from __future__ import annotations

from typing import Final

import torch

#: wire name -> torch dtype. The wire names are the contract; see docs/wire-format.md.
WIRE_DTYPES: Final[dict[str, torch.dtype]] = {
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f32": torch.float32,
    "f64": torch.float64,
    "i8": torch.int8,
    "u8": torch.uint8,
    "i16": torch.int16,
    "i32": torch.int32,
    "i64": torch.int64,
    "bool": torch.bool,
}

_BY_TORCH: Final[dict[torch.dtype, str]] = {v: k for k, v in WIRE_DTYPES.items()}

FLOAT_WIRE_DTYPES: Final[frozenset[str]] = frozenset({"f16", "bf16", "f32", "f64"})


def wire_name(dtype: torch.dtype) -> str | None:
    """The wire name of a torch dtype, or None when it cannot be sent."""
    return _BY_TORCH.get(dtype)


def itemsize(name: str) -> int:
    """Bytes per element of a wire dtype (``name`` must be a key of WIRE_DTYPES)."""
    return WIRE_DTYPES[name].itemsize
