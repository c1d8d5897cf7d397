"""Who may follow the key server's event stream (issue 14): real certificates, real TLS.

A certificate the CA signed is not enough: the connection must pass the client checks
of a key store of the appkey's project, hears only the stores it passes, and a stream
whose certificate is deleted ends.
"""
from __future__ import annotations

import asyncio

import aiohttp

from tests.access.helpers import cert_files
from tests.api.test_client_api import assert_err
from tests.sidecar.test_event_stream import next_event

BOUND = aiohttp.ClientTimeout(total=10)        # a stream opened by mistake must fail the test, not hang it


async def _rest(resp, timeout: float = 5.0) -> list[str]:
    """The event kinds still sent before the server ends the stream (bounded wait for EOF)."""
    kinds = []
    async with asyncio.timeout(timeout):
        while True:
            line = await resp.content.readline()
            if not line:
                return kinds
            text = line.decode().rstrip("\n")
            if text.startswith("event:"):
                kinds.append(text[6:].strip())


async def _cert_only_store(skm, name: str) -> dict:
    return await skm.keystore(name, ip4AuthUse="N", certificateAuthUse="Y")


async def test_a_ca_signed_certificate_that_passes_no_store_gets_no_stream(skm):
    a = await _cert_only_store(skm, "a")
    await cert_files(skm, a, "app")                           # a registered certificate exists, just not this one
    stranger = skm.client_cert("stranger")                   # signed by the server's CA, registered nowhere
    st, out = await skm.client("GET", "/events", session=skm.session(*stranger), timeout=BOUND)
    assert_err(st, out, 403, "Certificate Auth Failure")
    assert "no key store" in out["header"]["resultDetail"]


async def test_another_projects_certificate_gets_no_stream_here(skm):
    rt = skm.rt
    await _cert_only_store(skm, "mine")
    other = await rt.keys.create_project("other")
    theirs = await rt.keys.create_keystore(other.id, "theirs", cert_auth=True, actor="test")
    cert = await cert_files(skm, {"keyStoreId": theirs.id}, "their-host")
    s = skm.session(*cert)
    st, out = await skm.client("GET", "/events", session=s, timeout=BOUND)     # this project's appkey
    assert_err(st, out, 403, "Certificate Auth Failure")
    # Under its own project's appkey the same certificate is served.
    async with s.get(skm.client_path("/events", appkey=other.appkey)) as resp:
        assert resp.status == 200
        assert (await next_event(resp))[0] == "hello"


async def test_stream_carries_only_the_stores_the_certificate_passes(skm):
    a = await _cert_only_store(skm, "a")
    b = await _cert_only_store(skm, "b")
    cert = await cert_files(skm, a, "app")
    await cert_files(skm, b, "other-app")
    async with skm.session(*cert).get(skm.client_path("/events")) as resp:
        assert resp.status == 200
        assert (await next_event(resp))[0] == "hello"
        await skm.key(b, "SECRET", "b-secret", secretValue="x")             # b's event: not for this caller
        key = await skm.key(a, "SECRET", "a-secret", secretValue="x")
        kind, data, _ = await next_event(resp)
        assert (kind, data["keystore_id"], data["key_id"]) == ("key_created", a["keyStoreId"], key["keyId"])


async def test_deleting_the_certificate_ends_its_stream(skm):
    a = await _cert_only_store(skm, "a")
    cert = await cert_files(skm, a, "app")
    s = skm.session(*cert)
    async with s.get(skm.client_path("/events")) as resp:
        assert resp.status == 200
        assert (await next_event(resp))[0] == "hello"
        st, out = await skm.mgmt("POST", f"/keystores/{a['keyStoreId']}/certificates/schedule-deletion",
                                 json={"name": "app"})
        assert st == 200, out
        await skm.key(a, "SECRET", "after", secretValue="x")
        # The change that took the store away is told (the sidecar drops its cache), then the stream ends:
        # the key created afterwards never reaches it.
        assert await _rest(resp) == ["auth_changed"]
    st, out = await skm.client("GET", "/events", session=s, timeout=BOUND)
    assert_err(st, out, 403, "Certificate Auth Failure")


async def test_a_certificate_that_stops_passing_without_an_event_is_cut_at_a_heartbeat(skm):
    """Expiry publishes nothing: the heartbeat's re-check ends the stream (within the auth cache's age)."""
    import datetime as dt

    from server import timeutil
    skm.rt.extra["sse_heartbeat"] = 0.3
    a = await _cert_only_store(skm, "a")
    cert = await cert_files(skm, a, "app")
    async with skm.session(*cert).get(skm.client_path("/events")) as resp:
        assert resp.status == 200
        assert (await next_event(resp))[0] == "hello"
        past = timeutil.to_db(timeutil.now() - dt.timedelta(days=1))
        await skm.rt.access_seal.update(skm.rt.storage, "auth_certificates", "name = 'app'", (),
                                        {"expires_at": past})
        assert await _rest(resp, timeout=20) == []
