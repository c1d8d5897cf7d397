"""Upstream pool: failover past a dead key server with health tracking; a PKCS#12 host identity."""
from __future__ import annotations

import os
import socket

from cryptography import x509

from server.access.pki import pkcs12_bundle
from sidecar.app import Sidecar
from tests.support.sidecar import issue_host_cert, register_certificate, sidecar_config, unix_session


def dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                   # nothing listens there now
    return f"https://127.0.0.1:{port}"


async def test_failover_to_a_healthy_server_with_a_pkcs12_identity(skm, store, tmp_path):
    kid = (await skm.key(store, "SECRET", "db", secretValue="via-second"))["keyId"]
    host = issue_host_cert(skm.pki.load_ca(), tmp_path, "p12-host")
    await register_certificate(skm.rt.storage, skm.rt.barrier, store["keyStoreId"], host, "p12-host")
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    bundle = pkcs12_bundle("p12-host", x509.load_pem_x509_certificate(host.cert.read_bytes()),
                           load_pem_private_key(host.key.read_bytes(), None), skm.pki.load_ca().cert, "p12-pass")
    (tmp_path / "host.p12").write_bytes(bundle)
    pw = tmp_path / "p12.pw"
    pw.write_text("p12-pass\n")
    os.chmod(pw, 0o600)
    dead = dead_url()
    cfg = sidecar_config(appkey=skm.appkey, urls=[dead, skm.data_url], ca=skm.pki.ca_cert, host=host,
                         socket=tmp_path / "f.sock", events={"enabled": False},
                         upstream={"cert": "", "key": "", "pkcs12": str(tmp_path / "host.p12"),
                                   "pkcs12_password_file": str(pw), "unhealthy_for": 30})
    sc = await Sidecar(cfg).start()
    try:
        async with unix_session(cfg.listen.socket) as s:
            async with s.get(f"/secrets/{kid}") as r:
                assert r.status == 200 and (await r.json())["body"]["secret"] == "via-second"
            sent = sc.upstream.sent
            async with s.post(f"/symmetric-keys/{'0' * 32}/encrypt", json={"plaintext": "x"}) as r:
                assert r.status == 404                       # answered by the healthy server ...
            assert sc.upstream.sent == sent + 1              # ... without trying the dead one again
            async with s.get("/v1/status") as r:
                servers = (await r.json())["upstream"]["servers"]
        assert servers[0]["url"] == dead and servers[0]["healthy"] is False and servers[0]["failures"] == 1
        assert servers[1]["healthy"] is True and servers[1]["failures"] == 0
        assert sc.upstream.cert_expiry() is not None
    finally:
        await sc.stop()
    assert not (tmp_path / "f.sock").exists()                # the socket file goes with the sidecar
