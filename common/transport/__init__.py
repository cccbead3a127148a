"""How updates and models travel: one interface; RabbitMQ and in-process implementations."""

from common.transport.base import (
    Announcement,
    Chunking,
    DeadLetter,
    ModelDelivery,
    ReceiptDelivery,
    Subscription,
    TaskTopology,
    Transport,
    TransportRefusal,
    UpdateDelivery,
    UpdateSubscription,
    next_or_none,
    refusal_of,
)

__all__ = [
    "Announcement",
    "Chunking",
    "DeadLetter",
    "ModelDelivery",
    "ReceiptDelivery",
    "Subscription",
    "TaskTopology",
    "Transport",
    "TransportRefusal",
    "UpdateDelivery",
    "UpdateSubscription",
    "next_or_none",
    "refusal_of",
]
