"""The console in Chromium shows what the server refuses: a key store, a key or an entry edited in the
database outside the key server (server/access/seal.py) is marked INVALID, with what to do."""
from __future__ import annotations

from playwright.async_api import expect

from tests.access.test_seal_stores import NOW, _forget


async def test_rows_edited_in_the_database_are_marked_in_the_console(console, skm):
    db = skm.rt.storage
    store = await skm.keystore("edited")
    sid = store["keyStoreId"]
    kid = (await skm.key(store, "SYMMETRIC_KEY", "aes"))["keyId"]
    fine = (await skm.key(store, "SECRET", "fine", secretValue="x"))["keyId"]
    await db.execute("UPDATE keys SET exportable = 1 WHERE id = ?", kid)
    await db.execute("INSERT INTO auth_ipv4s (keystore_id, value, created_by, created_at, updated_by, updated_at) "
                     "VALUES (?, '0.0.0.0/0', 'admin', ?, 'admin', ?)", sid, NOW, NOW)
    await _forget(skm, sid, kid)
    page = await console.page("admin")
    # The store itself is intact: no warning; its edited key is marked in the list and on its page.
    await page.goto(f"{console.url}/keystores/{sid}")
    await expect(page.locator("#integrity")).to_have_count(0)
    rows = page.locator("table tbody tr")
    await expect(rows.filter(has_text="aes")).to_contain_text("INVALID")
    await expect(rows.filter(has_text="fine")).to_contain_text("ACTIVE")
    await page.goto(f"{console.url}/keys/{kid}")
    await expect(page.locator("#integrity")).to_contain_text("Changed outside the key server")
    await page.goto(f"{console.url}/keys/{fine}")
    await expect(page.locator("#integrity")).to_have_count(0)
    # The forged entry is listed as INVALID beside the real one.
    await page.goto(f"{console.url}/keystores/{sid}/auth")
    entries = page.locator("table tbody tr")
    await expect(entries.filter(has_text="0.0.0.0/0")).to_contain_text("INVALID")
    await expect(entries.filter(has_text="127.0.0.1")).to_contain_text("ACTIVE")
    # The store's checks switched off in the database: the store page says every client is refused.
    await db.execute("UPDATE keystores SET auth_mode = 'OR' WHERE id = ?", sid)
    await _forget(skm, sid)
    await page.goto(f"{console.url}/keystores/{sid}")
    await expect(page.locator("#integrity")).to_contain_text("every client and every change is refused")
    await console.shot(page, "store-invalid")


async def test_an_edited_change_request_shows_why_and_can_only_be_denied(console, skm):
    import json

    from tests.access.test_approvals import _approval_store
    db = skm.rt.storage
    await console.operator("alice", "approver")
    store = await _approval_store(skm)
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/auths/ipv4s", json={"value": "10.1.2.3"})
    rid = out["body"]["changeRequestId"]
    params = json.loads(await db.fetchval("SELECT params FROM change_requests WHERE id = ?", rid))
    await db.execute("UPDATE change_requests SET params = ? WHERE id = ?", json.dumps({**params, "value": "0.0.0.0/0"}),
                     rid)
    page = await console.page("alice")
    await page.goto(f"{console.url}/approvals/{rid}")
    await expect(page.locator("#integrity")).to_contain_text("It cannot be approved")
    await expect(page.locator("#approve")).to_have_count(0)
    await page.click("#deny")
    await expect(page.locator(".flash, .alert").first).to_contain_text("Denied")
    assert await db.fetchval("SELECT status FROM change_requests WHERE id = ?", rid) == "DENIED"
