"""The connection panel: how a client reaches a key store or key (URL, appkey, curl and SDK snippets, the CA)."""
from __future__ import annotations

from aiohttp import web

from server.api.mgmt.dataplane import data_plane_base
from server.console.keystores import _pending, keystore_of
from server.console.web import SECURITY_HEADERS, ConsoleRoutes, Ctx, render
from server.errors import NotFound
from server.keys.model import KeyType

routes = ConsoleRoutes()
_KS = r"/keystores/{keystore_id:\d{1,12}}"


def data_url(c: Ctx) -> str:
    """The data plane as the management API and `skm project show` name it (one rule for all three)."""
    return data_plane_base(c.request)


async def connection(c: Ctx, ks, key=None) -> dict:
    project = next((p for p in await c.rt.keys.projects() if p.id == ks.project_id), None)
    appkey = project.appkey if project is not None else ""
    base = f"{data_url(c)}/keymanager/v1.0/appkey/{appkey}"
    checks = []
    if ks.cert_auth:
        checks.append("--cert client.pem --key client-key.pem")
    if ks.mac_auth and ks.mac_mode.value == "header":
        checks.append("-H 'X-TOAST-CLIENT-MAC-ADDR: aa:bb:cc:dd:ee:ff'")
    extra = (" " + " ".join(checks)) if checks else ""
    if key is None:
        curl = f"curl --cacert skm-ca.pem{extra} \\\n  '{base}/keystores/{ks.id}/keys'"
        sdk = ("from sidecar.client import SidecarClient\n\n"
               "c = SidecarClient(\"/run/skm/sidecar.sock\")\n"
               "# then c.get_secret(KEY_ID), c.encrypt(KEY_ID, text), c.sign(KEY_ID, text)...")
    else:
        kt = key.key_type
        if kt is KeyType.SECRET:
            curl = f"curl --cacert skm-ca.pem{extra} \\\n  '{base}/secrets/{key.id}'"
            call = f"value = c.get_secret(\"{key.id}\")"
        elif kt is KeyType.SYMMETRIC_KEY:
            curl = (f"curl --cacert skm-ca.pem{extra} -H 'Content-Type: application/json' \\\n"
                    f"  -d '{{\"plaintext\": \"hello\"}}' '{base}/symmetric-keys/{key.id}/encrypt'")
            call = f"ciphertext = c.encrypt(\"{key.id}\", \"hello\")"
        else:
            curl = (f"curl --cacert skm-ca.pem{extra} -H 'Content-Type: application/json' \\\n"
                    f"  -d '{{\"plaintext\": \"hello\"}}' '{base}/asymmetric-keys/{key.id}/sign'")
            call = f"signature = c.sign(\"{key.id}\", \"hello\")"
        sdk = ("from sidecar.client import SidecarClient\n\n"
               "c = SidecarClient(\"/run/skm/sidecar.sock\")   # the sidecar holds the credentials\n" + call)
    return {"url": data_url(c), "appkey": appkey, "base": base, "curl": curl, "sdk": sdk,
            "cert": ks.cert_auth, "ip4": ks.ip4_auth, "mac": ks.mac_auth}


@routes.get(_KS + "/connect")
async def keystore_connect(c: Ctx) -> web.Response:
    ks = await keystore_of(c)
    return render(c, "connect.html", ks=ks, tab="connect", pending=await _pending(c, ks.id),
                  conn=await connection(c, ks))


@routes.get("/ca.pem")
async def ca_pem(c: Ctx) -> web.Response:
    """The CA that signed the server's TLS certificate and the client certificates (public)."""
    from server.access.pki import DevPKI
    path = DevPKI(c.rt.config.pki_dir()).ca_cert
    if not path.exists():
        raise NotFound("this server has no CA certificate in its PKI directory")
    import asyncio
    body = await asyncio.to_thread(path.read_bytes)
    return web.Response(body=body, content_type="application/x-pem-file",
                        headers={**SECURITY_HEADERS, "Content-Disposition": 'attachment; filename="skm-ca.pem"'})
