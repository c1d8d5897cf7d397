"""Helpers shared by the access-control tests: certificates through the real download path,
user access keys and bearer tokens through the real endpoints."""
from __future__ import annotations

import base64
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.serialization import pkcs12

from server.access.pki import cert_pem, key_pem, write_pem

PASSWORD = "correct horse 1"


async def issue_cert(skm, store: dict, name: str, *, password: str = PASSWORD, life: int = 30) -> dict:
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/certificates",
                             json={"name": name, "password": password, "lifeTime": life})
    assert st == 201, out
    return out["body"]


async def download_p12(skm, store: dict, name: str) -> tuple[int, bytes]:
    url = f"{skm.mgmt_url}/api/v1/keystores/{store['keyStoreId']}/certificates/{name}/bundle"
    async with skm._default().get(url, headers={"Authorization": f"Bearer {skm.init.token}"}) as r:
        return r.status, await r.read()


def p12_to_pem(data: bytes, password: str, out_dir: Path, name: str) -> tuple[Path, Path]:
    key, cert, _chain = pkcs12.load_key_and_certificates(data, password.encode())
    cp, kp = out_dir / f"{name}.pem", out_dir / f"{name}-key.pem"
    write_pem(cp, cert_pem(cert), private=False)
    write_pem(kp, key_pem(key), private=True)
    return cp, kp


async def cert_files(skm, store: dict, name: str, *, password: str = PASSWORD, life: int = 30
                     ) -> tuple[Path, Path]:
    """Issue through the management API and unpack the downloaded PKCS#12 (the path a user takes)."""
    await issue_cert(skm, store, name, password=password, life=life)
    st, data = await download_p12(skm, store, name)
    assert st == 200
    return p12_to_pem(data, password, skm.tmp, f"ks{store['keyStoreId']}-{name}")


async def access_key(skm, **fields) -> tuple[str, str]:
    st, out = await skm.mgmt("POST", "/access-keys", json=fields)
    assert st == 201, out
    return out["body"]["accessKeyId"], out["body"]["secretAccessKey"]


def v12_headers(key_id: str, secret: str) -> dict:
    return {"X-TC-AUTHENTICATION-ID": key_id, "X-TC-AUTHENTICATION-SECRET": secret}


async def token_call(skm, path: str, key_id: str | None, secret: str | None, form: dict) -> tuple[int, dict]:
    headers = {}
    if key_id is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{key_id}:{secret}".encode()).decode()
    async with skm._default().post(f"{skm.data_url}{path}", data=form, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def bearer(skm, key_id: str, secret: str, expires_in: int | None = None) -> str:
    form = {"grant_type": "client_credentials"}
    if expires_in is not None:
        form["expires_in"] = str(expires_in)
    st, out = await token_call(skm, "/oauth2/token/create", key_id, secret, form)
    assert st == 200, out
    return out["access_token"]


async def refused(session: aiohttp.ClientSession, url: str) -> bool:
    """True when the TLS handshake (or the connection right after it) is refused."""
    try:
        async with session.get(url) as r:
            await r.read()
            return False
    except aiohttp.ClientConnectionError:
        return True
