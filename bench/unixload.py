"""The load client for the sidecar's Unix socket (ab cannot reach one): h2load, else a Python client.

Both have the semantics of `ab -k -c C -t T`: C keep-alive HTTP/1.1 connections, each with one
request outstanding at a time (no pipelining), new requests until T seconds have passed; latency
from sending a request to the last byte of its response; p50/p99 over all requests; errors are
failed requests and non-2xx answers (ab: failed connects/receives/exceptions and non-2xx).

* h2load (nghttp2's load tester, Debian `nghttp2-client`), used when installed: `h2load --h1 -c C
  -m 1 -t 1 -D T -B unix:SOCKET`, percentiles from its per-request log (`--log-file`). Requests in
  flight when T ends are dropped, as ab does.
* the built-in client (`--client python`, or when h2load is missing): one asyncio Protocol per
  connection on uvloop, responses framed by Content-Length (what aiohttp and the sidecar send; a
  chunked or unframed response counts as an error), the garbage collector paused during the run;
  it finishes the requests in flight at T.

`--tcp HOST:PORT` drives a TCP listener instead, to compare either client with ab on one server.
On the sidecar's 127.0.0.1 listener (5 interleaved runs of 4 s, c=64, one shared 2-core machine) the
three agreed within 10%: ab 33.4k req/s (p50 1.17 ms, p99 7.9 ms), h2load 31.2k (1.01 / 9.1 ms),
this Python client 34.2k (0.85 / 9.3 ms), with the same server CPU per request (15 µs) and about the
same client CPU per request (~10 µs, mostly the kernel's). On the Unix socket h2load reads ~15%
below the Python client (37.5k vs 44.7k req/s): the harness reports the h2load figure when it can.

`python -m bench.unixload --socket S --path /p -c 64 -t 10` prints a JSON Result (bench.load) on
stdout and which client ran on stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class _Conn(asyncio.Protocol):
    def __init__(self, request: bytes, deadline: float, stats: dict, done: asyncio.Future) -> None:
        self.request, self.deadline, self.stats, self.done = request, deadline, stats, done
        self.lat = stats["lat"]
        self.buf = b""
        self.need = -1
        self.status = 0
        self.t0 = 0.0
        self.finished = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        self.t0 = time.perf_counter()
        self.transport.write(self.request)

    def _bad(self, why: str) -> None:
        self.stats["errors"] += 1
        self.stats["unframed"] += 1
        self.finished = True
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            if self.need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    self.buf = buf
                    return
                head = buf[:end].split(b"\r\n")
                try:
                    self.status = int(head[0].split(None, 2)[1])
                except (IndexError, ValueError):
                    return self._bad("status line")
                length = -1
                for h in head[1:]:
                    k, _, v = h.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip())
                        break
                if length < 0:
                    return self._bad("no Content-Length")
                self.need = end + 4 + length
            if len(buf) < self.need:
                self.buf = buf
                return
            buf = buf[self.need:]
            self.need = -1
            now = time.perf_counter()
            self.lat.append(now - self.t0)
            if not 200 <= self.status < 300:
                self.stats["errors"] += 1
            if now >= self.deadline:
                self.finished = True
                self.buf = b""
                self.transport.close()
                return
            self._send()

    def connection_lost(self, exc) -> None:
        if not self.finished:
            self.stats["errors"] += 1
            self.stats["lost"] += 1
        if not self.done.done():
            self.done.set_result(None)


async def run(target: str, path: str, concurrency: int, duration: float, method: str,
              headers: list[str], body: bytes, tcp: bool = False) -> dict:
    """`target` is a socket path, or HOST:PORT with tcp=True."""
    loop = asyncio.get_running_loop()
    head = [f"{method} {path} HTTP/1.1", "Host: sidecar" if not tcp else f"Host: {target}",
            "Connection: keep-alive", *headers]
    if body:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    stats = {"lat": [], "errors": 0, "lost": 0, "unframed": 0}
    gc.collect()
    gc.disable()                      # bounded: one float per request, freed after the run
    try:
        start = time.perf_counter()
        deadline = start + duration
        waits = []
        for _ in range(concurrency):
            done = loop.create_future()
            factory = (lambda d=done: _Conn(request, deadline, stats, d))
            if tcp:
                host, _, port = target.rpartition(":")
                await loop.create_connection(factory, host, int(port))
            else:
                await loop.create_unix_connection(factory, target)
            waits.append(done)
        await asyncio.wait_for(asyncio.gather(*waits), duration + 60)
        took = time.perf_counter() - start
    finally:
        gc.enable()
    lat = sorted(stats["lat"])
    n = len(lat)

    def pct(p: float) -> float:
        return lat[min(n - 1, int(p * n))] * 1000 if n else 0.0
    detail = ""
    if stats["errors"]:
        detail = (f"{stats['errors']} errors ({stats['lost']} connections lost, "
                  f"{stats['unframed']} responses without Content-Length)")
    return {"requests": n, "errors": stats["errors"], "rps": n / took if took else 0.0, "p50_ms": pct(0.50),
            "p99_ms": pct(0.99), "seconds": took, "error_detail": detail}


def h2load_available() -> bool:
    return shutil.which("h2load") is not None


def client_name(method: str = "GET") -> str:
    """The client `--client auto` picks: for the report's notes."""
    return "h2load" if h2load_available() and method in ("GET", "POST") else "python"


def run_h2load(target: str, path: str, concurrency: int, duration: float, method: str, headers: list[str],
               body: bytes, tcp: bool = False) -> dict:
    if method not in ("GET", "POST"):
        raise ValueError("h2load drives GET and POST only")
    with tempfile.TemporaryDirectory(prefix="skm-h2load-") as tmp:
        log = Path(tmp) / "requests.tsv"
        cmd = ["h2load", "--h1", "-c", str(concurrency), "-m", "1", "-t", "1", "-D", f"{duration:g}",
               "--log-file", str(log)]
        if tcp:
            url = f"http://{target}{path}"
        else:
            cmd += ["-B", f"unix:{target}"]
            url = f"http://localhost{path}"
        for h in headers:
            cmd += ["-H", h]
        if method == "POST":
            data = Path(tmp) / "body"
            data.write_bytes(body)
            cmd += ["-d", str(data), "-H", "Content-Type: application/json"]
        proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=duration + 120)
        lat = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.count("\t") >= 2) \
            if log.exists() else []
    return parse_h2load(proc.stdout, proc.stderr, lat, proc.returncode)


def _num(rx: str, text: str) -> float:
    m = re.search(rx, text, re.M)
    return float(m.group(1)) if m else 0.0


def parse_h2load(out: str, err: str, lat_us: list[int], returncode: int = 0) -> dict:
    """h2load's summary and its per-request log (sorted microseconds) as a Result dict."""
    m = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out, re.M)
    done, failed = (int(m.group(3)), int(m.group(5))) if m else (0, 0)
    n3xx = int(_num(r"^status codes: \d+ 2xx, (\d+) 3xx", out))
    seconds = _num(r"^finished in ([\d.]+)s", out)
    errors, detail = failed + n3xx, ""
    if returncode != 0 or done == 0:
        errors = max(errors, 1)
        detail = ((err.strip() or out.strip()).splitlines() or ["h2load failed"])[-1][:300]
    elif errors:
        detail = f"h2load: {failed} failed (non-2xx or errored), {n3xx} 3xx"
    n = len(lat_us)

    def pct(p: float) -> float:
        return lat_us[min(n - 1, int(p * n))] / 1000 if n else 0.0
    return {"requests": done, "errors": errors, "rps": _num(r"^finished in [\d.]+s, ([\d.]+) req/s", out),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "seconds": seconds, "error_detail": detail}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.unixload", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="Unix socket path")
    where.add_argument("--tcp", metavar="HOST:PORT", help="a TCP listener instead (to compare with ab)")
    p.add_argument("--path", required=True)
    p.add_argument("-c", type=int, default=64)
    p.add_argument("-t", type=float, default=10.0)
    p.add_argument("--method", default="GET")
    p.add_argument("-H", action="append", default=[], help="extra header, 'Name: value'")
    p.add_argument("--client", choices=("auto", "h2load", "python"), default="auto",
                   help="h2load when installed (auto), or the built-in Python client")
    a = p.parse_args(argv)
    body = sys.stdin.read().encode() if not sys.stdin.isatty() else b""
    target, tcp = a.tcp or a.socket, bool(a.tcp)
    if a.client == "h2load" or (a.client == "auto" and client_name(a.method) == "h2load"):
        print("unixload: client h2load", file=sys.stderr)
        print(json.dumps(run_h2load(target, a.path, a.c, a.t, a.method, a.H, body, tcp)))
        return 0
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    print("unixload: client python", file=sys.stderr)
    print(json.dumps(runner(run(target, a.path, a.c, a.t, a.method, a.H, body, tcp=tcp))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
