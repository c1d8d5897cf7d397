"""Schemathesis against both OpenAPI documents the server serves, on a `skm server run` process.

The documents are fetched from the running server (/api/v1/openapi.json and
/api/v1/client-openapi.json: generated from the route tables). Every operation gets
positive and negative cases; path parameters naming an appkey, key store or key are
swapped for real ones in most cases so requests reach the handlers, not only the 404.
Checks: no 5xx, documented status code, documented content type, body matches the
response schema. Authentication: the harness operator token (management plane) and a
client certificate registered to a certificate-auth key store (data plane).
"""
from __future__ import annotations

import asyncio
import collections
import random
import time

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from tests.reliability.procs import mgmt, setup_store

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
POSITIVE, NEGATIVE = 18, 8          # examples per operation and mode (fast run)
LONG_POSITIVE, LONG_NEGATIVE = 60, 30   # ~9k cases, ~3 min: CI runs every make target in under 30 min
STREAMING = ("/events",)


class Fuzz:
    def __init__(self, base_url: str, session: requests.Session, real: dict[str, list[str]], headers: dict) -> None:
        self.base_url = base_url
        self.session = session
        self.real = real
        self.headers = headers
        self.cases = 0
        self.by_status: collections.Counter = collections.Counter()
        self.failures: dict[str, str] = {}          # operation + check -> first message
        self.transport_errors: collections.Counter = collections.Counter()
        self.unsatisfiable = 0
        self.skipped: list[str] = []

    def prepare(self, case, pick: int) -> None:
        # Mostly real identifiers so cases get past lookup; sometimes the generated ones.
        if pick % 5 == 0:
            return
        for name in list(case.path_parameters or {}):
            choices = self.real.get(name)
            if choices:
                case.path_parameters[name] = choices[pick % len(choices)]

    def run(self, op, mode: GenerationMode, examples: int) -> None:
        @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode), pick=st.integers(0, 99))
        def one(case, pick):
            self.prepare(case, pick)
            self.cases += 1
            try:
                response = case.call(base_url=self.base_url, session=self.session, headers=self.headers,
                                     timeout=30, verify=self.session.verify, cert=self.session.cert)
            except (requests.exceptions.InvalidURL, requests.exceptions.InvalidHeader, ValueError,
                    UnicodeError) as e:
                self.transport_errors[type(e).__name__] += 1     # the client could not even send it
                return
            self.by_status[response.status_code // 100 * 100] += 1
            try:
                case.validate_response(response, checks=CHECKS, headers=self.headers)
            except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - FailureGroup: keep the first per check
                for f in getattr(e, "exceptions", [e]):
                    key = f"{op.label} [{mode.value}] {getattr(f, 'title', type(f).__name__)}"
                    self.failures.setdefault(key, f"{getattr(f, 'message', str(f))[:600]}\n  "
                                                  f"curl: {case.as_curl_command()[:600]}")
        try:
            one()
        except Unsatisfiable:
            self.unsatisfiable += 1       # nothing to negate (no parameters, no body)


async def _prepare_server(server_proc):
    srv = await server_proc("fuzz", data={"port": 0})
    await srv.start()
    ks = await setup_store(srv, "fuzzstore")
    cert, key = srv.client_cert("fuzz-client")
    real_keys: list[str] = []
    async with srv.session() as s:
        for kind, name, extra in (("SECRET", "fz-secret", {"secretValue": "fuzz-secret-value-0123456789"}),
                                  ("SYMMETRIC_KEY", "fz-sym", {"exportable": True}),
                                  ("ASYMMETRIC_KEY", "fz-asym", {"exportable": True})):
            st_, out = await mgmt(s, srv, "POST", f"/keystores/{ks['keyStoreId']}/keys",
                                  {"keyType": kind, "name": name, **extra})
            assert st_ == 201, out
            real_keys.append(out["body"]["keyId"])
        st_, out = await mgmt(s, srv, "POST", "/access-keys", {"description": "fuzz"})
        assert st_ == 201, out
        access = out["body"]
        async with s.get(f"{srv.mgmt_url}/api/v1/openapi.json") as r:
            mgmt_doc = await r.json()
        async with s.get(f"{srv.mgmt_url}/api/v1/client-openapi.json") as r:
            client_doc = await r.json()
    real = {"appkey": [srv.appkey], "keyid": real_keys, "key_id": real_keys,
            "keystore_id": [str(ks["keyStoreId"])], "keystoreid": [str(ks["keyStoreId"])],
            "kind": ["ipv4s", "macs"], "name": ["fuzzstore", "admin"]}
    return srv, cert, key, access, mgmt_doc, client_doc, real


def _fuzz_doc(doc: dict, base_url: str, session: requests.Session, real: dict, headers: dict,
              positive: int, negative: int) -> tuple[Fuzz, int]:
    schema = schemathesis.openapi.from_dict(doc)
    fuzz = Fuzz(base_url, session, real, headers)
    ops = [r.ok() for r in schema.get_all_operations()]
    for op in ops:
        if op.path.endswith(STREAMING):
            fuzz.skipped.append(op.label)     # an endless text/event-stream: requests would wait for its end
            continue
        fuzz.run(op, GenerationMode.POSITIVE, positive)
        fuzz.run(op, GenerationMode.NEGATIVE, negative)
    return fuzz, len(ops)


async def _fuzz_both(server_proc, hygiene, numbers, positive: int, negative: int) -> None:
    srv, cert, key, access, mgmt_doc, client_doc, real = await _prepare_server(server_proc)
    hygiene.secret(access["secretAccessKey"], "fuzz access key secret")
    session = requests.Session()
    session.verify = str(srv.ca)
    session.cert = (str(cert), str(key))
    t0 = time.monotonic()
    # Data plane first (the management fuzz may delete or reconfigure what it uses).
    client_headers = {"X-TC-AUTHENTICATION-ID": access["accessKeyId"],
                      "X-TC-AUTHENTICATION-SECRET": access["secretAccessKey"]}
    cfuzz, cops = await asyncio.to_thread(_fuzz_doc, client_doc, srv.data_url, session, real, client_headers,
                                          positive, negative)
    mfuzz, mops = await asyncio.to_thread(_fuzz_doc, mgmt_doc, srv.mgmt_url, session, real,
                                          {"Authorization": f"Bearer {srv.token}"}, positive, negative)
    session.close()
    elapsed = time.monotonic() - t0
    for name, f, n in (("client API", cfuzz, cops), ("management API", mfuzz, mops)):
        numbers.add("fuzz", f"{name}: {n} operations, {f.cases} cases, statuses {dict(sorted(f.by_status.items()))}, "
                            f"unsendable {sum(f.transport_errors.values())}, failures {len(f.failures)}"
                            + (f", not fuzzed: {', '.join(f.skipped)}" if f.skipped else ""))
    numbers.add("fuzz", f"total {cfuzz.cases + mfuzz.cases} cases in {elapsed:.0f} s")
    st_, body = await srv.health()
    assert st_ == 200, body                                   # still serving after all of it
    failures = {**cfuzz.failures, **mfuzz.failures}
    assert not failures, f"{len(failures)} distinct failures:\n" + "\n".join(
        f"- {k}: {v}" for k, v in sorted(failures.items())[:40])
    assert cfuzz.cases + mfuzz.cases >= 2000


async def test_fuzz_both_apis(server_proc, hygiene, numbers):
    await _fuzz_both(server_proc, hygiene, numbers, POSITIVE, NEGATIVE)


def _uses_2020_12(node) -> bool:
    if isinstance(node, dict):
        if node.get("type") == "null" or isinstance(node.get("exclusiveMinimum"), (int, float)) \
                and not isinstance(node.get("exclusiveMinimum"), bool):
            return True
        return any(_uses_2020_12(v) for v in node.values())
    if isinstance(node, list):
        return any(_uses_2020_12(v) for v in node)
    return False


def test_documents_declare_their_dialect():
    """A 3.0 document may not use 2020-12 keywords: schemathesis (and any 3.0 tool) rejects it."""
    from server.app import client_routes, mgmt_routes
    for doc in (client_routes().openapi("c", "1"), mgmt_routes().openapi("m", "1")):
        if doc["openapi"].startswith("3.0"):
            assert not _uses_2020_12(doc), ("the document says OpenAPI 3.0 but its schemas (from pydantic) are "
                                            "JSON Schema 2020-12: declare openapi 3.1.0 in RouteTable.openapi()")


@pytest.mark.long
async def test_fuzz_both_apis_long(server_proc, hygiene, numbers):
    await _fuzz_both(server_proc, hygiene, numbers, LONG_POSITIVE, LONG_NEGATIVE)
