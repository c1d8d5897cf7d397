"""The local user behind a loopback TCP connection, from the kernel's socket table (as identd does).

A TCP socket carries no SO_PEERCRED, but the kernel lists every socket of this network namespace
with its owner in /proc/net/tcp (IPv4) and /proc/net/tcp6 (IPv6). The caller's own socket is the
row whose local end is the connection's peer address and whose remote end is our address:
its uid column is the caller's uid. Only meaningful for peers on this host (the sidecar's TCP
listener accepts 127.0.0.1 only), and only while the caller's socket is open.
"""
from __future__ import annotations

import socket
import struct

_TABLES = {socket.AF_INET: "/proc/net/tcp", socket.AF_INET6: "/proc/net/tcp6"}
_ESTABLISHED = "01"


def _hex_address(family: int, host: str, port: int) -> str:
    """An address as /proc/net/tcp* prints it: the raw 32-bit words in host byte order, then the port."""
    raw = socket.inet_pton(family, host)
    # The kernel prints each 32-bit word of the address (network order in memory) read as a native int.
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def tcp_peer_uid(family: int, peer: tuple, local: tuple, table: str | None = None) -> int | None:
    """The uid owning the peer's end of the connection `peer` -> `local` (addresses as getpeername() /
    getsockname() give them), or None when no such socket is listed (the caller already left)."""
    want_local = _hex_address(family, peer[0], peer[1])
    want_remote = _hex_address(family, local[0], local[1])
    try:
        with open(table or _TABLES[family], encoding="ascii") as f:
            next(f, None)                                    # the column header
            for line in f:
                cols = line.split()
                # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
                if len(cols) > 7 and cols[1] == want_local and cols[2] == want_remote and cols[3] == _ESTABLISHED:
                    return int(cols[7])
    except (OSError, KeyError, ValueError):
        return None
    return None
