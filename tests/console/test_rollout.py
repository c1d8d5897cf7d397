"""The key page shows the key's roll-out: the summary, each host's version, and stale hosts."""
from __future__ import annotations

import time

from playwright.async_api import expect

from tests.support.sidecar import issue_host_cert, register_certificate


async def test_key_page_shows_the_rollout(console, skm):
    store = await skm.keystore("apps", certificateAuthUse="Y")
    kid = (await skm.key(store, "SECRET", "db", secretValue="x"))["keyId"]
    page = await console.page("admin")
    await page.goto(f"{console.url}/keys/{kid}")
    await expect(page.locator("#rollout-summary")).to_have_text("version 0 on 0 of 0 hosts")

    hosts = {}
    for name in ("web-1", "web-2"):           # registered first: the data plane caches a store's auth data
        hosts[name] = issue_host_cert(skm.pki.load_ca(), skm.tmp, name)
        await register_certificate(skm.rt.storage, skm.rt.barrier, store["keyStoreId"], hosts[name], name)
    for name, ttl in (("web-1", 600), ("web-2", 2)):
        host = hosts[name]
        st, out = await skm.client("POST", "/sidecar/acks", session=skm.session(host.cert, host.key), json={
            "ttl": ttl, "holdings": [{"keyId": kid, "version": 0, "deliveredAt": time.time(), "reloadOk": True}]})
        assert st == 200, out
    end = time.monotonic() + 10
    while True:                                    # web-2 promised a report within 2 s and sends none
        st, out = await skm.mgmt("GET", f"/keys/{kid}/rollout")
        if out["body"]["staleHosts"] == 1:
            break
        assert time.monotonic() < end
        await page.wait_for_timeout(100)
    await page.goto(f"{console.url}/keys/{kid}")
    await expect(page.locator("#rollout-summary")).to_have_text("version 0 on 1 of 2 hosts (1 stale)")
    rows = page.locator("#rollout tbody tr")
    await expect(rows).to_have_count(2)
    await expect(rows.nth(0)).to_contain_text("web-1")
    await expect(rows.nth(1)).to_contain_text("web-2")
    await expect(rows.nth(1)).to_contain_text("stale")
    await expect(rows.nth(0)).not_to_contain_text("stale")
    await console.shot(page, "key-rollout")
