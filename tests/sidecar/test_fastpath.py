"""The local fast path (sidecar/fastpath.py): cacheable reads answered without aiohttp's pipeline,
the same answers, headers, metrics and checks as the aiohttp route, and a clean hand-over of the
connection to aiohttp for everything else. Raw sockets, so what is on the wire is what is tested."""
from __future__ import annotations

import asyncio
import re

import pytest

from sidecar import fastpath
from sidecar.cache import Cache
from sidecar.fastpath import encode_tail, parse_head
from sidecar.upstream import UpstreamResponse

# ------------------------------------------------------------------ parsing (no server)
PATH = "/keymanager/v1.0/appkey/App1/secrets/" + "a" * 32


def test_a_plain_get_is_parsed_and_anything_unusual_is_left_to_aiohttp():
    h = parse_head(f"GET {PATH}?x=1 HTTP/1.1\r\nHost: s\r\nX-Request-Id: abc-1\r\nAccept: */*".encode())
    assert (h.path, h.query, h.close, h.v10) == (PATH, "x=1", False, False)
    assert h.headers[b"x-request-id"] == b"abc-1" and h.headers[b"host"] == b"s"
    assert parse_head(f"GET {PATH} HTTP/1.1\r\nConnection: close".encode()).close is True
    assert parse_head(b"GET / HTTP/1.1").headers == {}
    # HTTP/1.0 (ab): keep-alive only when asked for, and the answer says so.
    h10 = parse_head(f"GET {PATH} HTTP/1.0\r\nConnection: Keep-Alive".encode())
    assert h10.v10 and not h10.close and h10.connection == b"Connection: keep-alive\r\n"
    assert parse_head(f"GET {PATH} HTTP/1.0".encode()).close is True
    for bad in (f"POST {PATH} HTTP/1.1", f"HEAD {PATH} HTTP/1.1", f"GET {PATH} HTTP/2.0", f"GET {PATH}",
                f"GET {PATH} HTTP/1.1\r\nContent-Length: 0", f"GET {PATH} HTTP/1.1\r\nTransfer-Encoding: chunked",
                f"GET {PATH} HTTP/1.1\r\nExpect: 100-continue", f"GET {PATH} HTTP/1.1\r\nConnection: Upgrade",
                f"GET {PATH} HTTP/1.1\r\nHost : s", f"GET {PATH} HTTP/1.1\r\nHost: s\r\n folded",
                f"GET {PATH} HTTP/1.1\r\nHost: s\nX: y", f"GET {PATH} HTTP/1.1\r\nHost: s\rX: y",
                f"GET {PATH} HTTP/1.1\r\nHost: s\x00", "GET /secrets/%2e%2e/x HTTP/1.1", "GET * HTTP/1.1",
                "GET http://x/secrets HTTP/1.1", f"GET {PATH}#f HTTP/1.1", f"GET  {PATH} HTTP/1.1"):
        assert parse_head(bad.encode()) is None, bad
    assert fastpath.request_id({b"x-request-id": "é".encode()}) is None        # aiohttp judges those
    assert re.fullmatch(r"[0-9a-f]{32}", fastpath.request_id({b"x-request-id": b"--"}))
    assert fastpath.request_id({b"x-request-id": b"trace-7"}) == "trace-7"


async def test_the_encoded_answer_lives_and_dies_with_its_cache_entry():
    now = [0.0]
    c = Cache(ttl=10, max_entries=10, max_bytes=10_000, stale_if_error=60, clock=lambda: now[0], encode=encode_tail)
    value = [b'{"v":0}']

    async def fetch():
        return UpstreamResponse(200, value[0], "application/json", "u")

    assert (await c.get("a", "k1", fetch)).source == "miss"
    e, age = c.peek("a")
    assert e.wire.endswith(b"\r\n\r\n" + value[0]) and b"Content-Length: 7\r\n" in e.wire
    assert c.bytes == len(e.body) + len(e.wire) + 256                          # the bound counts both
    c.drop_key("k1")                                                            # a push event
    assert c.peek("a") is None and c.bytes == 0
    value[0] = b'{"v":11}'
    await c.get("a", "k1", fetch)
    assert c.peek("a")[0].wire.endswith(b'{"v":11}')
    now[0] = 10.5                                                               # past the TTL
    assert c.peek("a") is None
    value[0] = b'{"v":222}'
    assert (await c.get("a", "k1", fetch)).source == "miss"
    assert c.peek("a")[0].wire.endswith(b'{"v":222}') and b"Content-Length: 9\r\n" in c.peek("a")[0].wire
    c.expire_all()                                                              # the stream reconnected
    assert c.peek("a") is None


# ------------------------------------------------------------------ on the wire, against a real key server
DEADLINE = 30.0         # generous for a loaded machine; only a hang reaches it


async def until(cond, what: str, timeout: float = DEADLINE) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, what
        await asyncio.sleep(0.02)


async def read_response(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)).decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return head[0], headers, body


async def exchange(sock: str, raw: bytes, answers: int) -> list[tuple[str, dict[str, str], bytes]]:
    reader, writer = await asyncio.open_unix_connection(sock)
    try:
        writer.write(raw)
        return [await read_response(reader) for _ in range(answers)]
    finally:
        writer.close()


def get(path: str, *headers: str, version: str = "1.1") -> bytes:
    return "\r\n".join([f"GET {path} HTTP/{version}", "Host: sidecar", *headers, "", ""]).encode()


async def test_a_hit_answers_like_the_aiohttp_route(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="same-bytes"))["keyId"]
    sc = await make_sidecar()
    sock = sc.config.listen.socket
    (st1, h1, b1), = await exchange(sock, get(f"/secrets/{kid}"), 1)             # miss: through the cache
    assert st1 == "HTTP/1.1 200 OK" and h1["x-skm-cache"] == "miss"
    (st2, h2, b2), = await exchange(sock, get(f"/secrets/{kid}", "X-Request-Id: trace-42"), 1)
    # The same request with a (zero) body is not plain: aiohttp answers it, from the same cache entry.
    (st3, h3, b3), = await exchange(sock, get(f"/secrets/{kid}", "Content-Length: 0"), 1)
    assert st2 == st3 == "HTTP/1.1 200 OK" and b1 == b2 == b3 and b'"same-bytes"' in b2
    assert h2["x-skm-cache"] == h3["x-skm-cache"] == "hit"
    assert set(h2) == set(h3) == {"x-skm-cache", "age", "content-type", "cache-control", "x-request-id",
                                  "content-length", "date", "server"}
    for k in ("content-type", "cache-control", "content-length", "server"):
        assert h2[k] == h3[k], k
    assert h2["x-request-id"] == "trace-42" and re.fullmatch(r"[0-9a-f]{32}", h3["x-request-id"])
    assert sc.cache.hits == 2 and sc.cache.misses == 1 and sc.upstream.sent == 1


async def test_pipelined_requests_keep_their_order_across_the_hand_over(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="v"))["keyId"]
    sc = await make_sidecar()
    sock = sc.config.listen.socket
    await exchange(sock, get(f"/secrets/{kid}"), 1)                                # cached
    raw = (get(f"/secrets/{kid}", "X-Request-Id: one") + get(f"/secrets/{'0' * 32}", "X-Request-Id: two")
           + get("/healthz", "X-Request-Id: three") + get(f"/secrets/{kid}", "X-Request-Id: four"))
    out = await exchange(sock, raw, 4)
    assert [(s.split()[1], h["x-request-id"]) for s, h, _ in out] == [
        ("200", "one"), ("404", "two"), ("200", "three"), ("200", "four")]
    assert out[1][2].startswith(b'{"header":{"resultCode":') and b'"isSuccessful":false' in out[1][2]
    assert out[2][2] == b'{"status": "ok"}'                                       # aiohttp took over at /healthz
    assert out[0][1]["x-skm-cache"] == out[3][1]["x-skm-cache"] == "hit"


async def test_http10_keep_alive_and_connection_close(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="v"))["keyId"]
    sc = await make_sidecar()
    sock = sc.config.listen.socket
    await exchange(sock, get(f"/secrets/{kid}"), 1)
    out = await exchange(sock, get(f"/secrets/{kid}", "Connection: Keep-Alive", version="1.0") * 2, 2)
    assert all(s == "HTTP/1.0 200 OK" and h["connection"] == "keep-alive" for s, h, _ in out)
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(get(f"/secrets/{kid}", "Connection: close"))
    status, h, _ = await read_response(reader)
    assert status == "HTTP/1.1 200 OK" and h["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), DEADLINE) == b""                 # and it is closed
    writer.close()


async def test_tcp_listener_fast_path_keeps_the_anti_ssrf_check(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="v"))["keyId"]
    sc = await make_sidecar(listen={"tcp_port": 0, "tcp_allow_default": True})
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.api.tcp_port)
    try:
        for _ in range(2):                                                     # a miss, then a hit
            writer.write(get(f"/secrets/{kid}", "X-SKM-Request: 1"))
            status, h, _ = await read_response(reader)
            assert status == "HTTP/1.1 200 OK"
        assert h["x-skm-cache"] == "hit"
        writer.write(get(f"/secrets/{kid}"))                                    # no header: refused
        status, _, body = await read_response(reader)
        assert status.split()[1] == "403" and b"X-SKM-Request" in body
    finally:
        writer.close()


async def test_metrics_count_fast_hits_exactly(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="v"))["keyId"]
    sc = await make_sidecar()
    sock = sc.config.listen.socket
    await exchange(sock, get(f"/secrets/{kid}") * 25, 25)
    (_, _, text), = await exchange(sock, get("/metrics"), 1)
    text = text.decode()
    assert 'skm_sidecar_requests_total{kind="proxy",status="200"} 25.0' in text
    assert 'skm_sidecar_cache_requests_total{outcome="hit"} 24.0' in text
    assert 'skm_sidecar_cache_requests_total{outcome="miss"} 1.0' in text
    await exchange(sock, get(f"/secrets/{kid}") * 3, 3)
    (_, _, text), = await exchange(sock, get("/metrics"), 1)
    assert 'skm_sidecar_cache_requests_total{outcome="hit"} 27.0' in text.decode()


async def test_idle_fast_path_connections_are_closed(skm, store, make_sidecar, monkeypatch):
    monkeypatch.setattr(fastpath, "IDLE_TIMEOUT", 0.5)
    kid = (await skm.key(store, "SECRET", "db", secretValue="v"))["keyId"]
    sc = await make_sidecar()
    reader, writer = await asyncio.open_unix_connection(sc.config.listen.socket)
    writer.write(get(f"/secrets/{kid}"))
    await read_response(reader)
    assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
    writer.close()
    await until(lambda: not sc.api.connections, "the idle connection is still tracked")


async def test_upstream_error_through_the_fast_path_is_an_envelope(skm, store, make_sidecar):
    sc = await make_sidecar(cache={"stale_if_error": 0.0})
    await skm.server.stop()
    (status, h, body), = await exchange(sc.config.listen.socket, get(f"/secrets/{'c' * 32}"), 1)
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert h["content-type"] == "application/json; charset=utf-8"
    assert body.startswith(b'{"header":{"resultCode":') and b'"resultMessage":"Service Unavailable"' in body


@pytest.mark.parametrize("junk", [b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", b"GET / HTTP/1.1\r\nHost: x" * 400])
async def test_junk_goes_to_aiohttp_and_gets_a_4xx(make_sidecar, junk):
    sc = await make_sidecar()
    reader, writer = await asyncio.open_unix_connection(sc.config.listen.socket)
    writer.write(junk + b"\r\n\r\n")
    head = await asyncio.wait_for(reader.read(200), DEADLINE)
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", head), head
    writer.close()


async def test_an_app_that_does_not_read_is_throttled_and_then_answered_in_full(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="x" * 2000))["keyId"]
    sc = await make_sidecar()
    sock = sc.config.listen.socket
    await exchange(sock, get(f"/secrets/{kid}"), 1)
    n = 3000                                           # ~7 MB of answers: far past the socket buffers
    reader, writer = await asyncio.open_unix_connection(sock, limit=1 << 20)
    try:
        writer.write(b"".join(get(f"/secrets/{kid}", f"X-Request-Id: r{i}") for i in range(n)))
        # The sidecar stops reading instead of buffering it all.
        await until(lambda: any(c.write_paused and c.read_paused for c in sc.api.connections.values()),
                    "the sidecar never paused reading from an app that does not read")
        paused = [c for c in sc.api.connections.values() if c.write_paused]
        assert len(paused) == 1 and paused[0].read_paused and paused[0].inner is None
        ids = [(await read_response(reader))[1]["x-request-id"] for _ in range(n)]
        assert ids == [f"r{i}" for i in range(n)]
    finally:
        writer.close()


async def test_with_the_fast_path_off_aiohttp_answers_everything_the_same(skm, store, make_sidecar):
    kid = (await skm.key(store, "SECRET", "db", secretValue="v"))["keyId"]
    sc = await make_sidecar(listen={"fast_path": False})
    out = await exchange(sc.config.listen.socket, get(f"/secrets/{kid}") * 3, 3)
    assert [h["x-skm-cache"] for _, h, _ in out] == ["miss", "hit", "hit"]
    assert out[1][2] == out[2][2] and b'"v"' in out[2][2]
    assert sc.api.fast_hits == 0 and sc.cache.hits == 2
    assert all(c.inner is not None for c in sc.api.connections.values())
