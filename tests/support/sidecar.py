"""Sidecar test support: host certificates registered to key stores, an in-process
sidecar in front of the `skm` harness, Unix-socket sessions, a recording upstream.

Registering a certificate writes the auth_certificates row directly (with its
barrier-sealed columns) so these tests do not depend on the certificate
management API.
"""
from __future__ import annotations

import contextlib
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding

from server import timeutil
from server.access.pki import CA, cert_pem, fingerprint, key_pem, write_pem
from server.access.tls import server_context
from server.barrier.barrier import Barrier, sealed_aad
from server.config import load
from server.events import Event
from sidecar.app import Sidecar
from sidecar.settings import SidecarConfig
from tests.support.loopback import serve

__all__ = ["HostCert", "issue_host_cert", "register_certificate", "sidecar_config", "start_sidecar",
           "start_registered_sidecar", "unix_session", "server_requests", "RecordingUpstream"]


@dataclass
class HostCert:
    cert: Path
    key: Path
    fingerprint: str
    pem: bytes
    not_after: str


def issue_host_cert(ca: CA, out_dir: Path, name: str, macs: list[str] | None = None, days: float = 30) -> HostCert:
    cert, key = ca.issue_host(name, macs or [], days=days) if macs else ca.issue(name, client=True, days=days)
    cp, kp = out_dir / f"{name}.pem", out_dir / f"{name}-key.pem"
    write_pem(cp, cert_pem(cert), private=False)
    write_pem(kp, key_pem(key), private=True)
    return HostCert(cp, kp, fingerprint(cert.public_bytes(Encoding.DER)), cert_pem(cert),
                    timeutil.to_db(cert.not_valid_after_utc))


async def register_certificate(storage, barrier: Barrier, keystore_id: int, host: HostCert, name: str) -> int:
    """Insert an ACTIVE auth_certificates row for `host` (what the certificate API will do), sealed."""
    from server.access.seal import AccessSeal
    now = timeutil.now_db()
    seal = AccessSeal(storage, barrier)
    await seal.key()
    async with storage.transaction() as tx:
        row = await tx.fetchone(
            "INSERT INTO auth_certificates (keystore_id, name, description, fingerprint, serial, expires_at, "
            "password_sealed, bundle_sealed, status, created_by, created_at, updated_by, updated_at) "
            "VALUES (?, ?, '', ?, ?, ?, ?, ?, 'ACTIVE', 'test', ?, 'test', ?) RETURNING id",
            keystore_id, name, host.fingerprint, host.fingerprint[:16], host.not_after, b"", b"", now, now)
        cid = row["id"]
        await tx.execute(
            "UPDATE auth_certificates SET password_sealed = ?, bundle_sealed = ? WHERE id = ?",
            barrier.seal(b"", sealed_aad("auth_certificates", "password_sealed", cid)),
            barrier.seal(host.pem, sealed_aad("auth_certificates", "bundle_sealed", cid)), cid)
        await seal.seal_new(tx, "auth_certificates", cid)
    return cid


def sidecar_config(*, appkey: str, urls: list[str], ca: Path, host: HostCert, socket: Path,
                   **overrides: Any) -> SidecarConfig:
    base: dict[str, Any] = {
        "appkey": appkey, "log_format": "json",
        "upstream": {"urls": urls, "ca": str(ca), "cert": str(host.cert), "key": str(host.key),
                     "connect_timeout": 1.0, "request_timeout": 5.0, "unhealthy_for": 0.2},
        "listen": {"socket": str(socket)},
        "events": {"backoff_initial": 0.1, "backoff_max": 0.5},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return load(SidecarConfig, None, env_prefix="SKM_SIDECAR_", env={}, overrides=base)


async def start_sidecar(h, name: str = "sidecar", **overrides: Any) -> tuple[Sidecar, HostCert]:
    """A sidecar in front of harness `h`, with a fresh host certificate (not yet registered)."""
    host = issue_host_cert(h.pki.load_ca(), h.tmp, f"{name}-host")
    cfg = sidecar_config(appkey=h.appkey, urls=[h.data_url], ca=h.pki.ca_cert, host=host,
                         socket=h.tmp / f"{name}.sock", **overrides)
    return await Sidecar(cfg).start(), host


async def start_registered_sidecar(h, keystore_id: int, name: str = "sidecar", **overrides: Any) -> Sidecar:
    """A sidecar whose host certificate is registered to the key store before it starts (so what it
    does at start, e.g. rendering files, already passes the store's certificate check)."""
    host = issue_host_cert(h.pki.load_ca(), h.tmp, f"{name}-host")
    await register_certificate(h.rt.storage, h.rt.barrier, keystore_id, host, name)
    # What the certificate API does after a change: the data plane drops the store's cached checks. Before
    # the sidecar starts, so its event stream never sees this event (it would empty the sidecar's cache).
    await h.rt.events.publish(Event(keystore_id, "auth_changed"))
    cfg = sidecar_config(appkey=h.appkey, urls=[h.data_url], ca=h.pki.ca_cert, host=host,
                         socket=h.tmp / f"{name}.sock", **overrides)
    return await Sidecar(cfg).start()


def unix_session(path: Path | str, headers: dict | None = None) -> aiohttp.ClientSession:
    return aiohttp.ClientSession("http://sidecar", connector=aiohttp.UnixConnector(path=str(path)), headers=headers)


def server_requests(rt, fragment: str) -> float:
    """Requests the key server's data plane answered on routes containing `fragment` (its own metrics,
    flushed first as a scrape flushes them)."""
    rt.metrics.flush()
    total = 0.0
    for metric in rt.metrics.registry.collect():
        for s in metric.samples:
            if (s.name == "skm_http_requests_total" and s.labels.get("plane") == "data"
                    and fragment in s.labels.get("route", "")):
                total += s.value
    return total


@dataclass
class RecordingUpstream:
    """A TLS server posing as the key server: records each request's headers, answers a fixed secret."""
    ca: CA
    tmp: Path
    requests: list[dict] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> "RecordingUpstream":
        cert, key = self.ca.issue("recorder", server=True, dns=["localhost"], ips=["127.0.0.1"])
        cp, kp = self.tmp / "recorder.pem", self.tmp / "recorder-key.pem"
        write_pem(cp, cert_pem(cert), private=False)
        write_pem(kp, key_pem(key), private=True)
        ca_path = self.tmp / "recorder-ca.pem"
        write_pem(ca_path, cert_pem(self.ca.cert), private=False)
        ctx: ssl.SSLContext = server_context(cp, kp, ca_path)

        async def record(request: web.Request) -> web.Response:
            ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
            self.requests.append({"path": request.path, "method": request.method,
                                  "headers": {k: v for k, v in request.headers.items()},
                                  "client_cert": bool(ssl_obj and ssl_obj.getpeercert(binary_form=True))})
            if request.path.endswith("/events"):
                return web.Response(status=404)
            body = {"header": {"resultCode": 0, "resultMessage": "success", "isSuccessful": True},
                    "body": {"secret": "recorded"}}
            return web.Response(text=json.dumps(body), content_type="application/json")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        self._runner, self.port = await serve(app, ctx, access_log=None)
        return self

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
            self._runner = None
