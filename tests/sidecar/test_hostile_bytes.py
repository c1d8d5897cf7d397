"""Bytes an HTTP library would not send, from a local app to the sidecar (a header byte that is not UTF-8, a
NUL or a stray byte in a key id): each request gets its own answer, none a 5xx, and the ordinary reads sent
beside them are served. (Sent straight to the key server, such bytes once failed the audit batch of every
request beside them: tests/api/test_bad_input.py.)"""
from __future__ import annotations

import asyncio

from tests.support.sidecar import start_registered_sidecar, unix_session


async def _raw(sock, request: bytes) -> int:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(request)
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    return int(data.split(b" ", 2)[1])


async def test_hostile_bytes_through_the_sidecar_get_their_own_answer(skm):
    store = await skm.keystore("hostile", certificateAuthUse="Y", ip4AuthUse="N")
    secret = (await skm.key(store, "SECRET", "s", secretValue="v"))["keyId"]
    sc = await start_registered_sidecar(skm, store["keyStoreId"], "hostile")
    try:
        base = f"/keymanager/v1.0/appkey/{skm.appkey}"
        hostile = [
            b"GET %s/secrets/%s HTTP/1.1\r\nHost: s\r\nX-TOAST-CLIENT-MAC-ADDR: aa\xffbb\r\nConnection: close\r\n\r\n"
            % (base.encode(), secret.encode()),
            b"GET %s/secrets/%s HTTP/1.1\r\nHost: s\r\nX-Request-Id: r\xff\r\nConnection: close\r\n\r\n"
            % (base.encode(), secret.encode()),
            b"GET %s/secrets/abc%%00def HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n" % base.encode(),
            b"GET %s/secrets/%%ff HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n" % base.encode(),
            b"GET %s/confirm HTTP/1.1\r\nHost: s\r\nX-TOAST-CLIENT-MAC-ADDR: \xfe\r\nConnection: close\r\n\r\n"
            % base.encode(),
        ]
        async with unix_session(sc.config.listen.socket) as s:
            async def ordinary() -> tuple[int, dict]:
                async with s.get(f"{base}/secrets/{secret}", headers={"Cache-Control": "no-cache"}) as r:
                    return r.status, await r.json(content_type=None)
            for _ in range(2):
                answers = await asyncio.gather(*(ordinary() for _ in range(8)), *(_raw(sc.config.listen.socket, h)
                                                                                  for h in hostile))
                reads, statuses = answers[:8], answers[8:]
                assert all(st == 200 and out["body"]["secret"] == "v" for st, out in reads), reads
                assert all(st < 500 for st in statuses), statuses
        st, out = await skm.mgmt("GET", "/audit/verify")
        assert st == 200 and out["body"]["ok"], out
    finally:
        await sc.stop()
