"""Headless Chromium (Debian's package) driven by Playwright, against the in-process `skm` harness.

No browser is downloaded: Playwright launches /usr/bin/chromium by path. The
harness's CA is private; Chromium reads trust from its own store, not from
NODE_EXTRA_CA_CERTS (that variable is set too, for Playwright's own TLS), so
the browser is told to accept exactly the harness server's public key
(`--ignore-certificate-errors-spki-list`): a pin, stricter than ignoring
certificate errors, and the connection stays real TLS (Secure cookies work).

Use the `console` fixture: a `ConsoleDriver` with `.page(name, password)`
(a logged-in page in its own browser context), `.shot(page, name)` (saved to
tests/artifacts/) and `.operator(name, role)` (creates one with a password).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = ["CHROMIUM", "ARTIFACTS", "ConsoleDriver", "console", "chromium_args", "watch", "pending_request", "change_password"]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
PASSWORD = "correct horse battery staple"
VIEWPORT = {"width": 1366, "height": 768}
_BASE_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--disable-quic", "--no-first-run"]


def chromium_args(server_cert: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(server_cert.read_bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    return [*_BASE_ARGS, f"--ignore-certificate-errors-spki-list={pin}"]


@dataclass
class ConsoleDriver:
    harness: object
    browser: object
    test_name: str
    contexts: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.harness.mgmt_url + "/console"

    async def operator(self, name: str, role: str, password: str = PASSWORD) -> None:
        await self.harness.rt.operators.create(name, role, password=password)

    async def page(self, name: str | None = None, password: str = PASSWORD):
        """A new browser context (its own cookies) with one page, logged in as `name` when given."""
        ctx = await self.browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        self.contexts.append(ctx)
        page = await ctx.new_page()
        # Confirmation dialogs (data-confirm) are accepted, as an operator who means it would.
        page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
        if name is not None:
            await self.login(page, name, password)
        return page

    async def login(self, page, name: str, password: str = PASSWORD) -> None:
        await page.goto(self.url + "/login")
        await page.fill("#name", name)
        await page.fill("#password", password)
        await page.click("#login")
        await page.wait_for_url(re.compile(r".*/console/$"))

    async def shot(self, page, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.test_name}-{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        return path

    async def close(self) -> None:
        for ctx in self.contexts:
            await ctx.close()
        self.contexts.clear()


@pytest.fixture
async def console(skm, request):
    """A logged-out driver; the bootstrap `admin` operator gets the password PASSWORD."""
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        pytest.skip(reason="apt-get install chromium")
    from playwright.async_api import async_playwright
    os.environ["NODE_EXTRA_CA_CERTS"] = str(skm.pki.ca_cert)
    await skm.rt.operators.update("admin", password=PASSWORD)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                           args=chromium_args(skm.pki.server_cert))
        driver = ConsoleDriver(skm, browser, re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name))
        try:
            yield driver
        finally:
            await driver.close()
            await browser.close()


def watch(page) -> list[str]:
    """Everything a page says it ran: dialogs, console messages (a CSP refusal of an inline script or
    handler is one), page errors; the browser's own chatter (verbose DOM hints, the favicon's 404) left out."""
    seen: list[str] = []
    page.on("console", lambda m: seen.append(f"console:{m.type}:{m.text}")
            if m.type not in ("verbose", "debug") and "Failed to load resource" not in m.text else None)
    page.on("dialog", lambda d: seen.append(f"dialog:{d.type}:{d.message}"))
    page.on("pageerror", lambda e: seen.append(f"error:{e}"))
    return seen


async def pending_request(skm, store: dict, name: str) -> int:
    """Turn approval on for `store` (one approval) and ask for a secret `name` in it: the change
    request's id (it waits for an approver)."""
    st, out = await skm.mgmt("PATCH", f"/keystores/{store['keyStoreId']}",
                             json={"approvalRequired": True, "approvalsNeeded": 1})
    assert st == 200, out
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                             json={"keyType": "SECRET", "name": name, "secretValue": "v"})
    assert st == 202, out
    return out["body"]["changeRequestId"]


async def change_password(page, console, current: str, new: str) -> None:
    """Fill and send the /me password form (the answer is the caller's to check)."""
    await page.goto(console.url + "/me")
    await page.fill("#current-password", current)
    await page.fill("#new-password", new)
    await page.fill("#new-password2", new)
    await page.click("#change-password")
