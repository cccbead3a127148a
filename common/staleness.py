"""Staleness weighting ``s(t - v)`` for asynchronous aggregation. Pure, no I/O.

An update trained on version ``v`` that reaches the aggregator when the head is
version ``t`` has staleness ``t - v >= 0``. Its influence is scaled by
``s(t - v)``, with ``s(0) = 1`` for every kind. These are the definitions, with
``a >= 0`` and integer ``b >= 0`` from :class:`common.spec.StalenessSpec`:

- ``constant``:   ``s(t - v) = 1``
- ``polynomial``: ``s(t - v) = (t - v + 1) ** (-a)``   (``a = 0`` gives 1 everywhere)
- ``hinge``:      ``s(t - v) = 1`` if ``t - v <= b``, else ``1 / (a * (t - v - b) + 1)``

So the hinge is flat up to and including ``t - v == b``, and at ``t - v == b + 1``
it is ``1 / (a + 1)``: continuous at the knee, then decaying like ``1 / x``.

Implementations in the field disagree on the hinge. The FedAsync paper (Xie,
Koyejo and Gupta, 2019) writes ``1 / (a (t - v - b) + 1)`` for ``t - v > b``,
which is ours; some published code instead uses ``1 / (a (t - v + b) + 1)``
(discontinuous at the knee), or a power of ``(t - v - b)``. fedq uses the
paper's form above and no other; anyone comparing runs with another framework
should check which one it uses.

Units
-----
``t - v`` counts versions, and with FedAsync one round of ``N`` banks is ``N``
versions: the same age in wall-clock terms grows with the number of banks. With
``AsyncSettings.staleness_unit = "rounds"`` (the default) staleness is measured in
rounds of the federation instead (one round = one update per participant)::

    staleness_rounds = (t - v) * updates_per_version / N

with ``updates_per_version`` the strategy's capacity (1 for FedAsync, K for
FedBuff) and ``N = max(1, number of participants)``. :func:`in_unit` converts,
:func:`exceeds` checks the hard bound ``max_staleness`` in exact integer
arithmetic, and ``s(.)`` takes the float. With ``"versions"``, ``s(.)`` gets
``float(t - v)``, which gives exactly the weights of the integer formula.

The weight is an ordinary Python float (IEEE binary64). ``constant`` and
``hinge`` use only correctly rounded operations, so they are bit-identical on
every platform; ``polynomial`` calls the C library's ``pow`` (through
:func:`math.pow`), which is deterministic on one platform but not guaranteed to
be correctly rounded everywhere. That is one reason each version's lineage
records the weight actually used.
"""

from __future__ import annotations

import math
from typing import assert_never

from common.spec import StalenessSpec, StalenessUnit


def staleness_weight(spec: StalenessSpec, staleness: float) -> float:
    """``s(staleness)`` for the given spec; a value in ``(0, 1]``.

    ``staleness`` is in versions or in rounds (a float, see :func:`in_unit`); for an
    integer the result is the same as for the equal float.
    Raises ValueError when ``staleness`` is negative (an update cannot be based on
    a version newer than the head).
    """
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    kind = spec.kind
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return math.pow(float(staleness) + 1.0, -float(spec.a))
    if kind == "hinge":
        if staleness <= spec.b:
            return 1.0
        return 1.0 / (float(spec.a) * (float(staleness) - float(spec.b)) + 1.0)
    assert_never(kind)


def in_unit(staleness: int, unit: StalenessUnit, updates_per_version: int, n: int) -> float:
    """``t - v`` in ``unit``: ``float(t - v)`` for versions, else
    ``float((t - v) * updates_per_version) / max(1, n)`` (rounds of ``n`` participants)."""
    if unit == "versions":
        return float(staleness)
    return float(staleness * updates_per_version) / float(max(1, n))


def exceeds(
    staleness: int, bound: int, unit: StalenessUnit, updates_per_version: int, n: int
) -> bool:
    """Whether ``t - v`` is beyond the hard bound ``bound`` (in ``unit``), exactly:
    ``(t - v) * updates_per_version > bound * max(1, n)`` for rounds."""
    if unit == "versions":
        return staleness > bound
    return staleness * updates_per_version > bound * max(1, n)


def versions_within(bound: int, unit: StalenessUnit, updates_per_version: int, n: int) -> int:
    """The largest ``t - v`` (in versions) that :func:`exceeds` still admits:
    ``bound`` for versions, ``floor(bound * max(1, n) / updates_per_version)`` for rounds."""
    if unit == "versions":
        return bound
    return bound * max(1, n) // max(1, updates_per_version)
