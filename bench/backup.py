"""Backup and restore at N keys (default 100,000): `skm backup create` / `skm backup restore` next to
the raw tools on the same database in the same run (`sqlite3 .backup` / `.restore`; `pg_dump -Fc` /
`pg_restore` with --postgres), and the secret-read p99 while backups run vs while none does.

Every time is the wall time of the command as an operator runs it (a new process each: Python's
start-up is in ours, as the raw tools' start-up is in theirs), the minimum of `repeat` runs of each
(ours and the raw tools' alike: on a shared 2-core machine one run swings by a third). The CLI's start-up alone (`skm backup
create --help`) and the restore's audit-chain check (the CLI's --json says its seconds) are columns
of their own, with the ratios net of them beside the plain ones. The key server runs as `skm server
run`, pinned to the server core; the load client (ab) on the client core.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import keyserver, load, procs

REPO = Path(__file__).resolve().parents[1]
_PYCACHE = Path(tempfile.gettempdir()) / "skm-bench-pycache"


@dataclass
class BackupResult:
    backend: str
    keys: int
    create_s: float
    restore_s: float
    raw_backup_s: float
    raw_restore_s: float
    raw_tool: str
    file_bytes: int
    raw_bytes: int
    p99_idle_ms: float
    p99_during_ms: float
    backups_during: int
    errors: list[str] = field(default_factory=list)
    restore_audit_s: float = 0.0    # of restore_s, checking the restored audit chain (reported apart)
    startup_s: float = 0.0          # `skm backup create --help`: the CLI's start-up, in each command's time

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _skm(*args: str) -> list[str]:
    # This checkout's code (not whatever `skm` a venv points at).
    return [sys.executable, "-m", "server.cli.main", *args]


def _env(extra: dict | None = None) -> dict:
    # Bytecode cached (in the bench's own directory), as an installed skm has it: without it every
    # command would compile its modules again, a cost no operator pays.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKM_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=str(REPO), SKM_LOG_LEVEL="warning", SKM_CONFIG=str(REPO / "bench" / ".no-cli-config"),
               PYTHONPYCACHEPREFIX=str(_PYCACHE))
    env.update(extra or {})
    return env


def _timed(cmd: list[str], env: dict | None = None) -> float:
    return _run(cmd, env)[0]


def _run(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({p.returncode}): {(p.stderr or p.stdout)[-400:]}")
    return time.monotonic() - t0, p.stdout


def _restore(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, seconds of it spent checking the audit chain: the CLI's --json says)."""
    import json
    took, out = _run([*cmd, "--json"], env)
    return took, float(json.loads(out).get("auditSeconds", 0.0))


def _fresh(n: int, clear, run) -> list:
    """`run()` n times (at least once), `clear()` before each: each run on a fresh target."""
    out = []
    for _ in range(max(1, n)):
        clear()
        out.append(run())
    return out


def _best(n: int, run, clear) -> float:
    """The minimum of n timed runs, `clear()` before each (the last run's output stays)."""
    return min(_fresh(n, clear, run))


def _launch(fx: keyserver.Fixture, name: str) -> procs.Proc:
    p = procs.start(name, _skm("server", "run", "--config", str(fx.config)), fx.dir / f"{name}.log", env=_env())
    m = p.wait_for(r"data plane https://[\d.]+:(\d+), management https://[\d.]+:(\d+)")
    p.info = {"data_url": f"https://127.0.0.1:{m.group(1)}", "mgmt_url": f"https://127.0.0.1:{m.group(2)}"}
    return p


def _restore_config(fx: keyserver.Fixture, storage: str = "") -> Path:
    """The fixture's config with its root key and keyring named, so another data dir can be the target."""
    data = Path(fx.config.read_text().split('data_dir = "', 1)[1].split('"', 1)[0])
    text = fx.config.read_text()
    if storage:
        text = "\n".join(ln for ln in text.splitlines() if not ln.startswith("storage = ")) + "\n"
        text = text.replace("[data]", f'storage = "{storage}"\n[data]', 1)
    text += f'[rootkey]\npath = "{data / "root.key"}"\n[systemkey]\npath = "{data / "systemkey.json"}"\n'
    out = fx.dir / "restore.toml"
    out.write_text(text)
    return out


def measure(backend: str, keys: int, work: Path, *, pg=None, duration: float = 10.0, concurrency: int = 4,
            console: Console | None = None, repeat: int = 3) -> BackupResult:
    console = console or Console(stderr=True)
    if backend == "sqlite" and shutil.which("sqlite3") is None:
        raise RuntimeError("sqlite3 not found: apt-get install sqlite3 (the raw tool compared with)")
    root = work / f"backup-{backend}"
    storage = pg.create_database() if backend == "postgresql" else ""
    console.print(f"backup bench: {keys:,} keys on {backend}")
    fx = asyncio.run(keyserver.prepare(root, storage, bulk_keys=keys))
    server = _launch(fx, f"skm-backup-{backend}")
    try:
        env = _env({"SKM_ADDR": server.info["mgmt_url"], "SKM_TOKEN": fx.operator_token, "SKM_CACERT": str(fx.ca)})
        out = root / "bench.skmbak"
        # The floor every `skm` command pays (Python and the CLI's imports); the raw tools are C.
        startup_s = min(_timed(_skm("backup", "create", "--help"), env) for _ in range(3))
        create_s = _best(repeat, lambda: _timed(_skm("backup", "create", "--out", str(out)), env),
                         lambda: out.unlink(missing_ok=True))
        if backend == "sqlite":
            db = root / "data" / "skm.db"
            raw = root / "raw.db"
            raw_backup_s = _best(repeat, lambda: _timed(["sqlite3", str(db), f".backup '{raw}'"]),
                                 lambda: raw.unlink(missing_ok=True))
            raw_tool = "sqlite3 .backup / .restore"
        else:
            raw = root / "raw.dump"
            raw_backup_s = _best(repeat, lambda: _timed([str(pg.bindir / "pg_dump"), "-Fc", "-f", str(raw), storage]),
                                 lambda: raw.unlink(missing_ok=True))
            raw_tool = "pg_dump -Fc / pg_restore"
        # Secret-read latency with no backup running, then with backups back to back.
        req = load.Request(keyserver.client_url(server, fx, f"/secrets/{fx.keys['secret']}"),
                           cert_pem=fx.client.combined)
        idle = load.run(req, concurrency=concurrency, duration=duration)
        stop = threading.Event()
        taken: list[float] = []
        errors: list[str] = []

        def loop() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                f = root / f"during-{n}.skmbak"
                try:
                    taken.append(_timed(_skm("backup", "create", "--out", str(f)), env))
                except RuntimeError as e:
                    errors.append(str(e))
                    return
                finally:
                    f.unlink(missing_ok=True)
        t = threading.Thread(target=loop, daemon=True)
        t.start()
        during = load.run(req, concurrency=concurrency, duration=duration)
        stop.set()
        t.join()
    finally:
        server.stop()
    # Restores into fresh targets (the server is stopped: a restore runs offline).
    if backend == "sqlite":
        target = root / "restored"
        restore_s, audit_s = min(_fresh(repeat, lambda: shutil.rmtree(target, ignore_errors=True), lambda: _restore(
            _skm("backup", "restore", str(out), "--config", str(_restore_config(fx)), "--data-dir", str(target)),
            _env())))
        raw_db = root / "raw-restored.db"
        raw_restore_s = min(_fresh(repeat, lambda: raw_db.unlink(missing_ok=True),
                                   lambda: _timed(["sqlite3", str(raw_db), f".restore '{raw}'"])))
    else:
        restore_s, audit_s = min(_fresh(repeat, lambda: None, lambda: _restore(
            _skm("backup", "restore", str(out), "--config", str(_restore_config(fx, storage)), "--storage",
                 pg.create_database()), _env())))
        raw_restore_s = min(_fresh(repeat, lambda: None, lambda: _timed(
            [str(pg.bindir / "pg_restore"), "--no-owner", "-d", pg.create_database(), str(raw)])))
    # Milliseconds kept: a small store's raw backup takes a few of them, and 0.00 s would be no ratio.
    res = BackupResult(backend, keys, round(create_s, 4), round(restore_s, 4), round(raw_backup_s, 4),
                       round(raw_restore_s, 4), raw_tool, out.stat().st_size, raw.stat().st_size,
                       idle.p99_ms, during.p99_ms, len(taken), errors + ([idle.error_detail] if idle.errors else [])
                       + ([during.error_detail] if during.errors else []), restore_audit_s=round(audit_s, 4),
                       startup_s=round(startup_s, 4))
    shutil.rmtree(root / "restored", ignore_errors=True)
    return res


def table(results: list[BackupResult]) -> Table:
    t = Table(title="backup / restore (wall time of each command; secret-read p99 at the scale concurrency)")
    for col in ("backend", "keys", "skm backup create s", "raw backup s", "ratio", "skm backup restore s",
                "raw restore s", "ratio", "of it audit check s", "ratio without it", "skm start-up s",
                "ratios net of start-up (create / restore w/o audit)", "file MB", "raw MB", "read p99 idle ms",
                "read p99 during backup ms", "backups during"):
        t.add_column(col, justify="left" if col == "backend" else "right")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"
    for r in results:
        t.add_row(f"{r.backend} ({r.raw_tool})", f"{r.keys:,}", f"{r.create_s:.2f}", f"{r.raw_backup_s:.2f}",
                  ratio(r.create_s, r.raw_backup_s), f"{r.restore_s:.2f}", f"{r.raw_restore_s:.2f}",
                  ratio(r.restore_s, r.raw_restore_s), f"{r.restore_audit_s:.2f}",
                  ratio(r.restore_s - r.restore_audit_s, r.raw_restore_s), f"{r.startup_s:.2f}",
                  f"{ratio(r.create_s - r.startup_s, r.raw_backup_s)} / "
                  f"{ratio(r.restore_s - r.restore_audit_s - r.startup_s, r.raw_restore_s)}",
                  f"{r.file_bytes / 1e6:.1f}", f"{r.raw_bytes / 1e6:.1f}", f"{r.p99_idle_ms:.1f}",
                  f"{r.p99_during_ms:.1f}", str(r.backups_during))
    return t
