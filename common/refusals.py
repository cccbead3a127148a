"""Why an update is refused: one enum for every place that names a reason.

The values are the wire's reason strings: the dead-letter header ``x-fedq-reason``,
the metrics label ``reason``, the ``reason`` of a decision record and the tables of
docs/wire-format.md all use them. Decoding reasons come first, in the order the
reference decoder checks them; then the aggregator's own, in the order admission
applies them (:mod:`aggregator.admission`).
"""

from __future__ import annotations

from enum import StrEnum


class Refusal(StrEnum):
    """A refusal reason (``str``-valued: ``Refusal.DUPLICATE == "duplicate"``)."""

    # --- decoding (common.wire), docs/wire-format.md section 10
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    WRONG_KIND = "wrong_kind"
    UNKNOWN_FIELD = "unknown_field"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    UNKNOWN_CODEC = "unknown_codec"
    TOO_MANY_TENSORS = "too_many_tensors"
    TENSOR_MISMATCH = "tensor_mismatch"
    INVALID_TENSOR = "invalid_tensor"
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    SIZE_MISMATCH = "size_mismatch"
    CODEC_ERROR = "codec_error"
    HASH_MISMATCH = "hash_mismatch"
    NON_FINITE = "non_finite"

    # --- admission (aggregator.admission), docs/wire-format.md section 11
    UNKNOWN_TASK = "unknown_task"
    UNKNOWN_PARTICIPANT = "unknown_participant"
    SENDER_MISMATCH = "sender_mismatch"
    TOO_MANY_SAMPLES = "too_many_samples"
    FUTURE_BASE = "future_base"
    STALE_ROUND = "stale_round"
    DUPLICATE_IN_ROUND = "duplicate_in_round"
    TOO_STALE = "too_stale"
    DUPLICATE = "duplicate"
    BASE_UNAVAILABLE = "base_unavailable"
    # --- after admission: the strategy or the aggregate
    INVALID_UPDATE = "invalid_update"
    NON_FINITE_RESULT = "non_finite_result"
    # --- set by the broker, never by fedq
    DELIVERY_LIMIT = "delivery_limit"
