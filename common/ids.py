"""Identifier rules shared by the wire format, the store keys and AMQP routing keys."""

from __future__ import annotations

import re
from typing import Final

#: Task and participant ids: they appear in Redis keys and AMQP routing keys, so no
#: dots (routing-key separators), no braces (Redis hash tags), no spaces.
NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: Update ids: unique per update; UUIDs, ULIDs and similar fit.
UPDATE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def is_name(value: object) -> bool:
    """Whether ``value`` is a valid task or participant id."""
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def is_update_id(value: object) -> bool:
    """Whether ``value`` is a valid update id."""
    return isinstance(value, str) and UPDATE_ID_RE.fullmatch(value) is not None


#: The most members a secure aggregation cohort may have: every masked update carries
#: encrypted shares for each of them (docs/wire-format.md section 16).
MAX_COHORT: Final = 256
