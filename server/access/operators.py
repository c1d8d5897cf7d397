"""Operators of the management plane and their API tokens.

Tokens look like `skm_<id>_<secret>`: the id finds the row, the secret is
compared as a SHA-256 digest in constant time (the secret has 256 bits of
entropy, so a fast hash is the right tool; passwords get argon2).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from server import timeutil
from server.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unauthenticated
from server.storage.base import Storage

ROLES = ("admin", "approver", "viewer")


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


class Operators:
    def __init__(self, storage: Storage) -> None:
        self.db = storage

    async def create(self, name: str, role: str, password_hash: str | None = None) -> Operator:
        if role not in ROLES:
            raise InvalidRequest(f"role must be one of {', '.join(ROLES)}")
        if not name or len(name) > 64:
            raise InvalidRequest("operator name must be 1 to 64 characters")
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

    async def issue_token(self, op: Operator, description: str = "", ttl_days: float | None = 90) -> str:
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        expires = timeutil.to_db(timeutil.now() + dt.timedelta(days=ttl_days)) if ttl_days else None
        await self.db.execute("INSERT INTO operator_tokens (id, operator_id, secret_hash, description, expires_at, "
                              "created_at) VALUES (?, ?, ?, ?, ?, ?)", token_id, op.id, _digest(secret),
                              description, expires, timeutil.now_db())
        return f"skm_{token_id}_{secret}"

    async def revoke_token(self, token_id: str) -> None:
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
