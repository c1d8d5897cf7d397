"""Compose health checks: `healthcheck.py URL [--file PATH ...] [--cert PEM --key PEM]`, exit 0 when healthy.

URL is https://host:port/path (verified against $SKM_HEALTH_CA, default /certs/ca.pem; --cert/--key
present a client certificate) or unix:/path/to.sock:/path for the sidecar's socket. Each --file
must exist too.
"""
from __future__ import annotations

import http.client
import os
import socket
import ssl
import sys
from urllib.parse import urlsplit


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self._path)


def check(url: str, cert: str | None = None, key: str | None = None) -> bool:
    if url.startswith("unix:"):
        sock, _, path = url[5:].partition(":")
        conn: http.client.HTTPConnection = _Unix(sock)
    else:
        u = urlsplit(url)
        ctx = ssl.create_default_context(cafile=os.environ.get("SKM_HEALTH_CA", "/certs/ca.pem"))
        if cert:
            ctx.load_cert_chain(cert, key)
        conn = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=5)
        path = u.path or "/"
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    opts: dict[str, list[str]] = {"--file": [], "--cert": [], "--key": []}
    urls: list[str] = []
    it = iter(argv)
    for a in it:
        if a in opts:
            opts[a].append(next(it))
        else:
            urls.append(a)
    cert = opts["--cert"][0] if opts["--cert"] else None
    key = opts["--key"][0] if opts["--key"] else None
    ok = all(os.path.exists(f) for f in opts["--file"]) and all(check(u, cert, key) for u in urls)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
