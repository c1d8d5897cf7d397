"""Who is calling the client API: appkey (v1.0/v1.1), user access keys (v1.2), bearer tokens (v1.3).

* A user access key belongs to an operator (an installation-wide identity)
  and may be bound to one project: a bound key works only under that
  project's appkey, an unbound one under every appkey. The secret is shown once
  and stored as a SHA-256 digest (256 random bits: a fast hash is right).
* A v1.3 token is issued from a user access key by `POST /oauth2/token/create`
  (server/api/client/oauth_routes.py), lives 60..86400 s, is revocable, and is
  stored as a digest too. Deleting the access key ends its tokens.
* Every comparison is constant-time and runs even when the id is unknown, so
  timing does not tell which ids exist. A reason more specific than "not
  valid" (expired, revoked, other project) is given only to a caller who
  proved the secret.
* Access-key and token rows, and the operator rows and grants behind them, are sealed to the
  system key (server/access/seal.py): one that fails its seal is "not valid", like a wrong secret.
* Verified tokens and access keys are kept in memory per worker (server/access/authcache.py,
  `CredentialCache`): every change to a credential (revoke, delete, an operator changed)
  publishes `credential_changed`, which reaches every worker and replica before their next
  request; a wrong secret always costs the database read.
* An access key acts as its operator (one identity per person: a change request
  made with it records the operator, and the operator's project roles apply:
  no role in the appkey's project, no access). A non-admin's key uses keys
  and reads, but the client API's change endpoints (key create/delete, PUT
  secrets, auth data and certificates) refuse it, as the management plane does.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from aiohttp import web

from server import text, timeutil
from server.access.authcache import CREDENTIAL_CHANGED, CredentialCache, VerifiedCredential
from server.access.operators import Operator, sealed_grants
from server.access.seal import AccessSeal
from server.errors import Conflict, Forbidden, InvalidRequest, NotFound, SKMError, Unauthenticated
from server.events import Event, EventBus
from server.storage.base import Storage

ID_HEADER = "X-TC-AUTHENTICATION-ID"
SECRET_HEADER = "X-TC-AUTHENTICATION-SECRET"
TOKEN_HEADER = "X-NHN-Authorization"
MAX_KEYS_PER_OPERATOR = 5          # NHN: five user access keys per account
TOKEN_TTL_MIN, TOKEN_TTL_MAX = 60, 86400
_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_DUMMY = hashlib.sha256(b"no such credential").hexdigest()

MISSING_V12 = (f"API v1.2 needs a user access key in {ID_HEADER} and {SECRET_HEADER} "
               "(create one with `skm accesskey create`)")
MISSING_V13 = (f"API v1.3 needs a bearer token in {TOKEN_HEADER} "
               "(get one from POST /oauth2/token/create with a user access key)")
BAD_KEY = "the user access key is not valid"
BAD_TOKEN = "the bearer token is not valid; get a new one from /oauth2/token/create"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _epoch(db_time: str | None) -> float | None:
    return None if db_time is None else timeutil.from_db(db_time).timestamp()


def _earliest(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None


def _new_key_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))


@dataclass(frozen=True)
class AccessKey:
    id: str
    operator_id: int
    operator: str
    role: str
    project_id: int | None
    description: str
    expires_at: str | None
    created_by: str
    created_at: str
    last_used_at: str | None = None

    @classmethod
    def from_row(cls, r: dict) -> "AccessKey":
        return cls(r["id"], r["operator_id"], r["operator"], r["role"], r["project_id"], r["description"],
                   r["expires_at"], r["created_by"], r["created_at"], r.get("last_used_at"))

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timeutil.now_db()

    def identity(self) -> str:
        return f"uak:{self.id}@{self.operator}"

    def to_api(self) -> dict:
        return {"accessKeyId": self.id, "operator": self.operator, "projectId": self.project_id,
                "description": self.description, "expirationDate": timeutil.to_api(self.expires_at),
                "creationUser": self.created_by, "creationDatetime": timeutil.to_api(self.created_at)}


_KEY_SELECT = ("SELECT k.id, k.operator_id, k.project_id, k.secret_hash, k.description, k.expires_at, k.revoked, "
               "k.last_used_at, k.created_by, k.created_at, k.seal, o.name AS operator, o.role, o.disabled, "
               "o.password_hash AS operator_password_hash, o.deleted_at AS operator_deleted_at, "
               "o.created_by_id AS operator_created_by_id, o.created_at AS operator_created_at, "
               "o.lineage AS operator_lineage, o.seal AS operator_seal "
               "FROM user_access_keys k JOIN operators o ON o.id = k.operator_id")


def _operator_row(r: dict) -> dict:
    """The operator's sealed columns, from a row of _KEY_SELECT."""
    return {"id": r["operator_id"], "name": r["operator"], "password_hash": r["operator_password_hash"],
            "disabled": r["disabled"], "deleted_at": r["operator_deleted_at"],
            "created_by_id": r["operator_created_by_id"], "created_at": r["operator_created_at"],
            "lineage": r["operator_lineage"], "seal": r["operator_seal"]}


def parse_basic(header: str) -> tuple[str, str] | None:
    """`Basic base64(id:secret)` -> (id, secret); None when malformed."""
    if not header[:6].lower() == "basic " or len(header) > 512:
        return None
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    key_id, sep, secret = raw.partition(":")
    return (key_id, secret) if sep and key_id and secret else None


def bearer_value(header: str) -> str:
    """The token of `X-NHN-Authorization`, sent with or without `Bearer `."""
    v = header.strip()
    return v[7:].strip() if v[:7].lower() == "bearer " else v


def parse_token(token: str) -> tuple[str, str] | None:
    parts = token.split("_", 2)
    if len(token) > 200 or len(parts) != 3 or parts[0] != "skmat" or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


class CallerAuth:
    def __init__(self, storage: Storage, seal: AccessSeal, metrics=None, events: EventBus | None = None) -> None:
        self.db = storage
        self.seal = seal
        self.metrics = metrics
        self.events = events
        self.cache = CredentialCache(events) if events is not None else None

    async def _changed(self, what: str) -> None:
        """Tell every worker and replica to drop what they verified of `what` (token:<id>, accesskey:<id>)."""
        if self.events is not None:
            await self.events.publish(Event(keystore_id=0, kind=CREDENTIAL_CHANGED, key_id=what))

    # -- user access keys (management plane) ----------------------------------
    async def create_key(self, owner: Operator, *, actor: str, description: str = "",
                         project_id: int | None = None, ttl_days: int | None = None) -> tuple[AccessKey, str]:
        if len(description) > 1000:
            raise InvalidRequest("description must be at most 1000 characters")
        text.check(description, "description")
        if ttl_days is not None and not (1 <= ttl_days <= 3650):
            raise InvalidRequest("expiresInDays must be from 1 to 3650")
        n = await self.db.fetchval("SELECT COUNT(*) AS n FROM user_access_keys WHERE operator_id = ? AND revoked = 0",
                                   owner.id)
        if n >= MAX_KEYS_PER_OPERATOR:
            raise Conflict(f"an operator has at most {MAX_KEYS_PER_OPERATOR} user access keys; delete one first")
        key_id, secret = _new_key_id(), secrets.token_urlsafe(32)
        expires = timeutil.to_db(timeutil.now() + dt.timedelta(days=ttl_days)) if ttl_days else None
        await self.seal.insert(self.db, "user_access_keys", {
            "id": key_id, "operator_id": owner.id, "project_id": project_id, "secret_hash": _digest(secret),
            "description": description, "expires_at": expires, "revoked": 0, "created_by": actor,
            "created_at": timeutil.now_db()})
        return await self.key(key_id), secret

    async def key(self, key_id: str) -> AccessKey:
        row = await self.db.fetchone(_KEY_SELECT + " WHERE k.id = ? AND k.revoked = 0", key_id)
        if row is None:
            raise NotFound("no such user access key")
        return AccessKey.from_row(row)

    async def keys(self, operator_id: int | None = None) -> list[AccessKey]:
        if operator_id is None:
            rows = await self.db.fetchall(_KEY_SELECT + " WHERE k.revoked = 0 ORDER BY k.created_at")
        else:
            rows = await self.db.fetchall(_KEY_SELECT + " WHERE k.revoked = 0 AND k.operator_id = ? "
                                          "ORDER BY k.created_at", operator_id)
        return [AccessKey.from_row(r) for r in rows]

    async def delete_key(self, key_id: str, by: Operator) -> None:
        """Delete a key and every token issued from it (admins: any key; others: their own)."""
        key = await self.key(key_id)
        if key.operator_id != by.id and not by.has(("admin",)):
            raise Forbidden("only an admin deletes another operator's user access key")
        async with self.db.transaction() as tx:
            await tx.execute("DELETE FROM oauth_tokens WHERE access_key_id = ?", key_id)
            await tx.execute("DELETE FROM user_access_keys WHERE id = ?", key_id)
        await self._changed(f"accesskey:{key_id}")

    async def verify_key(self, key_id: str, secret: str) -> AccessKey:
        row = None
        cache = self.cache
        gen = 0
        if 0 < len(key_id) <= 64 and len(secret) <= 256:
            if cache is not None:
                hit = cache.get("k", key_id)
                if hit is not None and hmac.compare_digest(hit.digest, _digest(secret)) and not cache.expired(hit):
                    return hit.key
                gen = cache.generation
            await self.seal.key()          # before the read (see Operators._seal_ready)
            row = await self.db.fetchone(_KEY_SELECT + " WHERE k.id = ?", key_id)
        good = hmac.compare_digest(row["secret_hash"] if row else _DUMMY, _digest(secret))
        if row is None or not good or row["revoked"] or row["disabled"] or not await self._sealed(row):
            raise Unauthenticated(BAD_KEY)
        key = AccessKey.from_row(row)
        if key.expired:
            raise Unauthenticated("the user access key has expired; create a new one with `skm accesskey create`")
        if cache is not None:
            cache.put("k", key_id, VerifiedCredential(row["secret_hash"], key, _epoch(key.expires_at), key.id,
                                                      key.operator_id), gen)
        return key

    # -- bearer tokens (v1.3) ---------------------------------------------------
    async def issue_token(self, key: AccessKey, expires_in: int = TOKEN_TTL_MAX) -> dict:
        if isinstance(expires_in, bool) or not (TOKEN_TTL_MIN <= expires_in <= TOKEN_TTL_MAX):
            raise InvalidRequest(f"expires_in must be from {TOKEN_TTL_MIN} to {TOKEN_TTL_MAX} seconds")
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        expires = timeutil.now() + dt.timedelta(seconds=expires_in)
        if key.expires_at is not None:
            # A token never outlives the access key it came from.
            expires = min(expires, timeutil.from_db(key.expires_at))
        await self.seal.insert(self.db, "oauth_tokens", {
            "id": token_id, "access_key_id": key.id, "token_hash": _digest(secret),
            "expires_at": timeutil.to_db(expires), "revoked": 0, "created_at": timeutil.now_db()})
        ttl = max(0, int((expires - timeutil.now()).total_seconds() + 0.5))
        return {"access_token": f"skmat_{token_id}_{secret}", "token_type": "Bearer", "expires_in": ttl}

    async def revoke_token(self, key: AccessKey, token: str) -> None:
        """RFC 7009: revoking an unknown or someone else's token is not an error and changes nothing."""
        parsed = parse_token(bearer_value(token))
        if parsed is None:
            return
        token_id, secret = parsed
        row = await self.db.fetchone("SELECT access_key_id, token_hash FROM oauth_tokens WHERE id = ?", token_id)
        good = hmac.compare_digest(row["token_hash"] if row else _DUMMY, _digest(secret))
        if row is not None and good and row["access_key_id"] == key.id:
            await self.seal.update(self.db, "oauth_tokens", "id = ?", (token_id,), {"revoked": 1}, check=False)
            await self._changed(f"token:{token_id}")

    async def verify_token(self, token: str) -> tuple[str, AccessKey]:
        """(token id, its access key) for `X-NHN-Authorization`'s value, with or without `Bearer `."""
        return await self._verify_token(bearer_value(token))

    async def _verify_token(self, token: str) -> tuple[str, AccessKey]:
        parsed = parse_token(token)
        row = None
        token_id, secret = parsed or ("", token)
        cache = self.cache
        gen = 0
        if parsed is not None:
            if cache is not None:
                hit = cache.get("t", token_id)
                if hit is not None and hmac.compare_digest(hit.digest, _digest(secret)) and not cache.expired(hit):
                    return token_id, hit.key
                gen = cache.generation     # a miss, a wrong secret or an expiry: the database decides and says why
            await self.seal.key()          # before the read (see Operators._seal_ready)
            row = await self.db.fetchone(
                "SELECT t.token_hash, t.expires_at AS token_expires_at, t.revoked AS token_revoked, "
                "t.seal AS token_seal, " + _KEY_SELECT[len("SELECT "):]
                + " JOIN oauth_tokens t ON t.access_key_id = k.id WHERE t.id = ?", token_id)
        good = hmac.compare_digest(row["token_hash"] if row else _DUMMY, _digest(secret))
        if row is None or not good or row["revoked"] or row["disabled"]:
            raise Unauthenticated(BAD_TOKEN)
        token = {"id": token_id, "access_key_id": row["id"], "token_hash": row["token_hash"],
                 "expires_at": row["token_expires_at"], "revoked": row["token_revoked"], "seal": row["token_seal"]}
        if not await self.seal.valid("oauth_tokens", token) or not await self._sealed(row):
            raise Unauthenticated(BAD_TOKEN)
        if row["token_revoked"]:
            raise Unauthenticated("the bearer token has been revoked; get a new one from /oauth2/token/create")
        if row["token_expires_at"] <= timeutil.now_db():
            raise Unauthenticated("the bearer token has expired; get a new one from /oauth2/token/create")
        key = AccessKey.from_row(row)
        if key.expired:
            raise Unauthenticated("the user access key behind this token has expired")
        if cache is not None:
            cache.put("t", token_id, VerifiedCredential(row["token_hash"], key, _earliest(
                _epoch(row["token_expires_at"]), _epoch(key.expires_at)), key.id, key.operator_id), gen)
        return token_id, key

    async def _sealed(self, row: dict) -> bool:
        """A row of _KEY_SELECT: the access key's row and its operator's, as the key server wrote them."""
        return await self.seal.valid("user_access_keys", row) and await self.seal.valid("operators", _operator_row(row))

    async def purge_expired(self, now: dt.datetime | None = None) -> int:
        cutoff = timeutil.to_db((now or timeutil.now()) - dt.timedelta(days=1))
        return await self.db.execute("DELETE FROM oauth_tokens WHERE expires_at <= ?", cutoff)

    # -- the client-API pipeline step ---------------------------------------------
    async def authenticate(self, request: web.Request, ctx) -> str:
        """The caller identity for audit; raises Unauthenticated for a missing or bad credential."""
        try:
            return await self._authenticate(request, ctx)
        except SKMError:
            if self.metrics is not None:
                self.metrics.denials.labels("caller").inc()
            raise

    async def _authenticate(self, request: web.Request, ctx) -> str:
        if ctx.version in ("v1.0", "v1.1"):
            return "appkey"
        if ctx.version == "v1.2":
            key_id, secret = request.headers.get(ID_HEADER), request.headers.get(SECRET_HEADER)
            if not key_id or not secret:
                raise Unauthenticated(MISSING_V12)
            key = await self.verify_key(key_id.strip(), secret.strip())
            identity = key.identity()
            credential = f"accesskey:{key.id}"
        elif ctx.version == "v1.3":
            token = bearer_value(request.headers.get(TOKEN_HEADER) or "")
            if not token:
                raise Unauthenticated(MISSING_V13)
            token_id, key = await self._verify_token(token)
            identity = f"token:{token_id}/{key.identity()}"
            credential = f"bearer:{token_id}"
        else:
            raise Unauthenticated("unknown API version")
        if key.project_id is not None and key.project_id != ctx.project.id:
            raise Unauthenticated("this user access key is bound to another project's appkey")
        # One identity per person: the credential acts as its operator, with that operator's roles.
        op = await self.operator_of(key)
        roles = op.roles_in(ctx.project.id)
        if roles.isdisjoint(("admin", "approver", "viewer")):
            raise Forbidden(f"{key.operator} holds no role in this project; ask a global admin for one")
        if "admin" not in roles and _handler_name(request) in CHANGE_HANDLERS:
            # As on the management plane: only admins change key stores; others use keys and read.
            raise Forbidden(f"this change needs an admin's access key; {key.operator} is not an admin of this "
                            "project")
        ctx.operator, ctx.credential = op, credential
        return identity

    async def operator_of(self, key: AccessKey) -> Operator:
        cache = self.cache
        gen = 0
        if cache is not None:
            hit = cache.operator(key.operator_id)
            if hit is not None:
                return hit
            gen = cache.generation
        grants = await sealed_grants(self.db, self.seal, key.operator_id)
        op = Operator(key.operator_id, key.operator, next((g.role for g in grants if g.project_id is None), ""),
                      None, grants)
        if cache is not None:
            cache.put_operator(key.operator_id, op, gen)
        return op


# Client-API handlers that change a key store (its keys or auth data); everything else is use or read.
CHANGE_HANDLERS = frozenset({
    "create_secret", "create_symmetric", "create_asymmetric", "schedule_key_deletion", "delete_key", "put_secret",
    "add_auth", "schedule_auth_deletion", "delete_auth",
    "create_certificate", "schedule_certificate_deletion", "delete_certificate",
})


def _handler_name(request: web.Request) -> str:
    route = request.match_info.route
    return getattr(route.handler, "__name__", "") if route is not None else ""


def install(rt) -> None:
    rt.callers = CallerAuth(rt.storage, rt.access_seal, rt.metrics, rt.events)
