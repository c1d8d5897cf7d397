"""Key-store client checks: IPv4/CIDR, MAC address, client certificate; AND or OR.

A denial names the failed method (NHN's messages) and nothing about what is
registered. Checks read the store's auth data per request, so a deletion
takes effect on the very next request.
"""
from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web

from server import timeutil
from server.access.pki import macs_of, normalize_mac
from server.errors import CertificateAuthFailure, IPv4AuthFailure, MACAuthFailure, SKMError
from server.keys.model import AuthMode, KeyStore, MacMode
from server.storage.base import Storage


class ClientAccess:
    def __init__(self, storage: Storage, trusted_proxies: tuple[str, ...] = ()) -> None:
        self.db = storage
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    # -- where the client is -----------------------------------------------
    def client_ip(self, request: web.Request) -> str:
        peer = request.remote or ""
        if self.trusted and _in_any(peer, self.trusted):
            xff = request.headers.get("X-Forwarded-For", "")
            # The right-most address not added by a trusted proxy is the client.
            for hop in reversed([h.strip() for h in xff.split(",") if h.strip()]):
                if not _in_any(hop, self.trusted):
                    return hop if _is_ipv4(hop) else peer
        return peer

    # -- the checks ----------------------------------------------------------
    async def authorize(self, request: web.Request, ctx, ks: KeyStore) -> None:
        checks = []
        if ks.ip4_auth:
            checks.append(self._check_ipv4)
        if ks.mac_auth:
            checks.append(self._check_mac)
        if ks.cert_auth:
            checks.append(self._check_cert)
        if not checks:
            raise IPv4AuthFailure("the key store has no client check enabled")   # fail closed
        failures: list[SKMError] = []
        for check in checks:
            try:
                await check(request, ctx, ks)
                if ks.auth_mode is AuthMode.OR:
                    return
            except SKMError as e:
                if ks.auth_mode is AuthMode.AND:
                    raise
                failures.append(e)
        if failures:
            raise failures[0]

    async def _check_ipv4(self, request, ctx, ks: KeyStore) -> None:
        if not _is_ipv4(ctx.peer_ip):
            raise IPv4AuthFailure()
        rows = await self.db.fetchall("SELECT value FROM auth_ipv4s WHERE keystore_id = ? AND status = 'ACTIVE'", ks.id)
        addr = ipaddress.IPv4Address(ctx.peer_ip)
        for r in rows:
            if addr in ipaddress.IPv4Network(r["value"], strict=False):
                return
        raise IPv4AuthFailure()

    async def _registered_macs(self, ks: KeyStore) -> list[str]:
        rows = await self.db.fetchall("SELECT value FROM auth_macs WHERE keystore_id = ? AND status = 'ACTIVE'", ks.id)
        return [r["value"] for r in rows]

    async def _check_mac(self, request, ctx, ks: KeyStore) -> None:
        claim = _mac_or_none(ctx.mac_header)
        if ks.mac_mode is MacMode.NEIGHBOR:
            claim = await self.neighbor_mac(request, ctx)
        if claim is None:
            raise MACAuthFailure()
        if ks.mac_mode is MacMode.ATTESTED:
            if ctx.cert_der is None:
                raise MACAuthFailure()
            from cryptography import x509
            bound = macs_of(x509.load_der_x509_certificate(ctx.cert_der))
            if claim not in bound:
                raise MACAuthFailure()
        if not any(hmac.compare_digest(claim, m) for m in await self._registered_macs(ks)):
            raise MACAuthFailure()

    async def neighbor_mac(self, request, ctx) -> str | None:
        from server.access.neighbor import lookup_mac
        return await lookup_mac(ctx.peer_ip)

    async def _check_cert(self, request, ctx, ks: KeyStore) -> None:
        if ctx.fingerprint is None:
            raise CertificateAuthFailure()
        row = await self.db.fetchone(
            "SELECT fingerprint, expires_at FROM auth_certificates WHERE keystore_id = ? AND fingerprint = ? "
            "AND status = 'ACTIVE'", ks.id, ctx.fingerprint)
        if row is None or not hmac.compare_digest(row["fingerprint"], ctx.fingerprint):
            raise CertificateAuthFailure()
        if row["expires_at"] <= timeutil.now_db():
            raise CertificateAuthFailure()


def _is_ipv4(s: str) -> bool:
    try:
        ipaddress.IPv4Address(s)
        return True
    except ValueError:
        return False


def _in_any(addr: str, nets) -> bool:
    try:
        a = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(a in n for n in nets)


def _mac_or_none(v: str | None) -> str | None:
    if not v:
        return None
    try:
        return normalize_mac(v)
    except ValueError:
        return None
