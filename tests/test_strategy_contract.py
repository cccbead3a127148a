"""The contract every registered strategy keeps, run on each through the same cases.

The cases are in tests/strategy_contract.py (what each one checks is said there);
each test here runs one of them on every class in
:data:`aggregator.strategies.STRATEGIES`.
"""

from __future__ import annotations

import pytest

from aggregator.strategies import STRATEGIES, Strategy
from tests.strategy_contract import (
    check_conservation,
    check_determinism,
    check_identity,
    check_replay_equality,
    check_without_participant,
)

# --------------------------------------------------------------------------- every registered

REGISTERED = pytest.mark.parametrize("cls", list(STRATEGIES.values()), ids=list(STRATEGIES))


@REGISTERED
def test_identity(cls: type[Strategy]) -> None:
    check_identity(cls)


@REGISTERED
def test_determinism(cls: type[Strategy]) -> None:
    check_determinism(cls)


@REGISTERED
def test_conservation_and_capacity(cls: type[Strategy]) -> None:
    check_conservation(cls)


@REGISTERED
def test_replay_equality(cls: type[Strategy]) -> None:
    check_replay_equality(cls)


@REGISTERED
def test_without_participant(cls: type[Strategy]) -> None:
    check_without_participant(cls)


def test_the_built_in_strategies_are_registered() -> None:
    assert {"fedasync": "async", "fedbuff": "async", "fedavg": "sync"}.items() <= {
        name: cls.mode for name, cls in STRATEGIES.items()
    }.items()
