"""The client-check entries of one key store in force: IPv4 networks, MACs, certificate fingerprints.

Read once per store (server/access/authcache.py keeps them between changes). Only ACTIVE rows that pass
their seal (server/access/seal.py) count: an entry written into the database admits nobody, and one
scheduled for deletion and switched back on there stays out. Only fingerprints, networks and MACs are
held: no credential.
"""
from __future__ import annotations

import functools
import hmac
import ipaddress
from dataclasses import dataclass, field

from server import timeutil
from server.access.seal import columns


@functools.lru_cache(maxsize=4096)
def parse_ipv4(s: str) -> ipaddress.IPv4Address | None:
    """A dotted-quad peer address, or None. Memoised: the same few peers ask on every request,
    and ipaddress parses in pure Python (~6 µs)."""
    try:
        return ipaddress.IPv4Address(s)
    except ValueError:
        return None


@dataclass(frozen=True)
class AuthEntries:
    """The ACTIVE, sealed auth data of one key store at one moment."""
    ipv4: tuple[ipaddress.IPv4Network, ...] = ()
    macs: tuple[str, ...] = ()
    certs: dict[str, str] = field(default_factory=dict)      # fingerprint -> expires_at (db time)
    # peer address -> allowed: the same few peers ask on every request, and `addr in net` is pure
    # Python per network. The entries are immutable, so the answers never go stale with them.
    _ip_memo: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def ipv4_allows(self, ip: str) -> bool:
        memo = self._ip_memo
        hit = memo.get(ip)
        if hit is not None:
            return hit
        addr = parse_ipv4(ip)
        allowed = addr is not None and any(addr in net for net in self.ipv4)
        if len(memo) < 1024:
            memo[ip] = allowed
        return allowed

    def mac_registered(self, claim: str) -> bool:
        return any(hmac.compare_digest(claim, m) for m in self.macs)

    def certificate_valid(self, fingerprint: str, now_db: str | None = None) -> bool:
        expires = self.certs.get(fingerprint)
        if expires is None:
            return False
        return expires > (now_db or timeutil.now_db())


async def load_entries(db, seal, keystore_id: int) -> AuthEntries:
    """The store's entries in force now, from the database (`seal`: server.access.seal.AccessSeal)."""
    async def rows(table: str) -> list[dict]:
        # The sealed columns hold all a check needs (not a certificate's sealed bundle, say).
        found = await db.fetchall(f"SELECT {columns(table)} FROM {table} WHERE keystore_id = ? AND status = 'ACTIVE'",
                                  keystore_id)
        return [r for r in found if await seal.valid(table, r)]

    return AuthEntries(tuple(ipaddress.IPv4Network(r["value"], strict=False) for r in await rows("auth_ipv4s")),
                       tuple(r["value"] for r in await rows("auth_macs")),
                       {r["fingerprint"]: r["expires_at"] for r in await rows("auth_certificates")})
