"""Naming a key in a template or `skm run --env`: a key id, or `store-name/key-name`.

Names are resolved through the key server's read-only client inventory (v1.0+, the appkey's
project): `GET /keystores?detail=true` for the store, `GET /keystores/{id}/keys?detail=true&name=`
for the key (names are unique in their scope). The same code runs inside the sidecar (its upstream)
and in `skm run` (through the sidecar's socket, which proxies the inventory): only `get` differs.

A store name holding '/' cannot be used here (the first '/' splits): name such a key by its id.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import quote

KEY_ID = re.compile(r"[0-9a-f]{32}")
# (status, parsed envelope or {}) for a client-API suffix and query string
Get = Callable[[str, str], Awaitable[tuple[int, dict]]]


class KeyUnavailable(Exception):
    """A referenced key cannot be had. `definitive`: the key server said no (missing, refused), as opposed
    to not answering. The message names the reference, never a value."""

    def __init__(self, message: str, *, definitive: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.definitive = definitive
        self.status = status            # the key server's HTTP status, when it answered


@dataclass(frozen=True)
class KeyRef:
    text: str
    key_id: str | None = None
    store: str | None = None
    name: str | None = None

    @classmethod
    def parse(cls, text: object) -> "KeyRef":
        if not isinstance(text, str) or not text or len(text) > 201:
            raise ValueError("name a key by its id (32 hex) or as store-name/key-name")
        if KEY_ID.fullmatch(text):
            return cls(text, key_id=text)
        store, sep, name = text.partition("/")
        if not sep or not store or not name or len(store) > 100 or len(name) > 100:
            raise ValueError(f"{text!r} is neither a key id (32 hex) nor store-name/key-name")
        return cls(text, store=store, name=name)


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    keystore_id: int | None
    key_type: str | None
    version: int | None


def message_of(body: dict) -> str:
    try:
        return str(body["header"]["resultMessage"])
    except (KeyError, TypeError):
        return ""


def parse_body(raw: bytes) -> dict:
    try:
        out = json.loads(raw)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def refusal(status: int, body: dict, what: str) -> KeyUnavailable:
    """A non-200 answer as a KeyUnavailable: 4xx is the server's word (definitive), 5xx is not."""
    msg = message_of(body) or f"HTTP {status}"
    return KeyUnavailable(f"{what}: {msg}", definitive=400 <= status < 500 and status not in (408, 429),
                          status=status)


class Resolver:
    """Key references to key ids (and, for the sidecar, their store, type and current version)."""

    def __init__(self, get: Get, ttl: float = 30.0) -> None:
        self.get = get
        self.ttl = ttl
        self._stores: tuple[dict[str, int], float] | None = None     # name -> id, fetched at
        self._home: dict[str, int] = {}                                # key id -> key store id

    def forget(self) -> None:
        """Names may have moved (a key or store created, renamed, deleted): ask again next time."""
        self._stores = None
        self._home.clear()

    async def _json(self, suffix: str, query: str, what: str) -> dict:
        status, body = await self.get(suffix, query)
        if status != 200:
            raise refusal(status, body, what)
        out = body.get("body")
        return out if isinstance(out, dict) else {}

    async def _store_ids(self, ref: KeyRef) -> dict[str, int]:
        now = time.monotonic()
        if self._stores is None or now - self._stores[1] >= self.ttl:
            body = await self._json("/keystores", "detail=true", f"{ref.text}: listing key stores")
            self._stores = ({s["name"]: int(s["keyStoreId"]) for s in body.get("keyStoreList") or ()
                             if isinstance(s, dict) and "name" in s and "keyStoreId" in s}, now)
        return self._stores[0]

    async def key_id(self, ref: KeyRef) -> str:
        if ref.key_id:
            return ref.key_id
        return (await self.info(ref)).key_id

    async def info(self, ref: KeyRef) -> KeyInfo:
        """The key's id, store, type and current version (one or two inventory reads)."""
        if ref.key_id:
            sid = await self._home_of(ref)
            k = await self._json(f"/keystores/{sid}/keys/{ref.key_id}", "", ref.text)
            return _info(k, ref.key_id, sid)
        sid = (await self._store_ids(ref)).get(ref.store or "")
        if sid is None:
            self._stores = None          # created a moment ago? the next attempt asks again
            raise KeyUnavailable(f"{ref.text}: no key store named {ref.store!r}", definitive=True)
        body = await self._json(f"/keystores/{sid}/keys", f"detail=true&name={quote(ref.name or '', safe='')}",
                                ref.text)
        found = [k for k in body.get("keyList") or () if isinstance(k, dict) and k.get("name") == ref.name]
        if len(found) != 1:
            raise KeyUnavailable(f"{ref.text}: no key named {ref.name!r} in key store {ref.store!r}",
                                 definitive=True)
        return _info(found[0], str(found[0].get("keyId")), sid)

    async def _home_of(self, ref: KeyRef) -> int:
        """The key store holding a key given by id: the inventory lists key ids per store."""
        sid = self._home.get(ref.key_id or "")
        if sid is not None:
            return sid
        ids = (await self._json("/keystores", "", f"{ref.text}: listing key stores")).get("keyStoreIdList") or ()
        for sid in ids:
            keys = (await self._json(f"/keystores/{int(sid)}/keys", "", ref.text)).get("keyIdList") or ()
            for k in keys:
                self._home[str(k)] = int(sid)
            if ref.key_id in keys:
                return int(sid)
        raise KeyUnavailable(f"{ref.text}: no key with that id in this project's key stores", definitive=True)


def _info(k: dict, key_id: str, sid: int) -> KeyInfo:
    v = k.get("currentKeyValueVersion")
    return KeyInfo(key_id, sid, k.get("keyType"), v if isinstance(v, int) else None)
