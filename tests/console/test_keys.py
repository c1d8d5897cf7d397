"""The console in Chromium: log in, a key store, one key of each type, rotation, deletion and its cancel."""
from __future__ import annotations

import re

from playwright.async_api import expect


async def _create_store(page, url: str, name: str, *, approval: bool = False, cert: bool = False,
                        ip4: bool = True) -> int:
    await page.goto(url + "/keystores")
    await page.click("#new-keystore")
    await page.fill("#ks-name", name)
    await page.set_checked("#ip4_auth", ip4)
    await page.set_checked("#cert_auth", cert)
    await page.set_checked("#approval_required", approval)
    await page.click("#save")
    await page.wait_for_url(re.compile(r".*/console/keystores/\d+$"))
    return int(page.url.rsplit("/", 1)[1])


async def _create_key(page, url: str, store_id: int, key_type: str, name: str, *, spec: str | None = None,
                      secret: str | None = None) -> None:
    await page.goto(f"{url}/keystores/{store_id}/keys/new")
    await page.check(f"#type_{key_type}")
    await page.fill("#key-name", name)
    if secret is not None:
        await page.fill("#secret-value", secret)
    if spec is not None:
        await page.select_option(f"#spec_{key_type}", spec)
    await page.click("#create-key")


async def test_key_store_keys_rotation_and_deletion(console, skm):
    page = await console.page()
    await page.goto(console.url + "/")
    await expect(page).to_have_url(re.compile(r".*/console/login"))
    await console.shot(page, "login")
    # A wrong password is refused with a message on the login page, not a stack trace.
    await page.fill("#name", "admin")
    await page.fill("#password", "not the password")
    await page.click("#login")
    await expect(page.locator(".alert-error")).to_contain_text("wrong operator name or password")
    await console.login(page, "admin")

    sid = await _create_store(page, console.url, "payments")
    await expect(page.locator(".flash-ok")).to_contain_text("payments")
    # A validation message from the domain: a store with no client check cannot exist.
    await page.goto(console.url + "/keystores/new")
    await page.fill("#ks-name", "nochecks")
    await page.set_checked("#ip4_auth", False)
    await page.click("#save")
    await expect(page.locator(".alert-error")).to_contain_text("at least one client check")
    await console.shot(page, "keystore-form-error")

    await _create_key(page, console.url, sid, "SECRET", "db-password", secret="s3cr3t-value")
    await expect(page.locator("h1")).to_contain_text("db-password")
    await _create_key(page, console.url, sid, "SYMMETRIC_KEY", "data-key")
    await expect(page.locator("#current-version")).to_have_text("0")
    sym_url = page.url
    await _create_key(page, console.url, sid, "ASYMMETRIC_KEY", "signer", spec="EC-P256")
    await expect(page.locator("dd.mono").nth(1)).to_have_text("EC-P256")
    await page.goto(f"{console.url}/keystores/{sid}")
    rows = page.locator("#keys tbody tr")
    await expect(rows).to_have_count(3)
    types = {(await r.get_attribute("data-key")): (await r.locator("td").nth(1).inner_text()) for r in
             await rows.all()}
    assert types == {"db-password": "Secret", "data-key": "Symmetric Key", "signer": "Asymmetric Key"}
    await console.shot(page, "keystore-keys")

    # Rotate the symmetric key: version 1 appears and is primary.
    await page.goto(sym_url)
    await page.click("#rotate")
    await expect(page.locator(".flash-ok")).to_contain_text("Rotated")
    await expect(page.locator("#current-version")).to_have_text("1")
    await expect(page.locator("#versions tbody tr")).to_have_count(2)
    await expect(page.locator("#versions tbody tr").first).to_contain_text("primary")
    await console.shot(page, "key-detail")

    # Schedule deletion, then cancel it.
    await page.click("#schedule-deletion")
    await expect(page.locator("h1 .badge")).to_have_text("SCHEDULED DELETION")
    key_id = (await page.locator("#key-id").inner_text()).strip()
    assert (await skm.rt.keys.key(key_id)).status.value == "SCHEDULED_DELETION"
    await console.shot(page, "key-scheduled")
    await page.click("#cancel-deletion")
    await expect(page.locator("h1 .badge")).to_have_text("ACTIVE")
    assert (await skm.rt.keys.key(key_id)).status.value == "ACTIVE"

    # Settings: MAC verification and OR, saved through the same change path.
    await page.goto(f"{console.url}/keystores/{sid}/settings")
    await page.check("#mac_auth")
    await page.check("#auth_mode_or")
    await page.check("#mac_mode_neighbor")
    await page.click("#save")
    await expect(page.locator(".flash-ok")).to_contain_text("Settings saved")
    ks = await skm.rt.keys.keystore(sid)
    assert ks.mac_auth and ks.auth_mode.value == "OR" and ks.mac_mode.value == "neighbor"
    await console.shot(page, "keystore-settings")
    await page.goto(console.url + "/keystores")
    await console.shot(page, "keystores")
    await page.goto(f"{console.url}/keystores/{sid}/keys/new")
    await console.shot(page, "key-form")

    # Log out: the session's token is revoked, the console asks for a login again.
    await page.click("#logout")
    await expect(page).to_have_url(re.compile(r".*/console/login\?reason=out"))
    await page.goto(console.url + "/keystores")
    await expect(page).to_have_url(re.compile(r".*/console/login"))
