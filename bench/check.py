"""Answers, not just statuses: every measured run also checks a sample of response bodies.

ab only counts statuses (and, with -l, accepts any length), so a server answering 200 with a wrong
body would pass. While ab (or the Unix-socket client) runs, `Sampler` sends the same request
`SAMPLES` times, spread over the run, on its own connection, and hands each answer to the case's
check: the secret equals the stored one, a decryption gives the plaintext, a ciphertext or data key
made under load decrypts back (a second request), a signature verifies (a second request: our
`verify-standard`, OpenBao's `transit/verify`). Any mismatch counts as an error of the run, so the
harness exits non-zero. The checks see values; they print only what differs in shape, never a value.
"""
from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SAMPLES = 8          # answers checked per measured run (spread over its duration)


@dataclass
class Client:
    """One request at a time over TLS (client certificate) or a Unix socket; what the checks call."""
    cert_pem: Path | None = None
    ca: Path | None = None
    _ctx: ssl.SSLContext | None = field(default=None, repr=False)

    def context(self) -> ssl.SSLContext:
        if self._ctx is None:
            ctx = ssl.create_default_context(cafile=str(self.ca)) if self.ca else ssl.create_default_context()
            if self.ca is None:
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            if self.cert_pem is not None:
                ctx.load_cert_chain(str(self.cert_pem))
            self._ctx = ctx
        return self._ctx

    def call(self, method: str, url: str, body: bytes | None = None, headers: dict | None = None,
             content_type: str = "application/json") -> tuple[int, bytes]:
        hdrs = {"Content-Type": content_type, **(headers or {})} if body is not None else dict(headers or {})
        if url.startswith("unix:"):
            _, path, target = url.split(":", 2)
            return _unix(path, method, target, body, hdrs)
        u = urllib.parse.urlsplit(url)
        if u.scheme == "https":
            conn = http.client.HTTPSConnection(u.hostname, u.port, context=self.context(), timeout=30)
        else:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        try:
            conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=body, headers=hdrs)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()


def _unix(path: str, method: str, target: str, body: bytes | None, headers: dict) -> tuple[int, bytes]:
    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(30)
            self.sock.connect(path)
    conn = _Conn("localhost")
    try:
        conn.request(method, target, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


# A check: (client, status, body) -> None when right, else what was wrong (no values).
Check = Callable[[Client, int, bytes], "str | None"]


def _json(status: int, raw: bytes) -> dict:
    if status != 200:
        raise _Wrong(f"HTTP {status}")
    try:
        out = json.loads(raw)
    except ValueError:
        raise _Wrong("the body is not JSON") from None
    if not isinstance(out, dict):
        raise _Wrong("the body is not a JSON object")
    return out


class _Wrong(Exception):
    pass


def _ours(out: dict) -> dict:
    header = out.get("header") or {}
    if header.get("isSuccessful") is not True:
        raise _Wrong(f"isSuccessful is not true ({header.get('resultMessage')!r})")
    body = out.get("body")
    if not isinstance(body, dict):
        raise _Wrong("no body object")
    return body


def _equal(got, want, what: str) -> None:
    if got != want:
        raise _Wrong(f"{what} differs from the expected value ({len(str(got))} vs {len(str(want))} characters)")


def checked(fn: Callable[[Client, int, bytes], None]) -> Check:
    def run(client: Client, status: int, raw: bytes) -> str | None:
        try:
            fn(client, status, raw)
            return None
        except _Wrong as e:
            return str(e)
        except (OSError, http.client.HTTPException) as e:
            return f"the follow-up request failed: {type(e).__name__}"
        except (KeyError, TypeError, ValueError) as e:
            return f"unexpected answer shape ({type(e).__name__}: {str(e)[:80]})"
    return run


# ------------------------------------------------------------------ our key server (and the sidecar)
def ours_value(field_name: str, want: str) -> Check:
    """The body's `field_name` equals `want` (secret read, decrypt)."""
    return checked(lambda c, st, raw: _equal(_ours(_json(st, raw))[field_name], want, field_name))


def ours_ok() -> Check:
    return checked(lambda c, st, raw: _ours(_json(st, raw)) and None)


def ours_encrypt(decrypt_url: str, plaintext: str, headers: dict | None = None) -> Check:
    def run(c: Client, st: int, raw: bytes) -> None:
        ct = _ours(_json(st, raw))["ciphertext"]
        st2, raw2 = c.call("POST", decrypt_url, json.dumps({"ciphertext": ct}).encode(), headers)
        _equal(_ours(_json(st2, raw2))["plaintext"], plaintext, "the ciphertext's decryption")
    return checked(run)


def ours_datakey(decrypt_url: str, headers: dict | None = None) -> Check:
    def run(c: Client, st: int, raw: bytes) -> None:
        body = _ours(_json(st, raw))
        st2, raw2 = c.call("POST", decrypt_url, json.dumps({"ciphertext": body["localKeyCiphertext"]}).encode(),
                           headers)
        _equal(_ours(_json(st2, raw2))["plaintext"], body["localKeyPlaintext"], "the data key's decryption")
    return checked(run)


def ours_signature(verify_url: str, plaintext_b64: str, algorithm: str, headers: dict | None = None) -> Check:
    def run(c: Client, st: int, raw: bytes) -> None:
        sig = _ours(_json(st, raw))["signature"]
        req = {"plaintext": plaintext_b64, "signature": sig, "algorithm": algorithm}
        st2, raw2 = c.call("POST", verify_url, json.dumps(req).encode(), headers)
        _equal(_ours(_json(st2, raw2))["result"], True, "verify-standard's result")
    return checked(run)


def exact(body: bytes) -> Check:
    return checked(lambda c, st, raw: _equal(raw if st == 200 else f"HTTP {st}", body, "the body"))


# ------------------------------------------------------------------ OpenBao
def _bao(st: int, raw: bytes) -> dict:
    out = _json(st, raw)
    if out.get("errors"):
        raise _Wrong("OpenBao answered errors")
    return out["data"]


def bao_secret(want: str) -> Check:
    return checked(lambda c, st, raw: _equal(_bao(st, raw)["data"]["value"], want, "the secret"))


def bao_plaintext(want_b64: str) -> Check:
    return checked(lambda c, st, raw: _equal(_bao(st, raw)["plaintext"], want_b64, "plaintext"))


def bao_encrypt(decrypt_url: str, want_b64: str, headers: dict) -> Check:
    def run(c: Client, st: int, raw: bytes) -> None:
        ct = _bao(st, raw)["ciphertext"]
        st2, raw2 = c.call("POST", decrypt_url, json.dumps({"ciphertext": ct}).encode(), headers)
        _equal(_bao(st2, raw2)["plaintext"], want_b64, "the ciphertext's decryption")
    return checked(run)


def bao_datakey(decrypt_url: str, headers: dict) -> Check:
    def run(c: Client, st: int, raw: bytes) -> None:
        data = _bao(st, raw)
        st2, raw2 = c.call("POST", decrypt_url, json.dumps({"ciphertext": data["ciphertext"]}).encode(), headers)
        _equal(_bao(st2, raw2)["plaintext"], data["plaintext"], "the data key's decryption")
    return checked(run)


def bao_signature(verify_url: str, input_b64: str, headers: dict, extra: dict | None = None) -> Check:
    def run(c: Client, st: int, raw: bytes) -> None:
        sig = _bao(st, raw)["signature"]
        req = {"input": input_b64, "signature": sig, **(extra or {})}
        st2, raw2 = c.call("POST", verify_url, json.dumps(req).encode(), headers)
        _equal(_bao(st2, raw2)["valid"], True, "transit/verify's valid")
    return checked(run)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ------------------------------------------------------------------ sampling during a run
@dataclass
class Sampler:
    """Checks `samples` answers to `request`, spread over `duration` seconds, in a thread."""
    client: Client
    request: object                   # bench.load.Request
    check: Check
    duration: float
    samples: int = SAMPLES
    checked: int = 0                  # answers received and judged
    attempted: int = 0
    failures: list[str] = field(default_factory=list)
    _thread: threading.Thread | None = None

    def _one(self) -> None:
        r = self.request
        self.attempted += 1
        try:
            st, raw = self.client.call(r.method, r.url, r.body if r.method != "GET" else None, r.headers,
                                       r.content_type)
        except (OSError, http.client.HTTPException) as e:
            self.failures.append(f"sample request failed: {type(e).__name__}")
            return
        self.checked += 1
        why = self.check(self.client, st, raw)
        if why is not None:
            self.failures.append(why)

    def _run(self) -> None:
        gap = self.duration / (self.samples + 1)
        t0 = time.monotonic()
        for i in range(1, self.samples + 1):
            delay = t0 + i * gap - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._one()

    def start(self) -> "Sampler":
        self._thread = threading.Thread(target=self._run, name="bench-check", daemon=True)
        self._thread.start()
        return self

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(120)
