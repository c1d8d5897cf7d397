"""The server's own PKI: dev CA, listener certificates, client and host certificates.

The key server is the CA for client certificates, as NHN SKM is. A host
certificate binds the host's MAC address(es) as SAN URIs `urn:skm:mac:<12 hex>`
(a URI SAN survives every TLS stack and needs no private OID parser).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MAC_URI_PREFIX = "urn:skm:mac:"
_MAC_RE = re.compile(r"^[0-9a-f]{12}$")


def normalize_mac(value: str) -> str:
    """aa:bb:cc:dd:ee:ff from any case and `-`/`:`/`.`/no separator; ValueError otherwise."""
    hexes = re.sub(r"[-:.\s]", "", value.strip().lower())
    if not _MAC_RE.match(hexes):
        raise ValueError("not a MAC address")
    return ":".join(hexes[i:i + 2] for i in range(0, 12, 2))


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str = "SKM Dev CA", days: int = 3650) -> "CA":
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> "CA":
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), None)
        return cls(cert, key)

    def save(self, cert_path: Path, key_path: Path) -> None:
        write_pem(cert_path, cert_pem(self.cert), private=False)
        write_pem(key_path, key_pem(self.key), private=True)

    def issue(self, common_name: str, *, server: bool = False, client: bool = False,
              dns: list[str] | None = None, ips: list[str] | None = None, uris: list[str] | None = None,
              days: float = 365, key=None, not_before: dt.datetime | None = None,
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = key or new_key()
        now = not_before or (_now() - dt.timedelta(minutes=5))
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in (dns or [])]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in (ips or [])]
        sans += [x509.UniformResourceIdentifier(u) for u in (uris or [])]
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if usages:
            b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(self.key, hashes.SHA256()), key

    def issue_host(self, name: str, macs: list[str], days: float = 365):
        uris = [MAC_URI_PREFIX + normalize_mac(m).replace(":", "") for m in macs]
        return self.issue(name, client=True, uris=uris, days=days)


def macs_of(cert: x509.Certificate) -> set[str]:
    """The MAC addresses a host certificate binds."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    out = set()
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(MAC_URI_PREFIX):
            try:
                out.add(normalize_mac(uri[len(MAC_URI_PREFIX):]))
            except ValueError:
                continue
    return out


def pkcs12_bundle(name: str, cert: x509.Certificate, key, ca: x509.Certificate, password: str) -> bytes:
    enc = serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    return pkcs12.serialize_key_and_certificates(name.encode(), key, cert, [ca], enc)


def write_pem(path: Path, data: bytes, private: bool) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass
class DevPKI:
    """The files `skm server init` / `skm certs init` write into a directory."""
    dir: Path

    @property
    def ca_cert(self) -> Path: return self.dir / "ca.pem"
    @property
    def ca_key(self) -> Path: return self.dir / "ca-key.pem"
    @property
    def server_cert(self) -> Path: return self.dir / "server.pem"
    @property
    def server_key(self) -> Path: return self.dir / "server-key.pem"

    def exists(self) -> bool:
        return self.ca_cert.exists() and self.ca_key.exists()

    def create(self, hostnames: list[str] | None = None) -> CA:
        ca = CA.create()
        ca.save(self.ca_cert, self.ca_key)
        self.issue_server(ca, "server", hostnames)
        return ca

    def issue_server(self, ca: CA, name: str, hostnames: list[str] | None = None) -> tuple[Path, Path]:
        names = ["localhost", *(hostnames or [])]
        dns = [n for n in names if not _is_ip(n)]
        ips = ["127.0.0.1", *[n for n in names if _is_ip(n)]]
        cert, key = ca.issue(name, server=True, client=True, dns=dns, ips=ips, days=365)  # Mozilla intermediate: at most 366
        cp, kp = self.dir / f"{name}.pem", self.dir / f"{name}-key.pem"
        write_pem(cp, cert_pem(cert), private=False)
        write_pem(kp, key_pem(key), private=True)
        return cp, kp

    def load_ca(self) -> CA:
        return CA.load(self.ca_cert, self.ca_key)


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False
