"""The client-auth cache: an added, scheduled or deleted IPv4 entry or certificate counts on the
very next lookup, and a fill that raced with a change is not kept."""
from __future__ import annotations

import time

import pytest

from server.access.authcache import AuthCache
from tests.support.server import skm  # noqa: F401


async def test_entries_follow_changes(skm):  # noqa: F811
    rt = skm.rt
    project = await rt.keys.default_project()
    ks = await rt.keys.create_keystore(project.id, "ac", ip4_auth=True, cert_auth=True, actor="t")
    cache = AuthCache(rt.storage, rt.events, rt.access_seal, max_age=3600)
    assert not (await cache.entries(ks)).ipv4_allows("10.1.2.3")
    await rt.authdata.add(ks, "ipv4s", "10.1.2.0/24", actor="t")
    assert (await cache.entries(ks)).ipv4_allows("10.1.2.3")
    assert not (await cache.entries(ks)).ipv4_allows("10.1.3.3")
    await rt.authdata.schedule_deletion(ks, "ipv4s", "10.1.2.0/24", actor="t")
    assert not (await cache.entries(ks)).ipv4_allows("10.1.2.3")

    await rt.certificates.create(ks, "c1", "password1", 30, actor="t")
    fp = (await rt.certificates.get(ks, "c1"))["fingerprint"]
    assert (await cache.entries(ks)).certificate_valid(fp)
    assert not (await cache.entries(ks)).certificate_valid(fp, now_db="9999-12-31T00:00:00.000000Z")
    await rt.certificates.schedule_deletion(ks, "c1", actor="t")
    assert not (await cache.entries(ks)).certificate_valid(fp)


async def test_a_fill_racing_a_change_is_not_kept(skm):  # noqa: F811
    rt = skm.rt
    project = await rt.keys.default_project()
    ks = await rt.keys.create_keystore(project.id, "race", ip4_auth=True, actor="t")
    cache = AuthCache(rt.storage, rt.events, rt.access_seal, max_age=3600)
    real = rt.storage.fetchall
    calls = 0

    async def fetchall(sql, *args):
        nonlocal calls
        rows = await real(sql, *args)
        calls += 1
        if calls == 1:      # the change lands while the cache is reading
            await rt.authdata.add(ks, "ipv4s", "192.0.2.7", actor="t")
        return rows
    rt.storage.fetchall = fetchall
    try:
        first = await cache.entries(ks)
    finally:
        rt.storage.fetchall = real
    assert not first.ipv4_allows("192.0.2.7")            # read before the change ...
    assert (await cache.entries(ks)).ipv4_allows("192.0.2.7")   # ... but not kept


# ------------------------------------------------------------------ verified credentials (v1.2 keys, v1.3 tokens)
from server.access.authcache import CredentialCache  # noqa: E402
from server.errors import Unauthenticated  # noqa: E402


class _Reads:
    """Counts the credential reads CallerAuth makes (the real database answers them). The storage object
    is shared, so only reads of the credential tables count: the server's own background work (its start
    checkpoint, the audit writer) reads it too, at moments a test does not choose."""

    def __init__(self, rt) -> None:
        self.rt, self.n, self.real = rt, 0, rt.storage.fetchone

    async def fetchone(self, sql, *args):
        if "user_access_keys" in sql or "oauth_tokens" in sql:
            self.n += 1
        return await self.real(sql, *args)

    def __enter__(self):
        self.rt.callers.db.fetchone = self.fetchone
        return self

    def __exit__(self, *exc):
        self.rt.callers.db.fetchone = self.real


async def _key_and_token(rt, name="admin", expires_in=600):
    op = await rt.operators.by_name(name)
    key, secret = await rt.callers.create_key(op, actor="t")
    token = (await rt.callers.issue_token(key, expires_in))["access_token"]
    return key, secret, token


async def test_a_verified_token_is_served_from_memory_until_revoked(skm):  # noqa: F811
    rt = skm.rt
    key, secret, token = await _key_and_token(rt)
    with _Reads(rt) as reads:
        assert (await rt.callers.verify_token(token))[1].id == key.id
        first = reads.n
        for _ in range(5):
            assert (await rt.callers.verify_token(f"Bearer {token}"))[1].id == key.id
        assert reads.n == first == 1                       # one database read, then memory
        # A wrong secret for a cached id is refused, and the database (not the cache) says so.
        with pytest.raises(Unauthenticated) as wrong:
            await rt.callers.verify_token(token[:-3] + "xyz")
        assert reads.n == 2
        with pytest.raises(Unauthenticated) as unknown:
            await rt.callers.verify_token("skmat_0000000000000000_" + token.split("_")[2])
        assert wrong.value.message == unknown.value.message and wrong.value.detail == unknown.value.detail
    await rt.callers.revoke_token(key, token)
    with pytest.raises(Unauthenticated, match="revoked") as e:
        await rt.callers.verify_token(token)
    assert "revoked" in e.value.detail


async def test_access_key_deletion_and_operator_changes_drop_cached_credentials(skm):  # noqa: F811
    rt = skm.rt
    await rt.operators.create("alice", "admin", password="correct horse battery 1")
    alice = await rt.operators.by_name("alice")
    key, secret = await rt.callers.create_key(alice, actor="t")
    token = (await rt.callers.issue_token(key, 600))["access_token"]
    assert (await rt.callers.verify_key(key.id, secret)).role == "admin"
    assert (await rt.callers.verify_token(token))[1].role == "admin"
    # A role change is what the next request sees (cached answers carry the role).
    assert (await rt.callers.operator_of(key)).role == "admin"
    reads = []
    rt.storage.fetchall = lambda sql, *a: reads.append(sql)     # the roles too come from memory now
    try:
        assert (await rt.callers.operator_of(key)).role == "admin"
    finally:
        del rt.storage.fetchall
    assert reads == []
    await rt.operators.update("alice", role="viewer")
    assert (await rt.callers.verify_key(key.id, secret)).role == "viewer"
    assert (await rt.callers.verify_token(token))[1].role == "viewer"
    assert (await rt.callers.operator_of(key)).role == "viewer"
    # A project role granted or revoked counts at once.
    project = await rt.keys.default_project()
    admin = await rt.operators.by_name("admin")
    await rt.operators.grant("alice", "admin", project.id, by=admin)
    assert (await rt.callers.operator_of(key)).has(("admin",), project.id)
    await rt.operators.revoke("alice", project.id, by=admin)
    assert not (await rt.callers.operator_of(key)).has(("admin",), project.id)
    await rt.operators.update("alice", disabled=True)
    for call in (rt.callers.verify_key(key.id, secret), rt.callers.verify_token(token)):
        with pytest.raises(Unauthenticated):
            await call
    await rt.operators.update("alice", disabled=False)
    assert (await rt.callers.verify_token(token))[1].id == key.id
    admin = await rt.operators.by_name("admin")
    await rt.callers.delete_key(key.id, admin)
    for call in (rt.callers.verify_key(key.id, secret), rt.callers.verify_token(token)):
        with pytest.raises(Unauthenticated):
            await call


async def test_cached_credentials_expire_on_time_and_on_reset(skm):  # noqa: F811
    from server.events import Event
    rt = skm.rt
    key, secret, token = await _key_and_token(rt, expires_in=60)
    await rt.callers.verify_token(token)
    cache = rt.callers.cache
    hit = cache.get("t", token.split("_")[1])
    assert hit is not None and not cache.expired(hit)
    cache.clock = lambda: time.time() + 61                  # the token's 60 s have passed
    assert cache.expired(cache.get("t", token.split("_")[1]))
    with _Reads(rt) as reads:                               # an expired entry is not served: the database decides
        await rt.callers.verify_token(token)
        assert reads.n == 1
    cache.clock = time.time
    rt.events.deliver(Event(keystore_id=0, kind="reset"))   # the event channel had a gap: forget everything
    assert cache.get("t", token.split("_")[1]) is None and len(cache) == 0


async def test_a_verification_racing_a_revocation_is_not_kept(skm):  # noqa: F811
    rt = skm.rt
    key, secret, token = await _key_and_token(rt)
    real = rt.callers.db.fetchone
    raced = False

    async def fetchone(sql, *args):
        nonlocal raced
        row = await real(sql, *args)
        if "JOIN oauth_tokens" in sql and not raced:   # revoked while the row was in flight (read before)
            raced = True
            rt.callers.db.fetchone = real
            await rt.callers.revoke_token(key, token)
        return row
    rt.callers.db.fetchone = fetchone
    try:
        await rt.callers.verify_token(token)   # answered from what was read: valid at that moment ...
    finally:
        rt.callers.db.fetchone = real
    with pytest.raises(Unauthenticated, match="revoked"):
        await rt.callers.verify_token(token)   # ... but not kept


def test_the_cache_is_bounded():
    from server.access.authcache import VerifiedCredential
    from server.events import EventBus
    cache = CredentialCache(EventBus(), max_entries=3)
    for i in range(10):
        cache.put("t", str(i), VerifiedCredential("d", None, None, "k", 1), cache.generation)
    assert len(cache) == 3 and cache.get("t", "9") is not None and cache.get("t", "0") is None
