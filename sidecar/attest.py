"""Host attestation: the MAC address of the interface that routes to the key server.

The sidecar sends it (X-TOAST-CLIENT-MAC-ADDR) over mTLS with the host
certificate that binds it; an `attested` key store accepts the claim only in
that combination. The route and the address come from the kernel's own files:
/proc/net/route (longest prefix, then lowest metric, routes that are up; the
table scapy reads too) and /sys/class/net/<if>/address. scapy is the fallback
where those files do not answer (no /proc, an interface without a sysfs entry):
it is imported only then (in a thread), since loading it costs ~20 MB of
resident memory and its route resync costs CPU on every re-read. The MAC is
re-read periodically so a changed NIC or address is picked up without a restart.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from pathlib import Path

from server import logs
from server.access.pki import normalize_mac

log = logs.get("skm.sidecar.attest")


def _route_scapy(ip: str) -> str | None:
    from scapy.config import conf          # noqa: the route table loads on first use
    import scapy.route  # noqa: F401  (importing it sets conf.route)
    conf.route.resync()
    iface, _src, _gw = conf.route.route(ip)
    return str(iface) if iface else None


def _hwaddr_scapy(iface: str) -> str:
    from scapy.arch import get_if_hwaddr
    from scapy.config import conf
    conf.ifaces.reload()                   # scapy caches interfaces: a changed MAC must be seen
    return get_if_hwaddr(iface)


RTF_UP = 0x1


def _route_proc(ip: str, table: Path = Path("/proc/net/route")) -> str | None:
    """Longest-prefix match over /proc/net/route (IPv4; lowest metric among equals), lo for 127/8."""
    addr = ipaddress.IPv4Address(ip)
    if addr.is_loopback:
        return "lo"
    best: tuple[int, int, str] | None = None          # (prefix length, -metric, interface)
    with contextlib.suppress(OSError, ValueError):
        for line in table.read_text().splitlines()[1:]:
            f = line.split()
            if len(f) < 8 or not int(f[3], 16) & RTF_UP:
                continue
            dest = ipaddress.IPv4Address(struct.pack("<I", int(f[1], 16)))
            mask = ipaddress.IPv4Address(struct.pack("<I", int(f[7], 16)))
            net = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
            if addr in net:
                cand = (net.prefixlen, -int(f[6]), f[0])
                if best is None or cand[:2] > best[:2]:
                    best = cand
    return best[2] if best else None


def _hwaddr_sys(iface: str) -> str:
    return Path(f"/sys/class/net/{iface}/address").read_text().strip()


def read_mac(server_ip: str, interface: str = "") -> tuple[str, str]:
    """(interface, MAC) of the interface that routes to `server_ip`. Blocking: call in a thread."""
    iface = interface or _route_proc(server_ip)
    if not iface:
        try:
            iface = _route_scapy(server_ip)
        except Exception:       # scapy missing or its route table unreadable too
            iface = None
    if not iface:
        raise OSError(f"no interface routes to {server_ip}")
    try:
        mac = _hwaddr_sys(iface)
    except OSError:
        try:
            mac = _hwaddr_scapy(iface)
        except Exception:
            raise OSError(f"cannot read the MAC address of {iface}") from None
    return iface, normalize_mac(mac)


def resolve_ip(host: str) -> str:
    try:
        ipaddress.IPv4Address(host)
        return host
    except ValueError:
        return socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]


class Attestor:
    """Holds the current MAC; `refresh()` re-reads it and says whether it changed."""

    def __init__(self, server_host: str, interface: str = "", recheck: float = 5.0) -> None:
        self.server_host = server_host
        self.interface = interface
        self.recheck = recheck
        self.mac: str | None = None
        self.iface: str | None = None
        self.error: str | None = None
        self._task: asyncio.Task | None = None

    async def refresh(self) -> bool:
        try:
            # One hop to a thread per re-read: each hop can hold the event loop up to the GIL switch
            # interval (5 ms) while the loop is busy serving.
            iface, mac = await asyncio.to_thread(lambda: read_mac(resolve_ip(self.server_host), self.interface))
        except (OSError, ValueError) as e:
            self.error = f"cannot read the MAC of the interface to the key server: {e}"
            log.warning("attest_failed", reason=self.error)
            return False
        self.error = None
        changed = mac != self.mac or iface != self.iface
        if changed:
            log.info("attested_mac", interface=iface, mac=mac, previous=self.mac)
        self.mac, self.iface = mac, iface
        return changed

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="attest")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.recheck)
            await self.refresh()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
