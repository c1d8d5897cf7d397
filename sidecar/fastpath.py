"""The local endpoint's connections: cacheable reads answered straight from the protocol.

aiohttp's request pipeline (request and response objects, router, middlewares,
header serialisation) costs far more than serving a cached secret itself. So
every local connection starts here. Each request head is parsed; a plain
`GET` of a cacheable path (a secret, a public key) in HTTP/1.1 without a body
is answered by `LocalAPI.answer`: a fresh cache hit at once, from response
bytes kept with the cache entry; a miss, a stale answer or an error through
the same cache, policy and error code as the aiohttp route, in a task (the
connection's next request waits for it, so answers keep their order).

Anything else (another method or path, a body, HTTP/1.0, credential headers
an app should not send, a refusal, a head this parser does not take as plainly
valid) hands the connection, with every byte read so far, to aiohttp's request
handler for the rest of its life; this protocol then only forwards. aiohttp
therefore still answers everything the fast path does not, with its own
checks and limits.
"""
from __future__ import annotations

import asyncio
import os
import random
import re
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Awaitable, NamedTuple

from aiohttp.http import SERVER_SOFTWARE

MAX_HEAD = 8190                  # aiohttp's own line limit; a longer head is aiohttp's to judge
MAX_PENDING = 64 * 1024          # bytes read ahead while an answer is awaited; beyond, stop reading
IDLE_TIMEOUT = 75.0              # aiohttp's keep-alive timeout: idle fast-path connections close too

# A plain GET head, whole: request line, then header fields of visible characters (no control
# characters, no bare CR or LF, no space before a colon, no folded lines).
_HEAD = re.compile(rb"GET (/[A-Za-z0-9_.\-/]*)(?:\?([A-Za-z0-9._~!$&'()*+,;=:@/?%\-]*))? HTTP/1\.([01])\r\n"
                   rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r\n)*)")
_FIELD = re.compile(rb"([^:\r\n]+):[ \t]*([^\r\n]*?)[ \t]*\r\n")
_REQUEST_ID = re.compile(rb"[A-Za-z0-9-]{1,64}")
# Headers whose presence means the request is not a plain body-less read: aiohttp decides.
_NOT_PLAIN = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade"})
_MEMO_MAX, _MEMO_HEAD_MAX = 512, 1024
_memo: dict[bytes, "Head | None"] = {}     # head bytes -> parsed: apps repeat the same requests


class Head(NamedTuple):
    path: str
    query: str
    headers: dict[bytes, bytes]       # lower-case names, the first value of each; read-only
    close: bool                       # the connection ends after this answer
    v10: bool = False                 # HTTP/1.0 (ab speaks it): keep-alive only when asked for

    @property
    def connection(self) -> bytes:
        """The Connection header aiohttp would add to the answer."""
        if self.v10:
            return b"" if self.close else b"Connection: keep-alive\r\n"
        return b"Connection: close\r\n" if self.close else b""


def parse_head(head: bytes) -> Head | None:
    """A plain `GET <target> HTTP/1.1` (or 1.0) head, without its final blank line; None: not ours.
    Results are remembered for short heads (the same bytes always parse the same)."""
    try:
        return _memo[head]
    except KeyError:
        pass
    parsed = _parse(head)
    if len(head) <= _MEMO_HEAD_MAX:
        if len(_memo) >= _MEMO_MAX:
            _memo.clear()
        _memo[head] = parsed
    return parsed


def _parse(head: bytes) -> Head | None:
    m = _HEAD.fullmatch(head + b"\r\n")
    if m is None:
        return None
    path, query, minor, block = m.groups()
    headers: dict[bytes, bytes] = {}
    for name, value in _FIELD.findall(block):
        name = name.lower()
        if name not in headers:
            headers[name] = value
    if not _NOT_PLAIN.isdisjoint(headers):
        return None
    v10 = minor == b"0"
    close = v10
    conn = headers.get(b"connection")
    if conn is not None:
        tokens = {t.strip() for t in conn.lower().split(b",")}
        if tokens - {b"keep-alive", b"close"}:
            return None                # upgrade and friends
        close = b"close" in tokens or (v10 and b"keep-alive" not in tokens)
    return Head(path.decode("ascii"), query.decode("ascii") if query else "", headers, close, v10)


_rng = random.Random(os.urandom(32))


def request_id(headers: dict[bytes, bytes]) -> str | None:
    """The caller's X-Request-Id when well formed (as the aiohttp middleware takes it), else a new one
    (128 random bits, as there, from a seeded generator: a syscall per request shows in the profile);
    None for a non-ASCII one, which aiohttp decodes and judges itself."""
    rid = headers.get(b"x-request-id")
    if rid:
        if not rid.isascii():
            return None
        if _REQUEST_ID.fullmatch(rid) and rid.replace(b"-", b""):
            return rid.decode("ascii")
    return "%032x" % _rng.getrandbits(128)


# ---------------------------------------------------------------- response bytes
_SERVER = SERVER_SOFTWARE.encode()
_date = [0, b""]
_status_lines: dict[tuple[int, bool], bytes] = {}


def date_server() -> bytes:
    """`Date:` and `Server:` lines, as aiohttp sends them; the date is formatted once a second."""
    now = int(time.time())
    if now != _date[0]:
        _date[1] = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\nServer: " + _SERVER + b"\r\n"
        _date[0] = now
    return _date[1]


def status_line(status: int, v10: bool = False) -> bytes:
    line = _status_lines.get((status, v10))
    if line is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        line = _status_lines[(status, v10)] = f"HTTP/1.{0 if v10 else 1} {status} {reason}\r\n".encode()
    return line


def encode_tail(body: bytes, content_type: str) -> bytes:
    """What every answer of a cache entry shares: its fixed headers, the blank line and the body."""
    return (b"Content-Type: " + (content_type or "application/json").encode("latin-1")
            + b"\r\nCache-Control: no-store\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


def encode_response(status: int, headers: list[tuple[str, str]], body: bytes, rid: str, req: Head) -> bytes:
    out = [status_line(status, req.v10)]
    out += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers]
    out.append(f"X-Request-Id: {rid}\r\nContent-Length: {len(body)}\r\n".encode())
    out.append(date_server())
    out.append(req.connection)
    out.append(b"\r\n")
    out.append(body)
    return b"".join(out)


_HIT = {False: b"HTTP/1.1 200 OK\r\nX-SKM-Cache: hit\r\nAge: ", True: b"HTTP/1.0 200 OK\r\nX-SKM-Cache: hit\r\nAge: "}


def encode_hit(wire: bytes, age: float, rid: str, req: Head) -> bytes:
    return b"".join((_HIT[req.v10], str(int(age)).encode(), b"\r\nX-Request-Id: ", rid.encode(), b"\r\n",
                     date_server(), req.connection, wire))


# ---------------------------------------------------------------- the connection

class LocalConnection(asyncio.Protocol):
    """One app connection: plain cacheable reads here, the rest through aiohttp (see the module doc)."""

    def __init__(self, api, transport_kind: str) -> None:
        self.api = api                       # LocalAPI: identify(), answer(), make_handler(), the registry
        self.kind = transport_kind           # unix | tcp
        self.transport: asyncio.Transport | None = None
        self.caller = None                   # local_api.Caller, read once per connection
        self.local = False                   # tcp: the peer is 127.0.0.1
        self.inner: asyncio.Protocol | None = None
        self.buf = b""
        self.busy = False                    # an answer is being awaited
        self.write_paused = False
        self.read_paused = False
        self.eof = False
        self.last = time.monotonic()
        self.task: asyncio.Task | None = None

    # ------------------------------------------------ asyncio callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.api.connections[transport] = self
        try:
            self.caller, self.local = self.api.identify(transport, self.kind)
        except Exception:                    # noqa: BLE001 — aiohttp's gate refuses it with an envelope
            self.caller = None
        if self.caller is None or not self.api.cfg.listen.fast_path:
            self.handoff()

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
            return
        self.last = time.monotonic()
        self.buf = self.buf + data if self.buf else data
        if not self.busy:
            self._serve()
        elif len(self.buf) > MAX_PENDING and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def eof_received(self):
        if self.inner is not None:
            return self.inner.eof_received()
        if self.busy:
            self.eof = True                  # answer what is in flight, then close
            return True
        return None

    def connection_lost(self, exc) -> None:
        # An answer in flight runs to its end (its fetch may be shared by other callers), as aiohttp lets
        # a handler finish when its client goes away; _finish then drops it.
        self.api.connections.pop(self.transport, None)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()
            return
        self.write_paused = True

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
            return
        self.write_paused = False
        if not self.busy:
            self._serve()                    # answers what waited, resumes reading

    # ------------------------------------------------ serving
    def _serve(self) -> None:
        buf = self.buf
        transport = self.transport
        while buf:
            if self.write_paused:            # the app is not reading: stop until it drains
                if not self.read_paused:
                    self.read_paused = True
                    transport.pause_reading()
                break
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self.buf = buf
                    self.handoff()
                    return
                break
            head = parse_head(buf[:end]) if end <= MAX_HEAD else None
            out = self.api.answer(self, head) if head is not None else None
            if out is None:
                self.buf = buf
                self.handoff()
                return
            buf = buf[end + 4:]
            if type(out) is bytes:
                transport.write(out)
                if head.close:
                    self.buf = b""
                    transport.close()
                    return
                continue
            self.buf = buf
            self.busy = True
            self.task = asyncio.ensure_future(self._finish(out, head.close))
            return
        self.buf = buf
        if self.read_paused and not self.write_paused:
            self.read_paused = False
            transport.resume_reading()

    async def _finish(self, pending: Awaitable[bytes], close: bool) -> None:
        try:
            out = await pending
        finally:
            self.busy = False
            self.task = None
        if self.transport.is_closing():
            return
        self.transport.write(out)
        if close:
            self.transport.close()
            return
        self._serve()
        if self.eof and not self.busy and self.inner is None and not self.transport.is_closing():
            self.transport.close()

    def handoff(self) -> None:
        """aiohttp takes the connection over, starting from the bytes not yet answered."""
        inner = self.inner = self.api.make_handler()
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        inner.connection_made(self.transport)
        if self.write_paused:
            inner.pause_writing()
        data, self.buf = self.buf, b""
        if data:
            inner.data_received(data)
        if self.eof and not inner.eof_received():
            self.transport.close()           # what aiohttp does on end of input

    def idle_for(self, now: float) -> float:
        """Seconds without a request on the fast path (0 while aiohttp owns it or an answer is pending)."""
        if self.inner is not None or self.busy or self.buf:
            return 0.0
        return now - self.last
