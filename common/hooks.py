"""Named hooks around stages of work, for benchmarks: no private method is patched.

The aggregator, the store and the participant worker call ``stages(name)`` around
each stage ("admit", "commit", "worker: train + encode + publish", ...) and run the
stage inside it. The default does nothing; a benchmark passes one that times.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

#: ``stages(name)`` returns a context manager entered around the named stage.
Stages = Callable[[str], AbstractContextManager[object]]


def untimed(_: str) -> AbstractContextManager[object]:
    """The default :data:`Stages`: nothing happens around a stage."""
    return nullcontext()
