"""Reading a client's key (server/keys/lookup.py): the key and the store that proves it is in the caller's
project come from one lookup; a key of another project is, to the caller, no key at all."""
from __future__ import annotations

import pytest

from server.errors import InvalidKeyId


async def test_a_key_and_its_store_only_within_the_callers_project(skm):
    store = await skm.keystore("lookup-store")
    key = await skm.key(store, "SECRET", "lookup-secret", secretValue="lookup-value-1")
    rt = skm.rt
    mine = await rt.keys.project_by_appkey(skm.appkey)
    other = await rt.keys.create_project("lookup-other")
    k, ks = await rt.keys.key_in_project(key["keyId"], mine.id)
    assert (k.id, ks.id, ks.name, ks.project_id) == (key["keyId"], store["keyStoreId"], "lookup-store", mine.id)
    for key_id, project in ((key["keyId"], other.id), ("0" * 32, mine.id), ("NOT-A-KEY", mine.id)):
        with pytest.raises(InvalidKeyId):
            await rt.keys.key_in_project(key_id, project)


async def test_another_projects_appkey_reads_nothing_and_its_record_names_no_store(skm):
    store = await skm.keystore("foreign-store")
    key = await skm.key(store, "SECRET", "foreign-secret", secretValue="foreign-value-1")
    other = await skm.rt.keys.create_project("foreign-caller")
    s = skm._default()
    async with s.get(skm.client_path(f"/secrets/{key['keyId']}", appkey=other.appkey)) as r:
        status, out = r.status, await r.json(content_type=None)
    assert status == 404 and out["header"]["isSuccessful"] is False, out
    assert out["header"]["resultDetail"] == "no key with that id" and "foreign" not in str(out)
    st, audit = await skm.mgmt("GET", f"/audit?keyId={key['keyId']}&action=secret.read")
    [rec] = audit["body"]["records"]
    assert rec["result"] == "refused" and rec["keyStoreId"] is None and "keyStoreName" not in rec["detail"], rec
    st, ok = await skm.client("GET", f"/secrets/{key['keyId']}")
    assert st == 200 and ok["body"]["secret"] == "foreign-value-1"
    st, audit = await skm.mgmt("GET", f"/audit?keyId={key['keyId']}&action=secret.read&result=ok")
    [rec] = audit["body"]["records"]
    assert rec["keyStoreId"] == store["keyStoreId"] and rec["detail"]["keyStoreName"] == "foreign-store", rec
