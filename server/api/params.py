"""Whole-number request parameters, parsed one way for every API family.

`str.isdigit()` alone is not enough: it accepts non-ASCII digits ("²", "٣") that `int()` then refuses,
and an unbounded number overflows the database's 64-bit integer; both used to surface as a 500.
"""
from __future__ import annotations

from collections.abc import Mapping

from server.errors import InvalidRequest

ID_MAX = 2**63 - 1  # the database's signed 64-bit integer


def parse_int(raw: str, name: str, lo: int, hi: int) -> int:
    """`raw` as an integer in [lo, hi], or a 400 naming the parameter and the range."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(hi)) or not lo <= int(raw) <= hi:
        raise InvalidRequest(f"{name} must be a whole number from {lo} to {hi}")
    return int(raw)


def int_param(query: Mapping[str, str], name: str, default: int | None, lo: int = 0,
              hi: int = ID_MAX) -> int | None:
    """The query or form parameter `name` (absent or empty: `default`)."""
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    return parse_int(raw, name, lo, hi)
