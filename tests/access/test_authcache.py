"""The client-auth cache: an added, scheduled or deleted IPv4 entry or certificate counts on the
very next lookup, and a fill that raced with a change is not kept."""
from __future__ import annotations

from server.access.authcache import AuthCache
from tests.support.server import skm  # noqa: F401


async def test_entries_follow_changes(skm):  # noqa: F811
    rt = skm.rt
    project = await rt.keys.default_project()
    ks = await rt.keys.create_keystore(project.id, "ac", ip4_auth=True, cert_auth=True, actor="t")
    cache = AuthCache(rt.storage, rt.events, max_age=3600)
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
    cache = AuthCache(rt.storage, rt.events, max_age=3600)
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
