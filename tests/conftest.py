"""Shared fixtures. Under SKM_REQUIRE_ALL=1 (CI) any skipped test fails the run."""
from __future__ import annotations

import os

import pytest

from tests.support.postgres import *  # noqa: F401,F403  (fixtures: pg_cluster, pg_url, storage_url, storage)
from tests.support.server import *  # noqa: F401,F403  (fixtures: skm)

_skipped: list[str] = []


def pytest_runtest_logreport(report):
    # An xfail counts too: CI passes only when every test ran and asserted what it claims.
    if report.skipped and os.environ.get("SKM_REQUIRE_ALL") == "1":
        why = report.longrepr[-1] if isinstance(report.longrepr, tuple) else getattr(report, "wasxfail", "")
        _skipped.append(f"{report.nodeid}: {why}")


def pytest_sessionfinish(session, exitstatus):
    if _skipped:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"SKM_REQUIRE_ALL=1: {len(_skipped)} test(s) skipped; CI allows none:", red=True)
            for s in _skipped:
                tr.write_line("  " + s)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
