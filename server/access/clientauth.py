"""Key-store client checks: IPv4/CIDR, MAC address, client certificate; AND or OR.

A denial names the failed method (NHN's messages) and nothing about what is
registered: a detail, when there is one, describes the request or the network
path, never the store's entries. Checks see the store's entries as they are
now (server/access/authcache.py drops them on every change), so a deletion or a
scheduled deletion takes effect on the very next request, even on a kept-alive
connection. A store or entry whose row fails its seal admits nobody. Denials are counted in
`skm_access_denials{reason}`.

MAC verification modes (the key store's `macVerification`):
* header: the `X-TOAST-CLIENT-MAC-ADDR` value as sent, normalised (NHN compatible; weak: anyone can type it);
* attested: the claimed MAC must also be bound (SAN URI urn:skm:mac:<12 hex>) in the verified host
  certificate presented on this connection;
* neighbor: the MAC of the TCP peer in the kernel's neighbour table; the header is ignored; only a
  peer on the server's L2 segment can pass.
"""
from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web

from server.access.authentries import AuthEntries, load_entries, parse_ipv4
from server.access.pki import macs_of, normalize_mac
from server.errors import BarrierError, CertificateAuthFailure, IPv4AuthFailure, MACAuthFailure, SKMError
from server.keys.model import AuthMode, KeyStore, MacMode
from server.runtime import RUNTIME
from server.storage.base import Storage

MAC_HEADER = "X-TOAST-CLIENT-MAC-ADDR"
_REASONS = {IPv4AuthFailure: "ipv4", MACAuthFailure: "mac", CertificateAuthFailure: "certificate"}


class ClientAccess:
    def __init__(self, storage: Storage, seal, trusted_proxies: tuple[str, ...] = ()) -> None:
        self.db = storage
        self.seal = seal              # server.access.seal.AccessSeal: entries failing their seal admit nobody
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
        try:
            await self._authorize(request, ctx, ks)
        except SKMError as e:
            metrics = request.config_dict[RUNTIME].metrics if RUNTIME in request.config_dict else None
            if metrics is not None:
                metrics.denials.labels(_REASONS.get(type(e), "other")).inc()
            raise

    async def passes(self, request: web.Request, ctx, ks: KeyStore) -> bool:
        """Whether the caller passes the store's checks now, without counting a denial (listing which
        of a project's stores a caller may see, re-checking an open event stream)."""
        try:
            await self._authorize(request, ctx, ks)
        except SKMError:
            return False
        return True

    async def entries(self, ks: KeyStore) -> AuthEntries:
        """The store's entries in force (CachedClientAccess keeps them between changes)."""
        return await load_entries(self.db, self.seal, ks.id)

    async def _authorize(self, request: web.Request, ctx, ks: KeyStore) -> None:
        if not ks.intact:
            # Which checks run, and how they combine, were edited outside the key server: fail closed.
            raise BarrierError("this key store's client checks were changed outside the key server, so every "
                               "client is refused; restore the database from a backup "
                               "(docs/disaster-recovery.md)")
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
        # AND stops at the first failure, OR at the first pass: a denial costs at most one request's checks.
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
        if not (await self.entries(ks)).ipv4_allows(ctx.peer_ip):
            raise IPv4AuthFailure()

    async def _check_mac(self, request, ctx, ks: KeyStore) -> None:
        if ks.mac_mode is MacMode.NEIGHBOR:
            # The kernel's word, not the client's: the header is ignored.
            if ctx.peer_ip != (request.remote or ""):
                raise MACAuthFailure("neighbor verification needs a direct connection, not one through a proxy")
            found = await self.neighbor(ctx.peer_ip)
            if found.mac is None:
                raise MACAuthFailure(found.reason)
            claim = found.mac
        else:
            claim = _mac_or_none(ctx.mac_header)
            if claim is None:
                raise MACAuthFailure(f"send the client's MAC address in {MAC_HEADER}")
        if ks.mac_mode is MacMode.ATTESTED:
            # The claim counts only when the verified host certificate of this connection binds it.
            if ctx.cert_der is None:
                raise MACAuthFailure("this key store verifies MAC claims against the host certificate; "
                                     "connect with the host's certificate (the sidecar does)")
            from cryptography import x509
            bound = macs_of(x509.load_der_x509_certificate(ctx.cert_der))
            if not any(hmac.compare_digest(claim, m) for m in bound):
                raise MACAuthFailure("the claimed MAC address is not bound in the presented host certificate")
        if not (await self.entries(ks)).mac_registered(claim):
            raise MACAuthFailure()

    async def neighbor(self, ip: str):
        from server.access.neighbor import lookup
        return await lookup(ip)

    async def neighbor_mac(self, request, ctx) -> str | None:
        return (await self.neighbor(ctx.peer_ip)).mac

    async def _check_cert(self, request, ctx, ks: KeyStore) -> None:
        if ctx.fingerprint is None:
            raise CertificateAuthFailure("present the key store's client certificate (PKCS#12 from the server) "
                                         "in the TLS handshake")
        if not (await self.entries(ks)).certificate_valid(ctx.fingerprint):
            raise CertificateAuthFailure()


def _is_ipv4(s: str) -> bool:
    return parse_ipv4(s) is not None


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
