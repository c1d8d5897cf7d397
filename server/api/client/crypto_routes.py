"""Client API: confirm, secrets, symmetric and asymmetric key operations (NHN §4.1-4.4)."""
from __future__ import annotations

from aiohttp import web

from server.api.client import models as m
from server.api.client.context import PREFIX, client_context, key_for_use
from server.api.params import parse_int
from server.api.routing import RouteTable, ok
from server.errors import InvalidRequest
from server.keys import formats
from server.runtime import runtime
from server.timeutil import to_api

routes = RouteTable(PREFIX)
V12 = ("v1.2", "v1.3")
V13 = ("v1.3",)
KEY_VERSION_HEADER = "X-SKM-Key-Version"


def query_version(request: web.Request) -> int | None:
    raw = request.query.get("keyVersion")
    if raw is None or raw == "":
        return None
    return parse_int(raw, "keyVersion", 0, 10**9 - 1)


@routes.route("GET", "/confirm", summary="Show what the server sees of the caller", response=m.Confirm,
              tags=("client",))
async def confirm(request: web.Request, _body) -> dict:
    ctx = await client_context(request)
    return {"clientIp": ctx.peer_ip, "clientMacHeader": ctx.mac_header,
            "clientSentCertificate": ctx.sent_certificate, "clientSentCerfificate": ctx.sent_certificate}


@routes.route("GET", "/secrets/{keyid}", summary="Read a secret's value (the version read in X-SKM-Key-Version)",
              response=m.SecretOut, raw=True, tags=("client",))
async def get_secret(request: web.Request, _body) -> web.Response:
    _, key = await key_for_use(request)
    resp = ok({"secret": await runtime(request).keys.secret_value(key)})
    # NHN's body has no version; a sidecar reports which one it delivers (the roll-out), so it is said here.
    resp.headers[KEY_VERSION_HEADER] = str(key.current_version)
    return resp


@routes.route("PUT", "/secrets/{keyid}", summary="Replace a secret's value (adds a version)",
              body=m.SecretUpdateIn, response=m.SecretUpdateOut, versions=V12, tags=("client",))
async def put_secret(request: web.Request, body: m.SecretUpdateIn) -> dict:
    ctx, key = await key_for_use(request)
    rt = runtime(request)
    ks = await rt.keys.keystore(key.keystore_id)
    key = await rt.changes.submit_key_op(ctx, ks, "update_secret", key,
                                         {"secretValue": body.secretValue})
    return {"keyId": key.id, "name": key.name, "description": key.description, "secretValue": body.secretValue,
            "creationUser": key.created_by, "creationDatetime": to_api(key.created_at),
            "lastChangeUser": key.updated_by, "lastChangeDatetime": to_api(key.updated_at)}


@routes.route("POST", "/symmetric-keys/{keyid}/encrypt", summary="Encrypt text with the key's primary version",
              body=m.EncryptIn, response=m.EncryptOut, tags=("client",))
async def encrypt(request: web.Request, body: m.EncryptIn) -> dict:
    _, key = await key_for_use(request)
    ct, v = await runtime(request).keys.encrypt(key, body.plaintext)
    return {"ciphertext": ct, "keyVersion": v}


@routes.route("POST", "/symmetric-keys/{keyid}/decrypt", summary="Decrypt a ciphertext of any version of the key",
              body=m.DecryptIn, response=m.DecryptOut, tags=("client",))
async def decrypt(request: web.Request, body: m.DecryptIn) -> dict:
    _, key = await key_for_use(request)
    pt, v = await runtime(request).keys.decrypt(key, body.ciphertext)
    return {"plaintext": pt, "keyVersion": v}


@routes.route("POST", "/symmetric-keys/{keyid}/create-local-key", summary="Make a data key for envelope encryption",
              response=m.LocalKeyOut, tags=("client",))
async def create_local_key(request: web.Request, _body) -> dict:
    _, key = await key_for_use(request)
    return await runtime(request).keys.create_local_key(key)


@routes.route("GET", "/symmetric-keys/{keyid}/symmetric-key", summary="Export an exportable symmetric key",
              response=m.SymmetricKeyOut, query={"keyVersion": {"type": "integer", "minimum": 0}}, tags=("client",))
async def get_symmetric_key(request: web.Request, _body) -> dict:
    ctx, key = await key_for_use(request)
    version = None if ctx.version == "v1.0" else query_version(request)
    raw, v = await runtime(request).keys.export_symmetric(key, version)
    out: dict = {"symmetricKey": formats.hex_literals(raw)}
    if ctx.version != "v1.0":
        out["keyVersion"] = v
    return out


@routes.route("POST", "/asymmetric-keys/{keyid}/sign", summary="Legacy sign (RSA PKCS#1 v1.5 over raw bytes)",
              body=m.SignIn, response=m.SignOut, tags=("client",))
async def sign(request: web.Request, body: m.SignIn) -> dict:
    _, key = await key_for_use(request)
    sig, v = await runtime(request).keys.sign(key, body.plaintext)
    return {"signature": sig, "keyVersion": v}


@routes.route("POST", "/asymmetric-keys/{keyid}/verify", summary="Legacy verify",
              body=m.VerifyIn, response=m.VerifyOut, tags=("client",))
async def verify(request: web.Request, body: m.VerifyIn) -> dict:
    _, key = await key_for_use(request)
    ok, v = await runtime(request).keys.verify(key, body.plaintext, body.signature)
    return {"result": ok, "keyVersion": v}


@routes.route("POST", "/asymmetric-keys/{keyid}/sign-standard", summary="Sign with SHA-256 (PSS, PKCS#1 v1.5, ECDSA, Ed25519)",
              body=m.SignStandardIn, response=m.SignStandardOut, versions=V13, tags=("client",))
async def sign_standard(request: web.Request, body: m.SignStandardIn) -> dict:
    _, key = await key_for_use(request)
    data = formats.b64decode_strict(body.plaintext, "plaintext")
    return await runtime(request).keys.sign_standard(key, data, body.algorithm)


@routes.route("POST", "/asymmetric-keys/{keyid}/verify-standard", summary="Verify a standard-scheme signature",
              body=m.VerifyStandardIn, response=m.VerifyOut, versions=V13, tags=("client",))
async def verify_standard(request: web.Request, body: m.VerifyStandardIn) -> dict:
    _, key = await key_for_use(request)
    data = formats.b64decode_strict(body.plaintext, "plaintext")
    sig = formats.b64decode_strict(body.signature, "signature")
    ok, v = await runtime(request).keys.verify_standard(key, data, sig, body.algorithm, body.keyVersion)
    return {"result": ok, "keyVersion": v}


def _material(kind: str, der: bytes, version: int) -> dict:
    return {"keyType": kind, "key": formats.hex_literals(der), "encodedKey": formats.b64(der), "keyVersion": version}


@routes.route("GET", "/asymmetric-keys/{keyid}/privateKey", summary="Export an exportable private key (PKCS#8 DER)",
              response=m.KeyMaterialOut, query={"keyVersion": {"type": "integer", "minimum": 0}}, tags=("client",))
async def get_private_key(request: web.Request, _body) -> dict:
    _, key = await key_for_use(request)
    der, v = await runtime(request).keys.export_private(key, query_version(request))
    return _material("PrivateKey", der, v)


@routes.route("GET", "/asymmetric-keys/{keyid}/publicKey", summary="Public key (SPKI DER); no key-store checks",
              response=m.KeyMaterialOut, query={"keyVersion": {"type": "integer", "minimum": 0}}, tags=("client",))
async def get_public_key(request: web.Request, _body) -> dict:
    _, key = await key_for_use(request, check_access=False)
    der, v = await runtime(request).keys.public_key(key, query_version(request))
    return _material("PublicKey", der, v)
