"""A test's own aiohttp app served on 127.0.0.1 (a webhook receiver, a stand-in upstream, a bare middleware)."""
from __future__ import annotations

import ssl

from aiohttp import web


async def serve(app: web.Application, ssl_context: ssl.SSLContext | None = None,
                **runner_kw) -> tuple[web.AppRunner, int]:
    """Start `app` on a free loopback port: (its runner, to `cleanup()` when done; the port)."""
    runner = web.AppRunner(app, **runner_kw)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]
