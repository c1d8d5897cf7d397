"""The local endpoint apps call: a Unix socket (0660) and optionally 127.0.0.1.

Every client-API path of the key server works, with or without the
`/keymanager/{ver}/appkey/{appkey}` prefix (the sidecar puts in its own
appkey and credentials). Apps hold no credential: credential headers an app
sends anyway are removed and counted (or refused with
`reject_app_credentials`); only Content-Type reaches the key server. On the
socket each caller's uid/gid comes from SO_PEERCRED and an optional allow-list
per key or key store decides; the TCP listener answers 127.0.0.1 only and
requires `X-SKM-Request: 1` so a browser or an SSRF-able service on the host
cannot be steered into it. A TCP caller's uid comes from the kernel's socket
table (sidecar/peer.py) and the same allow-list applies to it (uid rules only:
the table names no groups).

Connections are served by `sidecar.fastpath.LocalConnection`: a plain GET of a
cacheable path (a secret, a public key) is answered by `answer()` below without
aiohttp's request pipeline, the rest by the aiohttp application built here. Both
use the same gate, policy, cache and error envelopes, count the same metrics and
bind the same request id to log lines. The caller's credentials (SO_PEERCRED)
are read once per connection, when it is made.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from server import logs
from server.api import envelope
from server.errors import ConfigError, Forbidden, SKMError, Unavailable, URLNotFound
from server.text import storable
from sidecar import fastpath, reads
from sidecar.peer import tcp_peer_uid
from sidecar.cache import Cache, Result
from sidecar.settings import AccessRule, SidecarConfig
from sidecar.upstream import Upstream, UpstreamUnavailable

log = logs.get("skm.sidecar.local")

ANTI_SSRF_HEADER = "X-SKM-Request"
CREDENTIAL_HEADERS = ("X-TC-AUTHENTICATION-ID", "X-TC-AUTHENTICATION-SECRET", "X-TC-AUTHENTICATION",
                      "X-NHN-Authorization", "Authorization", "X-TOAST-CLIENT-MAC-ADDR")
_PREFIX = re.compile(r"^/keymanager/(v1\.[0-3])/appkey/[A-Za-z0-9_-]{1,64}(/.*)?$")
_SAFE = re.compile(r"^(/[A-Za-z0-9_.\-]+)+$")
_KEY = re.compile(r"^/(?:secrets|symmetric-keys|asymmetric-keys|keys)/([0-9a-f]{32})(?:/|$)")
_STORE = re.compile(r"^/keystores/(\d{1,12})(?:/keys/([0-9a-f]{32}))?(?:/|$)")
CALLER = web.RequestKey("skm_sidecar_caller", object) if hasattr(web, "RequestKey") else "skm_sidecar_caller"
_CACHEABLE = re.compile(r"^/(?:secrets/[0-9a-f]{32}|asymmetric-keys/[0-9a-f]{32}/publicKey)$")
# Reads of a key's value that go straight upstream (exports): recorded for the audit like cached ones.
_VALUE_READ = re.compile(r"^/(?:symmetric-keys/[0-9a-f]{32}/symmetric-key|asymmetric-keys/[0-9a-f]{32}/privateKey)$")
_SOURCE = {"hit": reads.CACHE, "stale": reads.CACHE, "miss": reads.UPSTREAM}
_now = time.time
_CREDENTIALS_LOWER = tuple(h.lower().encode() for h in CREDENTIAL_HEADERS)


@dataclass(frozen=True)
class Caller:
    transport: str                   # unix | tcp
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    groups: frozenset[int] = frozenset()
    exe: str | None = None           # the caller's executable, read once per connection (for the read log)


def peer_of(request: web.Request) -> Caller:
    return caller_of(request.transport)


def caller_of(transport, groups: bool = True) -> Caller:
    """Who is on the other end: SO_PEERCRED (fixed when the peer connected) for the Unix socket.
    `groups` reads the peer's supplementary groups from /proc (only the allow-list needs them)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        raise Forbidden("the caller went away")
    if sock.family != socket.AF_UNIX:
        try:
            uid = tcp_peer_uid(sock.family, sock.getpeername(), sock.getsockname())
        except OSError:                  # not connected any more
            uid = None
        return Caller("tcp", uid)
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    return Caller("unix", uid, gid, pid, frozenset({gid, *(_supplementary_groups(pid) if groups else ())}),
                  _executable(pid))


def _executable(pid: int) -> str | None:
    """/proc/<pid>/exe; a sidecar that may not read it (another user's process, no CAP_SYS_PTRACE) falls back to
    argv[0] from /proc/<pid>/cmdline, which anyone may read. A byte of the path that is not UTF-8 is written
    `\\xff` (`storable`): kept as Python's lone surrogate it made the key server refuse the whole read report,
    every program's reads in it, so any local user could keep reads out of the audit."""
    try:
        return storable(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read(4096).split(b"\0", 1)[0]
        return storable(argv0.decode("utf-8", "surrogateescape")) or None
    except OSError:
        return None


def _supplementary_groups(pid: int) -> set[int]:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    return set()


@dataclass(frozen=True)
class Target:
    version: str
    suffix: str
    key_id: str | None
    keystore_id: int | None


def parse_path(path: str, default_version: str) -> Target:
    m = _PREFIX.match(path)
    version, suffix = (m.group(1), m.group(2) or "") if m else (default_version, path)
    if not _SAFE.match(suffix) or any(seg in (".", "..") for seg in suffix.split("/")):
        raise URLNotFound("no such endpoint; use a client-API path such as /secrets/{keyId}")
    if suffix == "/events":
        raise URLNotFound("the event stream is the sidecar's own")
    if suffix.startswith("/sidecar/"):
        # The sidecar's own reports (acks, read records) travel with its host certificate: an app must not
        # be able to write them through it.
        raise URLNotFound("the sidecar report endpoints are the sidecar's own")
    km, sm = _KEY.match(suffix), _STORE.match(suffix)
    key_id = km.group(1) if km else (sm.group(2) if sm and sm.group(2) else None)
    return Target(version, suffix, key_id, int(sm.group(1)) if sm else None)


class Policy:
    """The optional allow-list: which local uids/gids may use a key or the keys of a key store."""

    def __init__(self, rules: list[AccessRule], default: str, upstream: Upstream, version: str,
                 ttl: float = 30.0) -> None:
        self.key_rules: dict[str, list[AccessRule]] = {}
        self.store_rules: dict[int, list[AccessRule]] = {}
        for r in rules:
            if r.kind == "key":
                self.key_rules.setdefault(r.target, []).append(r)
            else:
                self.store_rules.setdefault(int(r.target), []).append(r)
        self.default = default
        self.upstream = upstream
        self.version = version
        self.ttl = ttl
        self._members: dict[int, tuple[frozenset[str], float]] = {}

    def forget(self, keystore_id: int | None) -> None:
        if keystore_id is None:
            self._members.clear()
        else:
            self._members.pop(keystore_id, None)

    async def _store_keys(self, sid: int) -> frozenset[str]:
        cached = self._members.get(sid)
        if cached is not None and time.monotonic() - cached[1] < self.ttl:
            return cached[0]
        try:
            resp = await self.upstream.request("GET", self.version, f"/keystores/{sid}/keys")
        except UpstreamUnavailable:
            resp = None
        if resp is not None and resp.status == 200:
            ids = frozenset((json.loads(resp.body).get("body") or {}).get("keyIdList") or ())
            self._members[sid] = (ids, time.monotonic())
            return ids
        if cached is not None:
            return cached[0]
        # Fail closed: a rule we cannot evaluate must not fall through to the default.
        raise Unavailable("cannot check the local access rules: the key server did not list the key store's keys")

    def _fresh_keys(self, sid: int) -> frozenset[str] | None:
        cached = self._members.get(sid)
        if cached is not None and time.monotonic() - cached[1] < self.ttl:
            return cached[0]
        return None

    def _rules(self, t: Target, members: dict[int, frozenset[str]]) -> list[AccessRule]:
        rules = list(self.key_rules.get(t.key_id, ())) if t.key_id else []
        if t.keystore_id is not None:
            rules += self.store_rules.get(t.keystore_id, ())
        if t.key_id:
            for sid, srules in self.store_rules.items():
                if sid != t.keystore_id and t.key_id in members[sid]:
                    rules += srules
        return rules

    def _decide(self, caller: Caller, rules: list[AccessRule]) -> None:
        if not rules:
            if self.default == "allow":
                return
            raise Forbidden("no local access rule grants this caller that key")
        if caller.uid is None:
            raise Forbidden("this key is limited to listed local users and the caller's user is unknown: "
                            "call over the Unix socket")
        if any(caller.uid in r.uids or (caller.groups & r.gids) for r in rules):
            return
        raise Forbidden("this local user is not on the allow-list for that key")

    def _stores_to_ask(self, t: Target) -> list[int]:
        return [sid for sid in self.store_rules if sid != t.keystore_id] if t.key_id else []

    def allows_now(self, caller: Caller, t: Target) -> bool:
        """True when `check` would pass without asking the key server; False: call `check`."""
        members = {}
        for sid in self._stores_to_ask(t):
            keys = self._fresh_keys(sid)
            if keys is None:
                return False
            members[sid] = keys
        try:
            self._decide(caller, self._rules(t, members))
        except Forbidden:
            return False
        return True

    async def check(self, caller: Caller, t: Target) -> None:
        members = {sid: await self._store_keys(sid) for sid in self._stores_to_ask(t)}
        self._decide(caller, self._rules(t, members))


@dataclass
class LocalAPI:
    cfg: SidecarConfig
    upstream: Upstream
    cache: Cache
    attestor: object
    metrics: object
    events: object = None
    policy: Policy | None = None
    read_log: reads.ReadLog | None = None                # records each local read for the key server's audit
    acks: object = None                                   # sidecar.acks.Acks (status only)
    started: float = field(default_factory=time.monotonic)
    tcp_port: int | None = None
    credential_requests: int = 0
    connections: dict = field(default_factory=dict)      # transport -> fastpath.LocalConnection
    _runners: list[web.AppRunner] = field(default_factory=list)
    _servers: list[asyncio.AbstractServer] = field(default_factory=list)
    _reaper: asyncio.Task | None = None
    _logged: set = field(default_factory=set)
    _targets: dict = field(default_factory=dict)         # raw path -> Target | None (not cacheable)
    routes: list = field(default_factory=list)           # (method, path, handler): the sidecar's own, e.g. /v1/watch
    reporters: dict = field(default_factory=dict)        # name -> .status() (in /v1/status), .problem() (/healthz)

    fast_hits: int = 0                                    # answered by the fast path, not yet in metrics
    _note_hit: object = None                              # read_log.note, bound once (hot path)

    def __post_init__(self) -> None:
        self.metrics.pending.append(self._export_hits)
        if self.read_log is not None:
            self._note_hit = self.read_log.note

    def _export_hits(self) -> None:
        n, self.fast_hits = self.fast_hits, 0
        if n:
            self.metrics.requests.labels("proxy", "200").inc(n)

    # ------------------------------------------------------------ app
    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.listen.max_body_bytes, middlewares=[self._edge])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/metrics", self.prometheus)
        for method, path, handler in self.routes:
            app.router.add_route(method, path, handler)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        return app

    @web.middleware
    async def _edge(self, request: web.Request, handler):
        """Request id, the request counter, error envelopes and the gate, in that order (outside in)."""
        rid = request.headers.get("X-Request-Id", "")
        if not (0 < len(rid) <= 64 and rid.replace("-", "").isalnum()):
            rid = os.urandom(16).hex()
        logs.bind_request_id(rid)
        try:
            self._gate(request)
            resp = await handler(request)
        except SKMError as e:
            resp = self._refused(e, request.rel_url.path)
        except web.HTTPException as e:
            err = envelope.from_http(e)
            if err is None:
                raise
            resp = envelope.error_response(err)
        except Exception:
            log.exception("request_failed", path=request.rel_url.path)
            resp = envelope.internal_error_response()
        path = request.path
        kind = path.strip("/").replace("v1/", "") if path in ("/healthz", "/v1/status", "/metrics") else "proxy"
        self.metrics.requests.labels(kind, str(resp.status)).inc()
        resp.headers["X-Request-Id"] = rid
        return resp

    @staticmethod
    def _refused(e: SKMError, path: str) -> web.Response:
        log.info("request_refused", status=e.status, result=e.message, path=path)
        return envelope.error_response(e)

    def _gate(self, request: web.Request) -> None:
        """Who may talk to the sidecar at all (before any route)."""
        conn = self.connections.get(request.transport)
        caller = conn.caller if conn is not None and conn.caller is not None else peer_of(request)
        if caller.transport == "tcp":
            if request.remote != "127.0.0.1":
                self.metrics.denials.labels("tcp_remote").inc()
                raise Forbidden("the sidecar answers 127.0.0.1 only")
            if request.headers.get(ANTI_SSRF_HEADER) != "1":
                self.metrics.denials.labels("anti_ssrf").inc()
                raise Forbidden(f"requests over TCP must carry the header {ANTI_SSRF_HEADER}: 1")
        request[CALLER] = caller

    async def healthz(self, _request: web.Request) -> web.Response:
        problems = {name: p for name, r in self.reporters.items() if (p := r.problem())}
        if problems:
            return web.json_response({"status": "degraded", "problems": problems}, status=503)
        return web.json_response({"status": "ok"})

    async def status(self, _request: web.Request) -> web.Response:
        now = time.monotonic()
        return web.json_response({
            "upstream": {"reachable": self.upstream.reachable, "requestsSent": self.upstream.sent,
                         "servers": [{"url": t.url, "address": t.address or None, "healthy": t.healthy(now),
                                      "failures": t.failures,
                                      "lastError": t.last_error} for t in self.upstream.targets]},
            "attestation": {"mac": getattr(self.attestor, "mac", None),
                            "interface": getattr(self.attestor, "iface", None),
                            "error": getattr(self.attestor, "error", None)},
            "certificate": {"notAfter": self.upstream.cert_expiry()},
            "cache": self.cache.stats(),
            "stream": self.events.status() if self.events is not None else {"state": "disabled"},
            "appCredentialRequests": self.credential_requests,
            "reads": self.read_log.status() if self.read_log is not None else {"state": "disabled"},
            "acks": self.acks.status() if self.acks is not None else {"state": "disabled"},
            "uptimeSeconds": round(now - self.started, 1),
            **{name: r.status() for name, r in self.reporters.items()},
        })

    async def prometheus(self, _request: web.Request) -> web.Response:
        return self.metrics.render()

    # ------------------------------------------------------------ the proxy
    def _app_credentials(self, request: web.Request, caller: Caller) -> None:
        sent = [h for h in CREDENTIAL_HEADERS if h in request.headers]
        if not sent:
            return
        self.credential_requests += 1
        action = "refused" if self.cfg.reject_app_credentials else "stripped"
        for h in sent:
            self.metrics.app_credentials.labels(h.lower(), action).inc()
        mark = (caller.uid, caller.pid, tuple(sent))
        if mark not in self._logged:          # once per process and header set: a hint, not a flood
            if len(self._logged) < 10_000:
                self._logged.add(mark)
            log.warning("app_sent_credentials", headers=sent, uid=caller.uid, pid=caller.pid, action=action,
                        hint="this app holds credentials it does not need behind the sidecar; remove them")
        if self.cfg.reject_app_credentials:
            raise Forbidden("this sidecar refuses requests carrying credentials; remove the "
                            f"{', '.join(sent)} header(s): the sidecar authenticates for you")

    async def _check_policy(self, caller: Caller, t: Target) -> None:
        if self.policy is None:
            return
        try:
            await self.policy.check(caller, t)
        except Forbidden:
            self.metrics.denials.labels("allow_list").inc()
            log.info("local_caller_refused", uid=caller.uid, key_id=t.key_id, keystore_id=t.keystore_id)
            raise

    async def _fetch(self, t: Target, query: str):
        resp = await self.upstream.request("GET", t.version, t.suffix, query=query)
        if resp.status == 200 and resp.version is None:
            resp.version = reads.version_of(None, resp.body)      # public/private key bodies say keyVersion
        return resp

    def _note_read(self, who, t: Target, version: int | None, source: str) -> None:
        if self.read_log is not None and t.key_id:
            self.read_log.note((who, reads.Ref(t.key_id, version, reads.tag_of(t.suffix) or ""),
                                source, time.time()))

    async def _read_cached(self, t: Target, query: str, who=None) -> tuple[Result, dict[str, str]]:
        """A cacheable read through the cache; the answer and its cache headers. `who` (the connection or
        caller) is recorded in the read log when the read succeeds."""
        ckey = f"{t.version} {t.suffix}?{query}"
        res = await self.cache.get(ckey, t.key_id, lambda: self._fetch(t, query), reads.tag_of(t.suffix) or "")
        if res.status == 200 and who is not None:
            self._note_read(who, t, res.version, _SOURCE.get(res.source, reads.UPSTREAM))
        headers = {"X-SKM-Cache": res.source}
        if res.source in ("hit", "stale"):
            headers["Age"] = str(int(res.age))
        if res.source == "stale":
            headers["X-SKM-Stale"] = f"true; age={int(res.age)}"
            headers["Warning"] = '110 - "Response is Stale"'
        return res, headers

    async def proxy(self, request: web.Request) -> web.Response:
        caller: Caller = request[CALLER]
        self._app_credentials(request, caller)
        t = parse_path(request.path, self.cfg.upstream.api_version)
        await self._check_policy(caller, t)
        query = request.rel_url.raw_query_string
        conn = self.connections.get(request.transport)
        who = conn if conn is not None and conn.caller is not None else caller
        if request.method == "GET" and _CACHEABLE.match(t.suffix):
            res, headers = await self._read_cached(t, query, who)
            return _response(res.status, res.body, res.content_type, headers)
        body = await request.read() if request.can_read_body else None
        resp = await self.upstream.request(request.method, t.version, t.suffix, query=query, body=body,
                                           content_type=request.headers.get("Content-Type") if body else None)
        if request.method == "GET" and resp.status == 200 and _VALUE_READ.match(t.suffix):
            self._note_read(who, t, resp.version if resp.version is not None else reads.version_of(None, resp.body),
                            reads.UPSTREAM)
        if request.method in ("PUT", "DELETE") and t.key_id and 200 <= resp.status < 300:
            self.cache.drop_key(t.key_id)       # a write through the sidecar: our copy is out of date
        return _response(resp.status, resp.body, resp.content_type, {"X-SKM-Cache": "bypass"})

    # ------------------------------------------------------------ the fast path (sidecar.fastpath)
    def identify(self, transport, kind: str) -> tuple[Caller, bool]:
        """The connection's caller, once; and for TCP whether the peer is 127.0.0.1."""
        caller = caller_of(transport, groups=self.policy is not None)
        local = kind == "unix" or (transport.get_extra_info("peername") or ("",))[0] == "127.0.0.1"
        return caller, local

    def _cacheable(self, path: str) -> Target | None:
        try:
            return self._targets[path]
        except KeyError:
            pass
        try:
            t = parse_path(path, self.cfg.upstream.api_version)
        except URLNotFound:
            t = None
        if t is not None and not _CACHEABLE.match(t.suffix):
            t = None
        if len(self._targets) < 4096:
            self._targets[path] = t
        return t

    def answer(self, conn, head: fastpath.Head):
        """A plain GET on a connection: the response bytes (a fresh hit), an awaitable of them (anything
        else the cacheable route answers), or None: aiohttp's pipeline must answer it."""
        h = head.headers
        if conn.kind == "tcp" and (not conn.local or h.get(b"x-skm-request") != b"1"):
            return None                          # refused by the gate: aiohttp renders and counts it
        for name in _CREDENTIALS_LOWER:
            if name in h:
                return None
        t = self._cacheable(head.path)
        if t is None:
            return None
        rid = fastpath.request_id(h)
        if rid is None:
            return None
        if self.policy is None or self.policy.allows_now(conn.caller, t):
            hit = self.cache.peek(f"{t.version} {t.suffix}?{head.query}")
            if hit is not None:
                e, age = hit
                self.fast_hits += 1
                note = self._note_hit
                if note is not None:                 # one tuple per hit; sidecar/reads.py does the rest later
                    note((conn, e, "cache", _now()))
                if e.wire:
                    return fastpath.encode_hit(e.wire, age, rid, head)
                return fastpath.encode_response(200, [("X-SKM-Cache", "hit"), ("Age", str(int(age))),
                                                      ("Content-Type", e.content_type or "application/json"),
                                                      ("Cache-Control", "no-store")], e.body, rid, head)
        return self._answer_later(conn.caller, t, head, rid, conn)

    async def _answer_later(self, caller: Caller, t: Target, head: fastpath.Head, rid: str, conn=None) -> bytes:
        logs.bind_request_id(rid)
        headers: list[tuple[str, str]]
        try:
            await self._check_policy(caller, t)
            res, cache_headers = await self._read_cached(t, head.query, conn if conn is not None else caller)
            status, body = res.status, res.body
            headers = [*cache_headers.items(), ("Content-Type", res.content_type or "application/json"),
                       ("Cache-Control", "no-store")]
        except SKMError as e:
            log.info("request_refused", status=e.status, result=e.message, path=head.path)
            status, body, headers = e.status, envelope.dumps(e.envelope()).encode(), [("Content-Type", envelope.JSON_UTF8)]
        except Exception:
            log.exception("request_failed", path=head.path)
            status, body, headers = 500, envelope.dumps(envelope.INTERNAL).encode(), [("Content-Type", envelope.JSON_UTF8)]
        self.metrics.requests.labels("proxy", str(status)).inc()
        return fastpath.encode_response(status, headers, body, rid, head)

    def make_handler(self):
        """aiohttp's protocol for a connection the fast path hands over."""
        return self._runners[0].server()

    # ------------------------------------------------------------ listeners
    async def start(self) -> None:
        runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False, shutdown_timeout=2)
        await runner.setup()
        self._runners.append(runner)
        loop = asyncio.get_running_loop()
        await self._unix_site(loop)
        if self.cfg.listen.tcp_port >= 0:
            srv = await loop.create_server(lambda: fastpath.LocalConnection(self, "tcp"), "127.0.0.1",
                                           self.cfg.listen.tcp_port, backlog=128, reuse_address=True)
            self._servers.append(srv)
            self.tcp_port = srv.sockets[0].getsockname()[1]
        self._reaper = asyncio.create_task(self._reap_idle(), name="sidecar-idle-connections")

    async def _unix_site(self, loop) -> None:
        path = Path(self.cfg.listen.socket)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
            if await _socket_alive(path):
                raise ConfigError(f"another process is serving {path}; stop it or choose another listen.socket")
            path.unlink()                      # a stale socket left by a previous run
        old = os.umask(0o117)                  # born 0660: no window where others may connect
        try:
            srv = await loop.create_unix_server(lambda: fastpath.LocalConnection(self, "unix"), str(path),
                                                backlog=128)
        finally:
            os.umask(old)
        self._servers.append(srv)
        gid = self.cfg.socket_gid()
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, 0o660)

    async def _reap_idle(self) -> None:
        """Close fast-path connections idle past aiohttp's keep-alive timeout (aiohttp closes its own)."""
        while True:
            await asyncio.sleep(fastpath.IDLE_TIMEOUT / 5)
            now = time.monotonic()
            for conn in [c for c in self.connections.values() if c.idle_for(now) > fastpath.IDLE_TIMEOUT]:
                conn.transport.close()

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(BaseException):
                await self._reaper
            self._reaper = None
        servers, self._servers = self._servers, []
        for srv in servers:
            srv.close()
        for conn in list(self.connections.values()):
            if conn.inner is None:             # aiohttp's own are shut down (gracefully) by the runner
                if conn.task is not None:
                    conn.task.cancel()
                conn.transport.close()
        for r in self._runners:
            await r.cleanup()
        self._runners.clear()
        for srv in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2)
        with contextlib.suppress(FileNotFoundError):
            p = Path(self.cfg.listen.socket)
            if stat.S_ISSOCK(p.lstat().st_mode):
                p.unlink()


def _response(status: int, body: bytes, content_type: str, headers: dict[str, str]) -> web.Response:
    resp = web.Response(body=body, status=status, headers=headers)
    resp.content_type = content_type or "application/json"
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def _socket_alive(path: Path) -> bool:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 0.5)
    except (OSError, asyncio.TimeoutError):
        return False
    w.close()
    with contextlib.suppress(Exception):
        await w.wait_closed()
    return True
