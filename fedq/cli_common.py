"""What the ``fedq`` commands share: server defaults and the way they fail."""

from __future__ import annotations

import sys
from typing import NoReturn

from rich.console import Console

from common.errors import FedqError

AMQP_DEFAULT = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_DEFAULT = "redis://127.0.0.1:6379/0"


def fail(e: FedqError) -> NoReturn:
    """Print the error's reason on stderr, on one line, and exit with status 2."""
    message = " ".join(str(e).split())  # one line, whatever the reason's text holds
    Console(stderr=True, soft_wrap=True, highlight=False).print(
        f"[red]error:[/] {message}", markup=True
    )
    sys.exit(2)
