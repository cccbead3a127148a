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
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    SPEC_MISMATCH = "spec_mismatch"
    TOO_MANY_SAMPLES = "too_many_samples"
    FUTURE_BASE = "future_base"
    STALE_ROUND = "stale_round"
    DUPLICATE_IN_ROUND = "duplicate_in_round"
    TOO_STALE = "too_stale"
    DUPLICATE = "duplicate"
    BASE_UNAVAILABLE = "base_unavailable"
    #: The task's training is paused (``fedq task pause``): sent again once it resumes.
    TRAINING_PAUSED = "training_paused"
    # --- after admission: the strategy or the aggregate
    INVALID_UPDATE = "invalid_update"
    NON_FINITE_RESULT = "non_finite_result"
    # --- bounded influence (common.spec.RobustnessSpec, aggregator/bounds.py)
    OUTLIER = "outlier"
    OVER_CAP = "over_cap"
    # --- secure aggregation (docs/wire-format.md section 16)
    NOT_MASKED = "not_masked"
    COHORT_CLOSED = "cohort_closed"
    # --- the transport: a chunk set that cannot be reassembled (docs/chunking.md)
    CHUNKS_INCOMPLETE = "chunks_incomplete"
    # --- set by the broker, never by fedq
    DELIVERY_LIMIT = "delivery_limit"
    # --- a participant refusing a model announcement (besides unsigned, bad_signature,
    # spec_mismatch and the decoding reasons)
    NOT_DESCENDANT = "not_descendant"


#: Refusals that can never heal for the participant that got one: sending again (a new
#: update from the same worker, code, data and spec) is refused again. A participant
#: that receives one in a receipt stops publishing (docs/wire-format.md, "Receipts").
#: The others (too_stale, future_base, stale_round, duplicate, duplicate_in_round,
#: base_unavailable, training_paused, outlier, over_cap, invalid_update,
#: non_finite_result, cohort_closed, delivery_limit) depend on timing, the head or this
#: one update's values: the next update may pass.
PERMANENT: frozenset[Refusal] = frozenset(
    {
        # Decoding: the worker's encoder produced bytes this aggregator cannot read;
        # every update it encodes will be the same (a version or codec mismatch, a bug).
        Refusal.TOO_LARGE,  # the model's delta is as large every time
        Refusal.MALFORMED,  # the encoder writes no valid msgpack envelope
        Refusal.UNSUPPORTED_VERSION,  # the worker speaks another format version
        Refusal.WRONG_KIND,  # the worker writes another envelope kind
        Refusal.UNKNOWN_FIELD,  # the worker writes fields this aggregator does not know
        Refusal.MISSING_FIELD,  # the worker leaves out a required field
        Refusal.INVALID_FIELD,  # the worker writes a field this aggregator rejects
        Refusal.UNKNOWN_CODEC,  # the configured codec is unknown to the aggregator
        Refusal.TOO_MANY_TENSORS,  # the worker's model has more tensors than allowed
        Refusal.TENSOR_MISMATCH,  # the worker's model differs from the task's
        Refusal.INVALID_TENSOR,  # the encoder writes bad tensor entries
        Refusal.BAD_DTYPE,  # the encoder writes a dtype the aggregator does not know
        Refusal.BAD_SHAPE,  # the encoder writes shapes the aggregator refuses
        Refusal.SIZE_MISMATCH,  # the encoder's payloads do not match their shapes
        Refusal.CODEC_ERROR,  # the encoder's codec output cannot be decoded
        Refusal.HASH_MISMATCH,  # the encoder's content hash is computed differently
        # Identity and spec: configuration, fixed for the life of the worker.
        Refusal.UNKNOWN_TASK,  # the worker's spec names a task this aggregator does not run
        Refusal.UNKNOWN_PARTICIPANT,  # the participant is not in the task's spec
        Refusal.SENDER_MISMATCH,  # the broker user is not the participant it claims
        Refusal.UNSIGNED,  # the task requires signatures and the worker has no key
        Refusal.BAD_SIGNATURE,  # the worker's key is not the one the task registered
        Refusal.SPEC_MISMATCH,  # the worker runs another version of the task spec
        Refusal.TOO_MANY_SAMPLES,  # the worker's data is larger than the bank declared
        Refusal.NOT_MASKED,  # the task uses secure aggregation and the worker does not
    }
)
