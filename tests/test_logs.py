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
