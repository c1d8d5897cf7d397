"""What CLI commands share: the management-API client, config, output."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import aiohttp

from server.access.tls import client_context
from server.errors import SKMError

CONFIG_FILE = Path(os.environ.get("SKM_CONFIG", Path.home() / ".config" / "skm" / "config.toml"))
_STATUS_ERRORS: dict[int, type[SKMError]] = {}


def add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection (default: SKM_ADDR, SKM_TOKEN, SKM_CACERT or the config file)")
    g.add_argument("--addr", help="management URL, e.g. https://127.0.0.1:8444")
    g.add_argument("--token", help="operator token (prefer SKM_TOKEN: arguments show in `ps`)")
    g.add_argument("--ca", help="CA certificate that signed the server's certificate")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@dataclass
class Connection:
    addr: str
    token: str | None
    ca: str | None


def connection(args: argparse.Namespace) -> Connection:
    cfg: dict[str, Any] = {}
    if CONFIG_FILE.exists():
        cfg = tomllib.loads(CONFIG_FILE.read_text())
    addr = getattr(args, "addr", None) or os.environ.get("SKM_ADDR") or cfg.get("addr") or "https://127.0.0.1:8444"
    token = getattr(args, "token", None) or os.environ.get("SKM_TOKEN") or cfg.get("token")
    ca = getattr(args, "ca", None) or os.environ.get("SKM_CACERT") or cfg.get("ca")
    if ca is None and Path(".skm/pki/ca.pem").exists():
        ca = ".skm/pki/ca.pem"
    return Connection(addr.rstrip("/"), token, ca)


class ApiError(SKMError):
    pass


def _raise_for(status: int, envelope: dict) -> None:
    from server import errors
    header = (envelope or {}).get("header") or {}
    msg = header.get("resultMessage", f"HTTP {status}")
    detail = header.get("resultDetail")
    if status == 202 and (envelope.get("body") or {}).get("changeRequestId") is not None:
        raise errors.ApprovalRequired(envelope["body"]["changeRequestId"], detail)
    cls = {401: errors.Unauthenticated, 403: errors.Forbidden, 404: errors.NotFound, 409: errors.Conflict,
           429: errors.TooManyAttempts, 503: errors.Unavailable}.get(status, ApiError)
    raise cls(detail, message=msg)


class MgmtClient:
    """Async client of /api/v1 with the operator token."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        ssl_ctx = client_context(Path(conn.ca)) if conn.ca else None
        headers = {"Authorization": f"Bearer {conn.token}"} if conn.token else {}
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx), headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=60))

    async def __aenter__(self) -> "MgmtClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
        url = f"{self.conn.addr}/api/v1{path}"
        async with self.session.request(method, url, json=body, params=params) as r:
            try:
                env = await r.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError):
                env = {}
            if r.status >= 300 or not (env.get("header") or {}).get("isSuccessful", False) or r.status == 202:
                _raise_for(r.status, env)
            return env.get("body")

    async def raw(self, method: str, path: str, params: dict | None = None) -> bytes:
        async with self.session.request(method, f"{self.conn.addr}/api/v1{path}", params=params) as r:
            if r.status >= 300:
                _raise_for(r.status, await r.json(content_type=None))
            return await r.read()


def client(args: argparse.Namespace) -> MgmtClient:
    return MgmtClient(connection(args))


def shown(value: Any) -> str:
    """Stored text as a terminal may print it: control and bidirectional-text characters escaped
    (`\x1b`, `\n`, `\u202e`). Names and descriptions are refused with them now, but rows stored
    earlier may hold them; every print of server data goes through here (server/text.py)."""
    from server.text import visible
    return visible(value)


def cell(value: Any):
    """A table cell: escaped (`shown`) and never read as rich markup (`[red]` in a name stays text)."""
    from rich.text import Text
    return Text(shown("" if value is None else value))


def json_text(data: Any) -> str:
    """JSON for a terminal: what json.dumps leaves raw (DEL, C1 controls, bidi controls) as \\u escapes,
    which is the same JSON to a parser."""
    from server.text import is_unsafe
    raw = json.dumps(data, indent=2, ensure_ascii=False)
    # A raw newline here is the indentation's: json.dumps escapes every one inside a string.
    return "".join(f"\\u{ord(ch):04x}" if ch != "\n" and is_unsafe(ch) else ch for ch in raw)


def output(args: argparse.Namespace, data: Any, columns: Iterable[str] | None = None,
           rows: list[dict] | None = None, title: str | None = None) -> None:
    """`--json` prints `data`; otherwise a table of `rows` (or key/value pairs of a dict).
    Every value goes through `cell`/`json_text`: stored text never reaches the terminal raw."""
    if getattr(args, "json", False):
        print(json_text(data))
        return
    from rich.console import Console
    from rich.table import Table
    console = Console()
    caption = cell(title) if title is not None else None
    if rows is None:
        table = Table(title=caption, show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        for k, v in (data or {}).items():
            if isinstance(v, (list, dict)):
                v = json.dumps(v, ensure_ascii=False)
            table.add_row(cell(k), cell(v))
        console.print(table)
        return
    cols = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=caption)
    for c in cols:
        table.add_column(cell(c))
    for r in rows:
        table.add_row(*[cell(r.get(c)) for c in cols])
    console.print(table)


def yn(flag: bool) -> str:
    return "Y" if flag else "N"


def key_id(text: str) -> str:
    """argparse type of a key id: a typo is named here, not answered by the server as an unknown URL."""
    import re
    if not re.fullmatch(r"[0-9a-f]{32}", text):
        raise argparse.ArgumentTypeError(f"{shown(text)!r} is not a key id: 32 lowercase hex characters "
                                         "(`skm key list STORE` shows them)")
    return text


def fail(msg: str, code: int = 1) -> int:
    print(f"error: {shown(msg)}", file=sys.stderr)
    return code
