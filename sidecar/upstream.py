"""The sidecar's side of the key server: one pooled keep-alive mTLS session.

Every request carries the host certificate (TLS), the attested MAC header, and
the sidecar's own v1.2/v1.3 caller credentials when configured. Several
upstream URLs are tried in order of health: a URL that failed is passed over
for `unhealthy_for` seconds. Reads (GET) are retried on another URL up to
`retries` times; a write is retried only when it never reached a server (the
connection could not be made), so it cannot run twice.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from server import logs
from server.access.tls import client_context
from server.errors import ConfigError, Unavailable
from sidecar.attest import Attestor
from sidecar.settings import SidecarConfig, read_secret_file

log = logs.get("skm.sidecar.upstream")

RETRY_STATUSES = frozenset({502, 503, 504})
# The key server's MAC claim header (server.api.client.context.MAC_HEADER), spelt out here: importing
# the server's API modules would load its whole runtime into every sidecar.
MAC_HEADER = "X-TOAST-CLIENT-MAC-ADDR"


KEY_VERSION_HEADER = "X-SKM-Key-Version"


def _key_version(v: str | None) -> int | None:
    return int(v) if v is not None and v.isdigit() and len(v) < 10 else None


class UpstreamUnavailable(Unavailable):
    """No key server answered (or every one answered 5xx)."""


@dataclass
class UpstreamResponse:
    status: int
    body: bytes
    content_type: str
    url: str
    version: int | None = None          # the key version a read answered (X-SKM-Key-Version), if said

    @property
    def server_error(self) -> bool:
        return self.status >= 500


@dataclass
class Target:
    url: str
    healthy_at: float = 0.0            # monotonic time from which it is tried first again
    failures: int = 0
    last_error: str | None = None
    last_ok: float | None = None

    def healthy(self, now: float) -> bool:
        return now >= self.healthy_at


@dataclass
class HostIdentity:
    ssl: ssl.SSLContext
    cert: x509.Certificate


def load_identity(cfg: SidecarConfig) -> HostIdentity:
    """The mTLS context with the host certificate; PKCS#12 is unpacked into a private temp dir."""
    up = cfg.upstream
    ca = Path(up.ca) if up.ca else None
    try:
        if up.pkcs12:
            password = read_secret_file(up.pkcs12_password_file, "PKCS#12 password") if up.pkcs12_password_file else ""
            key, cert, chain = pkcs12.load_key_and_certificates(Path(up.pkcs12).read_bytes(),
                                                                password.encode() or None)
            if key is None or cert is None:
                raise ConfigError("upstream.pkcs12 holds no certificate with its private key")
            with tempfile.TemporaryDirectory(prefix="skm-sidecar-") as d:
                cp, kp = Path(d) / "c.pem", Path(d) / "k.pem"
                fd = os.open(kp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
                cp.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [cert, *chain]))
                ctx = client_context(ca, cp, kp)
            return HostIdentity(ctx, cert)
        cert = x509.load_pem_x509_certificate(Path(up.cert).read_bytes())
        return HostIdentity(client_context(ca, Path(up.cert), Path(up.key)), cert)
    except (OSError, ValueError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the host certificate: {type(e).__name__}") from None


class Upstream:
    def __init__(self, cfg: SidecarConfig, attestor: Attestor, metrics=None) -> None:
        self.cfg = cfg
        self.attestor = attestor
        self.metrics = metrics
        self.targets = [Target(u.rstrip("/")) for u in cfg.upstream.urls]
        self.identity: HostIdentity | None = None
        self.session: aiohttp.ClientSession | None = None
        self.sent = 0                      # requests that left for a key server (tests count these)
        self._creds: dict[str, str] = {}

    @staticmethod
    def first_host(cfg: SidecarConfig) -> str:
        return urlsplit(cfg.upstream.urls[0]).hostname or ""

    async def start(self) -> None:
        up = self.cfg.upstream
        self.identity = await asyncio.to_thread(load_identity, self.cfg)
        if up.user_access_key_id:
            secret = read_secret_file(up.user_access_key_secret_file, "user access key secret")
            self._creds["v1.2"] = secret
        if up.token_file:
            self._creds["v1.3"] = read_secret_file(up.token_file, "access token")
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.identity.ssl, limit=up.pool_size, keepalive_timeout=60,
                                           enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=up.request_timeout, sock_connect=up.connect_timeout),
            auto_decompress=False)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    # ---------------------------------------------------------------- identity
    def cert_expiry(self) -> str | None:
        if self.identity is None:
            return None
        return self.identity.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")

    def headers(self, version: str) -> dict[str, str]:
        h = {"Accept": "application/json"}
        if self.attestor.mac:
            h[MAC_HEADER] = self.attestor.mac
        if version == "v1.2" and "v1.2" in self._creds:
            h["X-TC-AUTHENTICATION-ID"] = self.cfg.upstream.user_access_key_id
            h["X-TC-AUTHENTICATION-SECRET"] = self._creds["v1.2"]
        if version == "v1.3" and "v1.3" in self._creds:
            h["X-NHN-Authorization"] = f"Bearer {self._creds['v1.3']}"
        return h

    def path(self, version: str, suffix: str) -> str:
        return f"/keymanager/{version}/appkey/{self.cfg.appkey}{suffix}"

    # ---------------------------------------------------------------- health
    def ordered(self) -> list[Target]:
        now = time.monotonic()
        healthy = [t for t in self.targets if t.healthy(now)]
        # When all are marked down, still try them all (the soonest-healthy first).
        return healthy or sorted(self.targets, key=lambda t: t.healthy_at)

    def _down(self, t: Target, why: str) -> None:
        t.failures += 1
        t.last_error = why
        t.healthy_at = time.monotonic() + self.cfg.upstream.unhealthy_for
        log.warning("upstream_failed", url=t.url, reason=why)

    def _up(self, t: Target) -> None:
        t.failures, t.last_error, t.healthy_at, t.last_ok = 0, None, 0.0, time.monotonic()

    @property
    def reachable(self) -> bool:
        now = time.monotonic()
        return any(t.last_ok is not None and t.healthy(now) for t in self.targets)

    # ---------------------------------------------------------------- requests
    async def request(self, method: str, version: str, suffix: str, *, query: str = "", body: bytes | None = None,
                      content_type: str | None = None) -> UpstreamResponse:
        assert self.session is not None, "start() first"
        idempotent = method in ("GET", "HEAD")
        budget = 1 + self.cfg.upstream.retries if idempotent else len(self.targets)
        order = self.ordered()
        plan = [order[i % len(order)] for i in range(budget)]
        path = self.path(version, suffix) + (f"?{query}" if query else "")
        last, mac_retried, i = "no key server configured", False, 0
        while i < len(plan):
            t = plan[i]
            i += 1
            headers = self.headers(version)
            if content_type:
                headers["Content-Type"] = content_type
            self.sent += 1
            if self.metrics is not None:
                self.metrics.upstream.labels("sent").inc()
            try:
                async with self.session.request(method, t.url + path, data=body, headers=headers,
                                                allow_redirects=False) as r:
                    resp = UpstreamResponse(r.status, await r.read(), r.content_type, t.url,
                                            _key_version(r.headers.get(KEY_VERSION_HEADER)))
            except aiohttp.ClientConnectorError as e:
                # Never connected: safe to try the next server even for a write.
                last = f"cannot connect ({type(e).__name__})"
                self._down(t, last)
                continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                last = type(e).__name__
                self._down(t, last)
                if not idempotent:
                    raise UpstreamUnavailable("the key server did not answer a write; it may or may not "
                                              "have been applied") from None
                continue
            if resp.status in RETRY_STATUSES:
                last = f"HTTP {resp.status}"
                self._down(t, last)
                if idempotent and i < len(plan):
                    continue
                return resp
            self._up(t)
            if resp.status == 403 and b"MAC Auth Failure" in resp.body and not mac_retried:
                # The NIC may have changed under us: re-read once, and retry if it did.
                mac_retried = True
                if await self.attestor.refresh():
                    plan.insert(i, t)
                    continue
            return resp
        if self.metrics is not None:
            self.metrics.upstream.labels("unavailable").inc()
        raise UpstreamUnavailable(f"no key server answered ({last}); tried {i} time(s)")

    @contextlib.asynccontextmanager
    async def stream(self, version: str, suffix: str, read_timeout: float):
        """An open streaming response (the event stream) from the first healthy server."""
        assert self.session is not None, "start() first"
        last = "no key server configured"
        for t in self.ordered():
            try:
                r = await self.session.get(
                    t.url + self.path(version, suffix), headers={**self.headers(version), "Accept": "text/event-stream"},
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.upstream.connect_timeout,
                                                  sock_read=read_timeout))
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                last = type(e).__name__
                self._down(t, last)
                continue
            try:
                yield r
            finally:
                r.release()
                r.close()
            return
        raise UpstreamUnavailable(f"no key server answered the event stream ({last})")
