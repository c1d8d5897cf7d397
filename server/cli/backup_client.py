"""`skm backup create`'s side of the stream: one POST /api/v1/backup over the standard library's
http.client and ssl, the response written to a file as it arrives.

Why not aiohttp (the other commands' client): this command is measured against `sqlite3 .backup`,
a C program, and asyncio + aiohttp + rich cost it more start-up (about 0.2 s) than the raw tool's
whole run. The TLS rules are the same context (server/access/tls.py client_context: TLS 1.2+, AEAD
suites, the server's certificate checked against SKM_CACERT, host name included); every failure is one
line saying what to change. rich is imported only when a progress bar is shown (stderr a terminal).
"""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import sys
from typing import IO, Callable
from urllib.parse import urlsplit

from server.cli.common import Connection, _raise_for, _ssl_context
from server.errors import ConnectionFailed, Unavailable

CHUNK = 1 << 20
MAX_MANIFEST = 4 << 20        # the manifest line's limit (as server/backup/format.py reads it)
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 300.0          # a large store's snapshot is made before the first byte is sent
Progress = Callable[[int, int | None], object]      # (bytes so far, total bytes when known)


def stream_backup(conn: Connection, out: IO[bytes], progress: Progress | None = None) -> dict:
    """Ask the server for a backup and write it to `out`; the summary of the manifest and the bytes."""
    where = conn.addr
    url = urlsplit(conn.addr)
    ctx = _ssl_context(conn) or _default_context()
    c = http.client.HTTPSConnection(url.hostname or "", url.port or 443, timeout=CONNECT_TIMEOUT, context=ctx)
    headers = {"Content-Length": "0"}
    if conn.token:
        headers["Authorization"] = f"Bearer {conn.token}"
    try:
        try:
            c.connect()
            c.sock.settimeout(READ_TIMEOUT)
            c.request("POST", f"{url.path}/api/v1/backup", headers=headers)
            r = c.getresponse()
        except ssl.SSLCertVerificationError as e:
            if "hostname" in str(e).lower() or "ip address" in str(e).lower():
                raise ConnectionFailed(f"the certificate of {where} is not issued for that host name "
                                       f"({e.verify_message}); use the name or address the certificate names in "
                                       f"{conn.addr_source}") from None
            raise ConnectionFailed(f"the certificate of {where} is not trusted ({e.verify_message}); set "
                                   "SKM_CACERT to the CA certificate that signed it (the server's "
                                   "<data-dir>/pki/ca.pem)") from None
        except ssl.SSLError as e:
            raise ConnectionFailed(f"the TLS handshake with {where} failed ({e.reason or e}); is {conn.addr_source} "
                                   "the key server's management listener?") from None
        except http.client.RemoteDisconnected:
            raise ConnectionFailed(f"{where} closed the connection without answering; is {conn.addr_source} the "
                                   "key server's management listener (https, default port 8444)?") from None
        except (TimeoutError, socket.timeout):
            raise
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
            raise ConnectionFailed(f"cannot reach {where} ({reason}); is the server running, and is "
                                   f"{conn.addr_source} right?") from None
        if r.status != 200:
            _refused(r, conn)
        try:
            return _receive(r, out, progress)
        except (http.client.HTTPException, ConnectionError, ssl.SSLError) as e:
            raise _ended_early() from e
    finally:
        c.close()


def _default_context() -> ssl.SSLContext:
    from server.access.tls import client_context
    return client_context()


def _refused(r: http.client.HTTPResponse, conn: Connection) -> None:
    """The server's error envelope as the CLI's error (exit code by status)."""
    if r.status == 401 and not conn.token:      # as the other commands say it (MgmtClient)
        from server.cli.common import CliError
        raise CliError("no operator token: set SKM_TOKEN (`skm server init` printed one), or run "
                       "`skm login NAME --save`", 3)
    try:
        env = json.loads(r.read(1 << 20) or b"null")
    except (ValueError, UnicodeDecodeError, http.client.HTTPException, OSError):
        env = None
    if not isinstance(env, dict) or "header" not in env:
        raise Unavailable(f"HTTP {r.status} without an SKM answer; is SKM_ADDR the key server's management "
                          "listener?")
    _raise_for(r.status, env)


def _ended_early() -> Unavailable:
    return Unavailable("the backup stream ended early (the server failed or the connection broke); nothing was "
                       "kept: run it again")


def _receive(r: http.client.HTTPResponse, f: IO[bytes], progress: Progress | None) -> dict:
    """Write the stream to `f`, following its bytes; check it ends with its trailer (the MAC itself
    is checked by `skm backup verify` / `restore`, which hold the system key)."""
    manifest: dict | None = None
    buf = b""
    total_bytes = 0
    total: int | None = None
    last = b""
    block = bytearray(CHUNK)
    view = memoryview(block)
    while n := r.readinto(block):        # straight from the TLS socket into one buffer: no copy per read
        chunk = view[:n]
        f.write(chunk)
        total_bytes += n
        if manifest is None:
            buf += chunk
            if b"\n" not in buf and len(buf) > MAX_MANIFEST:     # not a backup stream: do not hold it all
                raise _ended_early()
            if b"\n" in buf:
                head = buf.split(b"\n", 1)[0]
                try:
                    manifest = json.loads(head)
                except (ValueError, UnicodeDecodeError):
                    raise _ended_early() from None
                size = (manifest.get("payload") or {}).get("bytes") if isinstance(manifest, dict) else None
                total = len(head) + 1 + size if isinstance(size, int) else None
                buf = b""
        last = (last + chunk[-4096:])[-4096:]
        if progress is not None:
            progress(total_bytes, total)
    try:        # the trailer follows the binary image: find it by its start, not by a newline
        end = json.loads(last[last.rindex(b'{"end":'):]) if manifest is not None and last.endswith(b"\n") else {}
    except ValueError:
        end = {}
    if not isinstance(manifest, dict) or not isinstance(end, dict) or end.get("end") != "skm-backup":
        raise _ended_early()
    if progress is not None:
        progress(total_bytes, total_bytes)
    return {"backupId": manifest["backupId"], "createdAt": manifest["createdAt"], "records": manifest["records"],
            "bytes": total_bytes, "backend": manifest["source"]["backend"],
            "schemaVersion": manifest["source"]["schemaVersion"], "auditHead": manifest.get("auditHead", {}),
            "systemKeyVersions": manifest["systemKeyVersions"],
            "tables": {t["name"]: t["count"] for t in manifest["tables"]}}


def progress_bar(json_output: bool):
    """A context manager yielding a progress callback: a rich bar when stderr is a terminal (and no
    --json), else nothing drawn (and rich not imported)."""
    import contextlib
    if json_output or not sys.stderr.isatty():
        return contextlib.nullcontext(None)
    return _bar()


def _bar():
    import contextlib

    from rich.console import Console
    from rich.filesize import decimal
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def bar():
        with Progress(TextColumn("backing up"), BarColumn(), TextColumn("{task.fields[size]}"), TimeElapsedColumn(),
                      console=Console(stderr=True)) as p:
            task = p.add_task("backup", total=None, size="0 bytes")

            def update(done: int, total: int | None) -> None:
                p.update(task, completed=done, total=total, size=decimal(done))
            yield update
    return bar()
