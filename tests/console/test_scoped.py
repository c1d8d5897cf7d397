"""The console shows every project, so an operator with project roles only is refused there
(the CLI and the management API are scoped to its projects)."""
from __future__ import annotations

from playwright.async_api import expect

from tests.support.browser import PASSWORD


async def test_a_project_scoped_operator_gets_no_console_page(console, skm):
    other = await skm.rt.keys.create_project("team-b")
    await skm.rt.keys.create_keystore(other.id, "b-secret-store", ip4_auth=True, actor="admin")
    await skm.rt.operators.create("scoped", "admin", password=PASSWORD, project_id=1)
    page = await console.page()
    await page.goto(console.url + "/login")
    await page.fill("#name", "scoped")
    await page.fill("#password", PASSWORD)
    await page.click("#login")
    await expect(page.locator(".errorpage h1")).to_have_text("Forbidden")
    await expect(page.locator(".errorpage .detail")).to_contain_text("global role")
    assert "b-secret-store" not in await page.content()
    for path in ("/keystores", "/keystores/1", "/approvals", "/operators", "/audit"):
        r = await page.goto(console.url + path)
        assert r.status == 403, path
        await expect(page.locator(".errorpage h1")).to_have_text("Forbidden")
