"""App SDK: talk to the local sidecar over its Unix socket. No credentials anywhere.

    from sidecar.client import SidecarClient
    c = SidecarClient("/run/skm/sidecar.sock", envelope_key_id=KEK_ID)
    password = c.get_secret("035a0ffa16a64bbf8171c4bdcea37bbf")
    blob = c.envelope_encrypt(b"file contents")     # one fresh data key, used once
    data = c.envelope_decrypt(blob)

`AsyncSidecarClient` has the same methods as coroutines. A refusal raises
`SidecarError` carrying the envelope's `resultMessage` (and code, status).

Envelope blob (this module owns the format), all lengths big-endian:
    b"SKE1" | key id (32 ASCII hex) | u16 len | localKeyCiphertext (ASCII) | 12-byte nonce | AES-256-GCM(data) + tag
with the whole header (everything before the nonce) as AAD, so the wrapped key
and key id cannot be swapped onto another blob.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

DEFAULT_SOCKET = "/run/skm/sidecar.sock"
MAGIC = b"SKE1"


class SidecarError(Exception):
    def __init__(self, result_message: str, result_code: int | None = None, status: int | None = None,
                 detail: str | None = None) -> None:
        self.result_message = result_message
        self.result_code = result_code
        self.status = status
        self.detail = detail
        super().__init__(result_message if not detail else f"{result_message}: {detail}")


def _check(status: int, raw: bytes) -> dict:
    try:
        env = json.loads(raw)
        header = env["header"]
    except (ValueError, KeyError, TypeError):
        raise SidecarError("Invalid Response", None, status, "the sidecar did not answer with an envelope") from None
    if not header.get("isSuccessful") or status >= 400:
        raise SidecarError(header.get("resultMessage", f"HTTP {status}"), header.get("resultCode"), status,
                           header.get("resultDetail"))
    return env.get("body") or {}


# -------------------------------------------------------------- envelope format
def _kek(key_id: str | None) -> str:
    if not key_id or len(key_id) != 32 or not all(c in "0123456789abcdef" for c in key_id):
        raise SidecarError("Invalid Key Id", None, None, "pass the symmetric key id (32 hex) that wraps data keys")
    return key_id


def _seal(key_id: str, local_key_ciphertext: str, local_key_b64: str, data: bytes) -> bytes:
    wrapped = local_key_ciphertext.encode("ascii")
    header = MAGIC + key_id.encode("ascii") + struct.pack(">H", len(wrapped)) + wrapped
    dek = base64.b64decode(local_key_b64)
    try:
        nonce = os.urandom(12)
        return header + nonce + AESGCM(dek).encrypt(nonce, data, header)
    finally:
        del dek                           # used once; nothing keeps it


def _parse(blob: bytes) -> tuple[str, str, bytes, bytes, bytes]:
    if len(blob) < 4 + 32 + 2 or blob[:4] != MAGIC:
        raise SidecarError("Invalid User Data", None, None, "not an envelope blob")
    key_id = blob[4:36].decode("ascii", "replace")
    (n,) = struct.unpack_from(">H", blob, 36)
    end = 38 + n
    if len(blob) < end + 12 + 16:
        raise SidecarError("Invalid User Data", None, None, "the envelope blob is truncated")
    return key_id, blob[38:end].decode("ascii", "replace"), blob[:end], blob[end:end + 12], blob[end + 12:]


def _open(header: bytes, nonce: bytes, sealed: bytes, local_key_b64: str) -> bytes:
    dek = base64.b64decode(local_key_b64)
    try:
        return AESGCM(dek).decrypt(nonce, sealed, header)
    except InvalidTag:
        raise SidecarError("Invalid User Data", None, None, "the envelope blob failed its integrity check") from None
    finally:
        del dek


# -------------------------------------------------------------- sync client
class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("sidecar", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class SidecarClient:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 15.0,
                 envelope_key_id: str | None = None) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.envelope_key_id = envelope_key_id      # the symmetric key that wraps envelope data keys

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Accept": "application/json"}
            if payload is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=payload, headers=headers)
            r = conn.getresponse()
            return _check(r.status, r.read())
        finally:
            conn.close()

    def get_secret(self, key_id: str) -> str:
        return self._call("GET", f"/secrets/{key_id}")["secret"]

    def encrypt(self, key_id: str, plaintext: str) -> str:
        return self._call("POST", f"/symmetric-keys/{key_id}/encrypt", {"plaintext": plaintext})["ciphertext"]

    def decrypt(self, key_id: str, ciphertext: str) -> str:
        return self._call("POST", f"/symmetric-keys/{key_id}/decrypt", {"ciphertext": ciphertext})["plaintext"]

    def sign(self, key_id: str, plaintext: str) -> str:
        return self._call("POST", f"/asymmetric-keys/{key_id}/sign", {"plaintext": plaintext})["signature"]

    def verify(self, key_id: str, plaintext: str, signature: str) -> bool:
        return bool(self._call("POST", f"/asymmetric-keys/{key_id}/verify",
                               {"plaintext": plaintext, "signature": signature})["result"])

    def envelope_encrypt(self, data: bytes, key_id: str | None = None) -> bytes:
        key_id = _kek(key_id or self.envelope_key_id)
        lk = self._call("POST", f"/symmetric-keys/{key_id}/create-local-key")
        try:
            return _seal(key_id, lk["localKeyCiphertext"], lk["localKeyPlaintext"], data)
        finally:
            lk.clear()

    def envelope_decrypt(self, blob: bytes) -> bytes:
        key_id, wrapped, header, nonce, sealed = _parse(blob)
        return _open(header, nonce, sealed, self.decrypt(key_id, wrapped))

    def status(self) -> dict[str, Any]:
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            conn.request("GET", "/v1/status")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()


# -------------------------------------------------------------- async client
class AsyncSidecarClient:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 15.0,
                 envelope_key_id: str | None = None) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.envelope_key_id = envelope_key_id      # the symmetric key that wraps envelope data keys
        self._session = None

    async def __aenter__(self) -> "AsyncSidecarClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _s(self):
        import aiohttp
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.socket_path),
                                                  timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        async with self._s().request(method, f"http://sidecar{path}", json=body,
                                     headers={"Accept": "application/json"}) as r:
            return _check(r.status, await r.read())

    async def get_secret(self, key_id: str) -> str:
        return (await self._call("GET", f"/secrets/{key_id}"))["secret"]

    async def encrypt(self, key_id: str, plaintext: str) -> str:
        return (await self._call("POST", f"/symmetric-keys/{key_id}/encrypt", {"plaintext": plaintext}))["ciphertext"]

    async def decrypt(self, key_id: str, ciphertext: str) -> str:
        return (await self._call("POST", f"/symmetric-keys/{key_id}/decrypt", {"ciphertext": ciphertext}))["plaintext"]

    async def sign(self, key_id: str, plaintext: str) -> str:
        return (await self._call("POST", f"/asymmetric-keys/{key_id}/sign", {"plaintext": plaintext}))["signature"]

    async def verify(self, key_id: str, plaintext: str, signature: str) -> bool:
        return bool((await self._call("POST", f"/asymmetric-keys/{key_id}/verify",
                                      {"plaintext": plaintext, "signature": signature}))["result"])

    async def envelope_encrypt(self, data: bytes, key_id: str | None = None) -> bytes:
        key_id = _kek(key_id or self.envelope_key_id)
        lk = await self._call("POST", f"/symmetric-keys/{key_id}/create-local-key")
        try:
            return _seal(key_id, lk["localKeyCiphertext"], lk["localKeyPlaintext"], data)
        finally:
            lk.clear()

    async def envelope_decrypt(self, blob: bytes) -> bytes:
        key_id, wrapped, header, nonce, sealed = _parse(blob)
        return _open(header, nonce, sealed, await self.decrypt(key_id, wrapped))

    async def status(self) -> dict[str, Any]:
        async with self._s().get("http://sidecar/v1/status") as r:
            return await r.json()
