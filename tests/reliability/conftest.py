"""Session-level collectors of the reliability suite.

* `numbers`: what each part tried (cases, failures, memory, requests during outages),
  written to the terminal summary at the end of the run so a reader sees it without -s.
* `hygiene` (tests/support/hygiene_plugin.py, for the whole suite): every secret and key
  material a run creates, and everything it leaves behind (captured output of every test,
  subprocess logs, data dirs, row dumps). test_secret_hygiene.py runs last and greps the lot.
* `tracked`: the `skm` harness, harvested for hygiene before it shuts down.
* `server_proc`, `sidecar_proc`: subprocesses whose logs and data join the sweep.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.procs import ServerProcess, SidecarProcess

_NUMBERS: list[tuple[str, str]] = []


class Numbers:
    def add(self, part: str, text: str) -> None:
        _NUMBERS.append((part, text))


@pytest.fixture(scope="session")
def numbers() -> Numbers:
    return Numbers()


@pytest.fixture
async def tracked(skm, hygiene):
    """The in-process key server harness; its token, key material and files join the hygiene check."""
    hygiene.secret(skm.init.token, "harness operator token")
    yield skm
    await hygiene.harvest(skm.server.config, f"harness {skm.tmp.name}")


@pytest.fixture
async def server_proc(tmp_path: Path, hygiene):
    """Factory of `skm server run` subprocesses; every one is stopped, harvested and its logs kept."""
    made: list[ServerProcess] = []

    async def make(sub: str = "srv", **kw) -> ServerProcess:
        srv = await ServerProcess.create(tmp_path / sub, **kw)
        hygiene.secret(srv.token, f"{sub} operator token")
        made.append(srv)
        return srv

    yield make
    for srv in made:
        await srv.stop()
        for p in srv.log_paths:
            hygiene.path(p)
        if srv.init is not None and not srv.harvested:
            await hygiene.harvest(srv.config, f"server process {srv.tmp}")


@pytest.fixture
async def sidecar_proc(tmp_path: Path, hygiene, server_proc):
    """Factory of `skm sidecar` subprocesses in front of a server_proc; each is stopped (before the servers)
    and its logs kept."""
    made: list[SidecarProcess] = []

    async def make(srv: ServerProcess, keystore_id: int, sub: str = "sidecar", **kw) -> SidecarProcess:
        sc = await SidecarProcess.create(tmp_path / sub, srv, keystore_id, **kw)
        hygiene.secret(sc.password, f"{sub} PKCS#12 password")
        made.append(sc)
        return sc

    yield make
    for sc in made:
        await sc.stop()
        for p in sc.log_paths:
            hygiene.path(p)


def pytest_terminal_summary(terminalreporter):
    if not _NUMBERS:
        return
    terminalreporter.section("reliability and security suite: numbers")
    for part, text in _NUMBERS:
        terminalreporter.write_line(f"{part}: {text}")
