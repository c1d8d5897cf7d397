"""Client certificates over real mTLS: only a registered, in-service, unexpired certificate the
server issued to *this* key store passes; deleting or scheduling it cuts access on the next request."""
from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives.serialization import pkcs12

from server.access.changes import OPS
from server.access.pki import CA, cert_pem, key_pem, write_pem
from server.barrier.barrier import sealed_aad
from server.errors import BarrierError
from tests.access.helpers import (PASSWORD, access_key, cert_files, download_p12, issue_cert, refused,
                                  v12_headers)
from tests.api.test_client_api import assert_err, assert_ok


@pytest.fixture
async def stores(skm):
    a = await skm.keystore("cert-a", ip4AuthUse="N", certificateAuthUse="Y")
    b = await skm.keystore("cert-b", ip4AuthUse="N", certificateAuthUse="Y")
    secret = await skm.key(a, "SECRET", "db", secretValue="s3cret")
    return a, b, secret["keyId"]


async def get_secret(skm, session, kid):
    return await skm.client("GET", f"/secrets/{kid}", session=session)


async def test_mtls_only_the_registered_certificate_passes(skm, stores):
    a, b, kid = stores
    good = await cert_files(skm, a, "app1")
    other_store = await cert_files(skm, b, "app1")            # same name, another key store
    unregistered = skm.client_cert("unregistered")            # issued by the CA, never registered

    foreign = CA.create("Foreign CA")
    fc, fk = foreign.issue("intruder", client=True)
    foreign_paths = (skm.tmp / "foreign.pem", skm.tmp / "foreign-key.pem")
    write_pem(foreign_paths[0], cert_pem(fc), private=False)
    write_pem(foreign_paths[1], key_pem(fk), private=True)

    ca = skm.pki.load_ca()
    ec, ek = ca.issue("expired", client=True, days=1,
                      not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3))
    expired_paths = (skm.tmp / "expired.pem", skm.tmp / "expired-key.pem")
    write_pem(expired_paths[0], cert_pem(ec), private=False)
    write_pem(expired_paths[1], key_pem(ek), private=True)

    url = skm.client_path(f"/secrets/{kid}")
    # Not one of our CA's certificates, or expired: the handshake itself is refused.
    assert await refused(skm.session(*foreign_paths), url)
    assert await refused(skm.session(*expired_paths), url)

    # A valid handshake but the wrong certificate (or none): the same 403, whatever is registered.
    bodies = []
    for paths in (None, other_store, unregistered):
        s = skm.session(*paths) if paths else skm.session()
        st, out = await get_secret(skm, s, kid)
        assert_err(st, out, 403, "Certificate Auth Failure")
        bodies.append(out)
    assert bodies[1] == bodies[2]                       # B's certificate and an unregistered one: identical

    # The right one, unpacked from the downloaded PKCS#12, passes.
    s = skm.session(*good)
    assert assert_ok(*await get_secret(skm, s, kid)) == {"secret": "s3cret"}
    st, out = await skm.client("GET", "/confirm", session=s)
    assert out["body"]["clientSentCertificate"] is True

    # Scheduled for deletion a moment ago: refused on the very next request of the same connection.
    st, out = await skm.mgmt("POST", f"/keystores/{a['keyStoreId']}/certificates/schedule-deletion",
                             json={"name": "app1"})
    assert st == 200, out
    st, out = await get_secret(skm, s, kid)
    assert_err(st, out, 403, "Certificate Auth Failure")
    assert out == bodies[1]
    # Cancelled: back in service.
    st, _ = await skm.mgmt("POST", f"/keystores/{a['keyStoreId']}/certificates/cancel-deletion", json={"name": "app1"})
    assert st == 200
    assert_ok(*await get_secret(skm, s, kid))
    # Deleted: gone for good.
    for step in ("schedule-deletion", "delete"):
        st, out = await skm.mgmt("POST", f"/keystores/{a['keyStoreId']}/certificates/{step}", json={"name": "app1"})
        assert st == 200, out
    assert_err(*await get_secret(skm, s, kid), 403, "Certificate Auth Failure")
    st, out = await skm.mgmt("GET", f"/keystores/{a['keyStoreId']}/certificates")
    assert out["body"]["certificates"] == []


async def test_expired_registration_is_refused(skm, stores):
    """The registry's expiry is checked too (e.g. a row whose certificate the CA re-issued longer)."""
    a, _, kid = stores
    good = await cert_files(skm, a, "short")
    s = skm.session(*good)
    assert_ok(*await get_secret(skm, s, kid))
    await skm.rt.access_seal.update(skm.rt.storage, "auth_certificates", "name = 'short'", (),
                                    {"expires_at": "2000-01-01T00:00:00.000000Z"})
    # The edit bypasses the services, so tell the auth-data cache as a real change would.
    from server.events import Event
    await skm.rt.events.publish(Event(a["keyStoreId"], "auth_changed"))
    assert_err(*await get_secret(skm, s, kid), 403, "Certificate Auth Failure")


async def test_bundle_is_password_protected_and_sealed_at_rest(skm, stores):
    a, _, _ = stores
    info = await issue_cert(skm, a, "sealed", password="another pass 2", life=7)
    assert info["password"] == "********" and info["status"] == "ACTIVE"
    st, data = await download_p12(skm, a, "sealed")
    assert st == 200
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(data, b"wrong password")
    key, cert, chain = pkcs12.load_key_and_certificates(data, b"another pass 2")
    assert key is not None and chain and chain[0].subject == skm.pki.load_ca().cert.subject
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=7) <= life <= dt.timedelta(days=7, minutes=10)

    row = await skm.rt.storage.fetchone("SELECT * FROM auth_certificates WHERE name = 'sealed'")
    assert b"another pass 2" not in bytes(row["password_sealed"]) and bytes(row["bundle_sealed"]) != data
    barrier = skm.rt.barrier
    aad = sealed_aad("auth_certificates", "password_sealed", row["id"])
    assert barrier.open(bytes(row["password_sealed"]), aad) == b"another pass 2"
    with pytest.raises(BarrierError):     # the blob is bound to its row and column
        barrier.open(bytes(row["bundle_sealed"]), sealed_aad("auth_certificates", "bundle_sealed", row["id"] + 1))
    with pytest.raises(BarrierError):
        barrier.open(bytes(row["bundle_sealed"]), sealed_aad("auth_certificates", "password_sealed", row["id"]))
    assert barrier.open(bytes(row["bundle_sealed"]), sealed_aad("auth_certificates", "bundle_sealed", row["id"])) == data
    # A viewer sees the certificate but cannot download its private key.
    viewer = await skm.rt.operators.create("viewer1", "viewer")
    vtoken = await skm.rt.operators.issue_token(viewer)
    st, out = await skm.mgmt("GET", f"/keystores/{a['keyStoreId']}/certificates/sealed", token=vtoken)
    assert st == 200 and out["body"]["password"] == "********"
    st, out = await skm.mgmt("GET", f"/keystores/{a['keyStoreId']}/certificates/sealed/bundle", token=vtoken)
    assert st == 403 and out["header"]["isSuccessful"] is False


async def test_client_api_certificate_life_cycle_v12(skm, stores):
    a, _, _ = stores
    kid, secret = await access_key(skm)
    h = v12_headers(kid, secret)
    # The store's own checks gate its administration too (manage_routes' docstring): its certificate.
    s = skm.session(*await cert_files(skm, a, "owner"))
    body = {"keyStoreName": "cert-a", "name": "api-cert", "password": PASSWORD, "lifeTime": 365,
            "description": "from the API"}
    st, out = await skm.client("POST", "/auths/certificates", version="v1.2", json=body, session=s)
    assert st == 401                                   # no caller credentials
    assert_err(*await skm.client("POST", "/auths/certificates", version="v1.2", json=body, headers=h),
               403, "Certificate Auth Failure")        # a valid access key, but not the store's certificate
    assert assert_ok(*await skm.client("POST", "/auths/certificates", version="v1.2", json=body, headers=h,
                                       session=s)) == {"name": "api-cert", "description": "from the API"}
    ks = a["keyStoreId"]
    assert assert_ok(*await skm.client("GET", f"/keystores/{ks}/certificates", session=s)) == {
        "certificateList": ["owner", "api-cert"]}
    detail = assert_ok(*await skm.client("GET", f"/keystores/{ks}/certificates?value=api-cert",
                                         session=s))["certificateList"]
    assert detail[0]["password"] == "********" and detail[0]["expirationDate"] and detail[0]["deletionDatetime"] is None
    assert detail[0]["creationUser"].startswith(f"uak:{kid}@")
    ref = {"keyStoreName": "cert-a", "name": "api-cert"}
    assert_err(*await skm.client("POST", "/auths/certificates/delete", version="v1.2", json=ref, headers=h,
                                 session=s), 404, "Not Found")   # only a scheduled certificate is deleted at once
    sched = assert_ok(*await skm.client("PUT", "/auths/certificates/delete", version="v1.2", json=ref, headers=h,
                                        session=s))
    assert sched["name"] == "api-cert" and sched["deletionDateTime"]
    done = assert_ok(*await skm.client("POST", "/auths/certificates/delete", version="v1.2", json=ref, headers=h,
                                       session=s))
    assert done["name"] == "api-cert"
    assert assert_ok(*await skm.client("GET", f"/keystores/{ks}/certificates", session=s)) == {
        "certificateList": ["owner"]}
    # Bad input: a short password, an unknown store.
    bad = {**body, "password": "123"}
    assert_err(*await skm.client("POST", "/auths/certificates", version="v1.2", json=bad, headers=h, session=s),
               400, "Invalid Request")
    assert_err(*await skm.client("POST", "/auths/certificates", version="v1.2",
                                 json={**body, "keyStoreName": "nope"}, headers=h, session=s), 404, "Invalid Key Store")


async def test_certificate_changes_go_through_the_change_gate(skm):
    assert {"cert.create", "cert.schedule_deletion", "cert.cancel_deletion", "cert.delete"} <= set(OPS)
    gated = await skm.keystore("gated", ip4AuthUse="N", certificateAuthUse="Y", approvalRequired=True)
    approver = await skm.rt.operators.create("appr", "approver")
    st, out = await skm.mgmt("POST", f"/keystores/{gated['keyStoreId']}/certificates",
                             json={"name": "held", "password": "held-password-9", "lifeTime": 30})
    # Held as a change request (approval workflow present) or refused (absent): never issued directly.
    assert st != 201, out
    assert await skm.rt.storage.fetchval("SELECT COUNT(*) AS n FROM auth_certificates") == 0
    # Whatever was stored for the request, the password is not in it in the clear.
    db = skm.rt.storage
    tables = [r["name"] for r in await db.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for t in tables:
        for row in await db.fetchall(f"SELECT * FROM {t}"):
            assert "held-password-9" not in repr(row), t
    approvals = getattr(skm.rt, "approvals", None)
    if approvals is None:
        return
    # Approved by someone else, the certificate is issued then, with the password given at request time.
    assert st == 202, out
    await approvals.approve(approver, out["body"]["changeRequestId"])
    rows = await db.fetchall("SELECT name, status FROM auth_certificates")
    assert [(r["name"], r["status"]) for r in rows] == [("held", "ACTIVE")]
    data = await skm.rt.certificates.bundle(await skm.rt.keys.keystore(gated["keyStoreId"]), "held")
    assert pkcs12.load_key_and_certificates(data, b"held-password-9")[1] is not None


async def test_scheduled_certificates_are_purged_after_the_grace_period(skm, stores):
    a, _, _ = stores
    await issue_cert(skm, a, "old")
    await issue_cert(skm, a, "kept")
    st, _ = await skm.mgmt("POST", f"/keystores/{a['keyStoreId']}/certificates/schedule-deletion", json={"name": "old"})
    assert st == 200
    certs = skm.rt.certificates
    assert await certs.purge_due() == 0                                   # still within the 7 days
    assert await certs.purge_due(dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=8)) == 1
    assert [c["name"] for c in await certs.list(await skm.rt.keys.keystore(a["keyStoreId"]))] == ["kept"]
