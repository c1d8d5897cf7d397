"""The console's audit filter takes the same action names as `skm audit query`: a mistyped one is said
(with the close names), never answered with an empty page; a resource name selects all its actions."""
from __future__ import annotations

from playwright.async_api import expect


async def test_a_mistyped_action_is_said_and_a_resource_selects_its_actions(console, skm):
    store = await skm.keystore("filtered")
    await skm.key(store, "SECRET", "db", secretValue="v")
    page = await console.page("admin")
    resp = await page.goto(console.url + "/audit?action=key.creat")
    assert resp.status == 400
    await expect(page.locator("body")).to_contain_text("no audit action is named 'key.creat'")
    await expect(page.locator("body")).to_contain_text("key.create")          # the close name, offered
    for action in ("key", "key.create"):
        resp = await page.goto(console.url + f"/audit?action={action}")
        assert resp.status == 200
        rows = page.locator("#audit tbody tr[data-action]")
        await expect(rows.first).to_contain_text("key.create")
        actions = [await r.get_attribute("data-action") for r in await rows.all()]
        assert actions and {a.split(".")[0] for a in actions} == {"key"}, actions
    resp = await page.goto(console.url + "/audit/export?format=jsonl&action=nosuch")
    assert resp.status == 400
