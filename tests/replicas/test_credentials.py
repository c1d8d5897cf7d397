"""Verified bearer tokens and access keys are cached per replica; a revocation made on one replica is
refused by the other on its very next request (LISTEN/NOTIFY carries `credential_changed`)."""
from __future__ import annotations

import base64

from tests.replicas.conftest import ReplicaSet
from tests.replicas.test_replicas import _start


async def test_a_token_revoked_on_one_replica_is_refused_by_the_other_at_once(replicas: ReplicaSet):
    rs = replicas
    await _start(rs, rs.a, rs.b)
    ks = await rs.keystore(rs.a, "tokens")
    sid = await rs.key(rs.a, ks, "SECRET", "s", secretValue="behind a token")
    key_id, secret = await rs.access_key(rs.a)
    basic = {"Authorization": "Basic " + base64.b64encode(f"{key_id}:{secret}".encode()).decode()}
    s = rs.session()            # one keep-alive connection per replica, reused by every request below

    async def oauth(r, path: str, form: dict) -> dict:
        async with s.post(f"{r.data_url}/oauth2/token/{path}", data=form, headers=basic) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def read(r, token: str) -> int:
        async with s.get(f"{r.data_url}/keymanager/v1.3/appkey/{rs.init.appkey}/secrets/{sid}",
                         headers={"X-NHN-Authorization": f"Bearer {token}"}) as resp:
            out = await resp.json(content_type=None)
            assert (resp.status == 200) == (out["header"]["isSuccessful"] is True), out
            return resp.status

    for revoker, other in ((rs.a, rs.b), (rs.b, rs.a)):
        token = (await oauth(other, "create", {"grant_type": "client_credentials"}))["access_token"]
        for _ in range(3):
            assert await read(rs.a, token) == 200 and await read(rs.b, token) == 200
        await oauth(revoker, "revoke", {"token": token})
        assert await read(other, token) == 401
        assert await read(revoker, token) == 401
    # The access key deleted on replica a: its v1.2 use and its tokens end on replica b.
    token = (await oauth(rs.b, "create", {"grant_type": "client_credentials"}))["access_token"]
    assert await read(rs.b, token) == 200
    assert (await rs.client(rs.b, "GET", f"/secrets/{sid}"))[0] == 200
    st, out = await rs.mgmt(rs.a, "DELETE", f"/access-keys/{key_id}")
    assert st == 200, out
    assert await read(rs.b, token) == 401
    assert (await rs.client(rs.b, "GET", f"/secrets/{sid}"))[0] == 401
