"""Exchange, queue and routing-key names: the broker topology in one place.

They match broker_config/definitions.json and its policies.
"""

from __future__ import annotations

from typing import Final

UPDATES_EXCHANGE: Final = "fedq.updates"
MODELS_EXCHANGE: Final = "fedq.models"
DEAD_LETTER_EXCHANGE: Final = "fedq.dlx"
RECEIPTS_EXCHANGE: Final = "fedq.receipts"
CONTENT_TYPE: Final = "application/x-fedq+msgpack"

#: Headers the aggregator sets on a refused update it dead-letters.
REASON_HEADER: Final = "x-fedq-reason"
DETAIL_HEADER: Final = "x-fedq-detail"
VERSION_HEADER: Final = "x-fedq-version"
#: Headers of a model announcement: the writer's fencing token and the version's hash.
FENCE_HEADER: Final = "x-fedq-fence"
VERSION_HASH_HEADER: Final = "x-fedq-version-hash"

#: A participant's receipt queue holds at most this many receipts; when full, the
#: oldest is dropped (``x-overflow=drop-head``): a bank that does not read its
#: receipts loses the oldest ones, never the aggregator's progress.
RECEIPT_QUEUE_MAX_LENGTH: Final = 100_000


def update_key(task: str, participant: str) -> str:
    """Routing key of a participant's update."""
    return f"update.{task}.{participant}"


def update_binding(task: str) -> str:
    """Binding that matches every participant's updates of a task."""
    return f"update.{task}.*"


def model_key(task: str, participant: str | None = None) -> str:
    """Routing key of a model announcement: to all participants, or addressed to one.

    Either lands in the task's model stream (bound with :func:`model_binding`), which
    every participant of the task reads: addressing one changes who is meant, not who
    receives it.
    """
    return f"model.{task}.{participant or 'all'}"


def model_binding(task: str) -> str:
    """Binding of the task's model stream: every announcement of the task."""
    return f"model.{task}.*"


def dead_key(task: str) -> str:
    """Routing key of a task's dead letters."""
    return f"dead.{task}"


def work_queue(task: str) -> str:
    """The aggregator's quorum work queue of a task."""
    return f"fedq.work.{task}"


def audit_stream(task: str) -> str:
    """The stream that retains every update of a task, accepted or not."""
    return f"fedq.audit.{task}"


def dead_queue(task: str) -> str:
    """Refused and poison updates of a task, with their reasons."""
    return f"fedq.dead.{task}"


def model_stream(task: str) -> str:
    """The task's model stream: every announcement, read by every participant.

    One message per announcement, whatever the number of participants. A consumer
    starts at the last announcement; retention drops old ones.
    """
    return f"fedq.model.{task}"


def head_queue(task: str) -> str:
    """The aggregator's own record of the last model it announced (latest only).

    The store's head is cross-checked against it at start: a store that went
    backwards (data lost on a restart) is caught by something the store does not hold.
    It is read with one ``basic.get``, which tells an empty queue at once; a stream
    consumer cannot tell an empty stream from a slow one.
    """
    return f"fedq.head.{task}"


def model_queue(task: str, participant: str) -> str:
    """The per-participant model queue of fedq before the model stream; no longer declared.

    Named so that tools can find and delete the ones a broker still holds.
    """
    return f"fedq.model.{task}.{participant}"


def receipt_key(task: str, participant: str) -> str:
    """Routing key of a receipt for one participant's update."""
    return f"receipt.{task}.{participant}"


def receipt_queue(task: str, participant: str) -> str:
    """A participant's receipt queue: the fate of each of its updates (only it may read)."""
    return f"fedq.receipt.{task}.{participant}"
