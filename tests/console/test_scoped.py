"""The console shows every project, so an operator with project roles only is refused there
(the CLI and the management API are scoped to its projects)."""
from __future__ import annotations

import pytest
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


async def test_operator_creation_in_the_console_waits_for_another_admin(console, skm):
    import dataclasses
    import re
    await console.operator("admin-b", "admin")
    svc = skm.rt.changes.approvals
    svc.settings = dataclasses.replace(svc.settings, operators=True)      # [approvals] operators = true
    a = await console.page("admin")
    await a.goto(console.url + "/operators")
    await a.fill("#op-name", "newbie")
    await a.select_option("#op-role", "approver")
    await a.fill("#op-password", "correct horse battery staple")
    await a.fill("#op-password2", "correct horse battery staple")
    await a.click("#create-operator")
    await a.wait_for_url(re.compile(r".*/console/approvals/\d+$"))
    await expect(a.locator(".flash-info")).to_contain_text("requires approval")
    await expect(a.locator("#cr-status")).to_contain_text("PENDING")
    await expect(a.locator("#approve")).to_have_count(0)               # not the requester's to decide
    rid = int(a.url.rsplit("/", 1)[1])
    with pytest.raises(Exception):
        await skm.rt.operators.by_name("newbie")
    b = await console.page("admin-b")
    await b.goto(f"{console.url}/approvals/{rid}")
    await expect(b.locator("main")).to_contain_text("operator management")
    await b.click("#approve")
    await expect(b.locator("#cr-status")).to_contain_text("APPLIED")
    newbie = await skm.rt.operators.by_name("newbie")
    assert newbie.role == "approver"
    assert (await skm.rt.operators.describe("newbie"))["createdBy"] == "admin"
