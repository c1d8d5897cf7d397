async def test_smoke(skm):
    store = await skm.keystore()
    sec = await skm.key(store, "SECRET", "db-password", secretValue="hunter2")
    st, out = await skm.client("GET", f"/secrets/{sec['keyId']}")
    assert st == 200, out
    assert out["body"]["secret"] == "hunter2"
