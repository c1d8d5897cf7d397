"""Test PKI: a CA, the system-key server's certificate, key-server client certificates
(one to allow-list, one not), and a client certificate from a foreign CA."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from server.access.pki import CA, cert_pem, fingerprint, key_pem, write_pem

__all__ = ["TestPKI", "make_pki", "pki"]


@dataclass
class TestPKI:
    __test__ = False  # not a test class

    dir: Path
    ca: CA
    ca_pem: Path
    systemkey_cert: Path
    systemkey_key: Path
    keyserver_cert: Path
    keyserver_key: Path
    keyserver_fp: str
    other_cert: Path
    other_key: Path
    other_fp: str
    foreign_ca_pem: Path
    foreign_cert: Path
    foreign_key: Path


def _issue(ca: CA, d: Path, name: str, **kw) -> tuple[Path, Path, str]:
    cert, key = ca.issue(name, **kw)
    cp, kp = d / f"{name}.pem", d / f"{name}-key.pem"
    write_pem(cp, cert_pem(cert), private=False)
    write_pem(kp, key_pem(key), private=True)
    return cp, kp, fingerprint(cert.public_bytes(Encoding.DER))


def make_pki(d: Path) -> TestPKI:
    d.mkdir(parents=True, exist_ok=True)
    ca = CA.create("SKM Test CA")
    ca.save(d / "ca.pem", d / "ca-key.pem")
    sk_cert, sk_key, _ = _issue(ca, d, "systemkey", server=True, dns=["localhost"], ips=["127.0.0.1"])
    ks_cert, ks_key, ks_fp = _issue(ca, d, "keyserver", client=True)
    ot_cert, ot_key, ot_fp = _issue(ca, d, "other-keyserver", client=True)
    foreign = CA.create("Foreign CA")
    foreign.save(d / "foreign-ca.pem", d / "foreign-ca-key.pem")
    fo_cert, fo_key, _ = _issue(foreign, d, "foreign-keyserver", client=True)
    return TestPKI(d, ca, d / "ca.pem", sk_cert, sk_key, ks_cert, ks_key, ks_fp, ot_cert, ot_key, ot_fp,
                   d / "foreign-ca.pem", fo_cert, fo_key)


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    return make_pki(tmp_path / "pki")
