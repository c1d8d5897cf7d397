"""The system-key server: an mTLS-only aiohttp listener serving the wrapped keyring.

Routes: `GET /v1/keyring` (allow-listed key-server certificates only, every fetch
audited), `POST|GET /v1/audit/checkpoints` (the key servers' signed audit checkpoints,
append-only: server/systemkey/checkpoints.py) and `GET /healthz`. Nothing else on the
network changes state: rotation, allow and revoke are local admin commands
(server/systemkey/admin.py).
"""
from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Awaitable, Callable

from aiohttp import web

from server import logs
from server.access.pki import fingerprint
from server.access.tls import AEAD_CIPHERS, server_context
from server.api.timeouts import DeadlineTCPSite
from server.audit.checkpoints import CHECKPOINT_PATH
from server.errors import (ConfigError, Forbidden, InvalidJSON, InvalidRequest, MethodNotAllowed, SKMError,
                           Unauthenticated, Unavailable, UnsupportedMediaType, URLNotFound)
from server.systemkey.checkpoints import CheckpointLog
from server.systemkey.settings import SystemKeyServerConfig
from server.systemkey.state import SystemKeyState

CIPHERS = AEAD_CIPHERS
STATE_KEY = web.AppKey("state", SystemKeyState)
CHECKPOINTS_KEY = web.AppKey("checkpoints", CheckpointLog)

log = logs.get("skm.systemkey")


def server_ssl_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """TLS 1.2+, AEAD suites only, no renegotiation, client certificate required."""
    for what, p in (("cert", cert), ("key", key), ("client_ca", client_ca)):
        if not Path(p).is_file():
            raise ConfigError(f"system-key server TLS file {p} does not exist; set `{what}` in its config "
                              "or run `skm certs init`")
    try:
        ctx = server_context(Path(cert), Path(key), Path(client_ca), require_client=True)
    except (ssl.SSLError, ValueError):
        raise ConfigError("the system-key server's certificate, key or client CA cannot be loaded; "
                          "check cert, key and client_ca") from None
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _peer(request: web.Request) -> tuple[str | None, str | None]:
    """(SHA-256 fingerprint, subject CN) of the client certificate; read before anything awaits."""
    transport = request.transport
    if transport is None:
        return None, None
    ssl_obj = transport.get_extra_info("ssl_object")
    der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
    if not der:
        return None, None
    cn = None
    for rdn in (transport.get_extra_info("peercert") or {}).get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                cn = v
    return fingerprint(der), cn


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except SKMError as e:
        return web.json_response(e.envelope(), status=e.status)
    except web.HTTPNotFound:
        e = URLNotFound()
        return web.json_response(e.envelope(), status=e.status)
    except web.HTTPMethodNotAllowed:
        e = MethodNotAllowed()
        return web.json_response(e.envelope(), status=e.status)
    except web.HTTPException as e:
        err = SKMError(e.reason)
        return web.json_response(err.envelope(), status=e.status)
    except Exception as e:  # noqa: BLE001 - rendered as an envelope, logged without values
        log.error("request failed", path=request.path, error_type=type(e).__name__)
        err = Unavailable("internal error; see the system-key server log")
        return web.json_response(err.envelope(), status=err.status)


async def get_keyring(request: web.Request) -> web.Response:
    fp, cn = _peer(request)
    remote = request.remote
    state = request.app[STATE_KEY]
    if fp is None:  # unreachable with CERT_REQUIRED; fail closed anyway
        await asyncio.to_thread(state.audit, peer_fingerprint=None, result="denied", remote=remote,
                                reason="no client certificate")
        raise Unauthenticated("a client certificate is required")
    try:
        allowed = await asyncio.to_thread(state.is_allowed, fp)
        ring = await asyncio.to_thread(state.load_keyring) if allowed else None
    except SKMError as e:
        await asyncio.to_thread(state.audit, peer_fingerprint=fp, result="error", remote=remote, subject=cn,
                                reason=e.message)
        log.error("keyring fetch failed", peer_fingerprint=fp, remote=remote, error=str(e))
        raise
    if ring is None:
        await asyncio.to_thread(state.audit, peer_fingerprint=fp, result="denied", remote=remote, subject=cn,
                                reason="not on the allow-list")
        log.warning("keyring fetch refused: certificate not on the allow-list", peer_fingerprint=fp,
                    subject=cn, remote=remote)
        raise Forbidden(f"certificate {fp} is not on this system-key server's allow-list; "
                        f"run `skm systemkey allow {fp}` on the system-key host")
    # Audit before answering: a fetch that cannot be recorded is not served.
    await asyncio.to_thread(state.audit, peer_fingerprint=fp, result="allowed", remote=remote, subject=cn,
                            current=ring.current, versions=sorted(ring.versions))
    log.info("keyring served", peer_fingerprint=fp, subject=cn, remote=remote, system_key_version=ring.current)
    return web.json_response(ring.to_json(), headers={"Cache-Control": "no-store"})


async def _allowed_peer(request: web.Request, what: str) -> str:
    """The fingerprint of an allow-listed key-server certificate; refused (and audited) otherwise."""
    fp, cn = _peer(request)
    state = request.app[STATE_KEY]
    if fp is None:
        raise Unauthenticated("a client certificate is required")
    if not await asyncio.to_thread(state.is_allowed, fp):
        await asyncio.to_thread(state.audit, peer_fingerprint=fp, result="denied", remote=request.remote,
                                subject=cn, reason=f"{what}: not on the allow-list")
        raise Forbidden(f"certificate {fp} is not on this system-key server's allow-list; "
                        f"run `skm systemkey allow {fp}` on the system-key host")
    return fp


async def post_checkpoint(request: web.Request) -> web.Response:
    await _allowed_peer(request, "audit checkpoint")
    if request.content_type != "application/json":
        raise UnsupportedMediaType("send the checkpoint as JSON with Content-Type: application/json")
    try:
        entry = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidJSON("the request body is not valid JSON") from None
    await asyncio.to_thread(request.app[CHECKPOINTS_KEY].append, entry)
    return web.json_response({"stored": True}, status=201)


async def get_checkpoints(request: web.Request) -> web.Response:
    await _allowed_peer(request, "audit checkpoints read")
    pub = request.query.get("pub")
    if pub is not None and len(pub) > 64:
        raise InvalidRequest("pub is a base64 Ed25519 public key")
    found = await asyncio.to_thread(request.app[CHECKPOINTS_KEY].read, pub)
    return web.json_response({"checkpoints": found}, headers={"Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    ok = await asyncio.to_thread(state.exists)
    return web.json_response({"status": "ok" if ok else "uninitialised"}, status=200 if ok else 503)


def make_app(cfg: SystemKeyServerConfig) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=4096)
    app[STATE_KEY] = SystemKeyState(cfg)
    app[CHECKPOINTS_KEY] = CheckpointLog(cfg.data_path)
    app.router.add_get("/v1/keyring", get_keyring, allow_head=False)
    app.router.add_post(CHECKPOINT_PATH, post_checkpoint)
    app.router.add_get(CHECKPOINT_PATH, get_checkpoints, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    return app


async def serve(cfg: SystemKeyServerConfig) -> tuple[web.AppRunner, int]:
    """Start the listener (port 0 picks one); the caller owns runner.cleanup()."""
    state = SystemKeyState(cfg)
    await asyncio.to_thread(state.require)
    ctx = await asyncio.to_thread(server_ssl_context, *cfg.tls_files())
    runner = web.AppRunner(make_app(cfg), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = DeadlineTCPSite(runner, cfg.host, cfg.port, ssl_context=ctx, reuse_address=True,
                               handshake_timeout=cfg.handshake_timeout)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    return runner, port


async def run(cfg: SystemKeyServerConfig) -> None:
    """Serve until cancelled (the CLI runs this under asyncio.run and cancels on SIGINT/SIGTERM)."""
    logs.configure(cfg.log_format, cfg.log_level)
    runner, port = await serve(cfg)
    log.info("system-key server listening", host=cfg.host, port=port, data_dir=str(cfg.data_path))
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        log.info("system-key server stopped")

