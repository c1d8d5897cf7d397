"""Abuse: slow-loris, oversized headers and bodies, login floods, replayed and expired tokens,
and a certificate deleted under an open keep-alive connection.

Memory is the resident set of the `skm server run` process alone (/proc/PID/status).
"""
from __future__ import annotations

import asyncio
import ssl
import time

import aiohttp
import pytest

from tests.access.helpers import access_key, bearer, cert_files, token_call, v12_headers
from tests.reliability.procs import ServerProcess, mgmt

SLOW_CONNECTIONS = 200
SLOW_TIMEOUT = 20.0          # a connection that never finishes its headers must be closed by then
MAX_GROWTH = 64 * 2**20
MAX_FAILURES = 5             # server/access/operators.py LoginSettings.max_failures (default)      # bytes of RSS the abuse may cost the server, at most


async def _tls(srv: ServerProcess, port: int, cert=None, key=None):
    return await asyncio.open_connection("127.0.0.1", port, ssl=srv.ssl(cert, key), server_hostname="127.0.0.1")


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), seconds)
            if not chunk:
                return True
    except asyncio.TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        return True


async def _responsive(srv: ServerProcess) -> float:
    t0 = time.monotonic()
    st, _ = await srv.health()
    assert st == 200
    return time.monotonic() - t0


@pytest.mark.parametrize("plane", ["data", "mgmt"])
async def test_slow_loris_is_timed_out_and_bounded(plane, server_proc, numbers):
    srv = await (await server_proc(f"loris-{plane}")).start()
    port = srv.data_port if plane == "data" else srv.mgmt_port
    await _responsive(srv)
    before = srv.rss()
    conns = []
    for i in range(SLOW_CONNECTIONS):
        r, w = await _tls(srv, port)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")   # headers never finish
        await w.drain()
        conns.append((r, w))
    latency = await _responsive(srv)
    during = srv.rss()
    t0 = time.monotonic()
    closed = await asyncio.gather(*(_closed_within(r, SLOW_TIMEOUT) for r, _ in conns))
    waited = time.monotonic() - t0
    for _, w in conns:
        w.close()
    after = srv.rss()
    numbers.add("abuse", f"slow-loris {plane}: {SLOW_CONNECTIONS} connections, rss {before // 2**20} -> "
                         f"{during // 2**20} -> {after // 2**20} MiB, health latency {latency * 1000:.0f} ms, "
                         f"{sum(closed)} closed by the server within {SLOW_TIMEOUT:.0f} s (waited {waited:.1f} s)")
    assert during - before < MAX_GROWTH
    assert all(closed), (f"{SLOW_CONNECTIONS - sum(closed)} of {SLOW_CONNECTIONS} half-sent requests still open "
                         f"after {SLOW_TIMEOUT:.0f} s: the {plane} listener has no header-read timeout")


async def _raw(srv: ServerProcess, port: int, data: bytes, cert=None, key=None, read_timeout: float = 20):
    r, w = await _tls(srv, port, cert, key)
    try:
        w.write(data)
        await w.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    try:
        head = await asyncio.wait_for(r.read(4096), read_timeout)
    except (ConnectionError, ssl.SSLError, asyncio.TimeoutError):
        head = b""                 # no answer: a wait for a body that never comes counts as a failure
    w.close()
    return head


def _status(head: bytes) -> int:
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


@pytest.mark.parametrize("plane", ["data", "mgmt"])
async def test_oversized_headers_and_bodies(plane, server_proc, numbers):
    srv = await (await server_proc(f"big-{plane}")).start()
    port = srv.data_port if plane == "data" else srv.mgmt_port
    path = (f"/keymanager/v1.0/appkey/{srv.appkey}/symmetric-keys/{'0' * 32}/encrypt" if plane == "data"
            else "/api/v1/keystores")
    auth = b"" if plane == "data" else f"Authorization: Bearer {srv.token}\r\n".encode()
    before = srv.rss()
    results = {}
    results["long header line (1 MiB)"] = _status(await _raw(
        srv, port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2**20 + b"\r\n\r\n"))
    results["10,000 headers"] = _status(await _raw(
        srv, port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(10000))
        + b"\r\n"))
    results["long URL (1 MiB)"] = _status(await _raw(srv, port, b"GET /" + b"a" * 2**20 + b" HTTP/1.1\r\nHost: x\r\n\r\n"))
    big = b'{"plaintext": "' + b"A" * (8 * 2**20) + b'"}'
    results["8 MiB body, Content-Length"] = _status(await _raw(
        srv, port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode() + auth
        + f"Content-Length: {len(big)}\r\n\r\n".encode() + big))
    chunked = b"".join(b"%x\r\n" % len(c) + c + b"\r\n" for c in [big[i:i + 65536] for i in range(0, len(big), 65536)])
    results["8 MiB body, chunked"] = _status(await _raw(
        srv, port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode() + auth
        + b"Transfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n"))
    results["Content-Length 10 GiB, 1 KiB sent"] = _status(await _raw(
        srv, port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode() + auth
        + b"Content-Length: 10737418240\r\n\r\n" + b"A" * 1024, read_timeout=25))
    after = srv.rss()
    await _responsive(srv)
    numbers.add("abuse", f"oversized {plane}: {results}, rss {before // 2**20} -> {after // 2**20} MiB")
    assert after - before < MAX_GROWTH
    for what, status in results.items():
        assert 400 <= status < 500, f"{what}: got {status or 'no answer'} instead of a 4xx"


async def test_failed_login_flood_keeps_lockout_and_responsiveness(server_proc, numbers, hygiene):
    await _login_flood(server_proc, numbers, hygiene, 600)


@pytest.mark.long
async def test_ten_thousand_failed_logins(server_proc, numbers, hygiene):
    await _login_flood(server_proc, numbers, hygiene, 10_000)


async def _login_flood(server_proc, numbers, hygiene, attempts: int) -> None:
    srv = await (await server_proc("logins")).start()
    password = "correct-horse-battery-staple-9"
    hygiene.secret(password, "operator password")
    async with srv.session(limit=32) as s:
        st, out = await mgmt(s, srv, "POST", "/operators", {"name": "ops", "role": "admin", "password": password})
        assert st in (200, 201), out
        statuses: dict[int, int] = {}
        worst = 0.0
        sem = asyncio.Semaphore(16)

        async def attempt(i: int) -> None:
            async with sem:
                async with s.post(f"{srv.mgmt_url}/api/v1/login",
                                  json={"name": "ops", "password": f"wrong-{i:06d}-password"}) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1

        t0 = time.monotonic()
        tasks = [asyncio.create_task(attempt(i)) for i in range(attempts)]
        # (numbers are reported before the asserts so a failing run still shows them)
        while not all(t.done() for t in tasks):
            worst = max(worst, await _responsive(srv))
            await asyncio.sleep(0.2)
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
        numbers.add("abuse", f"{attempts} failed logins in {elapsed:.1f} s: statuses {statuses}, worst health "
                             f"latency {worst * 1000:.0f} ms, rss {srv.rss() // 2**20} MiB")
        assert set(statuses) <= {401, 429}, statuses
        # Lockout: after MAX_FAILURES wrong passwords the name is locked, however the attempts are timed.
        assert statuses.get(401, 0) <= MAX_FAILURES, (
            f"{statuses.get(401, 0)} wrong passwords were checked before the lockout held (concurrent attempts)")
        # The lockout holds: the right password is refused now.
        async with s.post(f"{srv.mgmt_url}/api/v1/login", json={"name": "ops", "password": password}) as r:
            locked = r.status
            await r.read()
        assert locked in (401, 429), "a locked-out operator logged in"
        st, _ = await mgmt(s, srv, "GET", "/keystores")
        assert st == 200                 # token holders are not locked out by someone else's flood
    numbers.add("abuse", f"right password after {attempts} failed logins -> {locked}")
    assert worst < 2.0


async def test_replayed_and_expired_tokens_are_refused(tracked, hygiene, numbers):
    skm = tracked
    refused = 0
    # Management plane: a revoked token replayed, an expired token.
    st, out = await skm.mgmt("POST", "/tokens", json={"description": "replay"})
    assert st in (200, 201), out
    token, token_id = out["body"]["token"], out["body"]["tokenId"] if "tokenId" in out["body"] else out["body"]["id"]
    hygiene.secret(token, "mgmt api token")
    assert (await skm.mgmt("GET", "/keystores", token=token))[0] == 200
    st, _ = await skm.mgmt("DELETE", f"/tokens/{token_id}")
    assert st == 200
    for _ in range(3):
        st, out = await skm.mgmt("GET", "/keystores", token=token)
        assert st == 401, out
        refused += 1
    st, out = await skm.mgmt("POST", "/tokens", json={"description": "expiring"})
    token2 = out["body"]["token"]
    hygiene.secret(token2, "mgmt api token")
    await skm.rt.access_seal.update(skm.rt.storage, "operator_tokens", "id = ?", (token2.split("_")[1],),
                                    {"expires_at": "2000-01-01T00:00:00.000000Z"})
    st, out = await skm.mgmt("GET", "/keystores", token=token2)
    assert st == 401, out
    refused += 1
    # Data plane v1.3: a revoked bearer token replayed, an expired one.
    store = await skm.keystore("bearer")
    kid = (await skm.key(store, "SECRET", "s", secretValue="bearer-protected-value"))["keyId"]
    key_id, secret = await access_key(skm)
    hygiene.secret(secret, "user access key secret")
    tok = await bearer(skm, key_id, secret)
    hygiene.secret(tok, "v1.3 bearer token")
    hdr = {"X-NHN-Authorization": f"Bearer {tok}"}
    assert (await skm.client("GET", f"/secrets/{kid}", version="v1.3", headers=hdr))[0] == 200
    st, out = await token_call(skm, "/oauth2/token/revoke", key_id, secret, {"token": tok})
    assert st == 200, out
    for _ in range(3):
        st, out = await skm.client("GET", f"/secrets/{kid}", version="v1.3", headers=hdr)
        assert st == 401, out
        refused += 1
    tok2 = await bearer(skm, key_id, secret)
    hygiene.secret(tok2, "v1.3 bearer token")
    await skm.rt.storage.execute("UPDATE oauth_tokens SET expires_at = ?", "2000-01-01T00:00:00.000000Z")
    st, out = await skm.client("GET", f"/secrets/{kid}", version="v1.3",
                               headers={"X-NHN-Authorization": f"Bearer {tok2}"})
    assert st == 401, out
    refused += 1
    numbers.add("abuse", f"replayed/expired tokens: {refused} replays refused (mgmt revoked x3, mgmt expired, "
                         "v1.3 revoked x3, v1.3 expired)")


async def test_certificate_deleted_under_an_open_keep_alive_connection(tracked, hygiene, numbers):
    skm = tracked
    store = await skm.keystore("certs", ip4AuthUse="N", certificateAuthUse="Y")
    kid = (await skm.key(store, "SECRET", "s", secretValue="cert-protected-value"))["keyId"]
    cert, key = await cert_files(skm, store, "app1")
    created = []
    trace = aiohttp.TraceConfig()

    async def on_create(_session, _ctx, _params) -> None:
        created.append(time.monotonic())

    trace.on_connection_create_end.append(on_create)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=skm.ssl(cert, key), limit=1),
                                    trace_configs=[trace])
    try:
        async with session.get(skm.client_path(f"/secrets/{kid}")) as r:
            assert r.status == 200, await r.text()
            await r.read()
        ks = store["keyStoreId"]
        for step in ("schedule-deletion", "delete"):
            st, out = await skm.mgmt("POST", f"/keystores/{ks}/certificates/{step}", json={"name": "app1"})
            assert st == 200, out
        async with session.get(skm.client_path(f"/secrets/{kid}")) as r:
            status = r.status
            await r.read()
    finally:
        await session.close()
    assert len(created) == 1, "the second request did not reuse the keep-alive connection"
    assert status == 403, f"a deleted certificate still works on an open connection ({status})"
    numbers.add("abuse", "certificate deleted under an open keep-alive connection (1 connection for both requests): "
                         f"next request -> {status}")
