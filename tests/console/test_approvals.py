"""Approval stores in the console: forms become change requests; A cannot approve, B can; deny leaves nothing."""
from __future__ import annotations

import re

from playwright.async_api import expect

from tests.console.test_keys import _create_key, _create_store


async def _csrf(page) -> str:
    return await page.locator("input[name=_csrf]").first.get_attribute("value")


async def _post_form(page, action: str, fields: dict) -> None:
    """Submit a form the page does not offer, as a browser would (for refusals)."""
    await page.evaluate("""([action, fields]) => {
        const f = document.createElement('form'); f.method = 'post'; f.action = action;
        for (const [k, v] of Object.entries(fields)) {
            const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i);
        }
        document.body.appendChild(f); f.submit();
    }""", [action, fields])


async def test_approval_flow(console, skm):
    alice = await console.page("admin")
    # B is created from the operators page (admins only); the password rule comes from the service.
    await alice.goto(console.url + "/operators")
    await alice.fill("#op-name", "bob")
    await alice.select_option("#op-role", "approver")
    await alice.fill("#op-password", "short")
    await alice.fill("#op-password2", "short")
    await alice.evaluate("document.getElementById('operator-form').noValidate = true")
    await alice.click("#create-operator")
    await expect(alice.locator(".alert-error")).to_contain_text("10 to 1024 characters")
    await alice.fill("#op-password", "correct horse battery staple")
    await alice.fill("#op-password2", "correct horse battery staple")
    await alice.click("#create-operator")
    await expect(alice.locator(".flash-ok")).to_contain_text("bob")
    await expect(alice.locator("tr[data-operator='bob']")).to_contain_text("approver")
    await console.shot(alice, "operators")
    # A (who requests) is another admin: bob, made by the bootstrap admin, may decide A's requests but never
    # the bootstrap admin's own (tests/access/test_sod.py).
    await console.operator("carol", "admin")
    alice = await console.page("carol")
    sid = await _create_store(alice, console.url, "approved-store", approval=True)

    # A requests a key: a change request, no key.
    await _create_key(alice, console.url, sid, "SYMMETRIC_KEY", "requested-key")
    await alice.wait_for_url(re.compile(r".*/console/approvals/\d+$"))
    await expect(alice.locator(".flash-info")).to_contain_text("requires approval")
    rid = int(alice.url.rsplit("/", 1)[1])
    await expect(alice.locator("#cr-status")).to_contain_text("PENDING")
    await expect(alice.locator("#diff")).to_contain_text("requested-key")
    assert await skm.rt.keys.keys(sid) == []
    # A sees no approve button, and a post anyway is refused.
    await expect(alice.locator("#approve")).to_have_count(0)
    await expect(alice.locator("#own-request")).to_be_visible()
    await console.shot(alice, "change-request-requester")
    response = None

    async def capture(r):
        nonlocal response
        if r.url.endswith(f"/approvals/{rid}/approve"):
            response = r
    alice.on("response", capture)
    await _post_form(alice, f"/console/approvals/{rid}/approve", {"_csrf": await _csrf(alice)})
    await alice.wait_for_load_state()
    await expect(alice.locator(".errorpage h1")).to_have_text("Forbidden")
    assert response is not None and response.status == 403
    assert (await skm.rt.changes.approvals.get(rid))["status"] == "PENDING"

    # B, an approver, finds it waiting, sees the diff and approves: the key exists.
    bob = await console.page("bob")
    await bob.goto(console.url + "/approvals")
    await expect(bob.locator(f"#waiting tr[data-request='{rid}']")).to_be_visible()
    await console.shot(bob, "approvals")
    await bob.click(f"#waiting tr[data-request='{rid}'] a")
    await expect(bob.locator("#diff")).to_contain_text("SYMMETRIC_KEY")
    await console.shot(bob, "change-request-approver")
    await bob.click("#approve")
    await expect(bob.locator("#cr-status")).to_contain_text("APPLIED")
    keys = await skm.rt.keys.keys(sid)
    assert [k.name for k in keys] == ["requested-key"]
    await bob.click("#cr-result-key")
    await expect(bob.locator("h1")).to_contain_text("requested-key")
    await alice.goto(f"{console.url}/keystores/{sid}")
    await expect(alice.locator("#keys tbody tr")).to_have_count(1)

    # A denied request leaves nothing.
    await _create_key(alice, console.url, sid, "SECRET", "denied-secret", secret="never-stored")
    await alice.wait_for_url(re.compile(r".*/console/approvals/\d+$"))
    rid2 = int(alice.url.rsplit("/", 1)[1])
    # The secret value is masked in the diff.
    await expect(alice.locator("#diff")).not_to_contain_text("never-stored")
    await bob.goto(f"{console.url}/approvals/{rid2}")
    await bob.fill("form[action$='/deny'] input[name=comment]", "not needed")
    await bob.click("#deny")
    await expect(bob.locator("#cr-status")).to_contain_text("DENIED")
    assert [k.name for k in await skm.rt.keys.keys(sid)] == ["requested-key"]

    # My requests: A cancels a pending one.
    await _create_key(alice, console.url, sid, "SYMMETRIC_KEY", "cancelled-key")
    await alice.wait_for_url(re.compile(r".*/console/approvals/\d+$"))
    await alice.click("#cancel-request")
    await expect(alice.locator("#cr-status")).to_contain_text("CANCELLED")
    await alice.goto(console.url + "/approvals")
    await expect(alice.locator("#mine tbody tr")).to_have_count(3)
    await console.shot(alice, "my-requests")
    assert [k.name for k in await skm.rt.keys.keys(sid)] == ["requested-key"]
