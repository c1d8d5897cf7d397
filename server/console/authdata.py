"""Auth data of a key store: IPv4/CIDR and MAC entries, client certificates with PKCS#12 download."""
from __future__ import annotations

from aiohttp import web

from server.access import certificates as certs
from server.console.keystores import _pending, keystore_of
from server.console.web import PREFIX, SECURITY_HEADERS, ConsoleRoutes, Ctx, form_int, form_str, render, see_other
from server.errors import ApprovalRequired, InvalidRequest, SKMError, Unavailable
from server.runtime import ERROR

routes = ConsoleRoutes()
_KS = r"/keystores/{keystore_id:\d{1,12}}"
_KIND = r"/{kind:ipv4s|macs}"
KIND_LABEL = {"ipv4s": "IPv4 address or CIDR block", "macs": "MAC address"}


def _certs(c: Ctx):
    if c.rt.certificates is None:
        raise Unavailable("client certificates are not available on this server")
    return c.rt.certificates


async def _page(c: Ctx, ks, *, status: int = 200, error: SKMError | None = None, form: str = "",
                values: dict | None = None) -> web.Response:
    entries = {k: await c.rt.authdata.list(ks, k) for k in ("ipv4s", "macs")}
    cert_list = await c.rt.certificates.list(ks) if c.rt.certificates is not None else []
    return render(c, "authdata.html", status=status, ks=ks, entries=entries, certs=cert_list, tab="auth",
                  error=error, error_form=form, values=values or {}, pending=await _pending(c, ks.id),
                  min_password=certs.MIN_PASSWORD)


@routes.get(_KS + "/auth")
async def show(c: Ctx) -> web.Response:
    return await _page(c, await keystore_of(c))


async def _submit(c: Ctx, ks, op_name: str, params: dict, done: str, form: str) -> web.Response:
    try:
        await c.rt.changes.submit(c.op, ks, op_name, {"keystore_id": ks.id, **params})
    except ApprovalRequired:
        raise
    except SKMError as e:
        c.request[ERROR] = e
        return await _page(c, ks, status=e.status, error=e, form=form,
                           values={k: v for k, v in params.items() if k != "password"})
    c.flash("ok", done)
    return see_other(f"{PREFIX}/keystores/{ks.id}/auth")


@routes.post(_KS + "/auth" + _KIND + "/add", roles=("admin",), per_project=True)
async def add_entry(c: Ctx) -> web.Response:
    ks, kind = await keystore_of(c), c.match("kind")
    value = form_str(c, "value", limit=64).strip()
    return await _submit(c, ks, "auth.add", {"kind": kind, "value": value,
                                             "description": form_str(c, "description", limit=1000)},
                         f"{KIND_LABEL[kind]} {value} registered.", kind)


_ENTRY_OPS = {"schedule-deletion": ("auth.schedule_deletion", "scheduled for deletion"),
              "cancel-deletion": ("auth.cancel_deletion", "back in service"),
              "delete": ("auth.delete", "deleted")}


@routes.post(_KS + "/auth" + _KIND + r"/{action:schedule-deletion|cancel-deletion|delete}", roles=("admin",),
             per_project=True)
async def entry_action(c: Ctx) -> web.Response:
    ks, kind = await keystore_of(c), c.match("kind")
    op_name, what = _ENTRY_OPS[c.match("action")]
    value = form_str(c, "value", limit=64)
    return await _submit(c, ks, op_name, {"kind": kind, "value": value}, f"{value}: {what}.", kind)


@routes.post(_KS + "/certificates/new", roles=("admin",), per_project=True)
async def create_certificate(c: Ctx) -> web.Response:
    ks = await keystore_of(c)
    name = form_str(c, "name", limit=200).strip()
    try:
        password = form_str(c, "password", limit=certs.MAX_PASSWORD + 1)
        if password != form_str(c, "password2", limit=certs.MAX_PASSWORD + 1):
            raise InvalidRequest("the two passwords differ")
        days = form_int(c, "life_days", 365, 1, certs.MAX_LIFETIME_DAYS, "Lifetime")
        _certs(c)
        # The password travels sealed, as in the management API (cert_routes.create_certificate).
        params = certs.create_params(c.rt.barrier, ks, name, password, days, form_str(c, "description", limit=1000))
    except SKMError as e:
        c.request[ERROR] = e
        return await _page(c, ks, status=e.status, error=e, form="certs", values={"name": name})
    params.pop("keystore_id")
    return await _submit(c, ks, "cert.create", params,
                         f"Certificate {name!r} issued. Download its PKCS#12 bundle below.", "certs")


@routes.post(_KS + r"/certificates/{action:schedule-deletion|cancel-deletion|delete}", roles=("admin",),
             per_project=True)
async def certificate_action(c: Ctx) -> web.Response:
    ks = await keystore_of(c)
    action = c.match("action")
    name = form_str(c, "name", limit=100)
    _certs(c)
    op_name = {"schedule-deletion": "cert.schedule_deletion", "cancel-deletion": "cert.cancel_deletion",
               "delete": "cert.delete"}[action]
    return await _submit(c, ks, op_name, {"name": name}, f"Certificate {name!r}: {action.replace('-', ' ')} done.",
                         "certs")


@routes.post(_KS + "/certificates/bundle", roles=("admin",), per_project=True)
async def download_bundle(c: Ctx) -> web.Response:
    """The PKCS#12 bundle (protected by the password chosen at issue); admins only, as in the API."""
    from server.audit import AUDIT_ACTION, AUDIT_DETAIL
    ks = await keystore_of(c)
    name = certs.check_name(form_str(c, "name", limit=100))
    c.request[AUDIT_ACTION] = "cert.download"
    c.request[AUDIT_DETAIL] = {"certificate": name}
    data = await _certs(c).bundle(ks, name)
    return web.Response(body=data, content_type="application/x-pkcs12", headers={
        **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{name}.p12"'})


@routes.post(_KS + "/certificates/pem", roles=("admin",), per_project=True)
async def download_pem(c: Ctx) -> web.Response:
    """PEM of an issued certificate: `part=cert` the certificate and its CA; `part=key` the private key,
    encrypted (PKCS#8) with the bundle's own password, so a PEM download is no weaker than the .p12."""
    import asyncio
    from server.audit import AUDIT_ACTION, AUDIT_DETAIL
    ks = await keystore_of(c)
    name = certs.check_name(form_str(c, "name", limit=100))
    part = form_str(c, "part", limit=8)
    if part not in ("cert", "key"):
        raise InvalidRequest("part is cert or key")
    c.request[AUDIT_ACTION] = "cert.download"
    c.request[AUDIT_DETAIL] = {"certificate": name, "format": f"pem-{part}"}
    svc = _certs(c)
    bundle = await svc.bundle(ks, name)
    row = await svc._row(ks, name)
    from server.barrier.barrier import sealed_aad
    password = c.rt.barrier.open(bytes(row["password_sealed"]), sealed_aad(certs.TABLE, "password_sealed", row["id"]))
    body = await asyncio.to_thread(_pem_part, bundle, password, part)
    suffix = "" if part == "cert" else "-key"
    return web.Response(body=body, content_type="application/x-pem-file", headers={
        **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{name}{suffix}.pem"'})


def _pem_part(bundle: bytes, password: bytes, part: str) -> bytes:
    from cryptography.hazmat.primitives.serialization import (BestAvailableEncryption, Encoding, PrivateFormat,
                                                              pkcs12)
    key, cert, chain = pkcs12.load_key_and_certificates(bundle, password)
    if part == "cert":
        return b"".join(x.public_bytes(Encoding.PEM) for x in [cert, *(chain or [])])
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(password))
