"""The MAC address of a TCP peer, from the kernel's neighbour (ARP) table.

Only a peer on the same L2 segment has an entry of its own: a client behind a
router shows the router's MAC, so a peer reached through a gateway is refused
with that reason rather than matched against the router. When the table has no
complete entry for an on-link peer, one ARP request (scapy, in a thread; needs
CAP_NET_RAW) refreshes it, then the table is read again.

Everything here reads the network namespace the server runs in.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from server import logs
from server.access.pki import normalize_mac

log = logs.get("skm.neighbor")

ARP_TABLE = Path("/proc/net/arp")
ROUTE_TABLE = Path("/proc/net/route")
ATF_COM = 0x2                      # the entry is complete (resolved)
ARP_TIMEOUT = 1.0

# Reasons are about the network path only, never about what a key store has registered.
NOT_IPV4 = "neighbor verification needs an IPv4 peer"
LOOPBACK = "the client connected over loopback; neighbor verification needs a peer on the server's L2 segment"
OFF_LINK = "the client is not on the server's L2 segment (it is reached through a router), so its MAC cannot be verified"
NO_ROUTE = "the server has no route to the client's address"
NO_ANSWER = "the client's address did not answer an ARP request from the server"


@dataclass(frozen=True)
class Neighbor:
    mac: str | None
    reason: str | None = None        # why there is no MAC (None when found)
    iface: str | None = None


def read_arp(ip: str, table: Path = ARP_TABLE) -> str | None:
    """The complete neighbour entry for `ip` in /proc/net/arp, normalised; None if absent."""
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if len(f) < 6 or f[0] != ip:
            continue
        try:
            flags = int(f[2], 16)
            mac = normalize_mac(f[3])
        except ValueError:
            continue
        if flags & ATF_COM and mac != "00:00:00:00:00:00":
            return mac
    return None


def route_for(ip: str, table: Path = ROUTE_TABLE) -> tuple[str, bool] | None:
    """(interface, on_link) of the longest-prefix IPv4 route to `ip`; None without a route."""
    addr = int(ipaddress.IPv4Address(ip))
    best: tuple[int, str, bool] | None = None
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if len(f) < 8:
            continue
        try:
            # /proc/net/route prints each address as the hex of its bytes in host (little-endian) order.
            dest, gateway, mask = (int.from_bytes(bytes.fromhex(f[i])[::-1], "big") for i in (1, 2, 7))
            flags = int(f[3], 16)
        except ValueError:
            continue
        if not flags & 0x1 or addr & mask != dest:          # RTF_UP
            continue
        prefix = bin(mask).count("1")
        if best is None or prefix > best[0]:
            best = (prefix, f[0], gateway == 0 and not flags & 0x2)   # RTF_GATEWAY
    return None if best is None else (best[1], best[2])


def arp_request(ip: str, iface: str, timeout: float = ARP_TIMEOUT) -> str | None:
    """One ARP who-has for `ip` on `iface`; the answering MAC or None. Blocking: run in a thread."""
    try:
        # Only the modules needed: `import scapy.all` costs 1-2 s.
        from scapy.layers.l2 import ARP, Ether
        from scapy.sendrecv import srp
    except ImportError:
        log.warning("neighbor_arp_unavailable", reason="scapy is not installed")
        return None
    try:
        answered, _ = srp(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=ip), iface=iface, timeout=timeout,
                          retry=0, verbose=False)
    except (OSError, PermissionError) as e:
        log.warning("neighbor_arp_failed", reason=str(e))
        return None
    for _sent, received in answered:
        try:
            return normalize_mac(received[ARP].hwsrc)
        except (ValueError, IndexError):
            continue
    return None


async def lookup(ip: str) -> Neighbor:
    """The MAC of on-link peer `ip`, or the reason there is none."""
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        return Neighbor(None, NOT_IPV4)
    if addr.is_loopback:
        return Neighbor(None, LOOPBACK)
    mac = read_arp(ip)
    if mac is not None:
        return Neighbor(mac)
    route = route_for(ip)
    if route is None:
        return Neighbor(None, NO_ROUTE)
    iface, on_link = route
    if not on_link:
        return Neighbor(None, OFF_LINK, iface)
    if iface == "lo" or _is_local(ip):
        return Neighbor(None, LOOPBACK, iface)
    answered = await asyncio.to_thread(arp_request, ip, iface)
    # Prefer the kernel's table (it may have learnt the peer meanwhile); else the ARP answer itself.
    mac = read_arp(ip) or answered
    return Neighbor(mac, None if mac else NO_ANSWER, iface)


async def lookup_mac(ip: str) -> str | None:
    return (await lookup(ip)).mac


def _is_local(ip: str) -> bool:
    """True when `ip` is one of this host's own addresses (a client on the server itself)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False
