"""Operators of the management plane: accounts, passwords, login, API tokens.

Tokens look like `skm_<id>_<secret>`: the id finds the row, the secret is
compared as a SHA-256 digest in constant time (the secret has 256 bits of
entropy, so a fast hash is the right tool). Passwords are chosen by people, so
they get argon2id (memory-hard), verified in a thread.

Operator, role-grant and token rows are sealed to the system key (server/access/seal.py): a row
that fails its seal authenticates nobody and grants nothing, so writing the database is not a way
in. Only `skm server init` writes rows unsealed (it has no audit yet); the first start seals them.

Login never tells an unknown name from a wrong password: the same error, the
same argon2 work (a dummy hash for unknown names), and unknown names lock out
after the same number of failures as real ones.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from server import text, timeutil
from server.errors import Conflict, Forbidden, InvalidRequest, NotFound, TooManyAttempts, Unauthenticated
from server.access.lineage import seal_edge
from server.access.seal import AccessSeal, columns, insert_row
from server.settings import LoginSettings   # [login] in the server config
from server.storage.base import Storage

ROLES = ("admin", "approver", "viewer")
LOGIN_FAILED = "wrong operator name or password"
MIN_PASSWORD = 10
MAX_PASSWORD = 1024


@dataclass(frozen=True)
class Grant:
    """A current role grant: global (project_id None) or for one project."""
    role: str
    project_id: int | None = None

    def to_api(self) -> dict:
        return {"role": self.role, "projectId": self.project_id}


@dataclass(frozen=True)
class Operator:
    id: int
    name: str
    role: str                       # the global role; "" for an operator with project roles only
    token_id: str | None = None
    grants: tuple[Grant, ...] = ()

    def __post_init__(self) -> None:
        if not self.grants and self.role:
            object.__setattr__(self, "grants", (Grant(self.role),))
        # project id -> the roles that cover it: a cached credential's operator answers has() on every
        # v1.2/v1.3 request (grants never change on an instance: a role change makes a new Operator)
        object.__setattr__(self, "_roles_in", {})

    @property
    def is_global(self) -> bool:
        return any(g.project_id is None for g in self.grants)

    @property
    def can_change(self) -> bool:
        return self.role == "admin"

    @property
    def can_approve(self) -> bool:
        return self.role == "approver"

    def has(self, roles: tuple[str, ...], project_id: int | None = None) -> bool:
        """A grant of one of `roles` covering `project_id` (None: only a global grant does)."""
        return not self.roles_in(project_id).isdisjoint(roles)

    def roles_in(self, project_id: int | None) -> frozenset[str]:
        """The roles of the grants covering `project_id` (None: the global grants only)."""
        memo = self._roles_in
        found = memo.get(project_id)
        if found is None:
            found = frozenset(g.role for g in self.grants
                              if g.project_id is None or (project_id is not None and g.project_id == project_id))
            if len(memo) < 64:
                memo[project_id] = found
        return found

    def require(self, *roles: str, project_id: int | None = None) -> None:
        if not self.has(roles, project_id):
            where = "" if project_id is not None else " (a global role)"
            raise Forbidden(f"this needs the {' or '.join(roles)} role{where}")

    def projects(self) -> frozenset[int] | None:
        """Projects this operator may see; None: every project (a global role)."""
        if self.is_global:
            return None
        return frozenset(g.project_id for g in self.grants if g.project_id is not None)

    def sees(self, project_id: int | None) -> bool:
        mine = self.projects()
        return mine is None or project_id in mine


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def sealed_grants(db, seal: AccessSeal | None, operator_id: int) -> tuple[Grant, ...]:
    """The operator's current grants; a grant row that fails its seal (written outside the key
    server) is left out. `seal` None: `skm server init`, which reads rows it has just written."""
    if seal is not None:
        await seal.key()        # before the read: the first start's sealing must not be read half done
    rows = await db.fetchall(f"SELECT {columns('operator_roles')} FROM operator_roles WHERE operator_id = ? AND "
                             "revoked_at IS NULL ORDER BY id", operator_id)
    return tuple([Grant(r["role"], r["project_id"]) for r in rows
                  if seal is None or await seal.valid("operator_roles", r)])


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
    """Attempts per client IP in a sliding minute, and failures of unknown names (bounded).

    Unknown names mirror known ones: failures per (name, source) and a per-name total, so a
    lockout or a ceiling tells an attacker nothing about which names exist."""
    per_minute: int
    by_ip: dict[str, deque] = field(default_factory=dict)
    unknown: OrderedDict = field(default_factory=OrderedDict)   # digest(name, source) -> (failures, locked_until)
    unknown_total: OrderedDict = field(default_factory=OrderedDict)   # digest(name) -> (count, window end)

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


def login_source(ip: str) -> str:
    """The address a lockout is kept for: the IPv4 address, or the /64 of an IPv6 one (a host
    usually holds a whole /64, so single IPv6 addresses would give an attacker endless fresh sources)."""
    try:
        addr = ipaddress.ip_address((ip or "").split("%", 1)[0])
    except ValueError:
        return (ip or "-")[:64]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class Operators:
    def __init__(self, storage: Storage, settings: LoginSettings | None = None, events=None,
                 seal: AccessSeal | None = None) -> None:
        self.db = storage
        self.events = events          # server.events.EventBus: a changed operator drops its cached credentials
        self.seal = seal              # None only in `skm server init` (see the module docstring)
        self.configure(settings or LoginSettings.from_config(None))

    def configure(self, settings: LoginSettings) -> None:
        self.settings = settings
        self._limiter = _Limiter(settings.rate_per_minute)
        self._hasher: PasswordHasher | None = None
        self._dummy: str | None = None

    # ------------------------------------------------------------------ accounts
    async def create(self, name: str, role: str, password_hash: str | None = None, *,
                     password: str | None = None, project_id: int | None = None,
                     by: Operator | None = None) -> Operator:
        """A new operator with one role grant. `by`: who creates it (None: `skm server init`)."""
        check_role(role)
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise InvalidRequest("operator name must be 1 to 64 letters, digits, '.', '-' or '_'")
        if password is not None:
            password_hash = await self.hash_password(check_password(password))
        await self._check_project(project_id)
        now = timeutil.now_db()
        by_id = by.id if by is not None else None
        await self._seal_ready()
        try:
            async with self.db.transaction() as tx:
                row = await tx.fetchone("INSERT INTO operators (name, role, password_hash, created_at, created_by_id) "
                                        "VALUES (?, ?, ?, ?, ?) RETURNING id", name,
                                        role if project_id is None else "", password_hash, now, by_id)
                await self._seal_new(tx, "operators", row["id"])
                await self._insert_grant(tx, row["id"], role, project_id, by_id, now)
        except Exception as e:
            if "UniqueViolation" in type(e).__name__ or "UNIQUE" in str(e):
                raise Conflict("an operator with that name exists") from None
            raise
        return await self.by_id(row["id"])

    async def _check_project(self, project_id: int | None) -> None:
        if project_id is not None and not await self.db.fetchval("SELECT COUNT(*) AS n FROM projects WHERE id = ?",
                                                                 project_id):
            raise NotFound(f"no project with id {project_id}")

    # ------------------------------------------------------------------ seals
    async def _seal_ready(self) -> None:
        """Load the seal key before reading or writing sealed rows: its first load seals the rows already
        there (in a transaction of its own), so a row read before it would still be unsealed."""
        if self.seal is not None:
            await self.seal.key()

    async def _seal_new(self, tx, table: str, row_id: int) -> None:
        if self.seal is not None:
            await self.seal.seal_new(tx, table, row_id)

    async def _insert_grant(self, tx, operator_id: int, role: str, project_id: int | None, by_id: int | None,
                            now: str) -> None:
        row = await tx.fetchone("INSERT INTO operator_roles (operator_id, role, project_id, granted_by_id, granted_at) "
                                "VALUES (?, ?, ?, ?, ?) RETURNING id", operator_id, role, project_id, by_id, now)
        await self._seal_new(tx, "operator_roles", row["id"])
        await seal_edge(tx, self.seal, operator_id, by_id, now)     # outlives the grant row (lineage.py)

    async def _update(self, db, table: str, where: str, args: tuple, changes: dict, *, narrowing: bool = False) -> int:
        """UPDATE sealed rows. `narrowing` (a revocation, a disable, a delete): allowed on a row that
        fails its seal, since the row then allows nothing; anything else refuses such a row."""
        if self.seal is None:
            sets = ", ".join(f"{c} = ?" for c in changes)
            return await db.execute(f"UPDATE {table} SET {sets} WHERE {where}", *changes.values(), *args)
        return await self.seal.update(db, table, where, args, changes, check=not narrowing)

    async def _sealed(self, table: str, row: dict | None) -> bool:
        return row is not None and (self.seal is None or await self.seal.valid(table, row))

    async def _operator(self, row: dict, token_id: str | None = None) -> Operator:
        grants = await sealed_grants(self.db, self.seal, row["id"])
        glob = next((g.role for g in grants if g.project_id is None), "")
        return Operator(row["id"], row["name"], glob, token_id, grants)

    async def by_name(self, name: str) -> Operator:
        row = await self.db.fetchone("SELECT id, name FROM operators WHERE name = ? AND deleted_at IS NULL", name)
        if row is None:
            raise NotFound("no such operator")
        return await self._operator(row)

    async def by_id(self, operator_id: int) -> Operator:
        row = await self.db.fetchone("SELECT id, name FROM operators WHERE id = ? AND deleted_at IS NULL", operator_id)
        if row is None:
            raise NotFound("no such operator")
        return await self._operator(row)

    async def describe(self, name: str) -> dict:
        row = await self.db.fetchone(_SELECT + " WHERE o.name = ? AND o.deleted_at IS NULL", name)
        if row is None:
            raise NotFound("no such operator")
        return (await self._described([row]))[0]

    async def list(self) -> list[dict]:
        return await self._described(await self.db.fetchall(_SELECT + " WHERE o.deleted_at IS NULL ORDER BY o.name"))

    async def _described(self, rows: list[dict]) -> list[dict]:
        await self._seal_ready()
        names = {r["id"]: r["name"] for r in await self.db.fetchall("SELECT id, name FROM operators")}
        grants: dict[int, list[dict]] = {}
        for g in await self.db.fetchall(f"SELECT {columns('operator_roles')} FROM operator_roles "
                                        "WHERE revoked_at IS NULL ORDER BY id"):
            if not await self._sealed("operator_roles", g):
                continue                   # the roles in force only (a failing grant is logged and counted)
            grants.setdefault(g["operator_id"], []).append({
                "role": g["role"], "projectId": g["project_id"], "grantedBy": names.get(g["granted_by_id"]),
                "grantedAt": timeutil.to_api(g["granted_at"])})
        locked = await self._locked_ids()
        return [{**_api(r), "locked": r["id"] in locked, "roles": grants.get(r["id"], []),
                 "createdBy": names.get(r["created_by_id"])} for r in rows]

    async def role_history(self, name: str) -> list[dict]:
        """Every grant the operator ever had, with who granted and who revoked it."""
        target = await self.by_name(name)
        names = {r["id"]: r["name"] for r in await self.db.fetchall("SELECT id, name FROM operators")}
        rows = await self.db.fetchall("SELECT role, project_id, granted_by_id, granted_at, revoked_by_id, revoked_at "
                                      "FROM operator_roles WHERE operator_id = ? ORDER BY id", target.id)
        return [{"role": r["role"], "projectId": r["project_id"], "grantedBy": names.get(r["granted_by_id"]),
                 "grantedAt": timeutil.to_api(r["granted_at"]), "revokedBy": names.get(r["revoked_by_id"]),
                 "revokedAt": timeutil.to_api(r["revoked_at"])} for r in rows]

    async def update(self, name: str, *, role: str | None = None, disabled: bool | None = None,
                     password: str | None = None, unlock: bool = False, by: Operator | None = None) -> dict:
        target = await self.by_name(name)
        if role is not None:
            check_role(role)
        if by is not None and by.id == target.id and ((role and role != target.role) or disabled):
            raise Conflict("you cannot change your own role or disable yourself; ask another admin")
        if disabled and target.role == "admin":
            await self._keep_an_admin(target)
        if role is not None and role != target.role:
            await self.grant(name, role, None, by=by)
        changes: dict = {}
        if disabled is not None:
            changes["disabled"] = int(disabled)
        if password is not None:
            changes["password_hash"] = await self.hash_password(check_password(password))
        if changes:
            await self._seal_ready()
            async with self.db.transaction() as tx:
                # Disabling only narrows; enabling or a new password must start from an intact row.
                await self._update(tx, "operators", "id = ?", (target.id,), changes,
                                   narrowing=changes == {"disabled": 1})
        if disabled is not None:
            await self._changed(target)
        if password is not None and by is not None and by.id != target.id:
            await self.record_custody(target.id, by, "password_reset")
        if unlock or password is not None:
            await self.db.execute("UPDATE login_attempts SET failures = 0, window_failures = 0, locked_until = NULL "
                                  "WHERE operator_id = ?", target.id)
        return await self.describe(name)

    async def _changed(self, op: Operator) -> None:
        """Every worker and replica drops the access keys, tokens and roles it verified for `op`."""
        if self.events is not None:
            from server.access.authcache import CREDENTIAL_CHANGED
            from server.events import Event
            await self.events.publish(Event(keystore_id=0, kind=CREDENTIAL_CHANGED, key_id=f"operator:{op.id}"))

    async def grant(self, name: str, role: str, project_id: int | None, *, by: Operator | None) -> dict:
        """Give `name` the `role` globally (project_id None) or in one project; a previous role at the same
        scope is revoked (history kept). Granting the role it already has changes nothing."""
        check_role(role)
        target = await self.by_name(name)
        await self._check_project(project_id)
        if by is not None and by.id == target.id:
            raise Conflict("you cannot change your own roles; ask another admin")
        if Grant(role, project_id) in target.grants:
            return await self.describe(name)
        if project_id is None and target.role == "admin" and role != "admin":
            await self._keep_an_admin(target)
        now = timeutil.now_db()
        by_id = by.id if by is not None else None
        await self._seal_ready()
        async with self.db.transaction() as tx:
            await self._revoke_scope(tx, target.id, project_id, by_id, now)
            await self._insert_grant(tx, target.id, role, project_id, by_id, now)
            if project_id is None:
                await tx.execute("UPDATE operators SET role = ? WHERE id = ?", role, target.id)
        await self._changed(target)
        return await self.describe(name)

    async def revoke(self, name: str, project_id: int | None, *, by: Operator) -> dict:
        """Take away `name`'s role at one scope (global when project_id is None)."""
        target = await self.by_name(name)
        if by.id == target.id:
            raise Conflict("you cannot change your own roles; ask another admin")
        if not any(g.project_id == project_id for g in target.grants):
            raise NotFound("the operator holds no role there")
        if project_id is None and target.role == "admin":
            await self._keep_an_admin(target)
        await self._seal_ready()
        async with self.db.transaction() as tx:
            await self._revoke_scope(tx, target.id, project_id, by.id, timeutil.now_db())
            if project_id is None:
                await tx.execute("UPDATE operators SET role = '' WHERE id = ?", target.id)
        await self._changed(target)
        return await self.describe(name)

    async def _revoke_scope(self, tx, operator_id: int, project_id: int | None, by_id: int | None, now: str) -> None:
        revoked = {"revoked_at": now, "revoked_by_id": by_id}
        if project_id is None:
            await self._update(tx, "operator_roles", "operator_id = ? AND project_id IS NULL AND revoked_at IS NULL",
                               (operator_id,), revoked, narrowing=True)
        else:
            await self._update(tx, "operator_roles", "operator_id = ? AND project_id = ? AND revoked_at IS NULL",
                               (operator_id, project_id), revoked, narrowing=True)

    async def record_custody(self, operator_id: int, by: Operator, what: str) -> None:
        """`by` set a password of, or issued a credential to, another operator: a lineage edge."""
        if by.id != operator_id:
            now = timeutil.now_db()
            async with self.db.transaction() as tx:
                await tx.execute("INSERT INTO operator_custody (operator_id, by_id, what, at) VALUES (?, ?, ?, ?)",
                                 operator_id, by.id, what, now)
                await seal_edge(tx, self.seal, operator_id, by.id, now)

    async def delete(self, name: str, *, by: Operator) -> None:
        """A tombstone, not a delete: the lineage of everything this operator made must survive it.
        The name is freed (renamed `name~id`, which no live name can match)."""
        target = await self.by_name(name)
        if target.id == by.id:
            raise Conflict("you cannot delete yourself")
        if target.role == "admin":
            await self._keep_an_admin(target)
        if await self.db.fetchval("SELECT COUNT(*) AS n FROM user_access_keys WHERE operator_id = ? AND revoked = 0",
                                  target.id):
            raise Conflict("the operator still owns user access keys; delete them first or disable "
                           "the operator instead")
        now = timeutil.now_db()
        await self._seal_ready()
        async with self.db.transaction() as tx:
            await tx.execute("DELETE FROM operator_tokens WHERE operator_id = ?", target.id)
            await self._update(tx, "operator_roles", "operator_id = ? AND revoked_at IS NULL", (target.id,),
                               {"revoked_at": now, "revoked_by_id": by.id}, narrowing=True)
            await self._update(tx, "operators", "id = ?", (target.id,),
                               {"name": f"{target.name}~{target.id}", "role": "", "disabled": 1,
                                "password_hash": None, "deleted_at": now}, narrowing=True)
        await self._changed(target)

    async def _keep_an_admin(self, leaving: Operator) -> None:
        # Only a grant and an operator as the key server wrote them count: an admin forged in the
        # database must not let the last real one be disabled, demoted or deleted.
        seal = self.seal
        if seal is not None:
            await seal.key()
        grants = await self.db.fetchall(f"SELECT {columns('operator_roles')} FROM operator_roles WHERE "
                                        "role = 'admin' AND project_id IS NULL AND revoked_at IS NULL AND "
                                        "operator_id <> ?", leaving.id)
        for g in grants:
            op = await self.db.fetchone(f"SELECT {columns('operators')} FROM operators WHERE id = ? AND disabled = 0 "
                                        "AND deleted_at IS NULL", g["operator_id"])
            if op is not None and (seal is None or (await seal.valid("operator_roles", g)
                                                    and await seal.valid("operators", op))):
                return
        raise Conflict("this is the last enabled global admin; create another admin first")

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
        """Rate limit, lockout, and the password check, without issuing anything.

        Lockout is per (name, source address): failures from one address lock the name for that
        address only, so nobody can lock an operator out from elsewhere without its password. A
        per-name ceiling (`max_failures_per_name` within `lockout_seconds`, all addresses together)
        stops a distributed guesser; past it the name still accepts logins from addresses it has
        logged in from before."""
        if not self._limiter.hit(ip or "-"):
            raise TooManyAttempts("too many login attempts from this address; wait a minute")
        name = text.storable((name or "")[:64])    # a NUL matches no operator; PostgreSQL would refuse it
        password = (password or "")[:MAX_PASSWORD]
        source = login_source(ip)
        now = timeutil.now()
        stamp = timeutil.to_db(now)
        window_start = timeutil.to_db(now - dt.timedelta(seconds=self.settings.lockout_seconds))
        await self._seal_ready()
        row = await self.db.fetchone(f"SELECT {columns('operators')} FROM operators "
                                     "WHERE name = ? AND deleted_at IS NULL", name)
        if row is None:
            return await self._unknown_failure(name, password, source, now)
        # A row that fails its seal (a password hash set in the database) fails like a wrong password.
        intact = await self._sealed("operators", row)
        known = await self.db.fetchval("SELECT last_success_at FROM login_attempts WHERE operator_id = ? AND "
                                       "source = ?", row["id"], source)
        if known is None and await self._over_ceiling(row["id"], window_start):
            await self._verify(None, password)
            raise TooManyAttempts(_ceiling_hint(self.settings))
        # Count the attempt as a failure before the (slow) password check, in one atomic statement,
        # so concurrent attempts each see their own count: at most `max_failures` passwords are
        # ever checked per source before the lock holds. A locked pair is not counted (nor checked).
        claim = await self.db.fetchone(
            "INSERT INTO login_attempts (operator_id, source, failures, window_failures, last_failure_at) "
            "VALUES (?, ?, 1, 1, ?) ON CONFLICT (operator_id, source) DO UPDATE SET "
            "failures = login_attempts.failures + 1, "
            "window_failures = CASE WHEN login_attempts.last_failure_at IS NULL OR "
            "login_attempts.last_failure_at <= ? THEN 1 ELSE login_attempts.window_failures + 1 END, "
            "last_failure_at = ? "
            "WHERE login_attempts.locked_until IS NULL OR login_attempts.locked_until <= ? RETURNING failures",
            row["id"], source, stamp, window_start, stamp, stamp)
        limit = max(1, self.settings.max_failures)
        until = timeutil.to_db(now + dt.timedelta(seconds=self.settings.lockout_seconds))
        if claim is not None and int(claim["failures"]) > limit:
            # The budget is spent by attempts still being checked (or abandoned mid-check): lock now,
            # so an abandoned attempt cannot leave the pair refused with no lockout that ends. An
            # attempt still in flight with the right password lifts the lock when it succeeds.
            await self._lock(row["id"], source, until, stamp)
        if claim is None or int(claim["failures"]) > limit:
            await self._verify(None, password)                     # same work as any other attempt
            raise TooManyAttempts(_locked_hint(self.settings))
        ok = await self._verify(row["password_hash"], password)
        if not ok or row["disabled"] or not intact:
            if int(claim["failures"]) >= limit:
                await self._lock(row["id"], source, until, None)
                raise TooManyAttempts(_locked_hint(self.settings))
            raise Unauthenticated(LOGIN_FAILED)
        await self.db.execute("UPDATE login_attempts SET failures = 0, window_failures = 0, locked_until = NULL, "
                              "last_success_at = ? WHERE operator_id = ? AND source = ?", stamp, row["id"], source)
        if self._ph().check_needs_rehash(row["password_hash"]):
            await self._update(self.db, "operators", "id = ? AND password_hash = ?", (row["id"], row["password_hash"]),
                               {"password_hash": await self.hash_password(password)})
        return await self._operator(row)

    async def _lock(self, operator_id: int, source: str, until: str, unless_locked_at: str | None) -> None:
        sql = "UPDATE login_attempts SET failures = 0, locked_until = ? WHERE operator_id = ? AND source = ?"
        if unless_locked_at is None:
            await self.db.execute(sql, until, operator_id, source)
        else:
            await self.db.execute(sql + " AND (locked_until IS NULL OR locked_until <= ?)", until, operator_id,
                                  source, unless_locked_at)

    async def _over_ceiling(self, operator_id: int, window_start: str) -> bool:
        total = await self.db.fetchval("SELECT COALESCE(SUM(window_failures), 0) AS n FROM login_attempts "
                                       "WHERE operator_id = ? AND last_failure_at > ?", operator_id, window_start)
        return int(total or 0) >= max(1, self.settings.max_failures_per_name)

    async def _locked_ids(self) -> set[int]:
        now = timeutil.now()
        stamp = timeutil.to_db(now)
        window_start = timeutil.to_db(now - dt.timedelta(seconds=self.settings.lockout_seconds))
        rows = await self.db.fetchall(
            "SELECT operator_id, MAX(CASE WHEN locked_until > ? THEN 1 ELSE 0 END) AS locked, "
            "SUM(CASE WHEN last_failure_at > ? THEN window_failures ELSE 0 END) AS total "
            "FROM login_attempts GROUP BY operator_id", stamp, window_start)
        ceiling = max(1, self.settings.max_failures_per_name)
        return {r["operator_id"] for r in rows if r["locked"] or int(r["total"] or 0) >= ceiling}

    async def _unknown_failure(self, name: str, password: str, source: str, now: dt.datetime):
        await self._verify(None, password)
        lim = self._limiter
        name_key = _digest("login:" + name)
        count, window_end = lim.unknown_total.pop(name_key, (0, None))
        if window_end is None or window_end <= now:
            count, window_end = 0, now + dt.timedelta(seconds=self.settings.lockout_seconds)
        if count >= max(1, self.settings.max_failures_per_name):
            lim.unknown_total[name_key] = (count, window_end)
            raise TooManyAttempts(_ceiling_hint(self.settings))
        key = _digest("login:" + name + "\x00" + source)
        failures, until = lim.unknown.pop(key, (0, None))
        if until is not None and until > now:
            lim.unknown[key] = (failures, until)
            lim.unknown_total[name_key] = (count, window_end)
            raise TooManyAttempts(_locked_hint(self.settings))
        failures = 0 if until is not None else failures
        failures += 1
        lim.unknown_total[name_key] = (count + 1, window_end)
        if failures >= self.settings.max_failures:
            lim.unknown[key] = (0, now + dt.timedelta(seconds=self.settings.lockout_seconds))
            self._trim_unknown()
            raise TooManyAttempts(_locked_hint(self.settings))
        lim.unknown[key] = (failures, None)
        self._trim_unknown()
        raise Unauthenticated(LOGIN_FAILED)

    def _trim_unknown(self) -> None:
        for d in (self._limiter.unknown, self._limiter.unknown_total):
            while len(d) > 10000:
                d.popitem(last=False)

    # -------------------------------------------------------------------- tokens
    async def issue_token(self, op: Operator, description: str = "", ttl_days: float | None = 90, *,
                          by: Operator | None = None) -> str:
        text.check(description, "description")
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        expires = timeutil.to_db(timeutil.now() + dt.timedelta(days=ttl_days)) if ttl_days else None
        row = {"id": token_id, "operator_id": op.id, "secret_hash": _digest(secret), "description": description[:200],
               "expires_at": expires, "revoked": 0, "created_at": timeutil.now_db()}
        if self.seal is None:
            await insert_row(self.db, "operator_tokens", row)
        else:
            await self.seal.insert(self.db, "operator_tokens", row)
        if by is not None:
            await self.record_custody(op.id, by, "token")
        return f"skm_{token_id}_{secret}"

    async def tokens(self, operator_id: int | None = None) -> list[dict]:
        await self._seal_ready()
        sql = ("SELECT t.id, t.operator_id, t.secret_hash, t.description, t.expires_at, t.revoked, t.created_at, "
               "t.seal, o.name FROM operator_tokens t JOIN operators o ON o.id = t.operator_id")
        rows = await (self.db.fetchall(sql + " ORDER BY t.created_at", ) if operator_id is None else
                      self.db.fetchall(sql + " WHERE t.operator_id = ? ORDER BY t.created_at", operator_id))
        now = timeutil.now_db()
        out = []
        for r in rows:
            # INVALID: the row was written or changed outside the key server, so it authenticates nobody.
            status = ("REVOKED" if r["revoked"] else "INVALID" if not await self._sealed("operator_tokens", r) else
                      "EXPIRED" if r["expires_at"] and r["expires_at"] <= now else "ACTIVE")
            out.append({"tokenId": r["id"], "operator": r["name"], "description": r["description"],
                        "creationDatetime": timeutil.to_api(r["created_at"]),
                        "expirationDatetime": timeutil.to_api(r["expires_at"]), "status": status})
        return out

    async def revoke_token(self, token_id: str, by: Operator | None = None) -> None:
        await self._seal_ready()
        if by is not None and by.role != "admin":
            # Non-admins revoke their own tokens only; another's looks like a missing one.
            n = await self._update(self.db, "operator_tokens", "id = ? AND operator_id = ?", (token_id, by.id),
                                   {"revoked": 1}, narrowing=True)
        else:
            n = await self._update(self.db, "operator_tokens", "id = ?", (token_id,), {"revoked": 1}, narrowing=True)
        if n != 1:
            raise NotFound("no such token")

    async def authenticate_token(self, token: str) -> Operator:
        parsed = parse_token(token)
        if parsed is None:
            raise Unauthenticated("send an operator token: Authorization: Bearer skm_...")
        token_id, secret = parsed
        await self._seal_ready()
        row = await self.db.fetchone(
            "SELECT t.id AS token_id, t.operator_id, t.secret_hash, t.expires_at, t.revoked, t.seal AS token_seal, "
            "o.id, o.name, o.password_hash, o.disabled, o.deleted_at, o.created_by_id, o.created_at, o.lineage, o.seal "
            "FROM operator_tokens t "
            "JOIN operators o ON o.id = t.operator_id WHERE t.id = ?", token_id)
        # Compare even when the row is missing so timing does not tell which ids exist.
        expected = row["secret_hash"] if row else _digest("x" * 43)
        good = hmac.compare_digest(expected, _digest(secret))
        if not row or not good or row["revoked"] or row["disabled"] or not await self._sealed_token(row):
            raise Unauthenticated("the operator token is not valid; create a new one with `skm token create`")
        if row["expires_at"] and row["expires_at"] <= timeutil.now_db():
            raise Unauthenticated("the operator token has expired; create a new one with `skm token create`")
        return await self._operator(row, token_id)

    async def _sealed_token(self, row: dict) -> bool:
        """The token's row and its operator's row (one joined read) both as the key server wrote them."""
        token = {"id": row["token_id"], "operator_id": row["operator_id"], "secret_hash": row["secret_hash"],
                 "expires_at": row["expires_at"], "revoked": row["revoked"], "seal": row["token_seal"]}
        return await self._sealed("operator_tokens", token) and await self._sealed("operators", row)


_SELECT = ("SELECT o.id, o.name, o.role, o.disabled, o.password_hash, o.created_at, o.created_by_id, "
           "(SELECT COUNT(*) FROM operator_tokens t WHERE t.operator_id = o.id AND t.revoked = 0) "
           "AS tokens FROM operators o")


def _api(r: dict) -> dict:
    return {"name": r["name"], "role": r["role"], "disabled": bool(r["disabled"]),
            "hasPassword": r["password_hash"] is not None, "activeTokens": int(r["tokens"] or 0),
            "creationDatetime": timeutil.to_api(r["created_at"])}


def _locked_hint(s: LoginSettings) -> str:
    return f"too many failed logins for this name; try again in {max(1, s.lockout_seconds // 60)} minute(s)"


def _ceiling_hint(s: LoginSettings) -> str:
    return (f"too many failed logins for this name from many addresses; for {max(1, s.lockout_seconds // 60)} "
            "minute(s) it accepts logins only from addresses it has logged in from before (an admin can unlock it)")
