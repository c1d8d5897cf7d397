"""Console security: CSRF, roles (viewer), cookie flags, headers, idle timeout, errors as pages."""
from __future__ import annotations

import asyncio
import re

import pytest
from playwright.async_api import expect

from server.settings import ConsoleSettings
from server.errors import Unauthenticated
from tests.console.test_approvals import _csrf, _post_form
from tests.console.test_keys import _create_key, _create_store

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; object-src 'none'; frame-ancestors 'none'; "
       "base-uri 'none'; form-action 'self'")


def _responses(page, suffix: str) -> list:
    seen: list = []
    page.on("response", lambda r: seen.append(r) if r.url.split("?")[0].endswith(suffix) else None)
    return seen


async def test_post_without_csrf_token_is_refused(console, skm):
    page = await console.page("admin")
    sid = await _create_store(page, console.url, "csrf")
    await _create_key(page, console.url, sid, "SYMMETRIC_KEY", "k")
    key_id = (await page.locator("#key-id").inner_text()).strip()
    seen = _responses(page, "/schedule-deletion")
    # The page's own form with its token removed, as a forged cross-site form would arrive.
    await page.evaluate("document.querySelector(\"form[action$='/schedule-deletion'] input[name=_csrf]\").remove()")
    await page.click("#schedule-deletion")
    await expect(page.locator(".errorpage h1")).to_have_text("Forbidden")
    await expect(page.locator(".errorpage .detail")).to_contain_text("CSRF")
    assert seen and seen[-1].status == 403
    await console.shot(page, "csrf-refused")
    # A wrong token too.
    await page.goto(f"{console.url}/keys/{key_id}")
    await _post_form(page, f"/console/keys/{key_id}/schedule-deletion", {"_csrf": "x" * 43})
    await expect(page.locator(".errorpage h1")).to_have_text("Forbidden")
    assert (await skm.rt.keys.key(key_id)).status.value == "ACTIVE"
    # The login form carries its own token (no session yet).
    anon = await console.page()
    await anon.goto(console.url + "/login")
    await anon.evaluate("document.querySelector('input[name=_csrf]').remove()")
    await anon.fill("#name", "admin")
    await anon.fill("#password", "correct horse battery staple")
    await anon.click("#login")
    await expect(anon.locator(".errorpage h1")).to_have_text("Forbidden")
    assert not any(c["name"] == "skm_console" for c in await anon.context.cookies())


async def test_viewer_sees_no_edit_controls_and_gets_403(console, skm):
    admin = await console.page("admin")
    sid = await _create_store(admin, console.url, "readonly")
    await _create_key(admin, console.url, sid, "SECRET", "s", secret="viewer-must-not-see")
    key_id = (await admin.locator("#key-id").inner_text()).strip()

    await console.operator("vera", "viewer")
    page = await console.page("vera")
    await expect(page.locator("#new-keystore")).to_have_count(0)
    await expect(page.locator("a[href='/console/operators']")).to_have_count(0)
    await console.shot(page, "viewer-keystores")
    await page.goto(f"{console.url}/keystores/{sid}")
    await expect(page.locator("#keys tbody tr")).to_have_count(1)
    await expect(page.locator("#new-key")).to_have_count(0)
    await page.goto(f"{console.url}/keys/{key_id}")
    for control in ("#rotate", "#schedule-deletion", "#reveal", "#update-secret", "#delete-now"):
        await expect(page.locator(control)).to_have_count(0)
    await expect(page.locator("#secret-masked")).to_be_visible()
    assert "viewer-must-not-see" not in await page.content()
    await console.shot(page, "viewer-key")
    await page.goto(f"{console.url}/keystores/{sid}/settings")
    await expect(page.locator("#save")).to_have_count(0)
    await expect(page.locator("#ks-name")).to_be_disabled()
    await page.goto(f"{console.url}/keystores/{sid}/auth")
    await expect(page.locator("#issue-cert")).to_have_count(0)
    await expect(page.locator("#add-ipv4s")).to_have_count(0)

    # Posting anyway, with the viewer's own valid CSRF token: 403, nothing changes.
    token = await _csrf(page)
    for action, fields in ((f"/console/keys/{key_id}/schedule-deletion", {}),
                           (f"/console/keys/{key_id}/reveal", {}),
                           ("/console/keystores/new", {"name": "by-viewer", "ip4_auth": "on"}),
                           (f"/console/keystores/{sid}/auth/ipv4s/add", {"value": "10.0.0.1"})):
        seen = _responses(page, action.split("/console", 1)[1])
        await _post_form(page, action, {"_csrf": token, **fields})
        await expect(page.locator(".errorpage h1")).to_have_text("Forbidden")
        assert seen and seen[-1].status == 403, action
        assert "viewer-must-not-see" not in await page.content()
    assert (await skm.rt.keys.key(key_id)).status.value == "ACTIVE"
    assert [s.name for s in await skm.rt.keys.keystores()] == ["readonly"]
    assert await skm.rt.authdata.list(await skm.rt.keys.keystore(sid), "ipv4s") == []
    await page.goto(console.url + "/operators")
    await expect(page.locator(".errorpage h1")).to_have_text("Forbidden")


async def test_session_cookie_headers_idle_timeout_and_error_pages(console, skm):
    page = await console.page()
    seen = _responses(page, "/console/login")
    await page.goto(console.url + "/login")
    headers = seen[-1].headers
    assert headers["content-security-policy"] == CSP
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    await console.login(page, "admin")
    cookie = next(c for c in await page.context.cookies() if c["name"] == "skm_console")
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/console"

    # Errors are pages with the error's message and detail, never a stack trace.
    seen = _responses(page, "/keys/" + "0" * 32)
    await page.goto(f"{console.url}/keys/{'0' * 32}")
    await expect(page.locator(".errorpage h1")).to_have_text("Invalid Key Id")
    await expect(page.locator(".errorpage .detail")).to_have_text("no key with that id")
    assert seen[-1].status == 404 and "Traceback" not in await page.content()
    await console.shot(page, "error-page")

    await page.goto(console.url + "/no/such/page")
    await expect(page.locator(".errorpage h1")).to_have_text("URL NOT FOUND")

    # An API token pasted into the cookie is not a console session.
    op = await skm.rt.operators.by_name("admin")
    api_token = await skm.rt.operators.issue_token(op, "cli")
    other = await console.page()
    await other.context.add_cookies([{"name": "skm_console", "value": api_token, "url": skm.mgmt_url + "/console/",
                                      "secure": True, "httpOnly": True, "sameSite": "Strict"}])
    await other.goto(console.url + "/keystores")
    await expect(other).to_have_url(re.compile(r".*/console/login\?reason=ended.*"))
    await skm.rt.operators.authenticate_token(api_token)      # refused, not revoked

    # Admins revoke API tokens from the operators page: the token stops working at once.
    await page.goto(console.url + "/operators")
    await page.click(f"tr[data-token='{api_token.split('_')[1]}'] button")
    await expect(page.locator(".flash-ok")).to_contain_text("revoked")
    with pytest.raises(Unauthenticated):
        await skm.rt.operators.authenticate_token(api_token)

    # Idle timeout: the session ends and its token is revoked server-side.
    state = skm.rt.extra["console_state"]
    state.settings = ConsoleSettings(idle_seconds=1.0)
    await asyncio.sleep(1.3)
    await page.goto(console.url + "/keystores")
    await expect(page).to_have_url(re.compile(r".*/console/login\?reason=idle.*"))
    await expect(page.locator(".flash-info")).to_contain_text("inactivity")
    with pytest.raises(Unauthenticated):
        await skm.rt.operators.authenticate_token(cookie["value"])
