"""What CLI commands share: the management-API client, config, output."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from server.errors import SKMError

CONFIG_FILE = Path(os.environ.get("SKM_CONFIG", Path.home() / ".config" / "skm" / "config.toml"))
_STATUS_ERRORS: dict[int, type[SKMError]] = {}


def add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection (default: SKM_ADDR, SKM_TOKEN, SKM_CACERT or the config file)")
    g.add_argument("--addr", help="management URL, e.g. https://127.0.0.1:8444")
    g.add_argument("--token", help="operator token (prefer SKM_TOKEN: arguments show in `ps`)")
    g.add_argument("--ca", help="CA certificate that signed the server's certificate")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


class Connection(NamedTuple):      # (a NamedTuple, not a dataclass: dataclasses costs every command 10 ms)
    addr: str
    token: str | None
    ca: str | None
    addr_source: str = "SKM_ADDR"     # where each value came from, for errors that say what to change
    ca_source: str = "SKM_CACERT"


class CliError(SKMError):
    """A mistake the CLI itself detects (before or instead of the server): one line saying what to do."""
    message = "error"

    def __init__(self, detail: str, exit_code: int = 2) -> None:
        super().__init__(detail)
        self.exit_code = exit_code


def connection(args: argparse.Namespace) -> Connection:
    cfg: dict[str, Any] = {}
    if CONFIG_FILE.exists():
        import tomllib
        try:
            cfg = tomllib.loads(CONFIG_FILE.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise CliError(f"the CLI config file {CONFIG_FILE} is not valid TOML ({e}); fix or remove it "
                           "(SKM_CONFIG names another)", 1) from None
    addr, addr_source = _first(("--addr", getattr(args, "addr", None)), ("SKM_ADDR", os.environ.get("SKM_ADDR")),
                               (str(CONFIG_FILE), cfg.get("addr")), ("the default", "https://127.0.0.1:8444"))
    token = getattr(args, "token", None) or os.environ.get("SKM_TOKEN") or cfg.get("token")
    ca, ca_source = _first(("--ca", getattr(args, "ca", None)), ("SKM_CACERT", os.environ.get("SKM_CACERT")),
                           (str(CONFIG_FILE), cfg.get("ca")))
    if ca is None and Path(".skm/pki/ca.pem").exists():
        ca, ca_source = ".skm/pki/ca.pem", "the default (.skm/pki/ca.pem)"
    return Connection(management_url(str(addr), addr_source), token, ca, addr_source, ca_source or "SKM_CACERT")


def _first(*candidates: tuple[str, Any]) -> tuple[Any, str | None]:
    for source, value in candidates:
        if value:
            return value, source
    return None, None


def management_url(addr: str, source: str = "SKM_ADDR") -> str:
    """The management URL: https only (the listener speaks TLS); `host:port` alone means https://host:port."""
    addr = addr.strip().rstrip("/")
    scheme, sep, rest = addr.partition("://")
    if not sep:
        scheme, rest = "https", addr
    if scheme.lower() != "https":
        raise CliError(f"{source} is {addr!r}: the management API is served over TLS only; use "
                       f"https://{rest or 'HOST:8444'}")
    if rest.endswith("/api/v1"):           # the API's own prefix: the CLI adds it
        rest = rest[:-len("/api/v1")]
    if not rest or rest.startswith("/"):
        raise CliError(f"{source} is {addr!r}, which names no host; use https://HOST:PORT (e.g. "
                       "https://127.0.0.1:8444)")
    return f"https://{rest}"


def _ssl_context(conn: Connection):
    if not conn.ca:
        return None
    path = Path(conn.ca)
    what = f"{conn.ca_source} names {conn.ca}"
    if not path.is_file():
        raise CliError(f"{what}, which does not exist; set SKM_CACERT to the CA certificate that signed the "
                       "server's certificate (the server's <data-dir>/pki/ca.pem)")
    import ssl                  # here: commands that talk to no server (verify, restore) skip its import

    from server.access.tls import client_context
    try:
        return client_context(path)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise CliError(f"{what}, which is not a readable PEM CA certificate ({getattr(e, 'strerror', None) or e}); "
                       "set SKM_CACERT to the CA certificate that signed the server's certificate") from None


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
    err = cls(detail, message=msg)
    err.status = status
    if isinstance(header.get("resultCode"), int):
        err.result_code = header["resultCode"]
    raise err


class MgmtClient:
    """Async client of /api/v1 with the operator token."""

    def __init__(self, conn: Connection) -> None:
        import aiohttp               # here, not at import: commands that talk to no server skip its import
        self.conn = conn
        ssl_ctx = _ssl_context(conn)
        headers = {"Authorization": f"Bearer {conn.token}"} if conn.token else {}
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx), headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=60))

    async def __aenter__(self) -> "MgmtClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
        import aiohttp
        url = f"{self.conn.addr}/api/v1{path}"
        async with self.session.request(method, url, json=body, params=params) as r:
            try:
                env = await r.json(content_type=None)
            except (json.JSONDecodeError, UnicodeDecodeError, aiohttp.ContentTypeError):
                env = None
            if not isinstance(env, dict) or "header" not in env:
                raise self._not_skm(r.status)
            if r.status >= 300 or not (env.get("header") or {}).get("isSuccessful", False) or r.status == 202:
                if r.status == 404 and env["header"].get("resultCode") == URL_NOT_FOUND:
                    await self._check_plane()
                if r.status == 401 and not self.conn.token and path != "/login":
                    raise CliError("no operator token: set SKM_TOKEN (`skm server init` printed one), or run "
                                   "`skm login NAME --save`", 3)
                _raise_for(r.status, env)
            return env.get("body")

    async def raw(self, method: str, path: str, params: dict | None = None) -> bytes:
        import aiohttp
        async with self.session.request(method, f"{self.conn.addr}/api/v1{path}", params=params) as r:
            if r.status >= 300:
                try:
                    env = await r.json(content_type=None)
                except (json.JSONDecodeError, UnicodeDecodeError, aiohttp.ContentTypeError):
                    raise self._not_skm(r.status) from None
                if r.status == 404 and ((env or {}).get("header") or {}).get("resultCode") == URL_NOT_FOUND:
                    await self._check_plane()
                _raise_for(r.status, env)
            return await r.read()

    def _not_skm(self, status: int) -> CliError:
        return CliError(f"{self.conn.addr} (from {self.conn.addr_source}) answered HTTP {status}, not like a "
                        "Secure Key Manager management API; point SKM_ADDR at the management listener "
                        "(default port 8444)", 1)

    async def _check_plane(self) -> None:
        """A route the CLI knows is missing: say so when SKM_ADDR is the data plane or not a key server at all."""
        import aiohttp
        try:
            async with self.session.get(f"{self.conn.addr}/api/v1/openapi.json") as r:
                if r.status == 200:
                    return                      # the management listener: the 404 is the route's own
            async with self.session.get(f"{self.conn.addr}/keymanager/v1.0/appkey/-/confirm") as r:
                env = await r.json(content_type=None)
                data_plane = ((env or {}).get("header") or {}).get("resultCode") not in (None, URL_NOT_FOUND)
        except (aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError):
            data_plane = False
        if data_plane:
            raise CliError(f"{self.conn.addr} (from {self.conn.addr_source}) is the key server's data plane "
                           "(the client API port); point SKM_ADDR at the management listener (default port "
                           "8444)", 1)
        raise self._not_skm(404)


URL_NOT_FOUND = -1005


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
        _print_fields(console, data or {}, caption, title)
        return
    cols = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=caption)
    for c in cols:
        table.add_column(cell(c))
    for r in rows:
        table.add_row(*[cell(r.get(c)) for c in cols])
    console.print(table)


def _print_fields(console, data: dict, caption, title: str | None) -> None:
    """Field/value pairs: a table when every unbreakable word (an id, an appkey, a URL) fits its value
    column, so free text wraps at spaces and nothing is cut; `field  value` lines otherwise."""
    from rich.cells import cell_len
    from rich.table import Table
    pairs = [(shown(k), shown("" if v is None else json.dumps(v, ensure_ascii=False)
                              if isinstance(v, (list, dict)) else v)) for k, v in data.items()]
    field_w = max((cell_len(k) for k, _ in pairs), default=0)
    word_w = max((cell_len(w) for _, v in pairs for w in v.split(" ")), default=0)
    if field_w + word_w + 7 > console.width:
        if title is not None:
            print(shown(title))
        for k, v in pairs:
            print(f"{k:<{field_w}}  {v}")
        return
    from rich.text import Text
    table = Table(title=caption, show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", min_width=word_w, overflow="fold")
    for k, v in pairs:
        table.add_row(Text(k), Text(v))
    console.print(table)


def yn(flag: bool) -> str:
    return "Y" if flag else "N"


def fail(msg: str, code: int = 1) -> int:
    report_error(msg, code)
    return code


# ------------------------------------------------------------------ confirmation
def add_yes_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--yes", "-y", action="store_true",
                   help="do not ask for confirmation (needed when standard input is not a terminal)")


def confirm(args: argparse.Namespace, what: str) -> None:
    """Ask before something that cannot be undone; scripts say --yes. Raises CliError when not confirmed."""
    if getattr(args, "yes", False):
        return
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():
        raise CliError(f"{what} cannot be undone; add --yes to confirm (standard input is not a terminal, so "
                       "there is no one to ask)")
    print(f"{what} cannot be undone. Continue? [y/N] ", end="", file=sys.stderr, flush=True)
    answer = stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise CliError("not confirmed; nothing was changed", 1)


# ------------------------------------------------------------- key stores, keys
KEY_ID_CHARS = frozenset("0123456789abcdef")


def is_key_id(ref: str) -> bool:
    return len(ref) == 32 and set(ref) <= KEY_ID_CHARS


async def resolve_store(c: MgmtClient, ref: str) -> dict:
    """A key store by id (digits) or by name; its API object."""
    ref = ref.strip()
    if ref.isascii() and ref.isdigit():
        return await c.call("GET", f"/keystores/{int(ref)}")
    stores = (await c.call("GET", "/keystores"))["keyStoreList"]
    found = [s for s in stores if s["name"] == ref]
    if not found:
        from server.errors import KeyStoreNotFound
        raise KeyStoreNotFound(f"no key store named {ref!r} (`skm keystore list` shows them)",
                               message="Invalid Key Store")
    if len(found) > 1:      # one name per project: several projects may reuse it
        ids = ", ".join(str(s["keyStoreId"]) for s in found)
        raise CliError(f"{len(found)} key stores are named {ref!r} (ids {ids}); give the id instead")
    return found[0]


async def resolve_store_id(c: MgmtClient, ref: str) -> int:
    ref = ref.strip()
    return int(ref) if (ref.isascii() and ref.isdigit()) else (await resolve_store(c, ref))["keyStoreId"]


async def resolve_key(c: MgmtClient, ref: str) -> str:
    """A key id from an id (32 hex) or STORE/NAME (store name or id, a slash, the key's name)."""
    ref = ref.strip()
    if is_key_id(ref):
        return ref
    store, sep, name = ref.partition("/")
    if not sep or not store or not name:
        raise CliError(f"{ref!r} is neither a key id (32 lowercase hex characters) nor STORE/NAME (a key store "
                       "name or id, a slash, the key's name)")
    store_id = await resolve_store_id(c, store)
    keys = (await c.call("GET", f"/keystores/{store_id}/keys", params={"name": name}))["keyList"]
    if not keys:
        from server.errors import InvalidKeyId
        raise InvalidKeyId(f"key store {store} has no key named {name!r} (`skm key list {store}` shows them)",
                           message="Invalid Key Id")
    return keys[0]["keyId"]


# --------------------------------------------------------------- errors in flags
def name_flags(text: str | None, flags: dict[str, str] | None) -> str | None:
    """Rewrite the API field names in a server message as the CLI flags that set them (`ip4AuthUse` -> `--ip`)."""
    if not text or not flags:
        return text
    import re
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(flags, key=len, reverse=True)) + r")\b")
    return pattern.sub(lambda m: flags[m.group(1)], text)


# ----------------------------------------------------------------------- tables
class Col(NamedTuple):
    """A table column. Ids, appkeys and action names are `keep` (never dropped, never cut); free text is
    `wrap` (may wrap down to `min` cells); anything else is shown whole or not at all."""
    field: str
    label: str
    keep: bool = False        # never dropped, never shortened (ids)
    wrap: bool = False        # may wrap onto several lines (free text such as names)
    rank: int | None = None   # dropped in this order, highest first (default: its position)
    min: int = 12             # a wrap column's narrowest width


def print_table(columns: list[Col], rows: list[dict], title: str | None = None, width: int | None = None) -> None:
    """A table that fits the terminal without ever cutting a kept column (ids) or a whole one.

    Columns that are empty in every row take no room; then the lowest-ranked columns are dropped (named
    in the caption) and free text wraps. When even the kept columns do not fit side by side, each row is
    printed as `label  value` lines instead, so an id is still whole on one line. Every cell goes through
    `cell`/`shown` (escaped, never markup).
    """
    from rich.cells import cell_len
    from rich.console import Console
    from rich.table import Table
    console = Console()
    width = width or console.width

    def text_of(r: dict, c: Col) -> str:
        return shown("" if r.get(c.field) is None else r.get(c.field))

    # A column empty in every row takes no room (it has no id to cut either).
    cols = [c for c in columns if not rows or any(text_of(r, c) for r in rows)]
    natural = {c: max([cell_len(c.label), *(cell_len(text_of(r, c)) for r in rows)]) for c in cols}
    floor = {c: min(natural[c], max(c.min, cell_len(c.label))) if c.wrap else natural[c] for c in cols}
    rank = {c: (c.rank if c.rank is not None else i) for i, c in enumerate(cols)}

    def cost(vis: list[Col]) -> int:
        # Each column costs its text plus two spaces of padding and one border; the table one more border.
        return sum(floor[c] + 3 for c in vis) + 1

    visible = list(cols)
    while cost(visible) > width and any(not c.keep for c in visible):
        visible.remove(max((c for c in visible if not c.keep), key=lambda c: rank[c]))
    if cost(visible) > width:
        _print_stacked(cols, rows, title, text_of, width)
        return
    # What is left over widens the wrap columns towards their natural width, in display order.
    spare = width - cost(visible)
    widths = dict(floor)
    for c in visible:
        if c.wrap and spare > 0:
            grow = min(spare, natural[c] - floor[c])
            widths[c] += grow
            spare -= grow
    hidden = [c.label for c in cols if c not in visible]
    table = Table(title=cell(title) if title is not None else None,
                  caption=f"not shown at this width: {', '.join(hidden)} (widen the terminal or use --json)"
                  if hidden else None)
    for c in visible:
        table.add_column(c.label, width=widths[c], no_wrap=not c.wrap, overflow="fold")
    for r in rows:
        table.add_row(*[cell(text_of(r, c)) for c in visible])
    console.print(table)


def _print_stacked(cols: list[Col], rows: list[dict], title: str | None, text_of, width: int) -> None:
    """One `label  value` line per field, a blank line between rows: for terminals narrower than the ids.
    Plain print; free text wraps under its value, an id or any other whole value is never split."""
    import textwrap
    if title is not None:
        print(shown(title))
    pad = max((len(c.label) for c in cols), default=0)
    room = max(width - pad - 2, 10)
    for i, r in enumerate(rows):
        if i or title is not None:
            print()
        for c in cols:
            value = text_of(r, c)
            if not value:
                continue
            lines = textwrap.wrap(value, room, break_on_hyphens=False) if c.wrap else [value]
            print(f"{c.label:<{pad}}  {lines[0]}")
            for more in lines[1:]:
                print(f"{'':<{pad}}  {more}")


def listing(args: argparse.Namespace, data: Any, columns: list[Col], rows: list[dict], title: str | None = None,
            ) -> None:
    """A list command's output: `data` under --json, else the rows as a table that never cuts an id."""
    if getattr(args, "json", False):
        print(json_text(data))
    else:
        print_table(columns, rows, title=title)


# ---------------------------------------------------------------------- appkeys
async def with_appkeys(c: MgmtClient, out: dict) -> dict:
    """`out` plus the appkey(s) the caller can see and where clients call with the first one (the data-plane
    URL): what `skm server init` printed once, findable again."""
    from server.errors import Forbidden
    try:
        projects = (await c.call("GET", "/projects"))["projects"]
    except Forbidden:
        return out
    if not projects:
        return out
    first = projects[0]
    return {**out, "appkey": first["appkey"], "dataPlaneUrl": first.get("dataPlaneUrl"),
            "appkeys": {p["name"]: p["appkey"] for p in projects}}


# ----------------------------------------------------------------- error output
class _ErrorShape:
    json = False      # set by main when --json was given (before parsing, so usage errors follow it too)


ERRORS = _ErrorShape()


def report_error(text: str, code: int, *, kind: str = "error", **extra: Any) -> None:
    """One failure, one line: `error: ...` on stderr, or one JSON object there under --json."""
    if ERRORS.json:
        # Compact (one line), and no raw control or bidi character from a server message reaches the terminal.
        from server.text import is_unsafe
        raw = json.dumps({"error": {"kind": kind, "message": text, "exitCode": code, **extra}}, ensure_ascii=False)
        print("".join(f"\\u{ord(ch):04x}" if is_unsafe(ch) else ch for ch in raw), file=sys.stderr)
    else:
        print(f"error: {shown(text)}", file=sys.stderr)      # a server message may quote a stored name
