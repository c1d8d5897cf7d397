"""server/jsontext.py: the encoder built once writes exactly what json.JSONEncoder.encode writes.

Exactness matters: the audit's canonical form is hashed, and a verifier recomputes it with the
standard encoder (server/audit/record.py)."""
from __future__ import annotations

import json
import math

import pytest

from server.jsontext import encoder

VALUES = [
    None, True, 0, -1, 10**30, 1.5, 1e-7, math.inf, "", "plain", 'q"uote\\back/slash', "\x00\x1f\x7f\n\t",
    "caf\u00e9 \u2603 \U0001F510 \u2028", [], {}, [1, [2, [3, None]], "x"],
    {"b": 1, "a": {"d": [True, False], "c": "\u00e9"}, "": None, "1": 1},
    {"header": {"resultCode": 0, "resultMessage": "success", "isSuccessful": True}, "body": {"secret": "s" * 4096}},
    ("a", 1),
]


@pytest.mark.parametrize("sort_keys", [False, True])
@pytest.mark.parametrize("ensure_ascii", [False, True])
def test_the_same_text_as_the_standard_encoder(sort_keys, ensure_ascii):
    fast = encoder(sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    std = json.JSONEncoder(separators=(",", ":"), sort_keys=sort_keys, ensure_ascii=ensure_ascii).encode
    for v in VALUES:
        assert fast(v) == std(v), v
    assert fast({2: "int key", 1.5: "float key"}) == std({2: "int key", 1.5: "float key"})


def test_what_it_cannot_encode_is_refused_as_the_standard_encoder_refuses_it():
    fast = encoder()
    with pytest.raises(TypeError):
        fast({"x": object()})
    with pytest.raises(TypeError):
        fast({("tuple", "key"): 1})
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises((RecursionError, ValueError)):
        fast(cyclic)
