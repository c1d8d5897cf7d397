"""UTC inside; NHN's zone-less local-time strings only at the API edge."""
from __future__ import annotations

import datetime as dt

_FMT = "%Y-%m-%dT%H:%M:%S.%fZ"


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def to_db(t: dt.datetime | None) -> str | None:
    """Fixed-width UTC text: sorts and compares correctly as a string in SQL."""
    return None if t is None else t.astimezone(dt.timezone.utc).strftime(_FMT)


def from_db(s: str | None) -> dt.datetime | None:
    return None if s is None else dt.datetime.strptime(s, _FMT).replace(tzinfo=dt.timezone.utc)


def to_api(s: str | dt.datetime | None) -> str | None:
    """NHN's format: ISO local time without zone (we serve UTC), e.g. 2025-01-25T12:00:00."""
    if s is None:
        return None
    t = from_db(s) if isinstance(s, str) else s
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def now_db() -> str:
    return to_db(now())
