"""The console as an operator's home: dashboard, usage plots, connection panel, audit export and activity,
lists, key store deletion, self-service, narrow windows, and hostile names rendered as text everywhere.

`SKM_SCREENSHOTS=docs/console` (make screenshots) also writes the pages' full-page screenshots there.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

from playwright.async_api import expect

from tests.support.browser import PASSWORD, change_password, pending_request, watch

XSS_NAME = '<script>alert(1)</script>'
XSS_DESC = '"><img src=x onerror=alert(2)>'
SHOTS = os.environ.get("SKM_SCREENSHOTS")


async def _shot(console, page, name: str, doc: bool = True) -> None:
    await console.shot(page, name)
    if SHOTS and doc:
        out = Path(SHOTS)
        out.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(out / f"{name}.png"), full_page=True)


async def _setup(skm):
    """Two stores (one with hostile names), keys, reads and denials counted, a due rotation and an expiring cert."""
    good = await skm.keystore("payments", description="card processing")
    evil = await skm.keystore(XSS_NAME, description=XSS_DESC, register_loopback=False)
    sec = await skm.key(good, "SECRET", "db-password", secretValue="s3cret")
    sym = await skm.key(good, "SYMMETRIC_KEY", "data-key", autoRotationPeriod=30)
    bad = await skm.key(evil, "SECRET", XSS_NAME, description=XSS_DESC, secretValue="x")
    for _ in range(4):
        st, _o = await skm.client("GET", f"/secrets/{sec['keyId']}")
        assert st == 200
    for _ in range(3):
        st, _o = await skm.client("GET", f"/secrets/{bad['keyId']}")
        assert st == 403
    await skm.rt.extra["usage"].flush()
    # Due for rotation: move the next rotation into the window.
    from server import timeutil
    import datetime as dt
    await skm.rt.storage.execute("UPDATE keys SET next_rotation_at = ? WHERE id = ?",
                                 timeutil.to_db(timeutil.now() + dt.timedelta(days=2)), sym["keyId"])
    st, out = await skm.mgmt("POST", f"/keystores/{good['keyStoreId']}/certificates",
                             json={"name": "web-1", "password": "bundle-password-1", "lifeTime": 10})
    assert st == 201, out
    return good, evil, sec, sym, bad


async def test_dashboard_usage_connection_audit_and_escaping(console, skm):
    good, evil, sec, sym, bad = await _setup(skm)
    # A real scheduled backup (the schedule's own step), so the dashboard shows its time and size.
    from server.backup.schedule import STATE, ScheduleState, take_one
    from server.settings import BackupSettings
    state = skm.rt.extra[STATE] = ScheduleState(BackupSettings(dir=str(skm.tmp / "backups")))
    summary = await take_one(skm.rt, state)
    page = await console.page()
    seen = watch(page)
    await console.login(page, "admin")

    # Dashboard: the counts an operator acts on.
    await expect(page.locator("h1")).to_have_text("Dashboard")
    await expect(page.locator("#tile-rotations .tile-n")).to_have_text("1")
    await expect(page.locator("#rotations")).to_contain_text("data-key")
    await expect(page.locator("#tile-certs .tile-n")).to_have_text("1")
    await expect(page.locator("#certs")).to_contain_text("web-1")
    await expect(page.locator("#tile-denials .tile-n")).to_have_text("3")
    await expect(page.locator("#denials")).to_contain_text(XSS_NAME)          # shown as text
    await expect(page.locator("#tile-barrier")).to_contain_text("Unsealed")
    import datetime as dt
    taken = dt.datetime.fromtimestamp(state.last_success, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    await expect(page.locator("#tile-backup")).to_contain_text(taken)
    await expect(page.locator("#tile-backup")).to_contain_text(f"{round(summary.bytes / 1048576, 1)} MiB")
    await _shot(console, page, "dashboard")

    # Usage of a store: the SVG has bars and the totals.
    await page.goto(f"{console.url}/keystores/{good['keyStoreId']}/usage?range=hour")
    await expect(page.locator("#usage-ok")).to_have_text("4")
    assert await page.locator("svg.chart rect.bar-ok").count() >= 1
    await _shot(console, page, "usage")
    await page.goto(f"{console.url}/keystores/{evil['keyStoreId']}/usage?range=month")
    await expect(page.locator("#usage-denied")).to_have_text("3")
    await expect(page.locator("svg.chart rect.bar-denied")).to_have_count(1)

    # Key page: connection panel with the URL, appkey and a curl for this key; usage per key.
    await page.goto(f"{console.url}/keys/{sec['keyId']}?range=day")
    await expect(page.locator("#conn-appkey")).to_have_text(skm.appkey)
    await expect(page.locator("#conn-url")).to_have_text(skm.data_url)
    await expect(page.locator("#conn-curl")).to_contain_text(f"/secrets/{sec['keyId']}")
    await expect(page.locator("#conn-sdk")).to_contain_text(f'get_secret("{sec["keyId"]}")')
    await expect(page.locator("#usage-ok")).to_have_text("4")
    await _shot(console, page, "key")
    # CA download is the server's CA.
    async with page.expect_download() as dl:
        await page.click("#ca-download")
    ca = Path(await (await dl.value).path()).read_bytes()
    assert ca == skm.pki.ca_cert.read_bytes()
    # The store's Connect tab and its settings page (with the deletion form).
    await page.goto(f"{console.url}/keystores/{good['keyStoreId']}/connect")
    await expect(page.locator("#conn-appkey")).to_have_text(skm.appkey)
    await expect(page.locator("#conn-curl")).to_contain_text(f"/keystores/{good['keyStoreId']}/keys")
    await _shot(console, page, "connect")
    await page.goto(f"{console.url}/keystores/{good['keyStoreId']}/settings")
    await expect(page.locator("#ks-name")).to_have_value("payments")
    await expect(page.locator("#delete-keystore")).to_be_visible()
    await _shot(console, page, "keystore-settings")

    # Certificate PEMs: the certificate, and the key encrypted with the bundle password.
    await page.goto(f"{console.url}/keystores/{good['keyStoreId']}/auth")
    async with page.expect_download() as dl:
        await page.click("#pem-cert-web-1")
    cert_pem = Path(await (await dl.value).path()).read_bytes()
    assert cert_pem.startswith(b"-----BEGIN CERTIFICATE-----") and b"PRIVATE" not in cert_pem
    async with page.expect_download() as dl:
        await page.click("#pem-key-web-1")
    key_pem = Path(await (await dl.value).path()).read_bytes()
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    load_pem_private_key(key_pem, b"bundle-password-1")

    # Audit: semantic actions with names, changes only, the # column on one line, export of the view.
    await page.goto(console.url + "/audit?changes=1")
    actions = await page.locator("#audit tbody tr").evaluate_all("rs => rs.map(r => r.dataset.action)")
    assert actions and "key.create" in actions and "secret.read" not in actions
    # The sequence number stays on one line (it used to wrap one digit per line).
    lines = await page.locator("#audit tbody tr td.num").first.evaluate(
        "e => { const r = document.createRange(); r.selectNodeContents(e); return r.getClientRects().length; }")
    assert lines == 1
    await _shot(console, page, "audit")
    async with page.expect_download() as dl:
        await page.click("#export-csv")
    rows = list(csv.DictReader(io.StringIO(Path(await (await dl.value).path()).read_text())))
    assert rows and all(r["change"] == "true" for r in rows)
    assert any(r["action"] == "key.create" and r["keyName"] == "db-password" for r in rows)
    await page.goto(console.url + f"/audit?result=denied&keyStoreId={evil['keyStoreId']}")
    async with page.expect_download() as dl:
        await page.click("#export-jsonl")
    lines = Path(await (await dl.value).path()).read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert len(recs) == 3 and {r["action"] for r in recs} == {"secret.read"}
    assert recs[0]["detail"]["keyStoreName"] == XSS_NAME

    # Per-key activity tab.
    await page.goto(f"{console.url}/keys/{sec['keyId']}")
    await page.click("#tab-activity")
    acts = await page.locator("#audit tbody tr").evaluate_all("rs => rs.map(r => r.dataset.action)")
    assert acts.count("secret.read") == 4 and "key.create" in acts
    await _shot(console, page, "key-activity")
    await page.click("#activity-changes")
    acts = await page.locator("#audit tbody tr").evaluate_all("rs => rs.map(r => r.dataset.action)")
    assert acts == ["key.create"]

    # Hostile names: text on every page, nothing executed.
    for path in ("/", "/keystores", f"/keystores/{evil['keyStoreId']}", f"/keys/{bad['keyId']}",
                 f"/keys/{bad['keyId']}/activity", "/audit", f"/keystores/{evil['keyStoreId']}/usage",
                 f"/keystores/{evil['keyStoreId']}/connect", f"/keystores/{evil['keyStoreId']}/settings"):
        await page.goto(console.url + path)
        assert await page.locator("img[src=x]").count() == 0, path
        assert await page.locator("script:not([src])").count() == 0, path
        html = await page.content()
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, path
    await page.goto(f"{console.url}/keys/{bad['keyId']}")
    await expect(page.locator("h1")).to_contain_text(XSS_NAME)
    await _shot(console, page, "xss-key", doc=False)

    # Projects: a second team's project beside the first, each with its appkey and data-plane URL.
    team = await skm.rt.keys.create_project("team-analytics", description="reporting jobs")
    await skm.keystore("reports", projectId=team.id, register_loopback=False)
    await page.goto(console.url + "/projects")
    await expect(page.locator(f"#appkey-{team.id}")).to_have_text(team.appkey)
    await _shot(console, page, "projects")
    assert seen == [], seen


async def test_lists_deletion_self_service_and_narrow(console, skm):
    for i in range(30):
        await skm.keystore(f"store-{i:02d}", register_loopback=False)
    target = await skm.keystore("to-delete", register_loopback=False)
    full = await skm.keystore("has-keys", register_loopback=False)
    await skm.key(full, "SECRET", "k", secretValue="v")
    page = await console.page("admin")

    # Search, sort, paging.
    await page.goto(console.url + "/keystores")
    await expect(page.locator("#page-of")).to_have_text("Page 1 of 2")
    await page.click("#page-next")
    await expect(page.locator("#page-of")).to_have_text("Page 2 of 2")
    await page.goto(console.url + "/keystores")
    await page.fill("#search", "store-1")
    await page.click("#search-go")
    await expect(page.locator("#keystores tbody tr")).to_have_count(10)
    await page.click("th a[data-sort=name]")     # already by name: now descending
    await expect(page.locator("#keystores tbody tr").first).to_contain_text("store-19")
    await _shot(console, page, "keystores")

    # Deletion: a store holding a key is refused (409), an empty one goes.
    await page.goto(f"{console.url}/keystores/{full['keyStoreId']}/settings")
    await page.fill("#confirm-name", "has-keys")
    await page.click("#delete-keystore")
    await expect(page.locator(".errorpage")).to_contain_text("still holds 1 key")
    await page.goto(f"{console.url}/keystores/{target['keyStoreId']}/settings")
    await page.fill("#confirm-name", "to-delete")
    await page.click("#delete-keystore")
    await expect(page.locator(".flash-ok")).to_contain_text("deleted")
    st, _o = await skm.mgmt("GET", f"/keystores/{target['keyStoreId']}")
    assert st == 404
    recs = await skm.rt.audit.query(action="keystore.delete")
    assert recs and recs[-1]["change"] is True and recs[-1]["result"] == "ok"

    # Self-service for a viewer: change the password, revoke a token of theirs.
    await console.operator("vera", "viewer")
    vera = await skm.rt.operators.by_name("vera")
    cli_token = await skm.rt.operators.issue_token(vera, "vera's laptop")
    vpage = await console.page("vera")
    await change_password(vpage, console, "wrong password here", "a brand new password")
    await expect(vpage.locator(".alert-error")).to_be_visible()
    await change_password(vpage, console, PASSWORD, "a brand new password")
    await expect(vpage.locator(".flash-ok")).to_contain_text("Password changed")
    await skm.rt.operators.check_login("vera", "a brand new password", "127.0.0.1")
    tid = cli_token.split("_")[1]
    await _shot(console, vpage, "me")
    await vpage.locator(f"tr[data-token='{tid}'] button").click()
    await expect(vpage.locator(".flash-ok")).to_contain_text("revoked")
    st, _o = await skm.mgmt("GET", "/whoami", token=cli_token)
    assert st == 401
    # Another operator's token is not vera's to revoke (a 404 page, nothing changes).
    admin_token = await skm.rt.operators.issue_token(await skm.rt.operators.by_name("admin"), "admin's")
    admin_tid = admin_token.split("_")[1]
    csrf = await vpage.locator("input[name=_csrf]").first.get_attribute("value")
    resp = await vpage.request.post(f"{console.url}/me/tokens/{admin_tid}/revoke", form={"_csrf": csrf})
    assert resp.status == 404
    st, _o = await skm.mgmt("GET", "/whoami", token=admin_token)
    assert st == 200
    # Her access keys: listed and deleted here.
    ak, _secret = await skm.rt.callers.create_key(vera, actor="vera", description="ci job")
    await vpage.goto(console.url + "/me")
    await expect(vpage.locator(f"tr[data-access-key='{ak.id}']")).to_contain_text("ci job")
    await vpage.locator(f"tr[data-access-key='{ak.id}'] button").click()
    await expect(vpage.locator(".flash-ok")).to_contain_text("Access key deleted")
    assert await skm.rt.callers.keys(vera.id) == []
    recs = await skm.rt.audit.query(action="accesskey.delete")
    assert recs and recs[-1]["actor"] == "vera" and recs[-1]["change"] is True

    # Keys of a store: search, sort, pages.
    for i in range(27):
        await skm.key(full, "SECRET", f"app-{i:02d}", secretValue="v")
    await page.goto(f"{console.url}/keystores/{full['keyStoreId']}")
    await expect(page.locator("#page-of")).to_have_text("Page 1 of 2")
    await page.fill("#search", "app-2")
    await page.click("#search-go")
    await expect(page.locator("#keys tbody tr")).to_have_count(7)
    await page.click("th a[data-sort=name]")
    await expect(page.locator("#keys tbody tr").first).to_have_attribute("data-key", "app-26")
    await page.goto(f"{console.url}/keystores/{full['keyStoreId']}?q=50%25_off")   # LIKE wildcards are literal
    await expect(page.locator(".empty")).to_contain_text("50%_off")

    # Narrow window: the nav is behind a button, tables scroll inside their box, the page does not.
    await page.set_viewport_size({"width": 420, "height": 800})
    await page.goto(console.url + "/keystores")
    await expect(page.locator("#mainnav")).to_be_hidden()
    await page.click("#nav-toggle")
    await expect(page.locator("#mainnav")).to_be_visible()
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 430, width
    scroller = await page.locator(".scroll").first.evaluate("e => e.scrollWidth > e.clientWidth")
    assert scroller
    await _shot(console, page, "narrow")
    key_id = (await skm.rt.keys.keys(full["keyStoreId"], page_size=1))[0].id
    for path in ("/", f"/keys/{key_id}", f"/keys/{key_id}/activity", "/audit", "/me",
                 f"/keystores/{full['keyStoreId']}/usage", f"/keystores/{full['keyStoreId']}/connect",
                 f"/keystores/{full['keyStoreId']}/auth", f"/keystores/{full['keyStoreId']}/settings"):
        await page.goto(console.url + path)
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 430, (path, width)


async def test_approver_sees_what_waits_for_them(console, skm):
    await console.operator("alice", "approver")
    store = await skm.keystore("guarded")
    rid = await pending_request(skm, store, "waiting")
    page = await console.page("alice")
    await expect(page.locator("#nav-pending")).to_have_text("1")
    await expect(page.locator("#tile-approvals .tile-n")).to_have_text("1")
    await expect(page.locator("#waiting")).to_contain_text(f"#{rid}")
    # The requester (an admin) has nothing to decide: no badge.
    admin = await console.page("admin")
    await expect(admin.locator("#tile-approvals .tile-n")).to_have_text("0")
    assert await admin.locator("#nav-pending").count() == 0
    # Once decided it is gone from the approver's nav.
    await page.goto(f"{console.url}/approvals/{rid}")
    await page.click("#approve")
    await expect(page.locator(".flash-ok")).to_be_visible()
    assert await page.locator("#nav-pending").count() == 0
