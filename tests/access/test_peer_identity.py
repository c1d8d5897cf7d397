"""The client certificate is read once per connection (issue 18: server/access/tls.py peer_identity).

Kept-alive connections with different certificates, used in turns, must each keep being judged by
their own certificate, and each audit record must carry its own connection's fingerprint."""
from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.access.helpers import cert_files
from tests.api.test_client_api import assert_err


def _fingerprint(cert_path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


async def test_each_kept_alive_connection_keeps_its_own_certificate(skm):
    a = await skm.keystore("peer-a", ip4AuthUse="N", certificateAuthUse="Y")
    b = await skm.keystore("peer-b", ip4AuthUse="N", certificateAuthUse="Y")
    kid = (await skm.key(a, "SECRET", "peer-secret", secretValue="v"))["keyId"]
    good_paths, other_paths = await cert_files(skm, a, "conn-a"), await cert_files(skm, b, "conn-b")
    good, other, bare = skm.session(*good_paths), skm.session(*other_paths), skm.session()
    for _ in range(3):                          # interleaved, each session on its kept-alive connection
        st, out = await skm.client("GET", f"/secrets/{kid}", session=good)
        assert st == 200 and out["body"]["secret"] == "v"
        for s in (other, bare):
            st, out = await skm.client("GET", f"/secrets/{kid}", session=s)
            assert_err(st, out, 403, "Certificate Auth Failure")
    rows = await skm.rt.storage.fetchall("SELECT fingerprint, status FROM audit_log WHERE key_id = ? "
                                         "AND action = 'secret.read' ORDER BY seq", kid)
    assert [(r["status"], r["fingerprint"]) for r in rows] == [
        (200, _fingerprint(good_paths[0])), (403, _fingerprint(other_paths[0])), (403, None)] * 3
