"""Per-key-store cache of client-auth data (IPv4 networks, MACs, certificate fingerprints).

The data-plane checks (server/access/clientauth.py) otherwise read these tables on
every request. Entries are dropped by the `auth_changed` / `keystore_updated` /
`reset` events every writer publishes (authdata, certificates; replicas relay
theirs through the same bus), drained synchronously at each lookup, so an added,
scheduled or deleted entry counts on the very next request. A fill that raced
with an event for its store is not kept (generation check), and `max_age` bounds
staleness should an event ever be lost. Expiry of certificates is checked per
request against the cached `expires_at`. What is held is server/access/authentries.py's
AuthEntries: entries that pass their seal, no credential.

`CachedClientAccess` is ClientAccess with its entries served from here.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from server.access.authentries import AuthEntries, load_entries
from server.access.clientauth import ClientAccess
from server.events import EventBus
from server.keys.model import KeyStore
from server.storage.base import Storage


class AuthCache:
    def __init__(self, storage: Storage, events: EventBus, seal, *, max_age: float = 5.0,
                 max_entries: int = 10_000) -> None:
        self.db = storage
        self.seal = seal             # server.access.seal.AccessSeal: entries failing their seal are left out
        self.max_age = max_age
        self.max_entries = max_entries
        self._q = events.subscribe()
        self._entries: OrderedDict[int, tuple[float, AuthEntries]] = OrderedDict()
        self._gen: dict[int, int] = {}
        self._all_gen = 0

    def _sync(self) -> None:
        q = self._q
        while not q.empty():
            ev = q.get_nowait()
            if ev.kind == "reset":
                self._all_gen += 1
                self._entries.clear()
            elif ev.kind in ("auth_changed", "keystore_updated", "keystore_deleted"):
                self._gen[ev.keystore_id] = self._gen.get(ev.keystore_id, 0) + 1
                self._entries.pop(ev.keystore_id, None)

    def invalidate(self, keystore_id: int | None = None) -> None:
        if keystore_id is None:
            self._all_gen += 1
            self._entries.clear()
        else:
            self._gen[keystore_id] = self._gen.get(keystore_id, 0) + 1
            self._entries.pop(keystore_id, None)

    def _generation(self, keystore_id: int) -> tuple[int, int]:
        return self._all_gen, self._gen.get(keystore_id, 0)

    async def entries(self, ks: KeyStore | int) -> AuthEntries:
        ks_id = ks if isinstance(ks, int) else ks.id
        self._sync()
        hit = self._entries.get(ks_id)
        if hit is not None and time.monotonic() - hit[0] <= self.max_age:
            self._entries.move_to_end(ks_id)
            return hit[1]
        gen = self._generation(ks_id)
        found = await load_entries(self.db, self.seal, ks_id)
        self._sync()
        if self._generation(ks_id) == gen:     # no change announced while we read
            self._entries[ks_id] = (time.monotonic(), found)
            self._entries.move_to_end(ks_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return found


class CachedClientAccess(ClientAccess):
    """ClientAccess whose IPv4, MAC and certificate entries come from an AuthCache."""

    def __init__(self, storage: Storage, seal, trusted_proxies: tuple[str, ...] = (), *, events: EventBus,
                 max_age: float = 5.0) -> None:
        super().__init__(storage, seal, trusted_proxies)
        self.cache = AuthCache(storage, events, seal, max_age=max_age)

    async def entries(self, ks: KeyStore) -> AuthEntries:
        return await self.cache.entries(ks)


# ------------------------------------------------------------------ verified caller credentials (v1.2 / v1.3)
CREDENTIAL_CHANGED = "credential_changed"     # Event.kind; key_id names what: token:<id>, accesskey:<id>, operator:<id>


@dataclass(frozen=True)
class VerifiedCredential:
    """A credential the database said was good: its stored digest and what it stands for.

    `digest` is the SHA-256 the database holds (never the secret); a hit still compares the
    presented secret's digest with it in constant time. `expires` is the earliest of the
    token's and the access key's expiry, as epoch seconds (None: never)."""
    digest: str
    key: object                       # server.access.callers.AccessKey
    expires: float | None
    access_key_id: str
    operator_id: int


class CredentialCache:
    """Verified v1.3 bearer tokens and v1.2 user access keys, per worker, dropped on change events.

    The operator a credential acts as (its role grants) is kept beside it. Every writer of a
    credential publishes `credential_changed` (a revoked token, a deleted access key, an operator
    disabled, deleted, granted or revoked a role); the workers' datagram channel and PostgreSQL's LISTEN/NOTIFY carry it
    to every worker and replica, and the bus is drained synchronously at each lookup, so a change
    counts on the very next request everywhere. Only positive answers are kept (a wrong secret
    always costs the database read), a fill that raced with an event is not kept, expiry is
    checked at every hit, and `max_age` bounds staleness should an event ever be lost (a gap in
    the channel also delivers `reset`, which empties the cache)."""

    def __init__(self, events: EventBus, *, max_age: float = 30.0, max_entries: int = 10_000,
                 clock=time.time) -> None:
        self.max_age = max_age
        self.max_entries = max_entries
        self.clock = clock
        self._q = events.subscribe()
        self._d: OrderedDict[str, tuple[float, VerifiedCredential]] = OrderedDict()   # "t:<id>" / "k:<id>"
        self._ops: OrderedDict[int, tuple[float, object]] = OrderedDict()   # operator id -> Operator (roles)
        self._gen = 0

    def _sync(self) -> None:
        q = self._q
        while not q.empty():
            ev = q.get_nowait()
            if ev.kind == "reset":
                self.clear()
            elif ev.kind == CREDENTIAL_CHANGED:
                self._drop(ev.key_id or "")

    def _drop(self, what: str) -> None:
        self._gen += 1
        kind, _, ident = what.partition(":")
        if kind == "token":
            self._d.pop("t:" + ident, None)
        elif kind == "accesskey":
            for k in [k for k, (_, c) in self._d.items() if c.access_key_id == ident]:
                del self._d[k]
        elif kind == "operator" and (ident.isascii() and ident.isdigit()):
            op = int(ident)
            self._ops.pop(op, None)
            for k in [k for k, (_, c) in self._d.items() if c.operator_id == op]:
                del self._d[k]
        else:                                   # unknown or everything: forget all
            self._d.clear()
            self._ops.clear()

    def clear(self) -> None:
        self._gen += 1
        self._d.clear()
        self._ops.clear()

    def operator(self, operator_id: int):
        """The operator (with its role grants) a credential acts as, if cached and fresh."""
        self._sync()
        hit = self._ops.get(operator_id)
        if hit is None or time.monotonic() - hit[0] > self.max_age:
            return None
        return hit[1]

    def put_operator(self, operator_id: int, op, gen: int) -> None:
        if self.generation != gen:
            return
        now = time.monotonic()
        ops = self._ops
        ops[operator_id] = (now, op)
        ops.move_to_end(operator_id)
        while ops and (len(ops) > self.max_entries or now - next(iter(ops.values()))[0] > self.max_age):
            ops.popitem(last=False)

    @property
    def generation(self) -> int:
        self._sync()
        return self._gen

    def get(self, kind: str, ident: str) -> VerifiedCredential | None:
        """The cached credential `kind` ("t" token, "k" access key) with id `ident`, if fresh."""
        self._sync()
        hit = self._d.get(f"{kind}:{ident}")
        if hit is None:
            return None
        if time.monotonic() - hit[0] > self.max_age:
            self._d.pop(f"{kind}:{ident}", None)
            return None
        return hit[1]

    def expired(self, cred: VerifiedCredential) -> bool:
        return cred.expires is not None and cred.expires <= self.clock()

    def put(self, kind: str, ident: str, cred: VerifiedCredential, gen: int) -> None:
        if self.generation != gen:          # a change was announced while the database was read
            return
        now = time.monotonic()
        d = self._d
        d[f"{kind}:{ident}"] = (now, cred)
        d.move_to_end(f"{kind}:{ident}")
        while d and (len(d) > self.max_entries or now - next(iter(d.values()))[0] > self.max_age):
            d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)
