"""The key service's two in-process caches: loaded key material, and key / key-store rows.

Both live in one object per process (KeyContext) so every part of the service sees
the same entries and the same invalidation.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from server.events import EventBus
from server.keys.model import Key, KeyStore


class MaterialCache:
    """Bounded cache of loaded key versions (parsed keys are costly: RSA especially).

    Secret values are held as bytearrays and overwritten with zeros when they leave
    the cache (evicted, key deleted, cache cleared): what Python lets us wipe. The
    cache is never logged or rendered.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[tuple[str, int], Any] = OrderedDict()

    def get(self, k):
        v = self._d.get(k)
        if v is not None:
            self._d.move_to_end(k)
        return v

    def put(self, k, v) -> None:
        old = self._d.get(k)
        if old is not None and old is not v:
            _wipe(old)
        self._d[k] = v
        self._d.move_to_end(k)
        while len(self._d) > self.size:
            _wipe(self._d.popitem(last=False)[1])

    def drop_key(self, key_id: str) -> None:
        for k in [k for k in self._d if k[0] == key_id]:
            _wipe(self._d.pop(k))

    def clear(self) -> None:
        for v in self._d.values():
            _wipe(v)
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)


def _copy(obj: Any) -> Any:
    """A shallow copy of a row dataclass, so a caller's edits never reach the cache.

    dataclasses.replace re-runs __init__ and costs ~10 µs; this is the hot path's copy."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    return new


def _wipe(v: Any) -> None:
    if isinstance(v, bytearray):
        v[:] = bytes(len(v))


class MetaCache:
    """Key and key-store rows by id, dropped on the change events every writer publishes.

    The event bus is drained synchronously at each lookup (no task to run); replicas on
    PostgreSQL relay their events into the same bus. A fill that raced with an event
    for the same id is not stored (generation check), and an entry older than
    `max_age` is read again, a bound on staleness should an event ever be lost.
    """

    def __init__(self, events: EventBus, size: int, max_age: float) -> None:
        self.size, self.max_age = size, max_age
        self._q = events.subscribe()
        self._keys: OrderedDict[str, tuple[float, Key]] = OrderedDict()
        self._stores: dict[int, tuple[float, KeyStore]] = {}
        self._gen = 0
        self.on_version_disabled = None       # Crypto drops that key's loaded versions (other processes too)

    def sync(self) -> None:
        q = self._q
        while not q.empty():
            ev = q.get_nowait()
            self._gen += 1
            if ev.kind == "reset":
                self.clear()
            if ev.key_id:
                self._keys.pop(ev.key_id, None)
                if ev.kind == "key_version_disabled" and self.on_version_disabled is not None:
                    self.on_version_disabled(ev.key_id)     # loaded material skips the status check
            if ev.kind in ("keystore_updated", "keystore_deleted"):
                self._stores.pop(ev.keystore_id, None)

    def clear(self) -> None:
        self._gen += 1
        self._keys.clear()
        self._stores.clear()

    @property
    def generation(self) -> int:
        self.sync()
        return self._gen

    def key(self, key_id: str) -> Key | None:
        self.sync()
        hit = self._keys.get(key_id)
        if hit is None or time.monotonic() - hit[0] > self.max_age:
            return None
        return _copy(hit[1])

    def put_key(self, key: Key, gen: int) -> None:
        if self.generation != gen:
            return
        now = time.monotonic()
        self._keys[key.id] = (now, _copy(key))
        self._keys.move_to_end(key.id)
        # Oldest fill first (a hit does not reorder): drop what is over the size or too old to be served,
        # so the cache holds the keys used in the last max_age seconds, not the last `size` ever used.
        keys = self._keys
        while keys and (len(keys) > self.size or now - next(iter(keys.values()))[0] > self.max_age):
            keys.popitem(last=False)

    def drop_key(self, key_id: str) -> None:
        self._gen += 1
        self._keys.pop(key_id, None)

    def store(self, keystore_id: int) -> KeyStore | None:
        self.sync()
        hit = self._stores.get(keystore_id)
        if hit is None or time.monotonic() - hit[0] > self.max_age:
            return None
        return _copy(hit[1])

    def put_store(self, ks: KeyStore, gen: int) -> None:
        if self.generation != gen:
            return
        if len(self._stores) >= self.size:
            self._stores.clear()
        self._stores[ks.id] = (time.monotonic(), _copy(ks))

    def drop_store(self, keystore_id: int) -> None:
        self._gen += 1
        self._stores.pop(keystore_id, None)
