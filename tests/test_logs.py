"""server/logs.py: structlog is imported when a line is written; below the configured level nothing
is written and nothing imported; a written line keeps its secret-looking fields redacted."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from tests.support.backup import REPO

PROGRAM = """
import io, sys
from server import logs
out = io.StringIO()
log = logs.get("skm.test")
logs.configure("json", "warning", stream=out)
log.info("quiet", detail="x")
log.debug("quieter")
before = "structlog" in sys.modules
log.warning("loud", password="hunter2", key_id="k1")
print(before, "structlog" in sys.modules, repr(out.getvalue()))
"""


def test_structlog_only_when_a_line_is_written_and_fields_still_redacted():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKM_")}
    p = subprocess.run([sys.executable, "-c", PROGRAM], env={**env, "PYTHONPATH": str(REPO)}, cwd=str(REPO),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    before, after, text = p.stdout.strip().split(" ", 2)
    assert (before, after) == ("False", "True")
    lines = [json.loads(ln) for ln in ast.literal_eval(text).splitlines()]
    assert [ln["event"] for ln in lines] == ["loud"]
    assert lines[0]["password"] == "[redacted]" and lines[0]["key_id"] == "k1" and lines[0]["level"] == "warning"


def test_a_configured_logger_made_before_structlog_was_imported_writes_through_it():
    import io

    import structlog

    from server import logs
    log = logs.get("skm.test")
    out = io.StringIO()
    try:
        logs.configure("json", "info", stream=out)
        log.info("hello", token="t0k3n")
        line = json.loads(out.getvalue())
        assert line["event"] == "hello" and line["token"] == "[redacted]"
    finally:
        structlog.reset_defaults()


async def test_each_request_logs_under_its_own_request_id_on_one_kept_alive_connection():
    """The id a caller sends (or a new one) names every line its request logs, and the next request on the
    same connection (the same task in aiohttp) logs under its own id, not the last one's."""
    import io
    import re

    import aiohttp
    import structlog
    from aiohttp import web

    from server.api import middleware
    from server.errors import InvalidRequest
    from tests.support.loopback import serve

    async def refuse(_request):
        raise InvalidRequest("refused on purpose")

    app = web.Application(middlewares=[middleware.request_context, middleware.errors])
    app.router.add_get("/x", refuse)
    runner, port = await serve(app)
    out = io.StringIO()
    from server import logs
    try:
        logs.configure("json", "info", stream=out)
        sent = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            for rid in ("trace-1", "trace-2", None, "bad id!"):
                async with s.get(f"http://127.0.0.1:{port}/x", headers={"X-Request-Id": rid} if rid else {}) as r:
                    assert r.status == 400
                    sent.append(r.headers["X-Request-Id"])
    finally:
        structlog.reset_defaults()
        await runner.cleanup()
    lines = [json.loads(ln) for ln in out.getvalue().splitlines()]
    assert [ln["event"] for ln in lines] == ["request_refused"] * 4
    assert [ln["request_id"] for ln in lines] == sent
    assert sent[:2] == ["trace-1", "trace-2"]
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in sent[2:]) and sent[2] != sent[3]
