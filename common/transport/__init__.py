"""How updates and models travel: one interface; RabbitMQ and in-process implementations."""

from common.transport.base import (
    Announcement,
    DeadLetter,
    ModelDelivery,
    ReceiptDelivery,
    Subscription,
    TaskTopology,
    Transport,
    UpdateDelivery,
    UpdateSubscription,
    next_or_none,
)

__all__ = [
    "Announcement",
    "DeadLetter",
    "ModelDelivery",
    "ReceiptDelivery",
    "Subscription",
    "TaskTopology",
    "Transport",
    "UpdateDelivery",
    "UpdateSubscription",
    "next_or_none",
]
