"""Project-scoped operators in the console: each sees its projects only, on every page, and every write
to another project's object is refused (a 403 page) and changes nothing. Two projects: A (the first
project, `skm server init`'s) and B."""
from __future__ import annotations

import re

import pytest
from playwright.async_api import expect

from tests.support.browser import PASSWORD, change_password, pending_request

B_NAMES = ("team-b", "b-store", "b-secret", "b-guarded", "b-waiting")


async def _two_projects(skm):
    """A: a store with a secret. B: a store with a secret, and an approval store with a pending request."""
    b = await skm.rt.keys.create_project("team-b", description="the other team")
    a_store = await skm.keystore("a-store")
    a_key = await skm.key(a_store, "SECRET", "a-secret", secretValue="a-value")
    b_store = await skm.keystore("b-store", projectId=b.id)
    b_key = await skm.key(b_store, "SECRET", "b-secret", secretValue="b-value")
    guarded = await skm.keystore("b-guarded", projectId=b.id)
    await skm.rt.operators.create("bea", "approver", password=PASSWORD, project_id=b.id)    # B's approver
    return b, a_store, a_key, b_store, b_key, await pending_request(skm, guarded, "b-waiting")


async def _post(page, url: str, form: dict | None = None):
    """A form post with this page's session and CSRF token (what a crafted form would send)."""
    csrf = await page.locator("input[name=_csrf]").first.get_attribute("value")
    return await page.request.post(url, form={"_csrf": csrf, **(form or {})}, max_redirects=0)


async def _state(skm) -> dict:
    """Everything a write could change, to compare before and after the refused writes."""
    return {table: await skm.rt.storage.fetchall(f"SELECT * FROM {table} ORDER BY 1")
            for table in ("projects", "keystores", "keys", "key_versions", "auth_ipv4s", "auth_certificates",
                          "change_requests", "change_approvals", "operators", "operator_roles")}


async def test_a_project_admin_sees_and_changes_only_its_project(console, skm):
    b, a_store, a_key, b_store, b_key, b_request = await _two_projects(skm)
    await skm.rt.operators.create("anna", "admin", password=PASSWORD, project_id=1)
    page = await console.page("anna")
    await expect(page.locator("h1")).to_have_text("Dashboard")
    await expect(page.locator("#nav-role")).to_have_text("admin in 1 project")
    await expect(page.locator("#mainnav a[href='/console/operators']")).to_have_count(0)

    # Every page anna can reach shows project A's things and nothing of B.
    ks, kid = a_store["keyStoreId"], a_key["keyId"]
    for path in ("/", "/keystores", "/projects", "/approvals", "/audit", "/audit?changes=1", "/me",
                 "/keystores/new", f"/keystores/{ks}", f"/keystores/{ks}/auth", f"/keystores/{ks}/usage",
                 f"/keystores/{ks}/connect", f"/keystores/{ks}/settings", f"/keys/{kid}", f"/keys/{kid}/activity",
                 f"/keystores/{ks}/keys/new", "/keystores?project=%d" % b.id):
        r = await page.goto(console.url + path)
        assert r.status == 200, path
        html = await page.content()
        for name in B_NAMES:
            assert name not in html, (path, name)
    await page.goto(console.url + "/keystores")
    await expect(page.locator("#keystores tbody tr")).to_have_count(1)
    await expect(page.locator("#keystores")).to_contain_text("a-store")
    await page.goto(console.url + "/projects")
    await expect(page.locator("#projects tbody tr")).to_have_count(1)
    await expect(page.locator(f"#appkey-1")).to_have_text(skm.appkey)
    await expect(page.locator("#project-form")).to_have_count(0)       # creating projects: global admins
    await page.goto(console.url + f"/keys/{kid}/activity")
    await expect(page.locator("#audit tbody tr").first).to_be_visible()
    await page.goto(console.url + "/audit")
    names = await page.locator("#audit tbody tr").evaluate_all("rs => rs.map(r => r.textContent)")
    assert names and any("a-secret" in n for n in names)

    # B's pages answer as if they did not exist.
    for path in (f"/keystores/{b_store['keyStoreId']}", f"/keystores/{b_store['keyStoreId']}/settings",
                 f"/keystores/{b_store['keyStoreId']}/connect", f"/keystores/{b_store['keyStoreId']}/usage",
                 f"/keystores/{b_store['keyStoreId']}/auth", f"/keys/{b_key['keyId']}",
                 f"/keys/{b_key['keyId']}/activity", f"/approvals/{b_request}",
                 f"/keystores/{b_store['keyStoreId']}/keys/new"):
        r = await page.goto(console.url + path)
        assert r.status == 404, path
        html = await page.content()
        assert "b-store" not in html and "b-secret" not in html, path

    # Every write of B's objects (or of no object at all) is a 403 page, and nothing changes.
    await page.goto(console.url + "/keystores")
    before = await _state(skm)
    bks, bkid = b_store["keyStoreId"], b_key["keyId"]
    writes = [
        (f"/keystores/{bks}/settings", {"name": "taken-over", "ip4_auth": "on", "auth_mode": "AND",
                                        "mac_mode": "attested"}),
        (f"/keystores/{bks}/delete", {"confirm_name": "b-store"}),
        (f"/keystores/{bks}/keys/new", {"key_type": "SECRET", "name": "planted", "secret_value": "x"}),
        (f"/keystores/{bks}/auth/ipv4s/add", {"value": "10.0.0.0/8"}),
        (f"/keystores/{bks}/certificates/new", {"name": "c", "password": "bundle-password-1", "days": "10"}),
        (f"/keys/{bkid}/rotate", {"secret_value": "new"}),
        (f"/keys/{bkid}/reveal", {}),
        (f"/keys/{bkid}/schedule-deletion", {}),
        (f"/keys/{bkid}/delete", {}),
        (f"/keys/{bkid}/edit", {"description": "mine now"}),
        (f"/approvals/{b_request}/approve", {}),
        (f"/approvals/{b_request}/deny", {}),
        (f"/approvals/{b_request}/cancel", {}),
        ("/keystores/new", {"project_id": str(b.id), "name": "in-b", "ip4_auth": "on"}),
        ("/projects/new", {"name": "team-c"}),
        ("/operators/new", {"name": "mallory", "role": "admin", "password": PASSWORD, "password2": PASSWORD}),
        # Ids that do not exist: the same refusal, so a 403 tells nothing of other projects.
        ("/keystores/999999/settings", {"name": "x"}),
        (f"/keys/{'0' * 32}/rotate", {}),
        ("/approvals/999999/approve", {}),
    ]
    for url, form in writes:
        r = await _post(page, console.url + url, form)
        assert r.status == 403, (url, r.status)
        body = await r.text()
        assert "Forbidden" in body, url
        assert "b-value" not in body and "b-secret" not in body, url
    assert await _state(skm) == before
    st, out = await skm.mgmt("GET", f"/keystores/{bks}/keys")
    assert st == 200 and [k["name"] for k in out["body"]["keyList"]] == ["b-secret"], out

    # In A anna works as an admin: a new store (the form offers A only), a key in it, its settings.
    await page.goto(console.url + "/keystores/new")
    options = await page.locator("#ks-project option").evaluate_all("os => os.map(o => o.value)")
    assert options == ["1"]
    await page.fill("#ks-name", "anna-store")
    await page.click("#save")
    await page.wait_for_url(re.compile(r".*/console/keystores/\d+$"))
    new_id = int(page.url.rsplit("/", 1)[1])
    assert (await skm.rt.keys.keystore(new_id)).project_id == 1
    await page.goto(f"{console.url}/keystores/{new_id}/settings")
    await page.check("#approval_required")
    await page.click("#save")
    await expect(page.locator(".flash-ok")).to_contain_text("Settings saved")
    assert (await skm.rt.keys.keystore(new_id)).approval_required
    await page.goto(f"{console.url}/keys/{kid}")
    await page.click("#reveal")
    await expect(page.locator("#secret-value")).to_have_text("a-value")


async def test_a_project_approver_and_viewer_of_b(console, skm):
    b, a_store, a_key, b_store, b_key, b_request = await _two_projects(skm)
    # A pending request in A too: B's approver must not see it.
    await skm.rt.operators.create("ada", "approver", password=PASSWORD, project_id=1)
    a_request = await pending_request(skm, a_store, "a-waiting")
    await skm.rt.operators.create("vic", "viewer", password=PASSWORD, project_id=b.id)

    bea = await console.page("bea")
    await expect(bea.locator("#nav-pending")).to_have_text("1")
    await expect(bea.locator("#waiting")).to_contain_text(f"#{b_request}")
    await bea.goto(console.url + "/approvals")
    html = await bea.content()
    assert "a-waiting" not in html and "a-store" not in html and f"#{a_request}<" not in html
    r = await bea.goto(f"{console.url}/approvals/{a_request}")
    assert r.status == 404
    r = await _post(bea, f"{console.url}/approvals/{a_request}/approve")
    assert r.status == 403
    assert (await skm.rt.changes.approvals.get(a_request))["status"] == "PENDING"
    await bea.goto(f"{console.url}/approvals/{b_request}")
    await bea.click("#approve")
    await expect(bea.locator("#cr-status")).to_contain_text("APPLIED")
    # An approver changes no key store: settings are read-only, the post is refused.
    await bea.goto(f"{console.url}/keystores/{b_store['keyStoreId']}/settings")
    await expect(bea.locator("#save")).to_have_count(0)
    r = await _post(bea, f"{console.url}/keystores/{b_store['keyStoreId']}/settings", {"name": "x"})
    assert r.status == 403

    vic = await console.page("vic")
    await vic.goto(console.url + "/keystores")
    rows = await vic.locator("#keystores tbody tr").evaluate_all("rs => rs.map(r => r.dataset.store)")
    assert sorted(rows) == ["b-guarded", "b-store"]
    await expect(vic.locator("#new-keystore")).to_have_count(0)
    await vic.goto(f"{console.url}/keys/{b_key['keyId']}")
    await expect(vic.locator("#reveal")).to_have_count(0)
    r = await _post(vic, f"{console.url}/keys/{b_key['keyId']}/reveal")
    assert r.status == 403 and "b-value" not in await r.text()
    r = await vic.goto(f"{console.url}/keys/{a_key['keyId']}")
    assert r.status == 404
    # Self-service works for a project-scoped viewer too.
    await change_password(vic, console, PASSWORD, "vic's new password!")
    await expect(vic.locator(".flash-ok")).to_contain_text("Password changed")
    await skm.rt.operators.check_login("vic", "vic's new password!", "127.0.0.1")


async def test_operator_creation_in_the_console_waits_for_another_admin(console, skm):
    import dataclasses
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
