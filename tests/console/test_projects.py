"""The Projects page (appkeys, data-plane URLs, creation by global admins) and the copy buttons, read back
from the browser's clipboard."""
from __future__ import annotations

from urllib.parse import urlsplit

from playwright.async_api import expect

from tests.support.browser import PASSWORD


async def _clipboard_page(console, name: str):
    """A logged-in page whose origin may read and write the clipboard (headless Chromium asks otherwise)."""
    page = await console.page()
    u = urlsplit(console.url)
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=f"{u.scheme}://{u.netloc}")
    await console.login(page, name)
    return page


async def _copied(page, button: str) -> str:
    await page.evaluate("navigator.clipboard.writeText('')")
    await page.click(button)
    await expect(page.locator(button)).to_have_text("Copied")       # the button says the copy happened
    return await page.evaluate("navigator.clipboard.readText()")


async def test_projects_page_lists_creates_and_copies(console, skm):
    store = await skm.keystore("payments")
    page = await _clipboard_page(console, "admin")
    await page.click("#nav-projects")
    await expect(page.locator("h1")).to_have_text("Projects")
    await expect(page.locator("#projects tbody tr")).to_have_count(1)
    await expect(page.locator("#appkey-1")).to_have_text(skm.appkey)
    url = f"{skm.data_url}/keymanager/v1.0/appkey/{skm.appkey}"
    await expect(page.locator("#url-1")).to_have_text(url)
    assert await _copied(page, "#copy-appkey-1") == skm.appkey
    assert await _copied(page, "#copy-url-1") == url

    # A bad name is refused with the API's rule, and nothing is created.
    await page.fill("#project-name", "team/c")
    await page.click("#create-project")
    await expect(page.locator(".alert-error")).to_contain_text("name")
    await expect(page.locator("#project-name")).to_have_value("team/c")
    assert len(await skm.rt.keys.projects()) == 1

    # Created through the same domain function as the API: its appkey works at once.
    await page.fill("#project-name", "team-c")
    await page.fill("#project-description", "the payments team")
    await page.click("#create-project")
    await expect(page.locator(".flash-ok")).to_contain_text("Project 'team-c' created")
    st, out = await skm.mgmt("GET", "/projects")
    assert st == 200, out
    made = next(p for p in out["body"]["projects"] if p["name"] == "team-c")
    assert made["description"] == "the payments team"
    row = page.locator(f"tr[data-project-id='{made['id']}']")
    await expect(row.locator(f"#appkey-{made['id']}")).to_have_text(made["appkey"])
    assert await _copied(page, f"#copy-appkey-{made['id']}") == made["appkey"]
    recs = await skm.rt.audit.query(action="project.create")
    assert [r["result"] for r in recs] == ["refused", "ok"]
    assert recs[-1]["actor"] == "admin" and recs[-1]["detail"]["projectName"] == "team-c"
    # The name is taken now: a 409 on the form, still one team-c.
    await page.fill("#project-name", "team-c")
    await page.click("#create-project")
    await expect(page.locator(".alert-error")).to_contain_text("already exists")
    assert [p.name for p in await skm.rt.keys.projects()].count("team-c") == 1

    # A key store goes to the project chosen on the form; the project's row counts and links it.
    await page.goto(console.url + "/keystores/new")
    await page.select_option("#ks-project", str(made["id"]))
    await page.fill("#ks-name", "c-store")
    await page.click("#save")
    await expect(page.locator(".flash-ok")).to_contain_text("c-store")
    c_store = next(s for s in await skm.rt.keys.keystores() if s.name == "c-store")
    assert c_store.project_id == made["id"]
    await page.goto(console.url + "/projects")
    await page.click(f"tr[data-project-id='{made['id']}'] a[href*='project=']")
    rows = await page.locator("#keystores tbody tr").evaluate_all("rs => rs.map(r => r.dataset.store)")
    assert rows == ["c-store"]
    await page.goto(console.url + "/keystores")
    await expect(page.locator(f"#keystores tr[data-store='c-store'] td[data-project]")).to_have_text("team-c")
    await expect(page.locator(f"#keystores tr[data-store='payments'] td[data-project]")).to_contain_text(
        (await skm.rt.keys.project(1)).name)
    assert store["keyStoreId"] != c_store.id


async def test_only_global_admins_create_projects(console, skm):
    b = await skm.rt.keys.create_project("team-b")
    await console.operator("gwen", "viewer")
    await skm.rt.operators.create("pat", "admin", password=PASSWORD, project_id=b.id)
    for name in ("gwen", "pat"):
        page = await console.page(name)
        await page.goto(console.url + "/projects")
        await expect(page.locator("#project-form")).to_have_count(0)
        csrf = await page.locator("input[name=_csrf]").first.get_attribute("value")
        r = await page.request.post(console.url + "/projects/new", form={"_csrf": csrf, "name": "sneaky"},
                                    max_redirects=0)
        assert r.status == 403, name
    assert "sneaky" not in [p.name for p in await skm.rt.keys.projects()]
    # A project admin sees its own project only, with its appkey.
    page = await console.page("pat")
    await page.goto(console.url + "/projects")
    await expect(page.locator("#projects tbody tr")).to_have_count(1)
    await expect(page.locator(f"#appkey-{b.id}")).to_have_text(b.appkey)
    await expect(page.locator("#projects")).to_contain_text("admin")


async def test_connection_panel_copy_buttons_copy_the_exact_appkey_and_url(console, skm):
    store = await skm.keystore("payments")
    key = await skm.key(store, "SECRET", "db-password", secretValue="s3cret")
    page = await _clipboard_page(console, "admin")
    await page.goto(f"{console.url}/keys/{key['keyId']}")
    assert await _copied(page, "button[data-copy='#conn-appkey']") == skm.appkey
    assert await _copied(page, "button[data-copy='#conn-url']") == skm.data_url
    curl = await _copied(page, "button[data-copy='#conn-curl']")
    assert curl.endswith(f"'{skm.data_url}/keymanager/v1.0/appkey/{skm.appkey}/secrets/{key['keyId']}'"), curl
    await page.goto(f"{console.url}/keystores/{store['keyStoreId']}/connect")
    assert await _copied(page, "button[data-copy='#conn-appkey']") == skm.appkey
    assert await _copied(page, "button[data-copy='#conn-url']") == skm.data_url
