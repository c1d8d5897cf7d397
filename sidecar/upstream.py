"""The sidecar's side of the key server: one pooled keep-alive mTLS session.

Every request carries the host certificate (TLS), the attested MAC header, and
the sidecar's own v1.2/v1.3 caller credentials when configured. Several
upstream URLs are tried in order of health: a URL that failed is passed over
for `unhealthy_for` seconds. Reads (GET) are retried on another URL up to
`retries` times; a write is retried only when it never reached a server (the
connection could not be made), so it cannot run twice.

A URL whose host is a name (`https://keyserver:8443`, several replicas behind one
DNS name) is resolved here, not by aiohttp: every address becomes a target of its
own (own pool, own health), requests are spread over the healthy ones, and a
refused connection is tried on the next address at once, then on the name
resolved afresh. aiohttp's own DNS cache (10 s) would otherwise keep sending to
the address a replica had before it restarted.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass, field
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


# How long the addresses behind a name are used before it is looked up again, in the background (at once,
# before the next request, after a refused connection): short, so a scaled-up replica gets traffic soon.
RESOLVE_TTL = 2.0


@dataclass
class Target:
    url: str                           # the configured URL (what the status shows)
    address: str = ""                  # the address it resolved to ("" when the URL holds an address)
    healthy_at: float = 0.0            # monotonic time from which it is tried first again
    failures: int = 0
    last_error: str | None = None
    last_ok: float | None = None

    def healthy(self, now: float) -> bool:
        return now >= self.healthy_at


@dataclass
class Name:
    """One configured URL and the targets its host resolved to."""
    url: str
    host: str
    port: int
    literal: bool                      # the host is an IP address: nothing to resolve
    targets: list[Target]
    resolved_at: float | None = None
    turn: int = 0                      # round-robin offset over the healthy addresses
    lookup: asyncio.Task | None = field(default=None, repr=False)     # the lookup in flight, shared

    @classmethod
    def parse(cls, url: str) -> "Name":
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 443
        try:
            ipaddress.ip_address(host)
            literal = True
        except ValueError:
            literal = False
        return cls(url, host, port, literal, [Target(url)] if literal else [])

    def base(self, t: Target) -> str:
        """Where a request to `t` connects: the address itself for a resolved name."""
        if not t.address:
            return self.url
        addr = f"[{t.address}]" if ":" in t.address else t.address
        return f"https://{addr}:{self.port}"



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
    except OSError as e:
        if isinstance(e, ssl.SSLError) or not e.filename:
            raise ConfigError(f"cannot load the host certificate: {type(e).__name__}") from None
        # A missing or unreadable file: name it (a path is no secret) and the settings that point at it.
        raise ConfigError(f"cannot load the host certificate: {e.strerror}: {e.filename} (check upstream.cert/key, "
                          "upstream.pkcs12 and upstream.ca)") from None
    except ValueError as e:
        raise ConfigError(f"cannot load the host certificate: {type(e).__name__}") from None


class Upstream:
    def __init__(self, cfg: SidecarConfig, attestor: Attestor, metrics=None,
                 resolver: aiohttp.abc.AbstractResolver | None = None) -> None:
        self.cfg = cfg
        self.attestor = attestor
        self.metrics = metrics
        self.names = [Name.parse(u.rstrip("/")) for u in cfg.upstream.urls]
        # getaddrinfo in a thread: /etc/hosts and the container DNS, as every other program on the host sees them.
        self.resolver = resolver or aiohttp.ThreadedResolver()
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
        for n in self.names:
            if n.lookup is not None and not n.lookup.done():
                n.lookup.cancel()
                with contextlib.suppress(BaseException):
                    await n.lookup
        await self.resolver.close()

    @property
    def targets(self) -> list[Target]:
        return [t for n in self.names for t in n.targets]

    # ---------------------------------------------------------------- names
    async def _resolve(self, name: Name) -> None:
        """The name's addresses now; targets already known keep their health. A failed lookup keeps the old ones."""
        name.resolved_at = time.monotonic()
        try:
            found = await asyncio.wait_for(
                self.resolver.resolve(name.host, name.port, family=socket.AF_UNSPEC), self.cfg.upstream.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            log.warning("upstream_resolve_failed", host=name.host, reason=type(e).__name__)
            return
        addrs = list(dict.fromkeys(r["host"] for r in found))
        known = {t.address: t for t in name.targets}
        name.targets = [known.get(a) or Target(name.url, a) for a in addrs]

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
    def _lookup(self, name: Name) -> asyncio.Task:
        """One lookup per name at a time, whoever asks."""
        if name.lookup is None or name.lookup.done():
            name.lookup = asyncio.ensure_future(self._resolve(name))
        return name.lookup

    async def _fresh(self) -> None:
        """Names with no addresses yet, or whose address refused a connection, are looked up before the
        request; names merely past RESOLVE_TTL in the background (the request uses what is known)."""
        now = time.monotonic()
        wait = []
        for n in self.names:
            if n.literal:
                continue
            if not n.targets or n.resolved_at is None:
                wait.append(self._lookup(n))
            elif now - n.resolved_at >= RESOLVE_TTL:
                self._lookup(n)
        if wait:
            await asyncio.gather(*wait)

    def ordered(self) -> list[Target]:
        """Healthy targets first (URLs in configured order, the addresses behind one name taken in turn),
        then the ones marked down, the soonest-healthy first: when all are down, all are still tried."""
        now = time.monotonic()
        healthy: list[Target] = []
        for n in self.names:
            up = [t for t in n.targets if t.healthy(now)]
            if up:
                n.turn = (n.turn + 1) % len(up)
                healthy += up[n.turn:] + up[:n.turn]
        down = sorted((t for t in self.targets if not t.healthy(now)), key=lambda t: t.healthy_at)
        return healthy + down

    def _name(self, t: Target) -> Name:
        return next((n for n in self.names if any(x is t for x in n.targets)),
                    next(n for n in self.names if n.url == t.url))     # a target dropped by a new lookup

    def _base(self, t: Target) -> tuple[str, dict[str, str], str | None]:
        """URL base, extra headers and TLS server name for a request to `t` (the name, not the address)."""
        n = self._name(t)
        if not t.address:
            return n.url, {}, None
        return n.base(t), {"Host": urlsplit(n.url).netloc}, n.host

    def _down(self, t: Target, why: str) -> None:
        t.failures += 1
        t.last_error = why
        t.healthy_at = time.monotonic() + self.cfg.upstream.unhealthy_for
        log.warning("upstream_failed", url=t.url, address=t.address or None, reason=why)

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
        # Answers that failed (5xx, timeouts, dropped connections): reads may retry, writes may not. A
        # connection that was never made sent nothing: it moves on to the next address, for writes too.
        allowed = 1 + self.cfg.upstream.retries if idempotent else 1
        path = self.path(version, suffix) + (f"?{query}" if query else "")
        last, mac_retried, tries, failed = "no key server configured", False, 0, 0
        refused: set[int] = set()          # targets (by id) whose connection was refused in this request
        again: Target | None = None
        reresolved = False
        await self._fresh()
        while True:
            t = again or next((c for c in self.ordered() if id(c) not in refused), None)
            again = None
            if t is None:
                if reresolved or all(n.literal for n in self.names):
                    break
                # Every known address refused: the replicas may have moved (restarted) since the last lookup.
                reresolved = True
                await asyncio.gather(*(self._lookup(n) for n in self.names if not n.literal))
                continue
            tries += 1
            base, extra, server_name = self._base(t)
            headers = {**self.headers(version), **extra}
            if content_type:
                headers["Content-Type"] = content_type
            self.sent += 1
            if self.metrics is not None:
                self.metrics.upstream.labels("sent").inc()
            try:
                async with self.session.request(method, base + path, data=body, headers=headers,
                                                allow_redirects=False, server_hostname=server_name) as r:
                    resp = UpstreamResponse(r.status, await r.read(), r.content_type, t.url,
                                            _key_version(r.headers.get(KEY_VERSION_HEADER)))
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                # Never connected (refused, unreachable, or no answer to the SYN: a replica whose container is
                # gone): nothing was sent, so the next address is safe even for a write.
                last = f"cannot connect ({type(e).__name__})"
                refused.add(id(t))
                self._down(t, last)
                self._name(t).resolved_at = None          # look the name up again before the next request
                continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                last = type(e).__name__
                self._down(t, last)
                if not idempotent:
                    raise UpstreamUnavailable("the key server did not answer a write; it may or may not "
                                              "have been applied") from None
                failed += 1
                if failed >= allowed:
                    break
                continue
            if resp.status in RETRY_STATUSES:
                last = f"HTTP {resp.status}"
                self._down(t, last)
                failed += 1
                if idempotent and failed < allowed:
                    continue
                return resp
            self._up(t)
            if resp.status == 403 and b"MAC Auth Failure" in resp.body and not mac_retried:
                # The NIC may have changed under us: re-read once, and retry if it did.
                mac_retried = True
                if await self.attestor.refresh():
                    again = t
                    continue
            return resp
        if self.metrics is not None:
            self.metrics.upstream.labels("unavailable").inc()
        raise UpstreamUnavailable(f"no key server answered ({last}); tried {tries} time(s)")

    @contextlib.asynccontextmanager
    async def stream(self, version: str, suffix: str, read_timeout: float):
        """An open streaming response (the event stream) from the first healthy server."""
        assert self.session is not None, "start() first"
        last = "no key server configured"
        await self._fresh()
        for t in self.ordered():
            base, extra, server_name = self._base(t)
            try:
                r = await self.session.get(
                    base + self.path(version, suffix),
                    headers={**self.headers(version), **extra, "Accept": "text/event-stream"},
                    server_hostname=server_name,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.upstream.connect_timeout,
                                                  sock_read=read_timeout))
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                last = type(e).__name__
                self._down(t, last)
                if isinstance(e, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
                    self._name(t).resolved_at = None
                continue
            try:
                yield r
            finally:
                r.release()
                r.close()
            return
        raise UpstreamUnavailable(f"no key server answered the event stream ({last})")
