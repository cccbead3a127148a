"""fedq: message-queue federated learning on RabbitMQ and Redis.

This umbrella package holds what needs both sides: the ``fedq`` command and the
in-process simulation. The aggregator and the participant never import it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedq")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"
