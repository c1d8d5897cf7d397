"""Security-review findings on the listeners (issue 14): deep JSON, TLS handshake deadline, HSTS."""
from __future__ import annotations

import asyncio

import structlog

from tests.support.server import start_harness

DEEP = b"[" * 100_000


def _no_traceback(logs: list[dict]) -> None:
    for entry in logs:
        assert "exc_info" not in entry and "exception" not in entry, entry
        assert entry.get("log_level") not in ("error", "critical"), entry


async def test_deeply_nested_json_is_a_400_without_a_traceback_on_both_planes(skm):
    store = await skm.keystore("deep")
    key = await skm.key(store, "SYMMETRIC_KEY", "k")
    s = skm._default()
    calls = [
        (skm.client_path(f"/symmetric-keys/{key['keyId']}/encrypt"), {}),            # data plane
        (skm.client_path("/keys/secrets/create", "v1.2"), {}),                         # data plane, v1.2 write
        (f"{skm.mgmt_url}/api/v1/keystores", {"Authorization": f"Bearer {skm.init.token}"}),   # management
        (f"{skm.mgmt_url}/api/v1/login", {}),                                          # management, public
    ]
    before = await skm.rt.storage.fetchall("SELECT * FROM keystores ORDER BY id")
    for body in (DEEP, b'{"plaintext": ' + DEEP, b'{"name": "x", "description": ' + b"{\"a\":" * 50_000):
        for url, headers in calls:
            with structlog.testing.capture_logs() as logs:
                async with s.post(url, data=body, headers={"Content-Type": "application/json", **headers}) as r:
                    status, out = r.status, await r.json(content_type=None)
            if "/v1.2/" in url and status == 401:
                continue        # v1.2 asks for the caller's credential before it reads a body: also no 500
            assert status == 400, (url, out)
            assert out["header"]["isSuccessful"] is False
            assert out["header"]["resultMessage"] in ("Invalid Request", "Invalid JSON"), out
            if body is DEEP:
                assert out["header"]["resultMessage"] == "Invalid Request"
                assert "nests too deeply" in out["header"]["resultDetail"]
            _no_traceback(logs)
    assert await skm.rt.storage.fetchall("SELECT * FROM keystores ORDER BY id") == before


async def eof_within(host: str, port: int, seconds: float) -> bool:
    """Open a raw TCP connection, send nothing, and report whether the server closed it in time."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        data = await asyncio.wait_for(reader.read(1024), seconds)
        return data == b""
    except asyncio.TimeoutError:
        return False
    except ConnectionResetError:
        return True
    finally:
        writer.close()


async def test_a_connection_that_never_starts_tls_is_closed_at_the_handshake_deadline(tmp_path):
    h = await start_harness(tmp_path, handshake_timeout=0.5)
    try:
        for port in (h.server.data_port, h.server.mgmt_port):
            # asyncio's own default would hold it for 60 s; the deadline is 0.5 s.
            assert await eof_within("127.0.0.1", port, 10), port
        # A real client still completes its handshake and is served.
        st, out = await h.mgmt("GET", "/system/status")
        assert st == 200, out
    finally:
        await h.close()


async def test_management_responses_carry_hsts(skm):
    s = skm._default()
    for path, headers in (("/console/", {}), ("/console/login", {}), ("/api/v1/status", {}),
                          ("/api/v1/status", {"Authorization": f"Bearer {skm.init.token}"}),
                          ("/api/v1/no-such-route", {}), ("/healthz", {})):
        async with s.get(skm.mgmt_url + path, headers=headers, allow_redirects=False) as r:
            assert r.headers.get("Strict-Transport-Security") == "max-age=31536000", (path, r.status)


async def test_hsts_can_be_turned_off(tmp_path):
    h = await start_harness(tmp_path, hsts_max_age=0)
    try:
        async with h._default().get(h.mgmt_url + "/console/login") as r:
            assert r.status == 200 and "Strict-Transport-Security" not in r.headers
    finally:
        await h.close()
