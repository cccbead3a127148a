"""How updates and models travel: one interface; RabbitMQ and in-process implementations."""

from common.transport.base import (
    DeadLetter,
    ModelDelivery,
    Subscription,
    TaskTopology,
    Transport,
    UpdateDelivery,
    next_or_none,
)

__all__ = [
    "DeadLetter",
    "ModelDelivery",
    "Subscription",
    "TaskTopology",
    "Transport",
    "UpdateDelivery",
    "next_or_none",
]
