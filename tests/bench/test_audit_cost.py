"""The bench's audit-cost row measures the real writer functions and sets them against a secret read."""
from __future__ import annotations

import pytest

from bench import audit_cost


def test_audit_cost_row_compares_keyed_and_unkeyed_chains():
    c = audit_cost.measure(n=500, checkpoints=5, rounds=1)
    assert c.unkeyed_us > 0 and c.keyed_us > 0 and c.checkpoint_us > 0
    assert c.added_us == (c.keyed_us - c.unkeyed_us) + c.checkpoint_us / c.checkpoint_every
    c = audit_cost.against(c, [{"workload": "secret-read", "system": "skm", "cpu_us_per_req": 100.0}])
    assert c.added_pct == pytest.approx(c.added_us)
    assert "% of secret-read CPU" in audit_cost.line(c)
    assert audit_cost.against(audit_cost.measure(n=50, checkpoints=1, rounds=1), []).added_pct is None


def test_server_against_server_ratio_is_set_from_the_unkeyed_baseline_row():
    c = audit_cost.measure(n=50, checkpoints=1, rounds=1)
    c = audit_cost.against(c, [{"workload": "secret-read", "system": "skm", "cpu_us_per_req": 105.0},
                               {"workload": "secret-read", "system": "skm-unkeyed", "cpu_us_per_req": 100.0}])
    assert round(c.server_added_pct, 6) == 5.0 and c.unkeyed_server_cpu_us == 100.0
    assert "100 → 105 µs CPU/req (+5.0 %)" in audit_cost.line(c)
