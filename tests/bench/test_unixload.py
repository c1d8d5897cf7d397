"""bench.unixload: both Unix-socket load clients against a small aiohttp server, and h2load's output."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.unixload import parse_h2load

H2LOAD_OUT = """\
finished in 5.00s, 30350.80 req/s, 39.45MB/s
requests: 151754 total, 151818 started, 151754 done, 151700 succeeded, 54 failed, 4 errored, 1 timeout
status codes: 151700 2xx, 0 3xx, 50 4xx, 0 5xx
"""


def test_h2load_summary_and_log_make_a_result():
    r = parse_h2load(H2LOAD_OUT, "", sorted([1000] * 98 + [5000, 9000]))
    assert r["requests"] == 151754 and r["rps"] == 30350.8 and r["seconds"] == 5.0
    assert r["errors"] == 54 and "54 failed" in r["error_detail"]
    assert (r["p50_ms"], r["p99_ms"]) == (1.0, 9.0)
    bad = parse_h2load("", "connect to unix:/nope failed", [], 1)
    assert bad["errors"] == 1 and "nope" in bad["error_detail"]


SERVER = """
import sys
from aiohttp import web

async def ok(_request):
    return web.Response(body=b"x" * 1024, content_type="application/json")

app = web.Application()
app.router.add_get("/ok", ok)
web.run_app(app, path=sys.argv[1], access_log=None, print=None)
"""


@pytest.fixture
def server(tmp_path):
    """An aiohttp server on a Unix socket: /ok answers 1 KB, anything else 404."""
    sock = tmp_path / "s.sock"
    p = subprocess.Popen([sys.executable, "-c", SERVER, str(sock)])
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert p.poll() is None and time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.02)
        yield sock
    finally:
        p.terminate()
        p.wait(10)


def run_client(client: str, sock: Path, path: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.unixload", "--client", client, "--socket", str(sock),
                          "--path", path, "-c", "4", "-t", "1"], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    assert f"client {client}" in out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("client", ["python", "h2load"])
def test_clients_count_requests_latency_and_errors(server, client):
    if client == "h2load" and shutil.which("h2load") is None:
        pytest.skip(reason="h2load not installed: apt-get install nghttp2-client")
    r = run_client(client, server, "/ok")
    assert r["requests"] > 50 and r["errors"] == 0 and r["rps"] > 50
    assert 0 < r["p50_ms"] <= r["p99_ms"] < 1000
    r = run_client(client, server, "/missing")
    assert r["requests"] > 0 and r["errors"] >= r["requests"]         # every 404 is an error, as with ab
