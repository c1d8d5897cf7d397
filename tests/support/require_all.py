"""SKM_REQUIRE_ALL=1 (CI): any skip fails the run — a skipped test, an xfail, and a module skipped at
collection (`pytest.importorskip` at module level), which no test report ever shows."""
from __future__ import annotations

import os

import pytest

_skipped: list[str] = []


def _on() -> bool:
    return os.environ.get("SKM_REQUIRE_ALL") == "1"


def pytest_runtest_logreport(report):
    # An xfail counts too: CI passes only when every test ran and asserted what it claims.
    if report.skipped and _on():
        why = report.longrepr[-1] if isinstance(report.longrepr, tuple) else getattr(report, "wasxfail", "")
        _skipped.append(f"{report.nodeid}: {why}")


def pytest_collectreport(report):
    if report.skipped and _on():
        why = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid} (whole module, at collection): {why}")


def pytest_sessionfinish(session, exitstatus):
    if _skipped:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"SKM_REQUIRE_ALL=1: {len(_skipped)} test(s) skipped; CI allows none:", red=True)
            for s in _skipped:
                tr.write_line("  " + s)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
