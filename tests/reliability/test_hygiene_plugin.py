"""The secret-hygiene sweep's plumbing (tests/support/hygiene_plugin.py, tests/support/hygiene.py): any test in
any directory can register and has its output grepped, the sweep runs last, the `skm` harness's servers are
harvested when the session asks for it (`make test-postgres`), and the compose bring-up's registration reads
the stack's generated secrets. Not marked `sweep`: these start pytest sessions of their own, and the sweep
itself must stay quick in every target."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAST_NAME = "test_secret_hygiene.py"      # the sweep's module name: ordered last however it sorts

# A session of its own (a subprocess: its planted leaks must not reach this session's collector) with the
# plugin loaded the way tests/conftest.py loads it: tests in any directory, a harness server, the sweep.
_INNER_CONFTEST = """
pytest_plugins = ["tests.support.hygiene_plugin"]
from tests.support.server import skm  # noqa: F401
"""
_INNER_LEAKS = """
import os, sys

async def test_harness_server_leaks_its_material(skm):
    store = await skm.keystore("leaky")
    await skm.key(store, "SECRET", "leaky", secretValue=os.environ["PLANT_MATERIAL"])
    print("oops:", os.environ["PLANT_MATERIAL"])          # a log line that leaks a key's value

def test_registered_value_leaks(hygiene):
    hygiene.secret(os.environ["PLANT_REGISTERED"], "registered elsewhere")
    print("oops:", os.environ["PLANT_REGISTERED"], file=sys.stderr)

def test_clean(hygiene):
    print("nothing secret here")

async def test_database_log_leak(skm, hygiene):
    if os.environ.get("SKM_TEST_STORAGE") != "postgresql":
        return
    value = os.environ["PLANT_SQL"]
    hygiene.secret(value, "value in a failing statement")
    try:                                                   # PostgreSQL logs the failing statement
        await skm.rt.storage.execute("SELECT 1 FROM no_such_table_" + value)
    except Exception:
        pass
"""
_INNER_SWEEP = """
import json, os, pytest
pytestmark = pytest.mark.sweep

def test_sweep(hygiene, request):
    found, stats = hygiene.scan()
    order = [i.nodeid for i in request.session.items]
    with open(os.environ["SWEEP_OUT"], "w") as f:
        json.dump({"found": found, "stats": stats, "order": order, "unharvested": hygiene.unharvested}, f)
"""


def _inner_session(tmp_path: Path, *args: str, **env: str) -> dict:
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    (tmp_path / "conftest.py").write_text(_INNER_CONFTEST)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "test_zz_after_the_sweep_by_name.py").write_text(_INNER_LEAKS)
    (tmp_path / LAST_NAME).write_text(_INNER_SWEEP)
    out = tmp_path / "sweep.json"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                        str(tmp_path / "basetemp"), "--rootdir", str(tmp_path), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "SWEEP_OUT": str(out), "SKM_TEST_STORAGE": "sqlite",
                            **env})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


def _plants() -> dict[str, str]:
    return {"PLANT_MATERIAL": "material-" + secrets.token_hex(12), "PLANT_REGISTERED": "registered-" + secrets.token_hex(12),
            "PLANT_SQL": "t" + secrets.token_hex(12)}


def test_the_sweep_sees_every_directory_and_harvests_harness_servers(tmp_path):
    """As `make test-postgres` runs: any test's output is grepped and any test can register; a harness server's
    key material is a needle without the test registering it; the cluster's log is grepped; the sweep runs last."""
    res = _inner_session(tmp_path, SKM_TEST_STORAGE="postgresql", **_plants())
    assert res["order"][-1].endswith("test_secret_hygiene.py::test_sweep"), res["order"]
    leaky = "elsewhere/test_zz_after_the_sweep_by_name.py::"
    assert any(f.startswith("harness ") and " material found in " + leaky + "test_harness_server_leaks_its_material"
               " [Captured stdout call]" in f for f in res["found"]), res["found"]
    assert ("registered elsewhere found in " + leaky + "test_registered_value_leaks [Captured stderr call]"
            in res["found"]), res["found"]
    assert not [f for f in res["found"] if "test_clean" in f], res["found"]
    assert any(f.startswith("value in a failing statement found in ") and f.endswith("/postgres.log")
               for f in res["found"]), res["found"]
    assert res["stats"]["servers"] == 2 and not res["unharvested"], res


def test_without_harvesting_a_harness_server_is_not_a_needle(tmp_path):
    """The control: on SQLite without SKM_HYGIENE_HARVEST the session finds only what a test registered (so the
    finding above comes from the harness harvest, not from anything else)."""
    res = _inner_session(tmp_path, SKM_HYGIENE_HARVEST="0", **_plants())
    assert [f.split(" found in ")[0] for f in res["found"]] == ["registered elsewhere"], res["found"]
    assert res["stats"]["servers"] == 0


def test_postgresql_runs_harvest_harness_servers(monkeypatch):
    """`make test-postgres` (SKM_TEST_STORAGE=postgresql) harvests every harness server; other runs only on
    request; none when the session has no sweep."""
    from tests.support import hygiene_plugin
    monkeypatch.delenv("SKM_HYGIENE_HARVEST", raising=False)
    monkeypatch.setattr(hygiene_plugin, "_SWEEPING", [True])
    monkeypatch.setenv("SKM_TEST_STORAGE", "postgresql")
    assert hygiene_plugin.harvest_harnesses()
    monkeypatch.setenv("SKM_TEST_STORAGE", "sqlite")
    assert not hygiene_plugin.harvest_harnesses()
    monkeypatch.setenv("SKM_HYGIENE_HARVEST", "1")
    assert hygiene_plugin.harvest_harnesses()
    monkeypatch.setattr(hygiene_plugin, "_SWEEPING", [False])
    assert not hygiene_plugin.harvest_harnesses()


async def test_compose_registration_reads_the_stacks_generated_secrets(tmp_path):
    """What tests/compose/test_compose_up.py registers, from files laid out as the stack's containers hold them
    (docker/bootstrap.py's root key and wrapped keyring, its admin token, the sidecar's rendered db.env): each
    value, and the system key the keyring wraps, is then found in a container log that leaks it."""
    from server.barrier.keyring import new_keyring, save_keyring_file
    from server.barrier.rootkey import FileRootKey
    from tests.support import hygiene as hy
    containers = tmp_path / "containers"

    def place(where: tuple[str, str]) -> Path:
        f = containers / where[0] / where[1].lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        return f

    root = FileRootKey.create(place(hy.COMPOSE_ROOT_KEY))
    ring = await new_keyring(root)
    save_keyring_file(place(hy.COMPOSE_KEYRING), ring)
    system_key = (await ring.unwrap_all(root))[ring.current]
    await root.close()
    token, password = "tok-" + secrets.token_hex(16), secrets.token_hex(12)
    place(hy.COMPOSE_TOKEN).write_text(token + "\n")
    place(hy.COMPOSE_PASSWORD).write_text(f"DB_PASSWORD={password}\n")
    reads: list[tuple[str, str]] = []

    def read(service: str, path: str) -> bytes:
        reads.append((service, path))
        return (containers / service / path.lstrip("/")).read_bytes()

    h = hy.Hygiene()
    labels = await hy.register_compose(h, read, "compose p1")
    assert labels == ["compose p1: demo admin token", "compose p1: demo password (24 characters)",
                      "compose p1: root key", f"compose p1: system key v{ring.current}"]
    assert set(reads) == {hy.COMPOSE_TOKEN, hy.COMPOSE_PASSWORD, hy.COMPOSE_ROOT_KEY, hy.COMPOSE_KEYRING}
    h.text("compose p1: logs", f"keyserver_1 | token {token}\ndemo-app_1 | pw {password}\n"
                               f"systemkey_1 | {system_key.hex()}\n")
    found, _ = h.scan()
    assert found == ["compose p1: demo admin token found in compose p1: logs",
                     "compose p1: demo password (24 characters) found in compose p1: logs",
                     f"compose p1: system key v{ring.current} found in compose p1: logs"], found
    place(hy.COMPOSE_PASSWORD).write_text("OTHER=1\n")
    with pytest.raises(ValueError, match="DB_PASSWORD"):
        await hy.register_compose(hy.Hygiene(), read, "compose p2")
