"""Each bad input gets its envelope error and a 4xx, and the store does not change."""
from __future__ import annotations

import asyncio
import base64
import json

import pytest

from server.access.operators import LOGIN_FAILED
from tests.api.test_client_api import assert_err, assert_ok


async def snapshot(skm) -> list:
    """Everything a request could change."""
    db = skm.rt.storage
    out = []
    for table in ("keystores", "keys", "key_versions", "auth_ipv4s", "auth_macs"):
        out.append(await db.fetchall(f"SELECT * FROM {table} ORDER BY 1"))
    return out


@pytest.fixture
async def keys(skm):
    store = await skm.keystore("bad")
    return {
        "store": store,
        "secret": (await skm.key(store, "SECRET", "s", secretValue="v"))["keyId"],
        "sym": (await skm.key(store, "SYMMETRIC_KEY", "k"))["keyId"],
        "asym": (await skm.key(store, "ASYMMETRIC_KEY", "a"))["keyId"],
    }


async def raw_post(skm, path: str, data: bytes, content_type: str = "application/json"):
    async with skm._default().post(skm.client_path(path), data=data, headers={"Content-Type": content_type}) as r:
        return r.status, await r.json(content_type=None)


async def test_bad_inputs_each_refused_and_nothing_changes(skm, keys):
    sym, asym, sec = keys["sym"], keys["asym"], keys["secret"]
    before = await snapshot(skm)
    cases = [
        # (call, status, resultMessage)
        (skm.client("POST", f"/symmetric-keys/{sym}/encrypt", json={"plaintext": "x" * (32 * 1024 + 1)}),
         400, "Invalid Request"),
        (skm.client("POST", f"/symmetric-keys/{sym}/encrypt", json={"plaintext": "é" * (16 * 1024 + 1)}),
         400, "Data Too Large"),
        (skm.client("POST", f"/asymmetric-keys/{asym}/sign", json={"plaintext": "x" * 246}), 400, "Data Too Large"),
        (skm.client("POST", f"/symmetric-keys/{sym}/decrypt", json={"ciphertext": "not base64!"}),
         400, "Invalid User Data"),
        (skm.client("POST", f"/symmetric-keys/{sym}/decrypt", json={"ciphertext": "AAAA"}), 400, "Invalid User Data"),
        (skm.client("POST", f"/asymmetric-keys/{asym}/verify", json={"plaintext": "x", "signature": "%%%"}),
         400, "Invalid User Data"),
        (raw_post(skm, f"/symmetric-keys/{sym}/encrypt", b'{"plaintext": '), 400, "Invalid JSON"),
        (raw_post(skm, f"/symmetric-keys/{sym}/encrypt", b'["plaintext"]'), 400, "Invalid Request"),
        (raw_post(skm, f"/symmetric-keys/{sym}/encrypt", b'\xff\xfe'), 400, "Invalid JSON"),
        (raw_post(skm, f"/symmetric-keys/{sym}/encrypt", b'{"plaintext": "x"}', "text/plain"),
         415, "Unsupported Content Type"),
        (skm.client("POST", f"/symmetric-keys/{sym}/encrypt", json={"plaintext": 5}), 400, "Invalid Request"),
        (skm.client("POST", f"/symmetric-keys/{sym}/encrypt", json={}), 400, "Invalid Request"),
        (skm.client("GET", "/secrets/" + "0" * 32), 404, "Invalid Key Id"),
        (skm.client("GET", "/secrets/not-a-key-id"), 404, "Invalid Key Id"),
        (skm.client("POST", f"/symmetric-keys/{sec}/encrypt", json={"plaintext": "x"}), 400, "Invalid Key Type"),
        (skm.client("GET", f"/secrets/{sym}"), 400, "Invalid Key Type"),
        (skm.client("POST", f"/asymmetric-keys/{sym}/sign", json={"plaintext": "x"}), 400, "Invalid Key Type"),
        (skm.client("GET", f"/asymmetric-keys/{asym}/publicKey?keyVersion=7"), 400, "Invalid Key Version"),
        (skm.client("GET", f"/asymmetric-keys/{asym}/publicKey?keyVersion=-1"), 400, "Invalid Request"),
        (skm.client("GET", "/no/such/path"), 404, "URL NOT FOUND"),
        (skm.client("DELETE", f"/secrets/{sec}"), 405, "Method Not Allowed"),
        (skm.client("GET", f"/secrets/{sec}", version="v9.9"), 404, "URL NOT FOUND"),
        (skm.client("PUT", f"/secrets/{sec}", version="v1.0", json={"secretValue": "y"}), 404, "URL NOT FOUND"),
    ]
    for call, status, message in cases:
        assert_err(*await call, status, message)
    # A body over the listener's limit is refused before it is read whole.
    st, out = await raw_post(skm, f"/symmetric-keys/{sym}/encrypt", b'{"plaintext":"' + b"x" * 300_000 + b'"}')
    assert_err(st, out, 413, "Request Too Large")
    assert await snapshot(skm) == before


async def test_scheduled_deletion_blocks_use_until_cancelled(skm, keys):
    sym = keys["sym"]
    st, out = await skm.mgmt("POST", f"/keys/{sym}/schedule-deletion")
    assert st == 200 and out["body"]["keyStatus"] == "SCHEDULED_DELETION" and out["body"]["deletionDatetime"]
    before = await snapshot(skm)
    assert_err(*await skm.client("POST", f"/symmetric-keys/{sym}/encrypt", json={"plaintext": "x"}),
               409, "Invalid Key Status")
    assert await snapshot(skm) == before
    st, out = await skm.mgmt("POST", f"/keys/{sym}/cancel-deletion")
    assert st == 200 and out["body"]["keyStatus"] == "ACTIVE"
    assert_ok(*await skm.client("POST", f"/symmetric-keys/{sym}/encrypt", json={"plaintext": "x"}))


async def test_immediate_delete_only_from_scheduled(skm, keys):
    sec = keys["secret"]
    st, out = await skm.mgmt("DELETE", f"/keys/{sec}")
    assert st == 409 and out["header"]["resultMessage"] == "Invalid Key Status"
    await skm.mgmt("POST", f"/keys/{sec}/schedule-deletion")
    st, out = await skm.mgmt("DELETE", f"/keys/{sec}")
    assert st == 200 and out["body"]["keyId"] == sec
    assert_err(*await skm.client("GET", f"/secrets/{sec}"), 404, "Invalid Key Id")
    assert await skm.rt.storage.fetchval("SELECT COUNT(*) AS n FROM key_versions WHERE key_id = ?", sec) == 0


async def test_sign_245_bytes_is_the_limit(skm, keys):
    assert_ok(*await skm.client("POST", f"/asymmetric-keys/{keys['asym']}/sign", json={"plaintext": "é" * 122 + "x"}))
    assert_err(*await skm.client("POST", f"/asymmetric-keys/{keys['asym']}/sign", json={"plaintext": "é" * 123}),
               400, "Data Too Large")


async def test_secret_of_exactly_32k(skm, keys):
    value = "s" * (32 * 1024)
    key = await skm.key(keys["store"], "SECRET", "big", secretValue=value)
    assert assert_ok(*await skm.client("GET", f"/secrets/{key['keyId']}"))["secret"] == value
    st, out = await skm.mgmt("POST", f"/keystores/{keys['store']['keyStoreId']}/keys",
                             json={"keyType": "SECRET", "name": "too-big", "secretValue": value + "s"})
    assert st == 400 and out["header"]["isSuccessful"] is False


async def test_decrypt_ciphertext_from_encrypt_base64(skm, keys):
    enc = assert_ok(*await skm.client("POST", f"/symmetric-keys/{keys['sym']}/encrypt", json={"plaintext": ""}))
    assert len(base64.b64decode(enc["ciphertext"])) == 32
    assert assert_ok(*await skm.client("POST", f"/symmetric-keys/{keys['sym']}/decrypt",
                                       json={"ciphertext": enc["ciphertext"]}))["plaintext"] == ""


@pytest.mark.parametrize("value", ["99999999999999999999", "9223372036854775808", "²", "-1", "1e3"])
async def test_number_parameters_out_of_range_are_400_on_every_api(skm, keys, value):
    """A number too big for the database's integer, or a digit `int()` refuses, is a 400 naming the parameter:
    it used to reach SQLite as an overflow and come back a 500 (found by the long fuzz)."""
    before = await snapshot(skm)
    mgmt = [("/approvals", "keyStoreId"), ("/approvals", "limit"), ("/audit", "keyStoreId"), ("/audit", "beforeSeq"),
            ("/usage", "keyStoreId"), (f"/keystores/{keys['store']['keyStoreId']}/keys", "pageSize")]
    for path, name in mgmt:
        st, body = await skm.mgmt("GET", path, params={name: value})
        assert st == 400, (path, name, st, body)
        assert name in body["header"]["resultDetail"], body
    st, body = await skm.mgmt("DELETE", "/operators/admin/roles", params={"projectId": value})
    assert st == 400 and "projectId" in body["header"]["resultDetail"], body
    st, body = await skm.client("GET", f"/asymmetric-keys/{keys['asym']}/publicKey", params={"keyVersion": value}, version="v1.1")
    assert st == 400 and "keyVersion" in body["header"]["resultDetail"], body
    assert await snapshot(skm) == before


async def _raw(skm, path: str, header: bytes = b"", *, method: str = "GET", mgmt: bool = False) -> tuple[int, bytes]:
    """A request over real TLS with bytes an HTTP library would not send (a header byte that is not UTF-8)."""
    port = skm.server.mgmt_port if mgmt else skm.server.data_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=skm.ssl(), server_hostname="127.0.0.1")
    try:
        writer.write(b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\nContent-Length: 0\r\n%s\r\n"
                     % (method.encode(), path.encode(), port, header))
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def _raw_get(skm, path: str, header: bytes = b"") -> tuple[int, dict]:
    st, body = await _raw(skm, path, header)
    return st, json.loads(body)


async def test_a_header_byte_or_path_nul_the_audit_must_escape_fails_only_its_own_request(skm, keys):
    """A client's MAC header with a byte that is not UTF-8, or a key id with %00, once failed the audit write
    of the whole batch it joined, so every request waiting on that batch got 503 (audit is fail-closed):
    anyone could take the key server down for everyone; and /confirm, which echoes the header, answered 500.
    Now each gets its own answer, the ordinary reads sent with them succeed, and the log holds both values
    as escapes."""
    sec = keys["secret"]
    prefix = f"/keymanager/v1.0/appkey/{skm.appkey}"
    mac_header = b"X-TOAST-CLIENT-MAC-ADDR: aa\xffbb\r\n"
    for _ in range(3):           # with ordinary reads in flight, so they share batches
        ordinary = [skm.client("GET", f"/secrets/{sec}") for _ in range(10)]
        hostile = [_raw_get(skm, f"{prefix}/secrets/{sec}", mac_header), _raw_get(skm, f"{prefix}/secrets/abc%00def")]
        *reads, (mac_st, mac_out), (nul_st, nul_out) = await asyncio.gather(*ordinary, *hostile)
        for st, out in reads:
            assert st == 200 and out["body"]["secret"] == "v", out
        assert mac_st == 200 and mac_out["body"]["secret"] == "v", mac_out     # the store checks IPs only
        assert nul_st == 404 and nul_out["header"]["resultMessage"] == "Invalid Key Id", nul_out
    st, out = await _raw_get(skm, f"{prefix}/confirm", mac_header)      # echoed as its escape, not a 500
    assert st == 200 and out["body"]["clientMacHeader"] == "aa\\xffbb", out
    st, out = await skm.mgmt("GET", "/audit", params={"limit": "100", "keyId": "abc\\x00def"})
    assert st == 200 and len(out["body"]["records"]) == 3, out
    st, out = await skm.mgmt("GET", "/audit", params={"limit": "200"})
    assert sum(r["mac"] == "aa\\xffbb" for r in out["body"]["records"]) == 4      # three reads, one /confirm
    st, out = await skm.mgmt("GET", "/audit/verify")
    assert st == 200 and out["body"]["ok"], out


async def test_the_console_error_page_links_back_only_to_its_own_pages(skm):
    """An error page offers Back to the console page the user came from; a Referer elsewhere gets no Back
    button, and one with a byte that is not UTF-8 no longer makes the error page itself a 500."""
    port = skm.server.mgmt_port
    cases = [(f"https://127.0.0.1:{port}/console/keystores".encode(), True),
             (b"https://evil.example/console/keystores", False),
             (f"https://127.0.0.1:{port}/console/\xff".encode(), False)]
    for referer, back in cases:
        st, page = await _raw(skm, "/console/login", b"Referer: %s\r\n" % referer, method="POST", mgmt=True)
        assert st == 403 and b"CSRF" in page, page[-300:]            # no form token: refused, as a page
        assert (b'href="' + referer + b'"' in page) is back, (referer, page[-500:])
        assert (b">Back</a>" in page) is back


async def test_a_login_name_with_a_nul_is_an_ordinary_failed_login(skm):
    """No operator name holds a NUL (PostgreSQL's text cannot): such a name is a failed login like any unknown
    name (401, the one message every failure gets), not a 500 from the database."""
    for name in ("ad\x00min", "\x00"):
        async with skm._default().post(f"{skm.mgmt_url}/api/v1/login", json={"name": name, "password": "x"}) as r:
            out = await r.json(content_type=None)
        assert r.status == 401 and out["header"]["resultDetail"] == LOGIN_FAILED, out
