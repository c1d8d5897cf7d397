"""Hostile stored text on every console page that shows stored text (issue 14): script tags and attribute
break-outs put into names, descriptions, comments and credential descriptions through the management API,
then every page opened in Chromium. Nothing may execute (no dialog, no console message, no page error: a
CSP refusal of an injected script would show as a console error too), no injected element may exist, and
the payload must be on the page as text (escaped, not dropped).

Pages: dashboard, key store list (and its search box echoing a payload), key store, settings, auth data
(IPv4, MAC, certificate descriptions), connect, usage, new key form, key, key activity, audit, approvals
(pending, mine, recent), a pending change request (diff, approver's comment), a denied one (its reason),
operators (their tokens' descriptions), my account (tokens, access keys) and the login form (a refused name);
the audit exports, which carry the payloads raw, are downloads that are never rendered.
"""
from __future__ import annotations

from urllib.parse import quote

from playwright.async_api import expect

from tests.support.browser import watch

XSS_NAME = "<script>alert(1)</script>"
XSS_DESC = '"><img src=x onerror=alert(2)>'
XSS_ATTR = "' autofocus onfocus=alert(3) x='"          # a break-out of a single-quoted attribute
PAYLOADS = (XSS_NAME, XSS_DESC, XSS_ATTR)
PASSWORD = "correct horse battery staple"
# What an executed or injected payload would have made.
INJECTED = "img[src=x], [onerror], [onfocus], script:not([src])"


async def _api(skm, method: str, path: str, body: dict | None = None, token: str | None = None,
               want: tuple[int, ...] = (200, 201)) -> dict:
    st, out = await skm.mgmt(method, path, json=body, token=token)
    assert st in want, (method, path, st, out)
    return out["body"]


async def _hostile_world(skm) -> dict:
    """Stored text carrying the payloads wherever the API accepts free text."""
    admin = skm.init.token
    evil = await skm.keystore(XSS_NAME, description=XSS_DESC, register_loopback=False,
                              macAuthUse="Y", certificateAuthUse="Y", macVerification="header")
    sid = evil["keyStoreId"]
    await _api(skm, "POST", f"/keystores/{sid}/auths/ipv4s", {"value": "10.9.0.0/16", "description": XSS_DESC})
    await _api(skm, "POST", f"/keystores/{sid}/auths/ipv4s", {"value": "10.8.0.1", "description": XSS_NAME})
    await _api(skm, "POST", f"/keystores/{sid}/auths/macs", {"value": "02:00:00:00:00:01", "description": XSS_ATTR})
    await _api(skm, "POST", f"/keystores/{sid}/certificates", {"name": "web-1", "password": "bundle-password-1",
                                                                 "description": XSS_DESC})
    key = await skm.key(evil, "SECRET", XSS_NAME, description=XSS_DESC, secretValue="hostile-value")
    for _ in range(2):                                   # denied reads: usage, audit and dashboard rows
        st, _o = await skm.client("GET", f"/secrets/{key['keyId']}")
        assert st == 403
    await skm.rt.extra["usage"].flush()

    # Change requests: carol (admin) asks, bob (approver, not of carol's making) comments and denies.
    await skm.rt.operators.create("carol", "admin", password=PASSWORD)
    await skm.rt.operators.create("bob", "approver", password=PASSWORD)
    await skm.rt.operators.create("dave", "approver", password=PASSWORD)     # two approvals needed: two approvers
    carol = (await _api(skm, "POST", "/login", {"name": "carol", "password": PASSWORD}))["token"]
    bob = (await _api(skm, "POST", "/login", {"name": "bob", "password": PASSWORD}))["token"]
    gated = await _api(skm, "POST", "/keystores", {"name": XSS_DESC, "description": XSS_NAME, "ip4AuthUse": "Y",
                                                   "approvalRequired": True, "approvalsNeeded": 2})
    gid = gated["keyStoreId"]
    pending = await _request(skm, carol, gid, XSS_NAME)
    await _api(skm, "POST", f"/approvals/{pending}/approve", {"comment": XSS_DESC}, token=bob)
    denied = await _request(skm, carol, gid, XSS_ATTR)
    await _api(skm, "POST", f"/approvals/{denied}/deny", {"comment": XSS_NAME}, token=bob)
    for pid in (pending, denied):
        cr = await _api(skm, "GET", f"/approvals/{pid}")
        assert cr["status"] == ("PENDING" if pid == pending else "DENIED"), cr

    # Credentials with hostile descriptions: the admin's tokens (operators page, my account), an access key.
    await _api(skm, "POST", "/tokens", {"description": XSS_NAME}, token=admin)
    await _api(skm, "POST", "/tokens", {"description": XSS_DESC, "operator": "bob"}, token=admin)
    await _api(skm, "POST", "/access-keys", {"description": XSS_ATTR}, token=admin)
    return {"sid": sid, "gid": gid, "key": key["keyId"], "pending": pending, "denied": denied}


async def _request(skm, token: str, gid: int, name: str) -> int:
    """A key creation in an approval store: answered with a pending change request, no key made."""
    st, out = await skm.mgmt("POST", f"/keystores/{gid}/keys", token=token,
                             json={"keyType": "SECRET", "name": name, "description": XSS_DESC,
                                   "secretValue": "requested-value"})
    assert st == 202, out
    return int(out["body"]["changeRequestId"])


def _pages(w: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(page, the payloads it must show as text)."""
    sid, gid, key = w["sid"], w["gid"], w["key"]
    return [
        ("/", (XSS_NAME,)),
        ("/keystores", (XSS_NAME, XSS_DESC)),
        ("/keystores?q=" + quote(XSS_DESC), (XSS_DESC,)),        # a search term echoed into the form
        (f"/keystores/{sid}", (XSS_NAME, XSS_DESC)),
        (f"/keystores/{sid}/settings", (XSS_NAME,)),
        (f"/keystores/{sid}/auth", (XSS_NAME, XSS_DESC, XSS_ATTR)),
        (f"/keystores/{sid}/connect", (XSS_NAME,)),
        (f"/keystores/{sid}/usage", (XSS_NAME,)),
        (f"/keystores/{sid}/keys/new", (XSS_NAME,)),
        (f"/keys/{key}", (XSS_NAME, XSS_DESC)),
        (f"/keys/{key}/activity", (XSS_NAME,)),
        ("/audit", (XSS_NAME,)),
        ("/approvals", (XSS_DESC,)),
        (f"/approvals/{w['pending']}", (XSS_NAME, XSS_DESC)),
        (f"/approvals/{w['denied']}", (XSS_NAME, XSS_ATTR)),
        ("/operators", (XSS_NAME, XSS_DESC)),
        ("/me", (XSS_NAME, XSS_ATTR)),
    ]


async def _check(page, path: str, source: str, shown: tuple[str, ...]) -> None:
    # The page as served holds no payload verbatim (each one only escaped), the DOM no element one would make.
    assert not [p for p in PAYLOADS if p in source], path
    assert await page.locator(INJECTED).count() == 0, path
    text = await page.locator("body").inner_text()
    for p in shown:
        assert p in text, f"{path}: {p!r} not shown as text"


async def test_hostile_stored_text_is_inert_on_every_page(console, skm):
    w = await _hostile_world(skm)
    page = await console.page()
    seen = watch(page)
    await console.login(page, "admin")
    for path, shown in _pages(w):
        resp = await page.goto(console.url + path)
        assert resp is not None and resp.status == 200, path
        await _check(page, path, await resp.text(), shown)
        # Focus moves through every focusable element: an injected onfocus (autofocus aside) would fire.
        for _ in range(3):
            await page.keyboard.press("Tab")
    # The audit exports carry the payloads raw (they are data): never as a page a browser would render.
    for fmt, ctype in (("csv", "text/csv"), ("jsonl", "application/x-ndjson")):
        r = await page.request.get(f"{console.url}/audit/export?format={fmt}")
        assert r.status == 200 and XSS_NAME in await r.text(), fmt
        assert r.headers["content-type"].startswith(ctype), r.headers
        assert r.headers["content-disposition"].startswith("attachment") and r.headers["x-content-type-options"] == "nosniff"
    await page.goto(f"{console.url}/approvals/{w['pending']}")
    await expect(page.locator("#diff")).to_contain_text(XSS_NAME)
    await console.shot(page, "xss-approval")
    assert seen == [], seen


async def test_a_refused_login_echoes_the_name_as_text(console, skm):
    page = await console.page()
    seen = watch(page)
    await page.goto(console.url + "/login")
    await page.fill("#name", XSS_DESC)
    await page.fill("#password", "not the password")
    async with page.expect_response(lambda r: r.url.endswith("/console/login") and r.request.method == "POST") as info:
        await page.click("#login")
    resp = await info.value
    assert resp.status in (401, 403) and not [p for p in PAYLOADS if p in await resp.text()]
    await expect(page.locator(".alert-error")).to_be_visible()
    assert await page.locator(INJECTED).count() == 0
    assert await page.locator("#name").input_value() == XSS_DESC          # echoed into the field, as a value
    assert seen == [], seen
