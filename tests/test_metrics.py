"""server/metrics.py: the request path counts in memory and the metrics receive it at most a second later
(and before every scrape), with exactly the values a direct update would have given."""
from __future__ import annotations

import asyncio
import re

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from server import metrics as metrics_module
from server.metrics import Metrics, _observe_all

BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)
VALUES = [0.0, 0.0004, 0.0005, 0.00051, 0.001, 0.003, 0.02, 0.02, 0.7, 2.5, 2.6, 99.0, 1e-9]


def _text(registry: CollectorRegistry) -> str:
    # `_created` is the wall-clock time each histogram was made: not part of what is compared
    return re.sub(r"(?m)^.*_created.*\n", "", generate_latest(registry).decode())


def test_values_flushed_by_bucket_read_as_values_observed_one_by_one():
    direct, deferred = CollectorRegistry(), CollectorRegistry()
    one = Histogram("lat", "x", ["plane"], buckets=BUCKETS, registry=direct).labels("data")
    many = Histogram("lat", "x", ["plane"], buckets=BUCKETS, registry=deferred).labels("data")
    for v in VALUES:
        one.observe(v)
    _observe_all(many, list(VALUES))
    assert _text(direct) == _text(deferred)
    assert 'lat_bucket{le="0.0005",plane="data"} 4.0' in _text(deferred)      # a value on a bound counts in it


def test_without_the_histograms_internals_each_value_is_observed():
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, v: float) -> None:
            self.seen.append(v)
    p = Plain()
    _observe_all(p, [0.5, 0.25])
    assert p.seen == [0.5, 0.25]


async def test_counts_reach_the_metrics_within_the_flush_interval_and_at_once_for_a_scrape(monkeypatch):
    monkeypatch.setattr(metrics_module, "FLUSH_SECONDS", 0.05)
    m = Metrics()
    child = m.keystore_requests.labels("7", "ok")

    def seen() -> float:
        return m.registry.get_sample_value("skm_keystore_requests_total", {"keystore": "7", "result": "ok"}) or 0.0
    for _ in range(3):
        m.inc(child)
    assert seen() == 0.0                       # counted in memory only
    await asyncio.sleep(0.2)
    assert seen() == 3.0                       # flushed by the timer, once
    m.inc(child, 2)
    assert b'skm_keystore_requests_total{keystore="7",result="ok"} 5.0' in m.exposition()   # a scrape flushes
    m.inc(child)
    m.close()                                  # and so does stopping
    assert seen() == 6.0
    await asyncio.sleep(0.1)
    assert seen() == 6.0                       # nothing counted twice
