"""The secret-hygiene sweep's collector for the whole suite (loaded by tests/conftest.py).

* `hygiene` (session fixture): the one `Hygiene` of the run; any test registers the secrets it makes
  (`hygiene.secret`) and what it leaves behind (`hygiene.path`, `hygiene.text`).
* Every test's captured output (stdout, stderr, log) and every failure report join it, whichever
  directory the test lives in, when the session runs the sweep.
* The `skm` harness (tests/support/server.py) asks `harvest_harnesses` whether to harvest its server
  before it stops: yes when the sweep runs and the servers are on PostgreSQL (`make test-postgres`) or
  SKM_HYGIENE_HARVEST=1 says so; the session cluster's own log is grepped too.
* tests/reliability/test_secret_hygiene.py (marked `sweep`) is ordered last and greps the lot.
"""
from __future__ import annotations

import os

import pytest

from tests.support.hygiene import Hygiene

__all__ = ["HYGIENE", "LAST", "harvest_harnesses", "hygiene", "sweeping"]

HYGIENE = Hygiene()
LAST = "test_secret_hygiene.py"
_SWEEPING = [False]       # set once the collection is final (a report hook gets no config to stash on)


def sweeping() -> bool:
    """True when this session runs the sweep (a `sweep` test was selected): only then is output kept."""
    return _SWEEPING[0]


def harvest_harnesses() -> bool:
    """Whether the `skm` harness harvests its server for the sweep: the PostgreSQL target's servers, or
    every one with SKM_HYGIENE_HARVEST=1 (a harvest opens the store and dumps its rows: ~0.1 s a server)."""
    if not sweeping():
        return False
    if os.environ.get("SKM_HYGIENE_HARVEST", "") == "1":
        return True
    from tests.support.server import harness_backend
    return harness_backend() == "postgresql"


@pytest.fixture(scope="session")
def hygiene() -> Hygiene:
    return HYGIENE


def pytest_configure(config):
    config.addinivalue_line("markers", "sweep: the secret-hygiene sweep; every make target runs it last")


@pytest.hookimpl(trylast=True)          # after `-m` deselected: only the tests that will run count
def pytest_collection_modifyitems(session, config, items):
    # The hygiene check greps what the rest left behind: it runs after everything else.
    last = [i for i in items if i.path.name == LAST]
    if last:
        items[:] = [i for i in items if i.path.name != LAST] + last
    _SWEEPING[0] = any(i.get_closest_marker("sweep") is not None for i in items)


def pytest_runtest_logreport(report):
    # The teardown report carries every section of the test (setup, call and teardown output): one copy each.
    if not _SWEEPING[0]:
        return
    if report.when == "teardown":
        for name, text in report.sections:
            HYGIENE.text(f"{report.nodeid} [{name}]", text)
    if report.failed and report.longrepr is not None:
        HYGIENE.text(f"{report.nodeid} [{report.when} failure]", str(report.longrepr))
