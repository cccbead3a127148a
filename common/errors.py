"""The one exception hierarchy of fedq.

Every error fedq raises on purpose derives from :class:`FedqError`. Third-party
exceptions (msgpack, zstandard, redis, aio-pika, torch) are converted where they
enter our code, with the original kept as ``__cause__``.
"""

from __future__ import annotations

from common.refusals import Refusal


class FedqError(Exception):
    """Root of every error fedq raises on purpose."""


class DecodeError(FedqError):
    """Bytes that are not a valid envelope.

    ``reason`` is a :class:`~common.refusals.Refusal` (the dead-letter reason and the
    metrics label); ``detail`` is for humans.
    """

    def __init__(self, reason: Refusal | str, detail: str = "") -> None:
        self.reason = Refusal(reason)  # an unknown reason is a bug: ValueError here
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}" if detail else str(self.reason))


class EncodeError(FedqError):
    """Values that cannot be put on the wire (bad ids, unsupported dtype, too large)."""


class NonFiniteError(EncodeError):
    """A float tensor holds NaN or Inf: it is never put on the wire nor stored."""

    def __init__(self, tensor: str) -> None:
        self.tensor = tensor
        super().__init__(f"tensor {tensor!r} holds NaN or Inf")


class SpecError(FedqError):
    """An invalid task or model specification."""


class StoreError(FedqError):
    """The model store failed or was asked for something it does not hold."""


class StoreUnavailableError(StoreError):
    """Redis cannot be reached (down, restarting, network): wait and try again."""


class NotFoundError(StoreError):
    """A task or version the store does not hold."""


class BlobPrunedError(NotFoundError):
    """The parameters of a version were dropped by the retention policy.

    Its metadata and lineage are still there.
    """


class StoreRegressedError(StoreError):
    """The store went backwards: its head, lineage or fencing token is behind what was
    already committed and announced (data lost on a restart, a stale backup restored).

    The aggregator stops rather than start a fresh chain over the lost one. ``what``
    names the evidence; the message says what to do.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(
            f"store went backwards: {what}; it lost committed data (restore it from a "
            "backup of its AOF/RDB files, or start a new chain under a new task id)"
        )


class CommitConflictError(StoreError):
    """A commit found the head moved or an update already applied: another writer
    committed to this task without holding its lease (never expected)."""


class TaskConflictError(StoreError):
    """A task registered again with a different spec, or version 0 created twice."""


class ConfigError(FedqError):
    """Invalid configuration given at the command line, in the environment or a file."""


class TransportError(FedqError):
    """The message broker failed, refused an operation, or lacks a queue."""


class PublishRefusedError(TransportError):
    """The broker refused a publish for good (access refused, no such exchange, a
    message over its size limit): retrying cannot help. ``code`` is the AMQP reply
    code (403, 404, 406), or None where the broker gave none."""

    def __init__(self, message: str, code: int | None = None) -> None:
        self.code = code
        super().__init__(message)


class ParticipantStoppedError(FedqError):
    """A participant stopped publishing because the aggregator refused one of its updates
    for a reason that can never heal (:data:`common.refusals.PERMANENT`)."""

    def __init__(self, participant: str, reason: str, detail: str, update_id: str) -> None:
        self.participant, self.reason, self.detail, self.update_id = (
            participant,
            reason,
            detail,
            update_id,
        )
        super().__init__(
            f"participant {participant!r} stopped: update {update_id} was refused "
            f"({reason}: {detail}); this cannot succeed on a retry, fix the cause and restart"
        )


class SecAggError(FedqError):
    """Secure aggregation cannot go on: a masked update, an unmask request or answer is
    inconsistent (a share that does not decrypt or does not fit, a bank named both
    survivor and dropped, too few answers) (common/secagg.py)."""
