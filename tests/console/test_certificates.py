"""Issue a client certificate in the console, download its PKCS#12 bundle, use it for an mTLS client call."""
from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, pkcs12
from playwright.async_api import expect

from server.access.pki import write_pem
from tests.console.test_keys import _create_key, _create_store


async def test_certificate_bundle_works_for_mtls(console, skm, tmp_path: Path):
    page = await console.page("admin")
    sid = await _create_store(page, console.url, "mtls-only", cert=True, ip4=False)
    await _create_key(page, console.url, sid, "SECRET", "db", secret="over-mtls")
    key_id = (await page.locator("#key-id").inner_text()).strip()

    await page.goto(f"{console.url}/keystores/{sid}/auth")
    # Validation: a mismatched repeat is refused with a message, nothing issued.
    await page.fill("#cert-name", "web-1")
    await page.fill("#cert-password", "bundle-pass-1")
    await page.fill("#cert-password2", "bundle-pass-2")
    await page.click("#issue-cert")
    await expect(page.locator(".alert-error")).to_contain_text("the two passwords differ")
    await page.fill("#cert-name", "web-1")
    await page.fill("#cert-password", "bundle-pass-1")
    await page.fill("#cert-password2", "bundle-pass-1")
    await page.click("#issue-cert")
    await expect(page.locator(".flash-ok")).to_contain_text("web-1")
    await expect(page.locator("tr[data-cert='web-1']")).to_contain_text("ACTIVE")
    # IPv4 and MAC entries from the same page.
    await page.fill("#add-ipv4s", "10.20.0.0/16")
    await page.click("#ipv4s button[type=submit]:has-text('Add')")
    await expect(page.locator("#ipv4s")).to_contain_text("10.20.0.0/16")
    await page.fill("#add-macs", "02-00-00-AA-BB-CC")
    await page.click("#macs button[type=submit]:has-text('Add')")
    await expect(page.locator("#macs")).to_contain_text("02:00:00:aa:bb:cc")
    await page.fill("#add-ipv4s", "10.0.0.1/8")
    await page.click("#ipv4s button[type=submit]:has-text('Add')")
    await expect(page.locator(".alert-error")).to_contain_text("IPv4 address or CIDR")
    await console.shot(page, "auth-data")

    async with page.expect_download() as info:
        await page.click("#download-web-1")
    download = await info.value
    assert download.suggested_filename == "web-1.p12"
    data = Path(await download.path()).read_bytes()
    key, cert, _ = pkcs12.load_key_and_certificates(data, b"bundle-pass-1")
    cert_path, key_path = tmp_path / "web-1.pem", tmp_path / "web-1-key.pem"
    write_pem(cert_path, cert.public_bytes(Encoding.PEM), private=False)
    write_pem(key_path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), private=True)

    # The client API over mTLS with the downloaded certificate: the store admits it.
    with_cert = skm.session(cert_path, key_path)
    status, out = await skm.client("GET", f"/secrets/{key_id}", session=with_cert)
    assert status == 200 and out["body"]["secret"] == "over-mtls", out
    # And without it the same call is refused: the certificate is what passed.
    status, out = await skm.client("GET", f"/secrets/{key_id}", session=skm.session())
    assert status == 403 and out["header"]["resultMessage"] == "Certificate Auth Failure"

    # The download is audited (an identifier, never the bundle).
    records = await skm.rt.audit.query(action="cert.download")
    assert len(records) == 1 and records[0]["detail"].get("certificate") == "web-1"
