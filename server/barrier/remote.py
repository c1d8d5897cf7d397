"""The key server's system-key client: fetch the wrapped keyring over mTLS, unseal with backoff.

The system-key server answers `GET /v1/keyring` with WrappedKeyring.to_json() to
allow-listed key-server certificates. Nothing fetched here is usable without the
root key, and nothing here logs more than versions, URLs and reasons.
"""
from __future__ import annotations

import asyncio
import json
import random
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from server import logs
from server.access.tls import client_context
from server.barrier.barrier import Barrier
from server.barrier.keyring import SystemKeySource, WrappedKeyring
from server.barrier.rootkey import RootKeyProvider
from server.errors import ConfigError, SKMError, Unavailable
from server.settings import SystemKeySourceConfig

MAX_RESPONSE_BYTES = 1 << 20
KEYRING_PATH = "/v1/keyring"


class SystemKeyUnavailable(Unavailable):
    """No system-key server answered with a keyring; `failures` lists (url, status or None, reason)."""
    message = "System Key Unavailable"

    def __init__(self, failures: list[tuple[str, int | None, str]]) -> None:
        self.failures = failures
        self.status_codes = [s for _, s, _ in failures if s is not None]
        super().__init__("; ".join(f"{url}: {reason}" for url, _, reason in failures) or "no system-key server")


def client_ssl_context(cfg: SystemKeySourceConfig) -> ssl.SSLContext:
    """mTLS client context from systemkey.client_cert / client_key / ca."""
    missing = [n for n in ("client_cert", "client_key", "ca") if not getattr(cfg, n)]
    if missing:
        raise ConfigError(f"the remote system-key source needs systemkey.{', systemkey.'.join(missing)}")
    for n in ("client_cert", "client_key", "ca"):
        if not Path(getattr(cfg, n)).is_file():
            raise ConfigError(f"systemkey.{n} file {getattr(cfg, n)} does not exist")
    try:
        return client_context(Path(cfg.ca), Path(cfg.client_cert), Path(cfg.client_key))
    except (ssl.SSLError, ValueError):
        raise ConfigError("systemkey.client_cert, client_key or ca cannot be loaded (not PEM, or the key "
                          "does not match the certificate)") from None


def _error_reason(status: int, body: bytes) -> str:
    try:
        header = json.loads(body)["header"]
        text = str(header.get("resultMessage", ""))
        if header.get("resultDetail"):
            text += f": {header['resultDetail']}"
    except (ValueError, KeyError, TypeError, AttributeError):
        text = ""
    return f"HTTP {status}" + (f" ({text[:300]})" if text else "")


class RemoteKeyringSource(SystemKeySource):
    def __init__(self, cfg: SystemKeySourceConfig, *, ssl_context: ssl.SSLContext | None = None) -> None:
        if not cfg.urls:
            raise ConfigError("systemkey.urls is empty: list the system-key server(s) as https://host:port")
        for u in cfg.urls:
            if not u.startswith("https://"):
                raise ConfigError(f"systemkey.urls entry {u!r} must start with https://")
        self.cfg = cfg
        self.urls = tuple(u.rstrip("/") for u in cfg.urls)
        self.timeout = cfg.timeout
        self._ssl = ssl_context
        self.description = "system-key server " + ", ".join(self.urls)

    async def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = await asyncio.to_thread(client_ssl_context, self.cfg)
        return self._ssl

    async def fetch(self) -> WrappedKeyring:
        """The first server that answers wins; SystemKeyUnavailable lists why each failed."""
        ctx = await self._context()
        failures: list[tuple[str, int | None, str]] = []
        for url in self.urls:
            try:
                return await self._fetch_one(url, ctx)
            except _FetchFailed as e:
                failures.append((url, e.status, e.reason))
        raise SystemKeyUnavailable(failures)

    async def _fetch_one(self, url: str, ctx: ssl.SSLContext) -> WrappedKeyring:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=ctx)) as s:
                async with s.get(url + KEYRING_PATH, allow_redirects=False) as r:
                    body = await r.content.read(MAX_RESPONSE_BYTES + 1)
                    if r.status != 200:
                        raise _FetchFailed(r.status, _error_reason(r.status, body))
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise _FetchFailed(r.status, "response too large")
        except asyncio.TimeoutError:
            raise _FetchFailed(None, f"timed out after {self.timeout:g} s") from None
        except aiohttp.ClientConnectorCertificateError:
            raise _FetchFailed(None, "its certificate is not trusted (systemkey.ca, host name)") from None
        except aiohttp.ClientSSLError:
            raise _FetchFailed(None, "TLS handshake failed") from None
        except aiohttp.ClientConnectorError as e:
            raise _FetchFailed(None, f"unreachable ({e.os_error.strerror or type(e.os_error).__name__})") from None
        except aiohttp.ClientError as e:
            # A refused client certificate shows up as a dropped connection (TLS 1.3).
            raise _FetchFailed(None, f"connection failed ({type(e).__name__}); is this key server's "
                                     "certificate trusted by the system-key server?") from None
        try:
            return WrappedKeyring.from_json(json.loads(body))
        except (ValueError, ConfigError):
            raise _FetchFailed(200, "the answer is not a wrapped keyring") from None


class _FetchFailed(Exception):
    def __init__(self, status: int | None, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def unwrap_keyring(ring: WrappedKeyring, root: RootKeyProvider) -> dict[int, bytes]:
    keys = await ring.unwrap_all(root)
    if ring.current not in keys:
        raise ConfigError(f"the keyring's current system-key version {ring.current} is missing or retired")
    return keys


async def unseal_with_retry(barrier: Barrier, source: SystemKeySource, root: RootKeyProvider, *,
                            initial: float = 0.2, maximum: float = 5.0, log: Any = None) -> WrappedKeyring:
    """Fetch, unwrap with the root key and unseal, retrying outages with exponential backoff.

    A ConfigError (WrongRootKey, wrong PIN, missing files) stops at once: it is not an
    outage. Returns the keyring (wrapped blobs only).
    """
    if log is None:
        log = logs.get("skm.barrier")
    delay = max(initial, 0.01)
    attempt = 0
    root_ready = False
    while True:
        attempt += 1
        try:
            if not root_ready:
                opener = getattr(root, "open", None)  # PKCS#11: log in now, so a wrong PIN fails early
                if opener is not None:
                    await opener()
                root_ready = True
            ring = await source.fetch()
            keys = await unwrap_keyring(ring, root)
            barrier.unseal(keys, ring.current)
            log.info("system_key_fetched", attempt=attempt, source=source.description,
                     system_key_version=ring.current, versions=sorted(keys))
            return ring
        except ConfigError as e:
            log.error("system_key_unseal_refused", attempt=attempt, source=source.description, reason=str(e))
            raise
        except (SKMError, OSError, asyncio.TimeoutError, aiohttp.ClientError) as e:
            reason = str(e) or type(e).__name__
            barrier.sealed_reason = f"waiting for the system key ({source.description}): {reason}"
            log.warning("system_key_fetch_failed", attempt=attempt, source=source.description, reason=reason,
                        retry_in=round(delay, 3))
        await asyncio.sleep(delay * random.uniform(0.8, 1.0))
        delay = min(delay * 2, maximum)


async def refresh_keyring(barrier: Barrier, source: SystemKeySource, root: RootKeyProvider,
                          log: Any = None) -> list[int]:
    """Pick up versions added by `skm systemkey rotate` without resealing; returns the new versions.

    New versions are unwrapped and added; the keyring's current becomes the barrier's
    current. Retirement is not applied here (it needs a rewrap first).
    """
    if barrier.sealed:
        raise ConfigError("the barrier is sealed; unseal before refreshing the keyring")
    ring = await source.fetch()
    held = set(barrier.versions())
    added: list[int] = []
    for v in sorted(ring.versions):
        if v in held or v in ring.retired:
            continue
        key = await root.unwrap(ring.versions[v], v)
        barrier.add_version(v, key, make_current=(v == ring.current))
        added.append(v)
    if log is not None and added:
        log.info("system_key_versions_added", versions=added, system_key_version=barrier.current_version)
    return added
