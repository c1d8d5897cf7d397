"""A small HTTP/1.1 keep-alive load client for a Unix socket (ab cannot reach one).

One asyncio Protocol per connection, a fixed request, responses framed by
Content-Length (what both aiohttp and the sidecar send). uvloop when installed.
`python -m bench.unixload --socket S --path /p -c 64 -t 10` prints a JSON Result.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


class _Conn(asyncio.Protocol):
    def __init__(self, request: bytes, deadline: float, stats: dict, done: asyncio.Future) -> None:
        self.request, self.deadline, self.stats, self.done = request, deadline, stats, done
        self.buf = b""
        self.need: int | None = None
        self.status = 0
        self.t0 = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        self.t0 = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buf[:end].decode("latin-1").split("\r\n")
                self.status = int(head[0].split()[1])
                length = 0
                for h in head[1:]:
                    k, _, v = h.partition(":")
                    if k.strip().lower() == "content-length":
                        length = int(v.strip())
                self.need = end + 4 + length
            if len(self.buf) < self.need:
                return
            self.buf = self.buf[self.need:]
            self.need = None
            now = time.perf_counter()
            self.stats["lat"].append(now - self.t0)
            if not 200 <= self.status < 300:
                self.stats["errors"] += 1
            if now >= self.deadline:
                self.transport.close()
                return
            self._send()

    def connection_lost(self, exc) -> None:
        if time.perf_counter() < self.deadline:
            self.stats["errors"] += 1
            self.stats["lost"] += 1
        if not self.done.done():
            self.done.set_result(None)


async def run(socket_path: str, path: str, concurrency: int, duration: float, method: str,
              headers: list[str], body: bytes) -> dict:
    loop = asyncio.get_running_loop()
    head = [f"{method} {path} HTTP/1.1", "Host: sidecar", "Connection: keep-alive", *headers]
    if body:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    stats = {"lat": [], "errors": 0, "lost": 0}
    start = time.perf_counter()
    deadline = start + duration
    waits = []
    for _ in range(concurrency):
        done = loop.create_future()
        await loop.create_unix_connection(lambda d=done: _Conn(request, deadline, stats, d), socket_path)
        waits.append(done)
    await asyncio.wait_for(asyncio.gather(*waits), duration + 60)
    took = time.perf_counter() - start
    lat = sorted(stats["lat"])
    n = len(lat)

    def pct(p: float) -> float:
        return lat[min(n - 1, int(p * n))] * 1000 if n else 0.0
    return {"requests": n, "errors": stats["errors"], "rps": n / took if took else 0.0, "p50_ms": pct(0.50),
            "p99_ms": pct(0.99), "seconds": took,
            "error_detail": f"{stats['errors']} errors ({stats['lost']} connections lost)" if stats["errors"] else ""}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.unixload", description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("-c", type=int, default=64)
    p.add_argument("-t", type=float, default=10.0)
    p.add_argument("--method", default="GET")
    p.add_argument("-H", action="append", default=[], help="extra header, 'Name: value'")
    a = p.parse_args(argv)
    body = sys.stdin.read().encode() if not sys.stdin.isatty() else b""
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(run(a.socket, a.path, a.c, a.t, a.method, a.H, body))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
