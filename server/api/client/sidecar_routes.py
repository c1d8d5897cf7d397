"""Client API, sidecars only: version acknowledgements (the roll-out) and local-read reports (the audit).

`POST {prefix}/sidecar/acks`: the versions a sidecar host holds, per key (server/keys/rollout.py).
`POST {prefix}/sidecar/reads`: the reads its local apps made (cache hits included), appended to the
hash-chained audit as plane `sidecar`, actor the host (docs/audit.md).

The host is the client certificate of this connection (required). Its project is the appkey's; a
record naming a key of another project (or one that no longer exists) is refused, and so is one
whose key store's client checks (IPv4 / MAC / certificate) this connection does not pass. Refused
records are listed in the answer and counted in the request's own audit record; when none is
accepted the whole batch is refused with the first reason. Batches are bounded in count (and in
bytes by the server's body limit). Apps cannot reach these routes through a sidecar: its local API
refuses the `/sidecar/` paths (sidecar/local_api.py).
"""
from __future__ import annotations

import datetime as dt
import hmac
from collections import OrderedDict
from typing import Literal, Optional

from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ConfigDict, Field

from server import logs, timeutil
from server.access.pki import macs_of, normalize_mac
from server.api.client.context import PREFIX, ClientContext, authorize_keystore, client_context
from server.api.routing import RouteTable
from server.audit import AUDIT_DETAIL
from server.errors import CertificateAuthFailure, Forbidden, InvalidRequest, SKMError
from server.keys import rollout
from server.keys.model import Key, KeyStore
from server.runtime import runtime

log = logs.get("skm.sidecar_routes")
routes = RouteTable(PREFIX)

MAX_ACKS = 1000
MAX_READS = 1000
_KEY_ID = r"^[0-9a-f]{32}$"
_EPOCH_MIN = 946_684_800.0            # 2000-01-01: a read time before this is a broken clock
_CLOCK_SKEW = 86_400.0                # ... and one more than a day ahead of ours too
# What the app read -> the audit action of the sidecar record (the data plane's names for the same reads).
ACTIONS = {"secret": "secret.read", "publicKey": "publickey.read", "privateKey": "key.export",
           "symmetricKey": "key.export"}
DROPPED_ACTION = "sidecar.reads-dropped"
_SEEN_MAX = 4096                      # recent batch ids kept per process: a retried batch is not appended twice


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HoldingIn(_In):
    keyId: str = Field(pattern=_KEY_ID)
    version: int = Field(ge=0, le=2**31 - 1)
    deliveredAt: Optional[float] = None          # the sidecar's clock, seconds since the epoch
    reloadOk: Optional[bool] = None              # None: no reload action for this key


class AcksIn(_In):
    ttl: int = Field(ge=rollout.MIN_TTL, le=rollout.MAX_TTL)
    holdings: list[HoldingIn] = Field(max_length=MAX_ACKS)
    # True: this is everything the host holds in the project (its rows for other keys are dropped).
    complete: bool = False


class ReadIn(_In):
    keyId: str = Field(pattern=_KEY_ID)
    what: Literal["secret", "publicKey", "privateKey", "symmetricKey"]
    version: Optional[int] = Field(default=None, ge=0, le=2**31 - 1)
    uid: Optional[int] = Field(default=None, ge=0, le=2**32 - 1)
    pid: Optional[int] = Field(default=None, ge=0, le=2**32 - 1)
    exe: Optional[str] = Field(default=None, max_length=512)
    source: Literal["cache", "upstream"]
    readAt: float
    count: int = Field(default=1, ge=1, le=10**9)          # > 1: a burst of identical reads, one record
    lastReadAt: Optional[float] = None


class DroppedIn(_In):
    count: int = Field(ge=1, le=10**12)
    since: Optional[float] = None
    until: Optional[float] = None
    reason: Literal["buffer_full", "unreadable_spool"] = "buffer_full"


class ReadsIn(_In):
    batchId: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    reads: list[ReadIn] = Field(default_factory=list, max_length=MAX_READS)
    dropped: Optional[DroppedIn] = None


class Refused(BaseModel):
    index: int
    reason: str


class BatchOut(BaseModel):
    accepted: int
    refused: list[Refused]
    duplicate: bool = False


# ------------------------------------------------------------------ the host
def host_of(ctx: ClientContext) -> rollout.Host:
    """The sidecar host: its certificate (required), the certificate's name, the MAC it attests."""
    if ctx.cert_der is None or ctx.fingerprint is None:
        raise CertificateAuthFailure("these routes are for sidecars: connect with a host certificate issued by "
                                     "this server's CA")
    cert = x509.load_der_x509_certificate(ctx.cert_der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else ctx.fingerprint[:16]
    mac = None
    if ctx.mac_header:
        try:
            claim = normalize_mac(ctx.mac_header)
        except ValueError:
            claim = None
        if claim is not None and any(hmac.compare_digest(claim, m) for m in macs_of(cert)):
            mac = claim
    return rollout.Host(ctx.fingerprint, name, mac)


class _Admission:
    """Per batch: each key resolved once in the caller's project, each key store's checks run once."""

    def __init__(self, request: web.Request, ctx: ClientContext) -> None:
        self.request, self.ctx, self.rt = request, ctx, runtime(request)
        self._keys: dict[str, Key | SKMError] = {}
        self._stores: dict[int, SKMError | None] = {}

    async def key(self, key_id: str) -> Key:
        found = self._keys.get(key_id)
        if found is None:
            try:
                found = await self.rt.keys.key(key_id, project_id=self.ctx.project.id)
                await self._store_ok(found.keystore_id)
            except SKMError as e:
                found = e
            self._keys[key_id] = found
        if isinstance(found, SKMError):
            raise found
        return found

    async def _store_ok(self, keystore_id: int) -> None:
        if keystore_id not in self._stores:
            try:
                await authorize_keystore(self.request, self.ctx, await self.rt.keys.keystore(keystore_id))
                self._stores[keystore_id] = None
            except SKMError as e:
                self._stores[keystore_id] = e
        err = self._stores[keystore_id]
        if err is not None:
            raise err

    async def any_store(self) -> KeyStore:
        """A batch that names no key (a drop report): the host must pass some key store of the project."""
        first: SKMError | None = None
        for ks in await self.rt.keys.keystores(self.ctx.project.id):
            try:
                await self._store_ok(ks.id)
                return ks
            except SKMError as e:
                first = first or e
        raise first or Forbidden("this project has no key store whose checks this host could pass")


def _reason(e: SKMError) -> str:
    return e.message + (f": {e.detail}" if e.detail else "")


def _when(t: float | None, what: str) -> str | None:
    if t is None:
        return None
    now = timeutil.now().timestamp()
    if not (_EPOCH_MIN <= t <= now + _CLOCK_SKEW):
        raise InvalidRequest(f"{what} must be a time in seconds since the epoch, not in the far past or future")
    return timeutil.to_db(dt.datetime.fromtimestamp(t, dt.timezone.utc))


def _finish(request: web.Request, accepted: int, refused: list[dict], errors: list[SKMError]) -> dict:
    request[AUDIT_DETAIL] = {"accepted": accepted, "refused": len(refused)}
    if refused and not accepted:
        raise errors[0]                       # nothing usable: the batch is refused as a whole, nothing changed
    if refused:
        log.info("sidecar_records_refused", accepted=accepted, refused=len(refused), first=refused[0]["reason"])
    return {"accepted": accepted, "refused": refused[:100], "duplicate": False}


# ------------------------------------------------------------------ routes
@routes.route("POST", "/sidecar/acks", summary="Sidecars: acknowledge the key versions this host holds "
              "(requires a host certificate)", body=AcksIn, response=BatchOut, tags=("sidecar",))
async def acks(request: web.Request, body: AcksIn) -> dict:
    ctx = await client_context(request)
    host = host_of(ctx)
    adm = _Admission(request, ctx)
    good: list[rollout.Ack] = []
    refused: list[dict] = []
    errors: list[SKMError] = []
    if not body.holdings:
        await adm.any_store()                  # a heartbeat with nothing held still proves who calls
    for i, h in enumerate(body.holdings):
        delivered = _when(h.deliveredAt, f"holdings[{i}].deliveredAt")
        try:
            key = await adm.key(h.keyId)
            if h.version > key.current_version:
                raise InvalidRequest(f"key {key.id} has no version {h.version} yet")
        except SKMError as e:
            refused.append({"index": i, "reason": _reason(e)})
            errors.append(e)
            continue
        good.append(rollout.Ack(key.id, h.version, delivered, h.reloadOk))
    if good or body.complete:
        await rollout.record(runtime(request).storage, ctx.project.id, host, good, body.ttl,
                             complete=body.complete, reported={h.keyId for h in body.holdings})
    return _finish(request, len(good), refused, errors)


@routes.route("POST", "/sidecar/reads", summary="Sidecars: report local reads (cache hits included) for the "
              "audit log (requires a host certificate)", body=ReadsIn, response=BatchOut, tags=("sidecar",))
async def reads(request: web.Request, body: ReadsIn) -> dict:
    ctx = await client_context(request)
    host = host_of(ctx)
    rt = runtime(request)
    if rt.audit is None:
        from server.errors import Unavailable
        raise Unavailable("the audit log is not available on this server")
    seen: OrderedDict[str, None] = rt.extra.setdefault("sidecar_read_batches", OrderedDict())
    batch_key = f"{host.fingerprint}:{body.batchId}"
    if batch_key in seen:
        request[AUDIT_DETAIL] = {"duplicateBatch": body.batchId}
        return {"accepted": 0, "refused": [], "duplicate": True}
    adm = _Admission(request, ctx)
    base = {"plane": "sidecar", "actor": host.name[:200], "actor_kind": "host", "ip": ctx.peer_ip or None,
            "fingerprint": host.fingerprint, "mac": host.mac or (ctx.mac_header or None) and ctx.mac_header[:64],
            "method": None, "route": None, "project_id": ctx.project.id, "change": 0, "status": None}
    records: list[dict] = []
    refused: list[dict] = []
    errors: list[SKMError] = []
    for i, r in enumerate(body.reads):
        read_at = _when(r.readAt, f"reads[{i}].readAt")
        last = _when(r.lastReadAt, f"reads[{i}].lastReadAt")
        try:
            key = await adm.key(r.keyId)
        except SKMError as e:
            refused.append({"index": i, "reason": _reason(e)})
            errors.append(e)
            continue
        detail = {"uid": r.uid, "pid": r.pid, "exe": r.exe, "version": r.version, "source": r.source,
                  "readAt": read_at, "host": host.name[:200], "batch": body.batchId}
        if r.count > 1:
            detail.update(count=r.count, lastReadAt=last)
        records.append({**base, "action": ACTIONS[r.what], "keystore_id": key.keystore_id, "key_id": key.id,
                        "result": "ok", "reason": None, "detail": detail})
    if body.dropped is not None:
        d = body.dropped
        if not body.reads:
            await adm.any_store()
        why = ("its buffer was full" if d.reason == "buffer_full"
               else "its on-disk buffer could not be opened (sealed under another host key, or damaged)")
        records.append({**base, "action": DROPPED_ACTION, "keystore_id": None, "key_id": None, "result": "error",
                        "reason": f"the sidecar lost {d.count} read record(s): {why}",
                        "detail": {"count": d.count, "since": _when(d.since, "dropped.since"),
                                   "until": _when(d.until, "dropped.until"), "host": host.name[:200],
                                   "cause": d.reason, "batch": body.batchId}})
    if records:
        await append_many(rt.audit, records)
        seen[batch_key] = None
        while len(seen) > _SEEN_MAX:
            seen.popitem(last=False)
    return _finish(request, len(records), refused, errors)


async def append_many(audit, records: list[dict]) -> None:
    """One group commit, order kept; nothing when the audit log is switched off ([audit] enabled = false)."""
    if audit.settings.enabled:
        await audit.append_many(records)
