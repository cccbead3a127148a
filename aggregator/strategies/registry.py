"""The registry of strategies: name -> class. Adding a strategy is one class and one line."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import TypeVar

from aggregator.strategies.base import MODES, Strategy
from aggregator.strategies.fedasync import FedAsync
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedbuff import FedBuff
from common.errors import SpecError
from common.spec import TaskSpec

S = TypeVar("S", bound=Strategy)

#: The strategy of every sync-mode task (a spec has no field to name another).
SYNC_STRATEGY = "fedavg"

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_REGISTRY: dict[str, type[Strategy]] = {}
_BUILTIN: frozenset[str] = frozenset()

#: Every registered strategy class by name (read-only; change it with :func:`register`).
STRATEGIES: Mapping[str, type[Strategy]] = MappingProxyType(_REGISTRY)


def register(cls: type[S]) -> type[S]:
    """Register a strategy class under ``cls.name``; returns it (usable as a decorator).

    Raises ValueError for a malformed name or mode, or a name another class holds.
    """
    name, mode = getattr(cls, "name", None), getattr(cls, "mode", None)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{cls.__qualname__}.name must match {_NAME.pattern}, got {name!r}")
    if mode not in MODES:
        raise ValueError(f"{cls.__qualname__}.mode must be one of {MODES}, got {mode!r}")
    held = _REGISTRY.get(name)
    if held is not None and held is not cls:
        raise ValueError(f"strategy {name!r} is already registered ({held.__qualname__})")
    _REGISTRY[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a registered strategy (the built-in ones stay). Raises KeyError if absent."""
    if name in _BUILTIN:
        raise ValueError(f"strategy {name!r} is built in and cannot be unregistered")
    del _REGISTRY[name]


@contextmanager
def registered(cls: type[S]) -> Iterator[type[S]]:
    """Register ``cls`` for the duration of a ``with`` block (tests)."""
    register(cls)
    try:
        yield cls
    finally:
        unregister(cls.name)


def names(mode: str | None = None) -> tuple[str, ...]:
    """Registered names, sorted; only those of ``mode`` when given."""
    return tuple(sorted(n for n, c in _REGISTRY.items() if mode is None or c.mode == mode))


def strategy_class(name: str) -> type[Strategy]:
    """The class registered under ``name``; SpecError naming the registered ones if none."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise SpecError(f"no strategy {name!r} is registered (registered: {', '.join(names())})")
    return cls


def strategy_for(spec: TaskSpec) -> Strategy:
    """The strategy of a task: FedAvg rounds in sync mode, else ``async.strategy``.

    Raises SpecError when the name is not a registered strategy of the task's mode.
    """
    name = SYNC_STRATEGY if spec.mode == "sync" else spec.async_.strategy
    cls = _REGISTRY.get(name)
    if cls is None or cls.mode != spec.mode:
        raise SpecError(
            f"{spec.mode} strategy {name!r} is not registered "
            f"(registered {spec.mode} strategies: {', '.join(names(spec.mode))})"
        )
    return cls.from_spec(spec)


for _builtin in (FedAsync, FedBuff, FedAvg):
    register(_builtin)
_BUILTIN = frozenset(_REGISTRY)
