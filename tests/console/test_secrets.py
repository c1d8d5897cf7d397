"""Secret values stay masked until an admin reveals one; the reveal is in the audit viewer."""
from __future__ import annotations

import re

from playwright.async_api import expect

from tests.console.test_keys import _create_key, _create_store


async def test_secret_hidden_until_revealed_and_audited(console, skm):
    page = await console.page("admin")
    sid = await _create_store(page, console.url, "secrets")
    await _create_key(page, console.url, sid, "SECRET", "api-token", secret="tok-9f8e7d6c5b4a")
    await expect(page.locator("h1")).to_contain_text("api-token")
    key_id = (await page.locator("#key-id").inner_text()).strip()
    # Masked: the value is nowhere in the page.
    await expect(page.locator("#secret-masked")).to_be_visible()
    assert "tok-9f8e7d6c5b4a" not in await page.content()
    await console.shot(page, "secret-masked")
    await page.click("#reveal")
    await expect(page.locator("#secret-value")).to_have_text("tok-9f8e7d6c5b4a")
    await console.shot(page, "secret-revealed")
    # Leaving the page hides it again.
    await page.click("#hide")
    await expect(page.locator("#secret-masked")).to_be_visible()
    assert "tok-9f8e7d6c5b4a" not in await page.content()

    # Updating the value makes a new version (the rotation of a SECRET).
    await page.fill("#new-secret", "tok-second")
    await page.click("#update-secret")
    await expect(page.locator("#current-version")).to_have_text("1")

    # The audit viewer shows the reveal, by whom, for which key; the chain verifies.
    await page.goto(console.url + "/audit")
    await expect(page.locator("#chain-status")).to_contain_text("intact")
    await page.fill("#f-action", "key.reveal")
    await page.click("#filter")
    await expect(page).to_have_url(re.compile(r".*action=key\.reveal.*"))
    rows = page.locator("#audit tbody tr[data-action='key.reveal']")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text(key_id)
    await expect(rows.first).to_contain_text("admin")
    await console.shot(page, "audit")
    records = await skm.rt.audit.query(action="key.reveal")
    assert len(records) == 1 and records[0]["keyId"] == key_id and records[0]["actor"] == "admin"
    # No audit record holds the value.
    every = await skm.rt.audit.query(limit=1000)
    assert every and "tok-9f8e7d6c5b4a" not in str(every) and "tok-second" not in str(every)
