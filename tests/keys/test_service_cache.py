"""KeyService's caches (key rows, key-store rows, loaded versions incl. secrets) never serve a
change late: rotation, deletion scheduling, key-store changes show on the very next call."""
from __future__ import annotations

import pytest

from server.errors import InvalidKeyId, InvalidKeyStatus, KeyStoreNotFound
from tests.support.server import skm  # noqa: F401


async def _store(rt):
    project = await rt.keys.default_project()
    return project, await rt.keys.create_keystore(project.id, "cache", ip4_auth=True, actor="t")


async def test_secret_rotation_and_deletion_show_at_once(skm):  # noqa: F811
    rt = skm.rt
    project, ks = await _store(rt)
    key = await rt.keys.create_key(ks, "SECRET", "s", actor="t", secret_value="one")
    k = await rt.keys.key(key.id, project_id=project.id)
    assert await rt.keys.secret_value(k) == "one"
    assert await rt.keys.secret_value(await rt.keys.key(key.id)) == "one"      # served from the caches
    await rt.keys.update_secret(k, "two", actor="t")
    k = await rt.keys.key(key.id, project_id=project.id)
    assert k.current_version == 1
    assert await rt.keys.secret_value(k) == "two"
    await rt.keys.schedule_deletion(k, actor="t")
    k = await rt.keys.key(key.id, project_id=project.id)
    with pytest.raises(InvalidKeyStatus):
        await rt.keys.secret_value(k)
    await rt.keys.cancel_deletion(k, actor="t")
    assert (await rt.keys.key(key.id)).active


async def test_cached_key_is_a_copy_and_project_is_checked(skm):  # noqa: F811
    rt = skm.rt
    project, ks = await _store(rt)
    key = await rt.keys.create_key(ks, "SYMMETRIC_KEY", "a", actor="t")
    k1 = await rt.keys.key(key.id)
    k1.current_version = 99                       # a caller mutating its copy changes nothing cached
    assert (await rt.keys.key(key.id)).current_version == 0
    with pytest.raises(InvalidKeyId):
        await rt.keys.key(key.id, project_id=project.id + 1000)
    with pytest.raises(KeyStoreNotFound):
        await rt.keys.keystore(ks.id, project_id=project.id + 1000)


async def test_keystore_update_shows_at_once(skm):  # noqa: F811
    rt = skm.rt
    _, ks = await _store(rt)
    assert not (await rt.keys.keystore(ks.id)).cert_auth
    await rt.keys.update_keystore(ks, actor="t", cert_auth=True)
    assert (await rt.keys.keystore(ks.id)).cert_auth


async def test_secret_bytes_are_wiped_on_eviction():
    from server.keys.caches import MaterialCache
    lru = MaterialCache(1)
    secret = bytearray(b"value")
    lru.put(("k", 0), secret)
    lru.put(("k", 1), bytearray(b"other"))
    assert secret == bytearray(5)
