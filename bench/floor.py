"""The framework floor: a bare aiohttp server over mTLS answering a fixed 1 KB JSON body.

Nothing in it but aiohttp, the same TLS context code as the key server's data
plane (client certificate required here) and the same event loop choice, so
"ours / floor" says what our own code costs on top of the framework.
`python -m bench.floor --cert C --key K --ca CA [--port 0] [--uvloop]` prints
"floor: https://127.0.0.1:PORT" once it listens.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from aiohttp import web

from server.access.tls import server_context

BODY = json.dumps({"header": {"resultCode": 0, "resultMessage": "SUCCESS", "isSuccessful": True},
                   "body": {"secret": "x" * 930}}, separators=(",", ":")).encode()


def app() -> web.Application:
    a = web.Application()

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="application/json")
    a.router.add_get("/floor", handler)
    return a


async def serve(cert: str, key: str, ca: str, port: int) -> None:
    ctx = server_context(cert, key, ca, require_client=True)
    runner = web.AppRunner(app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx, backlog=1024)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    print(f"floor: https://127.0.0.1:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--uvloop", action="store_true", help="run on uvloop (as the key server does when installed)")
    a = p.parse_args(argv)
    if a.uvloop:
        import uvloop
        uvloop.run(serve(a.cert, a.key, a.ca, a.port))
    else:
        asyncio.run(serve(a.cert, a.key, a.ca, a.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
