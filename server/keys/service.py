"""KeyService: the one object callers use (`rt.keys`) for key stores, keys and versions.

Handlers stay thin: they parse, call one method here and render. The rules live in the parts
this class holds, one module each, sharing one KeyContext (storage, barrier, events, caches):

* stores.py    projects and key stores
* lookup.py    reading keys (the cached hot path, pages)
* lifecycle.py create, rotate, update, schedule/cancel deletion, delete, purge
* crypto.py    secret values, encrypt/decrypt, sign/verify, data keys, export
* lastaccess.py last-access timestamps
* jobs.py      purge and rotation when due

The methods are the parts' own bound methods, bound here once: callers keep one flat API and
nothing in between costs a call on the hot path.
"""
from __future__ import annotations

import datetime as dt

from server.access.seal import AccessSeal
from server.barrier.barrier import Barrier
from server.events import EventBus
from server.keys import jobs
from server.keys.context import KeyContext, Limits
from server.keys.crypto import Crypto
from server.keys.lastaccess import LastAccess
from server.keys.lifecycle import Lifecycle
from server.keys.lookup import KeyLookup
from server.keys.stores import Stores
from server.storage.base import Storage

__all__ = ["KeyService", "Limits"]


class KeyService:
    def __init__(self, storage: Storage, barrier: Barrier, events: EventBus | None = None,
                 limits: Limits | None = None, seal: AccessSeal | None = None) -> None:
        ctx = self.ctx = KeyContext(storage, barrier, events or EventBus(), limits or Limits(),
                                    seal or AccessSeal(storage, barrier))
        self.db, self.barrier, self.events, self.limits = ctx.db, ctx.barrier, ctx.events, ctx.limits
        self.stores = Stores(ctx)
        self.lookup = KeyLookup(ctx, self.stores)
        self.lifecycle = Lifecycle(ctx, self.lookup)
        self.crypto = Crypto(ctx)
        self.last_access = LastAccess(ctx)

        s = self.stores
        self.create_project, self.project_by_appkey = s.create_project, s.project_by_appkey
        self.project, self.projects, self.default_project = s.project, s.projects, s.default_project
        self.create_keystore, self.update_keystore = s.create_keystore, s.update_keystore
        self.keystore, self.keystore_by_name, self.keystores = s.keystore, s.keystore_by_name, s.keystores

        q = self.lookup
        self.key, self.keys, self.key_ids, self.key_in_project = q.key, q.keys, q.key_ids, q.key_in_project

        li = self.lifecycle
        self.create_key, self.rotate, self.update_key = li.create_key, li.rotate, li.update_key
        self.update_secret = li.update_secret
        self.schedule_deletion, self.cancel_deletion = li.schedule_deletion, li.cancel_deletion
        self.delete_now = li.delete_now

        c = self.crypto
        self.forget_material, self.secret_value = c.forget_material, c.secret_value
        self.encrypt, self.decrypt, self.create_local_key = c.encrypt, c.decrypt, c.create_local_key
        self.sign, self.verify = c.sign, c.verify
        self.sign_standard, self.verify_standard = c.sign_standard, c.verify_standard
        self.export_symmetric, self.export_private, self.public_key = (c.export_symmetric, c.export_private,
                                                                       c.public_key)

        self.touch = self.last_access.touch

    async def purge_due(self, now: dt.datetime | None = None) -> int:
        return await jobs.purge_due(self.lifecycle, now)

    async def rotate_due(self, now: dt.datetime | None = None) -> int:
        return await jobs.rotate_due(self.lifecycle, now)
