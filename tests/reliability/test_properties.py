"""Property tests: the wire-format parsers and every request model take anything and answer
either a valid value or a clean SKMError, never another exception, never an echo of the input.

Request models are driven through the real `read_model` (the same code every route uses),
so the JSON parsing, the content-type check and the pydantic-to-SKMError translation are
all under test; the models are collected from the live route tables plus every input model
declared in server/api/client/models.py and server/api/mgmt/models.py.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import struct

import pytest
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from server.api.client import models as client_models
from server.api.mgmt import models as mgmt_models
from server.api.routing import read_model
from server.app import client_routes, mgmt_routes
from server.errors import InvalidUserData, SKMError
from server.keys import formats

EXAMPLES = 120
COUNTS: dict[str, int] = {}

# -- strategies -------------------------------------------------------------------------
json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=False) | st.text(max_size=300))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=20), inner, max_size=5), max_leaves=20)
b64_alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
texts_for_b64 = (st.text() | st.text(alphabet=b64_alphabet, max_size=200)
                 | st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
                 | st.binary(max_size=300).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")))
non_strings = st.none() | st.integers() | st.binary() | st.lists(st.text(), max_size=3) | st.floats()


def request_models() -> list[type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    for table in (client_routes(), mgmt_routes()):
        for r in table.routes:
            if r.body is not None:
                found[f"{r.body.__module__}.{r.body.__qualname__}"] = r.body
    for mod, base in ((client_models, client_models._In), (mgmt_models, mgmt_models._In)):
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, base) and obj is not base:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


MODELS = request_models()


def field_names(model: type[BaseModel]) -> list[str]:
    names = []
    for name, f in model.model_fields.items():
        names.append(f.alias or name)
    return names


def bodies_for(model: type[BaseModel]):
    """Raw request bodies: arbitrary bytes, arbitrary JSON, and objects using the model's field names."""
    names = field_names(model)
    near = st.dictionaries(st.sampled_from(names) | st.text(max_size=10), json_values, max_size=len(names) + 2)
    return st.one_of(
        st.binary(max_size=400),
        json_values.map(lambda v: json.dumps(v).encode()),
        near.map(lambda v: json.dumps(v).encode()),
        near.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    )


# -- the request pipeline on one body ---------------------------------------------------------
@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


async def _read(model: type[BaseModel], body: bytes, content_type: str, optional: bool):
    loop = asyncio.get_running_loop()
    payload = StreamReader(_Proto(), 2**20, loop=loop)
    payload.feed_data(body)
    payload.feed_eof()
    req = make_mocked_request("POST", "/x", headers={"Content-Type": content_type,
                                                     "Content-Length": str(len(body))}, payload=payload,
                              app=_SHARED["app"], protocol=_SHARED["protocol"], writer=_SHARED["writer"], loop=loop)
    return await read_model(req, model, optional=optional)


def _shared_parts() -> dict:
    # make_mocked_request builds a dozen unittest.mock objects per call (8 ms); build them once.
    from unittest import mock
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_coro
    protocol = mock.Mock()
    protocol.transport = mock.Mock()
    writer = mock.Mock()
    for name in ("write_headers", "write", "write_eof", "drain"):
        setattr(writer, name, make_mocked_coro(None))
    return {"app": web.Application(), "protocol": protocol, "writer": writer}


_SHARED = _shared_parts()


class _Proto:
    """The minimum a StreamReader asks of its protocol (flow control is not exercised here)."""
    _reading_paused = False

    def pause_reading(self, *a, **kw) -> None: ...

    def resume_reading(self, *a, **kw) -> None: ...


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        # Values only: an unknown field's *name* is named in the error on purpose (extra="forbid").
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def check_body(loop, model: type[BaseModel], body: bytes, content_type: str = "application/json",
               optional: bool = False) -> None:
    COUNTS[_name(model)] = COUNTS.get(_name(model), 0) + 1
    try:
        out = loop.run_until_complete(_read(model, body, content_type, optional))
    except SKMError as e:
        assert 400 <= e.status < 500, (model, body, e)
        env = e.envelope()
        assert env["header"]["isSuccessful"] is False
        # The error never echoes user input (it may be a secret): no long input string appears in it.
        try:
            sent = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return
        text = str(e)
        for s in _strings(sent):
            if len(s) >= 12 and s in text:
                # A coincidence (hypothesis likes substrings of the message) or an echo? Change the
                # value and see whether the message follows it.
                marker = ("Zq9" * len(s))[:len(s)]
                again = body.replace(json.dumps(s)[1:-1].encode(), marker.encode())
                try:
                    loop.run_until_complete(_read(model, again, content_type, optional))
                except SKMError as e2:
                    assert marker not in str(e2), f"{model.__name__} error echoes its input: {e2}"
        return
    assert out is None or isinstance(out, model), (model, body, out)


def _name(m: type[BaseModel]) -> str:
    return f"{m.__module__.removeprefix('server.api.')}.{m.__qualname__}"


@pytest.mark.parametrize("model", MODELS, ids=_name)
def test_request_model_takes_anything(loop, model, numbers):
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=bodies_for(model))
    def run(body: bytes) -> None:
        check_body(loop, model, body)

    run()
    # Content types other than JSON, and an empty body for optional bodies, are clean errors too.
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "", "application/json; charset=latin-1"):
        check_body(loop, model, b'{"a": 1}', ctype)
    check_body(loop, model, b"", optional=True)
    numbers.add("properties", f"{_name(model)}: {COUNTS[_name(model)]} bodies, 0 unclean errors")


# -- the wire-format parsers ---------------------------------------------------------------------
def _clean(fn, arg):
    COUNTS["parsers"] = COUNTS.get("parsers", 0) + 1
    try:
        return fn(arg)
    except SKMError as e:
        assert isinstance(e, InvalidUserData), e
        # Fixed texts only: nothing of the input comes back.
        assert _PARSER_MESSAGE.fullmatch(str(e)), str(e)
        return None


_PARSER_MESSAGE = re.compile(r"Invalid User Data: (ciphertext|signature|value) "
                             r"(must be a base64 string|is not valid base64|is too short|"
                             r"is not canonical base64 \(standard alphabet, padded, unused bits zero\))")


@settings(max_examples=1500, deadline=None, database=None)
@given(text=texts_for_b64 | non_strings)
def test_parsers_take_any_text(text):
    raw = _clean(formats.b64decode_strict, text)
    ct = _clean(formats.unpack_ciphertext, text)
    sig = _clean(formats.unpack_signature, text)
    if raw is None:
        assert ct is None and sig is None        # the parsers reject what base64 rejects
        return
    # Only canonical base64 is accepted: what decodes re-encodes to exactly the input.
    assert base64.b64encode(raw).decode() == text
    if ct is not None:
        version, nonce, sealed = ct
        assert len(raw) >= 4 + formats.NONCE + formats.TAG
        assert (struct.pack(">I", version) + nonce + sealed) == raw and len(nonce) == formats.NONCE
    else:
        assert len(raw) < 4 + formats.NONCE + formats.TAG
    if sig is not None:
        version, signature = sig
        assert struct.pack(">I", version) + signature == raw and signature
    else:
        assert len(raw) <= 4


@settings(max_examples=500, deadline=None, database=None)
@given(version=st.integers(0, 2**32 - 1), nonce=st.binary(min_size=12, max_size=12),
       sealed=st.binary(min_size=16, max_size=200), signature=st.binary(min_size=1, max_size=600))
def test_pack_unpack_round_trip(version, nonce, sealed, signature):
    assert formats.unpack_ciphertext(formats.pack_ciphertext(version, nonce, sealed)) == (version, nonce, sealed)
    assert formats.unpack_signature(formats.pack_signature(version, signature)) == (version, signature)


def test_parser_numbers(numbers):
    # Normally runs after the parser properties (file order) and reports how many inputs they took;
    # run alone (or before them), it runs the property itself so the count means something.
    if COUNTS.get("parsers", 0) < 3 * 1000:
        test_parsers_take_any_text()
    assert COUNTS.get("parsers", 0) >= 3 * 1000
    numbers.add("properties", f"parsers (b64decode_strict, unpack_ciphertext, unpack_signature): "
                              f"{COUNTS['parsers']} inputs, 0 unclean errors; {len(MODELS)} request models")
