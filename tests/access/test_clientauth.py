"""Key-store client checks on loopback over real TLS: AND vs OR, MAC modes as far as loopback can
show them, X-Forwarded-For, and denials that change nothing and reveal nothing.
(The L2 half of the MAC modes and IPv4 on real addresses: test_netns.py.)"""
from __future__ import annotations

import pytest

from server.access.pki import cert_pem, key_pem, write_pem
from tests.access.helpers import cert_files
from tests.api.test_client_api import assert_err, assert_ok
from tests.support.server import start_harness

MAC_A, MAC_B = "02:00:00:00:00:aa", "02:00:00:00:00:bb"
HDR = "X-TOAST-CLIENT-MAC-ADDR"


async def add(skm, store, kind, value):
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/auths/{kind}", json={"value": value})
    assert st == 201, out


def denials(skm, reason: str) -> float:
    return skm.rt.metrics.registry.get_sample_value("skm_access_denials_total", {"reason": reason}) or 0.0


@pytest.mark.parametrize("mode", ["AND", "OR"])
async def test_and_or_with_two_methods(skm, mode):
    store = await skm.keystore(f"two-{mode}", ip4AuthUse="Y", certificateAuthUse="Y", authMode=mode,
                               register_loopback=False)
    await add(skm, store, "ipv4s", "10.9.9.9")          # something registered, not us
    kid = (await skm.key(store, "SECRET", "s", secretValue="v"))["keyId"]
    cert = await cert_files(skm, store, "c")
    with_cert, without = skm.session(*cert), skm.session()
    path = f"/secrets/{kid}"
    expect = {  # (ip passes, cert passes) -> None for success or the resultMessage
        "AND": {(True, True): None, (True, False): "Certificate Auth Failure",
                (False, True): "IPv4 Auth Failure", (False, False): "IPv4 Auth Failure"},
        "OR": {(True, True): None, (True, False): None, (False, True): None, (False, False): "IPv4 Auth Failure"},
    }[mode]
    for ip_ok in (False, True):
        if ip_ok:
            await add(skm, store, "ipv4s", "127.0.0.0/30")
        for cert_ok, session in ((True, with_cert), (False, without)):
            st, out = await skm.client("GET", path, session=session)
            want = expect[(ip_ok, cert_ok)]
            if want is None:
                assert assert_ok(st, out) == {"secret": "v"}, (ip_ok, cert_ok)
            else:
                assert_err(st, out, 403, want)


async def test_header_mode_normalises_and_is_only_as_strong_as_the_header(skm):
    store = await skm.keystore("hdr", ip4AuthUse="N", macAuthUse="Y", macVerification="header")
    await add(skm, store, "macs", MAC_A.upper().replace(":", "-"))
    kid = (await skm.key(store, "SECRET", "s", secretValue="v"))["keyId"]
    for claim in ("02-00-00-00-00-AA", "0200000000AA", "02:00:00:00:00:aa"):
        assert_ok(*await skm.client("GET", f"/secrets/{kid}", headers={HDR: claim}))
    for headers in ({HDR: MAC_B}, {}, {HDR: "not a mac"}):
        assert_err(*await skm.client("GET", f"/secrets/{kid}", headers=headers), 403, "MAC Auth Failure")


async def test_attested_mode_needs_the_host_certificate_that_binds_the_claim(skm):
    store = await skm.keystore("att", ip4AuthUse="N", macAuthUse="Y", macVerification="attested")
    await add(skm, store, "macs", MAC_A)
    await add(skm, store, "macs", MAC_B)
    kid = (await skm.key(store, "SECRET", "s", secretValue="v"))["keyId"]
    ca = skm.pki.load_ca()

    def host(name, macs):
        cert, key = ca.issue_host(name, macs)
        cp, kp = skm.tmp / f"{name}.pem", skm.tmp / f"{name}-key.pem"
        write_pem(cp, cert_pem(cert), private=False)
        write_pem(kp, key_pem(key), private=True)
        return skm.session(cp, kp)

    host_a, host_c = host("host-a", [MAC_A]), host("host-c", ["02:00:00:00:00:cc"])
    path = f"/secrets/{kid}"
    assert_ok(*await skm.client("GET", path, session=host_a, headers={HDR: MAC_A}))
    # B's MAC is registered, but host A's certificate does not bind it.
    assert_err(*await skm.client("GET", path, session=host_a, headers={HDR: MAC_B}), 403, "MAC Auth Failure")
    # The right claim without a host certificate, or with one binding another MAC, fails.
    assert_err(*await skm.client("GET", path, headers={HDR: MAC_A}), 403, "MAC Auth Failure")
    assert_err(*await skm.client("GET", path, session=host_c, headers={HDR: MAC_A}), 403, "MAC Auth Failure")
    # A certificate binding an unregistered MAC, claiming it: still not registered.
    assert_err(*await skm.client("GET", path, session=host_c, headers={HDR: "02:00:00:00:00:cc"}),
               403, "MAC Auth Failure")
    assert_err(*await skm.client("GET", path, session=host_a), 403, "MAC Auth Failure")   # no claim


async def test_neighbor_mode_refuses_a_peer_without_l2_adjacency(skm):
    store = await skm.keystore("nb", ip4AuthUse="N", macAuthUse="Y", macVerification="neighbor")
    await add(skm, store, "macs", MAC_A)
    kid = (await skm.key(store, "SECRET", "s", secretValue="v"))["keyId"]
    st, out = await skm.client("GET", f"/secrets/{kid}", headers={HDR: MAC_A})   # the header does not count
    assert_err(st, out, 403, "MAC Auth Failure")
    assert "loopback" in out["header"]["resultDetail"] and MAC_A not in str(out)


async def test_x_forwarded_for_only_from_trusted_proxies(skm, tmp_path):
    store = await skm.keystore("xff", register_loopback=False)
    await add(skm, store, "ipv4s", "10.1.2.3")
    kid = (await skm.key(store, "SECRET", "s", secretValue="v"))["keyId"]
    xff = {"X-Forwarded-For": "10.1.2.3"}
    assert_err(*await skm.client("GET", f"/secrets/{kid}", headers=xff), 403, "IPv4 Auth Failure")
    assert assert_ok(*await skm.client("GET", "/confirm", headers=xff))["clientIp"] == "127.0.0.1"

    proxied = await start_harness(tmp_path / "proxied", trusted_proxies=["127.0.0.1"])
    try:
        store = await proxied.keystore("xff", register_loopback=False)
        await add(proxied, store, "ipv4s", "10.1.2.3")
        kid = (await proxied.key(store, "SECRET", "s", secretValue="v"))["keyId"]
        assert_ok(*await proxied.client("GET", f"/secrets/{kid}", headers=xff))
        # The right-most untrusted hop is the client: a forged left-most entry does not help.
        assert_err(*await proxied.client("GET", f"/secrets/{kid}", headers={"X-Forwarded-For": "10.1.2.3, 10.7.7.7"}),
                   403, "IPv4 Auth Failure")
        assert assert_ok(*await proxied.client("GET", "/confirm", headers=xff))["clientIp"] == "10.1.2.3"
        assert_err(*await proxied.client("GET", f"/secrets/{kid}"), 403, "IPv4 Auth Failure")
    finally:
        await proxied.close()


async def snapshot(skm) -> list:
    db = skm.rt.storage
    return [await db.fetchall(f"SELECT * FROM {t} ORDER BY 1") for t in
            ("keystores", "keys", "key_versions", "auth_ipv4s", "auth_macs", "auth_certificates",
             "user_access_keys", "oauth_tokens", "operators", "operator_tokens")]


async def test_a_denial_changes_nothing_and_reveals_nothing(skm):
    few = await skm.keystore("few", ip4AuthUse="Y", macAuthUse="Y", certificateAuthUse="Y", macVerification="header",
                             register_loopback=False)
    many = await skm.keystore("many", ip4AuthUse="Y", macAuthUse="Y", certificateAuthUse="Y",
                              macVerification="header", register_loopback=False)
    for v in ("10.0.0.0/8", "192.168.1.7", "127.0.0.2"):
        await add(skm, many, "ipv4s", v)
    await add(skm, many, "macs", MAC_A)
    await cert_files(skm, many, "c1")
    k_few = (await skm.key(few, "SECRET", "s", secretValue="v"))["keyId"]
    k_many = (await skm.key(many, "SYMMETRIC_KEY", "k"))["keyId"]

    before, denied_before = await snapshot(skm), denials(skm, "ipv4")
    outs = []
    for kid, path, body in ((k_few, f"/secrets/{k_few}", None),
                            (k_many, f"/symmetric-keys/{k_many}/encrypt", {"plaintext": "x"})):
        st, out = await skm.client("POST" if body else "GET", path, json=body, headers={HDR: MAC_B})
        assert_err(st, out, 403, "IPv4 Auth Failure")
        outs.append(out)
    assert outs[0] == outs[1]                      # the same answer however much is registered
    assert "10.0.0.0" not in str(outs) and MAC_A not in str(outs)
    assert await snapshot(skm) == before           # nothing changed, not even last-access times
    assert denials(skm, "ipv4") == denied_before + 2
