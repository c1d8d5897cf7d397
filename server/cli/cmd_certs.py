"""`skm certs init|host`: the dev/demo PKI on disk.

`init` writes a CA, the key server's certificate, the system-key server's
certificate and one host certificate into a directory (default `certs/`).
`host` issues a sidecar host certificate that binds the host's MAC address(es)
as SAN URIs `urn:skm:mac:<12 hex>` (see certs/README.md). Private keys are 0600.
"""
from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from server.access.neighbor import route_for
from server.access.pki import DevPKI, cert_pem, fingerprint, key_pem, macs_of, normalize_mac, pkcs12_bundle, write_pem
from server.cli.common import fail


def register(sub) -> None:
    p = sub.add_parser("certs", help="create the dev PKI and host certificates",
                       description="Write the dev/demo PKI (CA, server, system-key server, host certificates).")
    s = p.add_subparsers(dest="certs_command", metavar="SUBCOMMAND")
    s.required = True

    i = s.add_parser("init", help="write CA, server, system-key server and one host certificate",
                     description="Create a CA and issue the key server's and system-key server's certificates and "
                                 "one host certificate into --dir. Refuses to replace an existing CA without --force.")
    i.add_argument("--dir", default="certs", help="output directory (default certs/)")
    i.add_argument("--hostname", action="append", default=[],
                   help="extra DNS name or IP for the server certificates (repeatable)")
    i.add_argument("--host", default="host1", help="name of the host certificate (default host1)")
    i.add_argument("--mac", help="MAC(s) the host certificate binds, comma-separated "
                                 "(default: the interface of the default route)")
    i.add_argument("--force", action="store_true", help="replace an existing CA (invalidates every certificate)")
    i.set_defaults(func=_init)

    h = s.add_parser("host", help="issue a host certificate binding MAC address(es)",
                     description="Issue a client certificate for a sidecar host from the CA in --dir, binding the "
                                 "given MAC address(es) as SAN URIs urn:skm:mac:<12 hex>. Use the key server's own "
                                 "CA (--dir <data_dir>/pki) for key stores in attested MAC mode.")
    h.add_argument("name")
    h.add_argument("--mac", required=True, help="MAC address(es), comma-separated")
    h.add_argument("--dir", default="certs", help="directory holding ca.pem and ca-key.pem (default certs/)")
    h.add_argument("--days", type=int, default=365)
    h.add_argument("--p12", action="store_true",
                   help="also write NAME.p12 (password from SKM_P12_PASSWORD or a prompt)")
    h.set_defaults(func=_host)


def parse_macs(value: str) -> list[str]:
    macs = [m.strip() for m in value.split(",") if m.strip()]
    if not macs:
        raise ValueError("give at least one MAC address")
    return [normalize_mac(m) for m in macs]


def default_mac() -> str | None:
    """The MAC of the interface that holds the default route, if there is one."""
    route = route_for("0.0.0.0")
    if route is None:
        return None
    try:
        return normalize_mac(Path(f"/sys/class/net/{route[0]}/address").read_text())
    except (OSError, ValueError):
        return None


def issue_host(pki: DevPKI, name: str, macs: list[str], days: int = 365, p12_password: str | None = None
               ) -> tuple[Path, Path, str]:
    ca = pki.load_ca()
    cert, key = ca.issue_host(name, macs, days=days)
    cp, kp = pki.dir / f"{name}.pem", pki.dir / f"{name}-key.pem"
    write_pem(cp, cert_pem(cert), private=False)
    write_pem(kp, key_pem(key), private=True)
    if p12_password is not None:
        write_pem(pki.dir / f"{name}.p12", pkcs12_bundle(name, cert, key, ca.cert, p12_password), private=True)
    return cp, kp, fingerprint(cert.public_bytes(Encoding.DER))


def _name_ok(name: str) -> bool:
    return bool(name) and len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name) and name[0] != "."


def _init(args: argparse.Namespace) -> int:
    pki = DevPKI(Path(args.dir))
    if pki.exists() and not args.force:
        return fail(f"{pki.ca_cert} exists; use --force to replace the CA (every certificate it issued stops "
                    "working)", 5)
    if not _name_ok(args.host):
        return fail("the host name may hold letters, digits, '-', '_' and '.'", 2)
    try:
        macs = parse_macs(args.mac) if args.mac else [m for m in [default_mac()] if m]
    except ValueError as e:
        return fail(str(e), 2)
    if not macs:
        return fail("no default-route interface to read a MAC from; give --mac", 2)
    pki.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(pki.dir, 0o700)
    ca = pki.create(args.hostname)
    pki.issue_server(ca, "systemkey", args.hostname)
    cp, _kp, fp = issue_host(pki, args.host, macs)
    print(f"wrote the dev PKI to {pki.dir}/")
    print("  ca.pem / ca-key.pem            certificate authority (keep ca-key.pem secret)")
    print("  server.pem / server-key.pem    key server (data and management listeners)")
    print("  systemkey.pem / systemkey-key.pem  system-key server")
    print(f"  {cp.name} / {args.host}-key.pem    host certificate binding {', '.join(macs)}")
    print(f"  host certificate SHA-256 fingerprint: {fp}")
    return 0


def _host(args: argparse.Namespace) -> int:
    pki = DevPKI(Path(args.dir))
    if not pki.exists():
        return fail(f"no CA in {pki.dir} (run `skm certs init --dir {pki.dir}` first)", 4)
    if not _name_ok(args.name):
        return fail("the host name may hold letters, digits, '-', '_' and '.'", 2)
    if not 1 <= args.days <= 3650:
        return fail("--days must be from 1 to 3650", 2)
    try:
        macs = parse_macs(args.mac)
    except ValueError as e:
        return fail(f"{e}: use aa:bb:cc:dd:ee:ff", 2)
    password = None
    if args.p12:
        password = os.environ.get("SKM_P12_PASSWORD")
        if password is None:
            if not sys.stdin.isatty():
                return fail("give the PKCS#12 password in SKM_P12_PASSWORD", 2)
            password = getpass.getpass("PKCS#12 password: ")
    cp, kp, fp = issue_host(pki, args.name, macs, args.days, password)
    from cryptography import x509
    bound = sorted(macs_of(x509.load_pem_x509_certificate(cp.read_bytes())))
    print(f"wrote {cp} and {kp}" + (f" and {pki.dir / (args.name + '.p12')}" if password is not None else ""))
    print(f"  binds MAC {', '.join(bound)} (SAN URI urn:skm:mac:<12 hex>)")
    print(f"  SHA-256 fingerprint: {fp}")
    return 0
