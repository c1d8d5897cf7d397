"""Compact JSON text from an encoder built once.

`json.JSONEncoder.encode` builds its C encoder afresh on every call (about 1.3 µs here), which the
hot path pays three times a request for nothing: the response envelope, and the audit record's detail
and canonical form. `encoder()` builds it once and gives the same text as `JSONEncoder.encode` with the
same options (tests/test_jsontext.py holds them equal); without the C accelerator it is that method.
"""
from __future__ import annotations

import json
from json import encoder as _stdlib
from typing import Any, Callable


def encoder(*, sort_keys: bool = False, ensure_ascii: bool = True) -> Callable[[Any], str]:
    """`json.JSONEncoder(separators=(",", ":"), sort_keys=..., ensure_ascii=...).encode`, built once.

    No circular-reference check (the values are the server's own dicts and lists): a cycle ends in
    RecursionError instead of ValueError."""
    plain = json.JSONEncoder(separators=(",", ":"), sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    make = getattr(_stdlib, "c_make_encoder", None)
    if make is None:
        return plain.encode
    strings = _stdlib.encode_basestring_ascii if ensure_ascii else _stdlib.encode_basestring
    chunks = make(None, plain.default, strings, None, ":", ",", sort_keys, False, True)
    join = "".join

    def encode(value: Any) -> str:
        return join(chunks(value, 0))
    return encode
