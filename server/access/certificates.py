"""Client certificates the server issues to key stores (NHN "auths/certificates").

The server's CA (the dev PKI in the data dir) issues the certificate; its
SHA-256 fingerprint is what the data plane matches a presented certificate
against (server/access/clientauth.py). The password and the PKCS#12 bundle are
sealed by the barrier, AAD = sealed_aad(table, column, id). Life cycle as for IPv4/MAC
entries: ACTIVE -> SCHEDULED_DELETION (cancellable) -> deleted.

Inventory never returns the password: NHN's §4.9 does, this server answers a
fixed mask in that field (the password is the operator's to keep; the bundle is
downloaded from the management API only).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import re

from cryptography.hazmat.primitives.serialization import Encoding

from server import logs, timeutil
from server.access.changes import ChangeGate, op
from server.access.pki import DevPKI, fingerprint, pkcs12_bundle
from server.access.seal import AccessSeal
from server.barrier.barrier import Barrier, record_aad, sealed_aad
from server.errors import BarrierError, Conflict, InvalidRequest, NotFound
from server.events import Event, EventBus
from server.keys.model import KeyStore
from server.storage.base import Storage

log = logs.get("skm.certificates")

TABLE = "auth_certificates"
PASSWORD_MASK = "********"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MIN_PASSWORD, MAX_PASSWORD = 6, 128       # keytool refuses PKCS#12 passwords under 6 characters
MAX_LIFETIME_DAYS = 3650
KEYSTORE_URI = "urn:skm:keystore:"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequest("certificate name: 1 to 100 of A-Z a-z 0-9 . _ - (starting with a letter or digit)")
    return name


def check_password(password: str) -> str:
    if not isinstance(password, str) or not (MIN_PASSWORD <= len(password) <= MAX_PASSWORD):
        raise InvalidRequest(f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


def check_lifetime(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not (1 <= days <= MAX_LIFETIME_DAYS):
        raise InvalidRequest(f"lifeTime must be a whole number of days from 1 to {MAX_LIFETIME_DAYS}")
    return days


def to_api(row: dict, intact: bool = True) -> dict:
    """NHN §4.9 certificate object; `password` is masked (see the module docstring); `status` is INVALID
    for a row that fails its seal (it admits nobody)."""
    return {
        "name": row["name"], "password": PASSWORD_MASK, "description": row["description"],
        "status": row["status"] if intact else "INVALID", "fingerprint": row["fingerprint"],
        "serialNumber": row["serial"],
        "expirationDate": timeutil.to_api(row["expires_at"]),
        "lastAccessDatetime": timeutil.to_api(row["last_access_at"]),
        "deletionDatetime": timeutil.to_api(row["deletion_at"]),
        "creationUser": row["created_by"], "creationDatetime": timeutil.to_api(row["created_at"]),
        "lastChangeUser": row["updated_by"], "lastChangeDatetime": timeutil.to_api(row["updated_at"]),
    }


class Certificates:
    def __init__(self, storage: Storage, barrier: Barrier, events: EventBus, pki: DevPKI, seal: AccessSeal,
                 grace_days: int = 7) -> None:
        self.db = storage
        self.barrier = barrier
        self.seal = seal              # certificate rows are sealed (server/access/seal.py)
        self.events = events
        self.pki = pki
        self.grace_days = grace_days

    # -- issue ----------------------------------------------------------------
    def _issue(self, ks: KeyStore, name: str, password: str, days: int) -> tuple[bytes, bytes]:
        """(DER certificate, PKCS#12 bundle); blocking: runs in a thread."""
        ca = self.pki.load_ca()
        cert, key = ca.issue(name, client=True, uris=[f"{KEYSTORE_URI}{ks.id}"], days=days)
        return cert.public_bytes(Encoding.DER), pkcs12_bundle(name, cert, key, ca.cert, password)

    async def create(self, ks: KeyStore, name: str, password: str, life_days: int, description: str = "",
                     *, actor: str) -> dict:
        check_name(name), check_password(password), check_lifetime(life_days)
        if len(description or "") > 1000:
            raise InvalidRequest("description must be at most 1000 characters")
        if await self.db.fetchval(f"SELECT id FROM {TABLE} WHERE keystore_id = ? AND name = ?", ks.id, name):
            raise Conflict("a certificate with that name exists in this key store")
        der, bundle = await asyncio.to_thread(self._issue, ks, name, password, life_days)
        from cryptography import x509
        cert = x509.load_der_x509_certificate(der)
        now = timeutil.now_db()
        await self.seal.key()         # before the transaction: loading it may seal rows in one of its own
        try:
            async with self.db.transaction() as tx:
                # The AAD names the row id, known only after the insert: seal in the same transaction.
                row = await tx.fetchone(
                    f"INSERT INTO {TABLE} (keystore_id, name, description, fingerprint, serial, expires_at, "
                    "password_sealed, bundle_sealed, created_by, created_at, updated_by, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    ks.id, name, description or "", fingerprint(der), format(cert.serial_number, "x"),
                    timeutil.to_db(cert.not_valid_after_utc), b"", b"", actor, now, actor, now)
                await tx.execute(f"UPDATE {TABLE} SET password_sealed = ?, bundle_sealed = ? WHERE id = ?",
                                 self.barrier.seal(password.encode(), sealed_aad(TABLE, "password_sealed", row["id"])),
                                 self.barrier.seal(bundle, sealed_aad(TABLE, "bundle_sealed", row["id"])), row["id"])
                await self.seal.seal_new(tx, TABLE, row["id"])
        except Exception as e:
            if "UniqueViolation" in type(e).__name__ or "UNIQUE" in str(e):
                raise Conflict("a certificate with that name exists in this key store") from None
            raise
        await self.events.publish(Event(ks.id, "auth_changed"))
        return await self.get(ks, name)

    # -- read -----------------------------------------------------------------
    async def _row(self, ks: KeyStore, name: str) -> dict:
        row = await self.db.fetchone(f"SELECT * FROM {TABLE} WHERE keystore_id = ? AND name = ?",
                                     ks.id, check_name(name))
        if row is None:
            raise NotFound("no certificate with that name in this key store")
        return row

    async def get(self, ks: KeyStore, name: str) -> dict:
        row = await self._row(ks, name)
        return to_api(row, await self.seal.valid(TABLE, row))

    async def list(self, ks: KeyStore, name: str | None = None) -> list[dict]:
        if name is not None:
            rows = await self.db.fetchall(f"SELECT * FROM {TABLE} WHERE keystore_id = ? AND name = ?", ks.id, name)
        else:
            rows = await self.db.fetchall(f"SELECT * FROM {TABLE} WHERE keystore_id = ? ORDER BY id", ks.id)
        return [to_api(r, await self.seal.valid(TABLE, r)) for r in rows]

    async def bundle(self, ks: KeyStore, name: str) -> bytes:
        """The PKCS#12 bundle (protected by the certificate's password) of a certificate in service."""
        row = await self._row(ks, name)
        if not await self.seal.valid(TABLE, row):
            raise BarrierError("this certificate's row was changed outside the key server; it admits nobody and "
                               "is not handed out: issue a new one")
        if row["status"] != "ACTIVE":
            raise NotFound("the certificate is scheduled for deletion; cancel the deletion to download it")
        return self.barrier.open(bytes(row["bundle_sealed"]), sealed_aad(TABLE, "bundle_sealed", row["id"]))

    # -- life cycle -----------------------------------------------------------
    async def schedule_deletion(self, ks: KeyStore, name: str, *, actor: str) -> dict:
        when = timeutil.to_db(timeutil.now() + dt.timedelta(days=self.grace_days))
        # Only narrows: allowed on a row failing its seal, which keeps failing (no cancelling it back in).
        n = await self.seal.update(self.db, TABLE, "keystore_id = ? AND name = ? AND status = 'ACTIVE'",
                                   (ks.id, check_name(name)), {"status": "SCHEDULED_DELETION", "deletion_at": when,
                                                               "updated_by": actor, "updated_at": timeutil.now_db()},
                                   check=False)
        if n != 1:
            raise NotFound("no certificate in service with that name in this key store")
        await self.events.publish(Event(ks.id, "auth_changed"))
        return {"name": name, "deletionDateTime": timeutil.to_api(when)}

    async def cancel_deletion(self, ks: KeyStore, name: str, *, actor: str) -> dict:
        n = await self.seal.update(self.db, TABLE, "keystore_id = ? AND name = ? AND status = 'SCHEDULED_DELETION'",
                                   (ks.id, check_name(name)), {"status": "ACTIVE", "deletion_at": None,
                                                               "updated_by": actor, "updated_at": timeutil.now_db()})
        if n != 1:
            raise NotFound("no certificate scheduled for deletion with that name in this key store")
        await self.events.publish(Event(ks.id, "auth_changed"))
        return await self.get(ks, name)

    async def delete_now(self, ks: KeyStore, name: str, *, actor: str) -> dict:
        n = await self.db.execute(f"DELETE FROM {TABLE} WHERE keystore_id = ? AND name = ? "
                                  "AND status = 'SCHEDULED_DELETION'", ks.id, check_name(name))
        if n != 1:
            raise NotFound("schedule the certificate for deletion first; only scheduled ones are deleted at once")
        await self.events.publish(Event(ks.id, "auth_changed"))
        return {"name": name, "deletionDateTime": timeutil.to_api(timeutil.now())}

    async def purge_due(self, now: dt.datetime | None = None) -> int:
        return await self.db.execute(f"DELETE FROM {TABLE} WHERE status = 'SCHEDULED_DELETION' AND deletion_at <= ?",
                                     timeutil.to_db(now or timeutil.now()))


# -- change operations (approval stores hold them as change requests) ---------
def _change_aad(ks_id: int, name: str) -> bytes:
    return record_aad("change:cert.create", ks_id, name)


def create_params(barrier: Barrier, ks: KeyStore, name: str, password: str, life_days: int,
                  description: str) -> dict:
    """Parameters of a `cert.create` change: the password travels sealed, so a change request held
    for approval never stores it in the clear."""
    check_name(name), check_password(password), check_lifetime(life_days)
    sealed = barrier.seal(password.encode(), _change_aad(ks.id, name))
    return {"keystore_id": ks.id, "name": name, "password_sealed": base64.b64encode(sealed).decode(),
            "life_days": life_days, "description": description or ""}


async def _ks(g: ChangeGate, p: dict) -> KeyStore:
    return await g.keys.keystore(p["keystore_id"])


def _certs(g: ChangeGate) -> Certificates:
    if g.certificates is None:
        raise InvalidRequest("certificates are not available on this server")
    return g.certificates


@op("cert.create")
async def _cert_create(g: ChangeGate, p: dict, actor: str):
    certs = _certs(g)
    ks = await _ks(g, p)
    password = certs.barrier.open(base64.b64decode(p["password_sealed"]), _change_aad(ks.id, p["name"])).decode()
    return await certs.create(ks, p["name"], password, p["life_days"], p.get("description", ""), actor=actor)


@op("cert.schedule_deletion")
async def _cert_schedule(g: ChangeGate, p: dict, actor: str):
    return await _certs(g).schedule_deletion(await _ks(g, p), p["name"], actor=actor)


@op("cert.cancel_deletion")
async def _cert_cancel(g: ChangeGate, p: dict, actor: str):
    return await _certs(g).cancel_deletion(await _ks(g, p), p["name"], actor=actor)


@op("cert.delete")
async def _cert_delete(g: ChangeGate, p: dict, actor: str):
    return await _certs(g).delete_now(await _ks(g, p), p["name"], actor=actor)


# -- wiring -----------------------------------------------------------------
def install(rt) -> None:
    rt.certificates = Certificates(rt.storage, rt.barrier, rt.events, DevPKI(rt.config.pki_dir()), rt.access_seal,
                                   rt.config.deletion_grace_days)
    if rt.changes is not None:
        rt.changes.certificates = rt.certificates
    tasks: list[asyncio.Task] = []

    async def purge_loop(rt_) -> None:
        # app.run_jobs_once purges keys and IPv4/MAC entries; certificates and expired tokens are purged here.
        while True:
            await asyncio.sleep(rt_.config.purge_interval)
            if rt_.barrier.sealed:
                continue
            try:
                if await rt_.storage.try_lock("skm-access-purge"):
                    n = await rt_.certificates.purge_due()
                    t = await rt_.callers.purge_expired() if rt_.callers is not None else 0
                    if n or t:
                        log.info("access_data_purged", certificates=n, expired_bearers=t)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("certificate_purge_failed")

    async def start(rt_) -> None:
        tasks.append(asyncio.create_task(purge_loop(rt_), name="access-purge"))

    async def stop(_rt) -> None:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        tasks.clear()

    rt.extra.setdefault("on_start", []).append(start)
    rt.extra.setdefault("on_stop", []).append(stop)
