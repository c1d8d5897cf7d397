"""now_db (issue 18): the database's fixed-width UTC text, formatted once per second."""
from __future__ import annotations

import datetime as dt
import time
import types

from server import timeutil


def test_now_db_is_to_db_of_now():
    before = timeutil.to_db(timeutil.now())
    got = timeutil.now_db()
    after = timeutil.to_db(timeutil.now())
    assert len(got) == 27 and got.endswith("Z")
    assert before <= got <= after               # same clock, same format: sorts between its neighbours
    assert timeutil.from_db(got).tzinfo is dt.timezone.utc


def test_now_db_follows_the_clock_across_seconds(monkeypatch):
    ns = [1_700_000_000_000_123_000]            # 2023-11-14T22:13:20.000123Z
    fake = types.SimpleNamespace(time_ns=lambda: ns[0], strftime=time.strftime, gmtime=time.gmtime)
    monkeypatch.setattr(timeutil, "time", fake)
    monkeypatch.setattr(timeutil, "_second", (-1, ""))
    expect = lambda n: timeutil.to_db(dt.datetime.fromtimestamp(n // 1000 / 1e6, dt.timezone.utc))  # noqa: E731
    assert timeutil.now_db() == "2023-11-14T22:13:20.000123Z" == expect(ns[0])
    ns[0] += 999_000_000                         # same second: the cached date and time, new microseconds
    assert timeutil.now_db() == "2023-11-14T22:13:20.999123Z"
    ns[0] += 86_400 * 10**9 + 1_000              # a day later: the cache is not reused
    assert timeutil.now_db() == "2023-11-15T22:13:20.999124Z" == expect(ns[0])
