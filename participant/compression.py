"""Lossy compression of a bank's updates, with error feedback.

The task spec's ``compression`` (common/spec.py) names the codec; the worker
compresses each delta after local training (and after any privacy mechanism: the
delta is already clipped and noised) and before it signs the update. With
``error_feedback`` the bank keeps what compression lost, its **residual**
``delta + previous residual - decoded`` (float32), and adds it to its next delta
before compressing that one: over updates nothing is lost for good, only delayed.
``decoded`` is what the aggregator decodes, bit for bit (the encoder decodes its own
payload to hash it, docs/wire-format.md section 8).

The residual lives in the worker's memory only: a restarted worker starts again
from none, which loses at most one update's compression error and is otherwise
harmless (the residual is not part of any protocol). Like the delta, it is computed
from the privacy mechanism's output only, so it spends no privacy budget.
"""

from __future__ import annotations

import torch

from common.codecs import Codec, lossy_codec
from common.spec import CompressionSpec
from common.wire import EncodedTensors, Tensors, encode_tensors


class Compressor:
    """The task's lossy codec at one bank, and its error-feedback residual."""

    def __init__(self, spec: CompressionSpec) -> None:
        self.spec = spec
        self.codec: Codec = lossy_codec(
            spec.codec,
            zstd=spec.lossless == "zstd",
            stochastic=spec.stochastic_rounding,
            topk_fraction=spec.topk_fraction,
        )
        #: What compression has lost so far, by tensor (float32 tensors only); empty
        #: without error feedback and before the first update.
        self.residual: Tensors = {}

    @property
    def name(self) -> str:
        """The wire codec (``c``) of the updates it makes."""
        return self.codec.name

    def compress(self, delta: Tensors, seed: int | None = None) -> tuple[EncodedTensors, Tensors]:
        """Encode ``delta`` plus the residual; returns the encoded tensors (with what
        they decode to) and the new residual, which :meth:`keep` makes current once
        the update has left. ``seed``: the encoder's randomness (stochastic rounding)."""
        target = self.with_residual(delta)
        encoded = encode_tensors(target, self.codec, seed=seed)
        if not self.spec.error_feedback or encoded.decoded is None:
            return encoded, {}
        decoded = encoded.decoded
        # Only float32 tensors are compressed (the rest travel exactly).
        residual = {
            name: t - decoded[name] for name, t in target.items() if t.dtype == torch.float32
        }
        return encoded, residual

    def with_residual(self, delta: Tensors) -> Tensors:
        """``delta`` with the residual added to each tensor that has one (float32)."""
        out = dict(delta)
        for name, r in self.residual.items():
            t = out.get(name)
            if t is not None and t.shape == r.shape and t.dtype == r.dtype:
                out[name] = t + r
        return out

    def keep(self, residual: Tensors) -> None:
        """Make ``residual`` (from :meth:`compress`) the one the next delta gets."""
        self.residual = residual
