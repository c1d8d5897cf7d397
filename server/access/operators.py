"""Operators of the management plane: accounts, passwords, login, API tokens.

Tokens look like `skm_<id>_<secret>`: the id finds the row, the secret is
compared as a SHA-256 digest in constant time (the secret has 256 bits of
entropy, so a fast hash is the right tool). Passwords are chosen by people, so
they get argon2id (memory-hard), verified in a thread.

Login never tells an unknown name from a wrong password: the same error, the
same argon2 work (a dummy hash for unknown names), and unknown names lock out
after the same number of failures as real ones.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from server import timeutil
from server.errors import Conflict, Forbidden, InvalidRequest, NotFound, TooManyAttempts, Unauthenticated
from server.settings import LoginSettings   # [login] in the server config
from server.storage.base import Storage

ROLES = ("admin", "approver", "viewer")
LOGIN_FAILED = "wrong operator name or password"
MIN_PASSWORD = 10
MAX_PASSWORD = 1024


@dataclass(frozen=True)
class Operator:
    id: int
    name: str
    role: str
    token_id: str | None = None

    @property
    def can_change(self) -> bool:
        return self.role == "admin"

    @property
    def can_approve(self) -> bool:
        return self.role == "approver"

    def require(self, *roles: str) -> None:
        if self.role not in roles:
            raise Forbidden(f"this needs the {' or '.join(roles)} role")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "skm" or not parts[1] or not parts[2] or len(token) > 200:
        return None
    return parts[1], parts[2]


def check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidRequest(f"a password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


@dataclass
class _Limiter:
    """Attempts per client IP in a sliding minute, and failures of unknown names (bounded)."""
    per_minute: int
    by_ip: dict[str, deque] = field(default_factory=dict)
    unknown: OrderedDict = field(default_factory=OrderedDict)   # name digest -> (failures, locked_until)

    def hit(self, ip: str) -> bool:
        now = time.monotonic()
        q = self.by_ip.setdefault(ip, deque())
        while q and q[0] <= now - 60:
            q.popleft()
        if len(q) >= self.per_minute:
            return False
        q.append(now)
        if len(self.by_ip) > 10000:           # bounded memory: forget sources quiet for a minute
            for k in [k for k, v in self.by_ip.items() if not v or v[-1] <= now - 60]:
                self.by_ip.pop(k, None)
        return True


class Operators:
    def __init__(self, storage: Storage, settings: LoginSettings | None = None, events=None) -> None:
        self.db = storage
        self.events = events          # server.events.EventBus: a changed operator drops its cached credentials
        self.configure(settings or LoginSettings.from_config(None))

    def configure(self, settings: LoginSettings) -> None:
        self.settings = settings
        self._limiter = _Limiter(settings.rate_per_minute)
        self._hasher: PasswordHasher | None = None
        self._dummy: str | None = None

    # ------------------------------------------------------------------ accounts
    async def create(self, name: str, role: str, password_hash: str | None = None, *,
                     password: str | None = None) -> Operator:
        check_role(role)
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise InvalidRequest("operator name must be 1 to 64 letters, digits, '.', '-' or '_'")
        if password is not None:
            password_hash = await self.hash_password(check_password(password))
        try:
            async with self.db.transaction() as tx:
                row = await tx.fetchone("INSERT INTO operators (name, role, password_hash, created_at) "
                                        "VALUES (?, ?, ?, ?) RETURNING id", name, role, password_hash,
                                        timeutil.now_db())
        except Exception as e:
            if "UniqueViolation" in type(e).__name__ or "UNIQUE" in str(e):
                raise Conflict("an operator with that name exists") from None
            raise
        return Operator(row["id"], name, role)

    async def by_name(self, name: str) -> Operator:
        row = await self.db.fetchone("SELECT id, name, role FROM operators WHERE name = ?", name)
        if row is None:
            raise NotFound("no such operator")
        return Operator(row["id"], row["name"], row["role"])

    async def describe(self, name: str) -> dict:
        row = await self.db.fetchone(_SELECT + " WHERE name = ?", name)
        if row is None:
            raise NotFound("no such operator")
        return _api(row)

    async def list(self) -> list[dict]:
        return [_api(r) for r in await self.db.fetchall(_SELECT + " ORDER BY name")]

    async def update(self, name: str, *, role: str | None = None, disabled: bool | None = None,
                     password: str | None = None, unlock: bool = False, by: Operator | None = None) -> dict:
        target = await self.by_name(name)
        if role is not None:
            check_role(role)
        if by is not None and by.id == target.id and ((role and role != "admin") or disabled):
            raise Conflict("you cannot demote or disable yourself; ask another admin")
        if (role not in (None, "admin") or disabled) and target.role == "admin":
            await self._keep_an_admin(target)
        sets, args = [], []
        if role is not None:
            sets.append("role = ?"), args.append(role)
        if disabled is not None:
            sets.append("disabled = ?"), args.append(int(disabled))
        if password is not None:
            sets.append("password_hash = ?"), args.append(await self.hash_password(check_password(password)))
        if unlock or password is not None:
            sets += ["failed_logins = 0", "locked_until = NULL"]
        if sets:
            await self.db.execute(f"UPDATE operators SET {', '.join(sets)} WHERE id = ?", *args, target.id)
            if role is not None or disabled is not None:
                await self._changed(target)
        return await self.describe(name)

    async def _changed(self, op: Operator) -> None:
        """Every worker and replica drops the access keys and tokens it verified for `op` (role, disabled)."""
        if self.events is not None:
            from server.access.authcache import CREDENTIAL_CHANGED
            from server.events import Event
            await self.events.publish(Event(keystore_id=0, kind=CREDENTIAL_CHANGED, key_id=f"operator:{op.id}"))

    async def delete(self, name: str, *, by: Operator) -> None:
        target = await self.by_name(name)
        if target.id == by.id:
            raise Conflict("you cannot delete yourself")
        if target.role == "admin":
            await self._keep_an_admin(target)
        try:
            async with self.db.transaction() as tx:
                await tx.execute("DELETE FROM operator_tokens WHERE operator_id = ?", target.id)
                await tx.execute("DELETE FROM operators WHERE id = ?", target.id)
        except Exception as e:
            if "foreign" in str(e).lower() or "ForeignKey" in type(e).__name__:
                raise Conflict("the operator still owns user access keys; delete them first or disable "
                               "the operator instead") from None
            raise
        await self._changed(target)

    async def _keep_an_admin(self, leaving: Operator) -> None:
        n = await self.db.fetchval("SELECT COUNT(*) AS n FROM operators WHERE role = 'admin' AND disabled = 0 "
                                   "AND id <> ?", leaving.id)
        if not n:
            raise Conflict("this is the last enabled admin; create another admin first")

    async def eligible_approvers(self, exclude: str) -> int:
        """Enabled approvers other than `exclude` (the requester)."""
        return int(await self.db.fetchval("SELECT COUNT(*) AS n FROM operators WHERE role = 'approver' "
                                          "AND disabled = 0 AND name <> ?", exclude) or 0)

    # ----------------------------------------------------------------- passwords
    def _ph(self) -> PasswordHasher:
        if self._hasher is None:
            s = self.settings
            self._hasher = PasswordHasher(time_cost=s.argon2_time_cost, memory_cost=s.argon2_memory_kib,
                                          parallelism=s.argon2_parallelism)
        return self._hasher

    async def hash_password(self, password: str) -> str:
        return await asyncio.to_thread(self._ph().hash, password)

    async def _verify(self, stored: str | None, password: str) -> bool:
        if self._dummy is None:
            self._dummy = await self.hash_password(secrets.token_urlsafe(16))
        target = stored or self._dummy

        def run() -> bool:
            try:
                return self._ph().verify(target, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False
        ok = await asyncio.to_thread(run)
        return ok and stored is not None

    async def login(self, name: str, password: str, ip: str, *, description: str = "login") -> tuple[Operator, str]:
        """Check a name and password; return the operator and a new token. One error for every failure."""
        op = await self.check_login(name, password, ip)
        return op, await self.issue_token(op, description, ttl_days=self.settings.token_ttl_hours / 24)

    async def check_login(self, name: str, password: str, ip: str) -> Operator:
        """Rate limit, lockout, and the password check, without issuing anything."""
        if not self._limiter.hit(ip or "-"):
            raise TooManyAttempts("too many login attempts from this address; wait a minute")
        name = (name or "")[:64]
        password = (password or "")[:MAX_PASSWORD]
        now = timeutil.now()
        stamp = timeutil.to_db(now)
        row = await self.db.fetchone("SELECT id, name, role, password_hash, disabled, locked_until "
                                     "FROM operators WHERE name = ?", name)
        if row is None:
            return await self._unknown_failure(name, password, now)
        # Count the attempt as a failure before the (slow) password check, in one atomic statement,
        # so concurrent attempts each see their own count: at most `max_failures` passwords are
        # ever checked before the lock holds. A locked name is not counted (nor checked).
        claim = await self.db.fetchone(
            "UPDATE operators SET failed_logins = failed_logins + 1 WHERE id = ? "
            "AND (locked_until IS NULL OR locked_until <= ?) RETURNING failed_logins, locked_until",
            row["id"], stamp)
        limit = max(1, self.settings.max_failures)
        until = timeutil.to_db(now + dt.timedelta(seconds=self.settings.lockout_seconds))
        if claim is not None and int(claim["failed_logins"]) > limit:
            # The budget is spent by attempts still being checked (or abandoned mid-check): lock now,
            # so an abandoned attempt cannot leave the name refused with no lockout that ends. An
            # attempt still in flight with the right password lifts the lock when it succeeds.
            await self.db.execute("UPDATE operators SET failed_logins = 0, locked_until = ? WHERE id = ? "
                                  "AND (locked_until IS NULL OR locked_until <= ?)", until, row["id"], stamp)
        if claim is None or int(claim["failed_logins"]) > limit:
            await self._verify(None, password)                     # same work as any other attempt
            raise TooManyAttempts(_locked_hint(self.settings))
        ok = await self._verify(row["password_hash"], password)
        if not ok or row["disabled"]:
            if int(claim["failed_logins"]) >= limit:
                await self.db.execute("UPDATE operators SET failed_logins = 0, locked_until = ? WHERE id = ?",
                                      until, row["id"])
                raise TooManyAttempts(_locked_hint(self.settings))
            raise Unauthenticated(LOGIN_FAILED)
        await self.db.execute("UPDATE operators SET failed_logins = 0, locked_until = NULL WHERE id = ?", row["id"])
        if self._ph().check_needs_rehash(row["password_hash"]):
            await self.db.execute("UPDATE operators SET password_hash = ? WHERE id = ?",
                                  await self.hash_password(password), row["id"])
        return Operator(row["id"], row["name"], row["role"])

    async def _unknown_failure(self, name: str, password: str, now: dt.datetime):
        await self._verify(None, password)
        key = _digest("login:" + name)
        failures, until = self._limiter.unknown.pop(key, (0, None))
        if until is not None and until > now:
            self._limiter.unknown[key] = (failures, until)
            raise TooManyAttempts(_locked_hint(self.settings))
        failures = 0 if until is not None else failures
        failures += 1
        if failures >= self.settings.max_failures:
            self._limiter.unknown[key] = (0, now + dt.timedelta(seconds=self.settings.lockout_seconds))
            self._trim_unknown()
            raise TooManyAttempts(_locked_hint(self.settings))
        self._limiter.unknown[key] = (failures, None)
        self._trim_unknown()
        raise Unauthenticated(LOGIN_FAILED)

    def _trim_unknown(self) -> None:
        while len(self._limiter.unknown) > 10000:
            self._limiter.unknown.popitem(last=False)

    # -------------------------------------------------------------------- tokens
    async def issue_token(self, op: Operator, description: str = "", ttl_days: float | None = 90) -> str:
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        expires = timeutil.to_db(timeutil.now() + dt.timedelta(days=ttl_days)) if ttl_days else None
        await self.db.execute("INSERT INTO operator_tokens (id, operator_id, secret_hash, description, expires_at, "
                              "created_at) VALUES (?, ?, ?, ?, ?, ?)", token_id, op.id, _digest(secret),
                              description[:200], expires, timeutil.now_db())
        return f"skm_{token_id}_{secret}"

    async def tokens(self, operator_id: int | None = None) -> list[dict]:
        sql = ("SELECT t.id, t.description, t.expires_at, t.revoked, t.created_at, o.name FROM operator_tokens t "
               "JOIN operators o ON o.id = t.operator_id")
        rows = await (self.db.fetchall(sql + " ORDER BY t.created_at", ) if operator_id is None else
                      self.db.fetchall(sql + " WHERE t.operator_id = ? ORDER BY t.created_at", operator_id))
        now = timeutil.now_db()
        return [{"tokenId": r["id"], "operator": r["name"], "description": r["description"],
                 "creationDatetime": timeutil.to_api(r["created_at"]),
                 "expirationDatetime": timeutil.to_api(r["expires_at"]),
                 "status": "REVOKED" if r["revoked"] else
                 ("EXPIRED" if r["expires_at"] and r["expires_at"] <= now else "ACTIVE")} for r in rows]

    async def revoke_token(self, token_id: str, by: Operator | None = None) -> None:
        if by is not None and by.role != "admin":
            # Non-admins revoke their own tokens only; another's looks like a missing one.
            n = await self.db.execute("UPDATE operator_tokens SET revoked = 1 WHERE id = ? AND operator_id = ?",
                                      token_id, by.id)
        else:
            n = await self.db.execute("UPDATE operator_tokens SET revoked = 1 WHERE id = ?", token_id)
        if n != 1:
            raise NotFound("no such token")

    async def authenticate_token(self, token: str) -> Operator:
        parsed = parse_token(token)
        if parsed is None:
            raise Unauthenticated("send an operator token: Authorization: Bearer skm_...")
        token_id, secret = parsed
        row = await self.db.fetchone(
            "SELECT t.secret_hash, t.expires_at, t.revoked, o.id, o.name, o.role, o.disabled FROM operator_tokens t "
            "JOIN operators o ON o.id = t.operator_id WHERE t.id = ?", token_id)
        # Compare even when the row is missing so timing does not tell which ids exist.
        expected = row["secret_hash"] if row else _digest("x" * 43)
        good = hmac.compare_digest(expected, _digest(secret))
        if not row or not good or row["revoked"] or row["disabled"]:
            raise Unauthenticated("the operator token is not valid; create a new one with `skm token create`")
        if row["expires_at"] and row["expires_at"] <= timeutil.now_db():
            raise Unauthenticated("the operator token has expired; create a new one with `skm token create`")
        return Operator(row["id"], row["name"], row["role"], token_id)


_SELECT = ("SELECT id, name, role, disabled, password_hash, locked_until, created_at, "
           "(SELECT COUNT(*) FROM operator_tokens t WHERE t.operator_id = operators.id AND t.revoked = 0) "
           "AS tokens FROM operators")


def _api(r: dict) -> dict:
    locked = bool(r["locked_until"] and r["locked_until"] > timeutil.now_db())
    return {"name": r["name"], "role": r["role"], "disabled": bool(r["disabled"]), "locked": locked,
            "hasPassword": r["password_hash"] is not None, "activeTokens": int(r["tokens"] or 0),
            "creationDatetime": timeutil.to_api(r["created_at"])}


def _locked_hint(s: LoginSettings) -> str:
    return f"too many failed logins for this name; try again in {max(1, s.lockout_seconds // 60)} minute(s)"
