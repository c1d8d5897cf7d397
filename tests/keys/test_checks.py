"""Key ids are exactly 32 lowercase ASCII hex characters (issue 18 made the test a set test)."""
from __future__ import annotations

from server.keys.checks import is_key_id


def test_key_ids_are_32_lowercase_hex():
    good = "0123456789abcdef0123456789abcdef"
    assert is_key_id(good)
    for bad in (good.upper(), good[:-1], good + "0", good[:-1] + "g", good[:-1] + "\n", "٠" * 32, "", " " * 32):
        assert not is_key_id(bad), bad
