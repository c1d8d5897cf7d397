"""Connection deadlines for both listeners: the TLS handshake and a request's headers must arrive in time.

The handshake comes first: until it completes, aiohttp's protocol does not even
exist (asyncio's SSL layer holds the connection), so the header deadline below
cannot cover it, and asyncio's own default gives a silent client 60 s.
`DeadlineTCPSite` passes `ssl_handshake_timeout` to the server it creates (every
TLS listener: data, management, system-key server).

aiohttp (3.14) has no header-read timeout: a client that opens a connection and
sends half a request line ("slow loris") holds a socket, a TLS session and a
protocol object until the keep-alive timer finally closes it. Here every
connection gets a header deadline:

* armed when the connection opens, and again when the first byte of a next
  request arrives on a kept-alive connection (or arrived while the previous
  request was being handled: pipelining);
* cancelled when a request's handler starts, so long-lived responses (the SSE
  event stream) and slow handlers are never cut;
* when it fires while the connection still waits for a complete request, the
  transport is closed.

A kept-alive connection that is merely idle (no byte since the last response) is
aiohttp's keepalive_timeout's business, not this one's. Body reads have their
own deadline (server/api/routing.py read_model).
"""
from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

HEADER_TIMEOUT = 10.0        # seconds from a request's first byte (or the connection's opening) to its last header
KEEPALIVE_TIMEOUT = 75.0     # idle kept-alive connection
BODY_TIMEOUT = 10.0          # reading a request body (read_model)
HANDSHAKE_TIMEOUT = 10.0     # from the TCP connection to the end of the TLS handshake


class DeadlineTCPSite(web.TCPSite):
    """web.TCPSite with a TLS handshake deadline (aiohttp's TCPSite does not take one)."""

    def __init__(self, *args: Any, handshake_timeout: float = HANDSHAKE_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not handshake_timeout > 0:
            from server.errors import ConfigError
            raise ConfigError("handshake_timeout must be more than 0 seconds")
        self._handshake_timeout = float(handshake_timeout)

    async def start(self) -> None:
        await web.BaseSite.start(self)          # registers the site with its runner (TCPSite.start's first step)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        extra: dict[str, Any] = {}
        if self._ssl_context is not None:
            extra["ssl_handshake_timeout"] = self._handshake_timeout
        self._server = await loop.create_server(
            server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port, **extra)
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]
        else:
            self._bound_port = self._port


class DeadlineRequestHandler(RequestHandler):
    """aiohttp's protocol with a header deadline (see the module docstring)."""

    def __init__(self, manager: Server, *, header_timeout: float = HEADER_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_handle: asyncio.TimerHandle | None = None
        self._next_started = False   # bytes of a next request arrived while one was being handled
        # (DER, fingerprint) of the client certificate, read once (server/access/tls.py: peer_identity)
        self.peer_identity: tuple[bytes | None, str | None] | None = None

    # --- protocol-level errors ----------------------------------------------
    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None):
        """Errors aiohttp finds before any handler runs (an oversized request line, bad HTTP) get the
        same JSON envelope as everything else, with a fixed text: the parser's message may quote
        the request."""
        from aiohttp import web

        from server.api.envelope import dumps
        from server.errors import PayloadTooLarge, SKMError
        # Not super(): aiohttp logs the parser's message, which can quote a header (a token).
        if request.writer.output_size > 0:
            raise ConnectionError("response already sent; cannot send the error")
        from server import logs
        logs.get("skm.http").info("bad_http_request", status=status, error=type(exc).__name__ if exc else None)
        if status == 413:
            err: SKMError = PayloadTooLarge("the request is larger than this server accepts")
        elif status >= 500:
            err = SKMError(message="Internal Error")
            err.result_code = -9999
        else:
            err = SKMError("the request is not valid HTTP or its request line or headers are too long "
                           "(at most 8 KB each)", message="Bad Request")
        out = web.Response(status=status, text=dumps(err.envelope()),
                           content_type="application/json")
        out.force_close()
        return out

    # --- the timer ---------------------------------------------------------
    def _arm_header_deadline(self) -> None:
        if self._header_handle is None and self._header_timeout > 0:
            self._header_handle = self._loop.call_later(self._header_timeout, self._header_deadline)

    def _cancel_header_deadline(self) -> None:
        if self._header_handle is not None:
            self._header_handle.cancel()
            self._header_handle = None

    def _header_deadline(self) -> None:
        self._header_handle = None
        if self._request_in_progress or self._messages or self.transport is None:
            return                   # a complete request is being (or about to be) handled
        self.force_close()

    # --- protocol hooks ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if data:
            if not self._request_in_progress:
                if not self._messages:
                    self._arm_header_deadline()
            else:
                current = self._current_request
                # Bytes after the current request's body: the start of a pipelined next request.
                if current is None or current.content.is_eof():
                    self._next_started = True
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    async def _handle_request(self, request, start_time, request_handler):  # type: ignore[override]
        self._cancel_header_deadline()
        if not self._messages:
            self._next_started = False
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            if self._next_started and not self._messages:
                self._next_started = False
                self._arm_header_deadline()


class _DeadlineServer(Server):
    _header_timeout: float = HEADER_TIMEOUT

    def __call__(self) -> RequestHandler:
        return DeadlineRequestHandler(self, loop=self._loop, header_timeout=self._header_timeout, **self._kwargs)


class DeadlineAppRunner(web.AppRunner):
    """web.AppRunner whose connections use DeadlineRequestHandler.

    Takes AppRunner's arguments plus header_timeout; pass keepalive_timeout too
    (aiohttp's default is an hour)."""

    __slots__ = ("_header_timeout",)

    def __init__(self, app: web.Application, *, header_timeout: float = HEADER_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = float(header_timeout)

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _DeadlineServer
        server._header_timeout = self._header_timeout  # type: ignore[attr-defined]
        return server
