"""The benchmark harness end to end, briefly: our key server (and sidecar) and the floor, ~2 s per
workload, one run. Proves the harness sets everything up, drives it with the real load client over
mTLS with certificate + IPv4 auth, and writes a report with zero errors. OpenBao is left out to
keep it short; `make bench` runs it."""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.long

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("ab") is None, reason="ab not installed: apt-get install apache2-utils")
def test_bench_smoke(tmp_path):
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--systems", "skm,skm-unkeyed,sidecar,floor", "--duration", "2", "--runs", "1",
         "--warmup", "0", "--concurrency", "8", "--scale", "1500", "--backup-keys", "1500", "--workdir", str(tmp_path / "work"),
         "--results", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((results / "latest.json").read_text())
    assert report["errors"] == 0
    rows = {(r["workload"], r["system"]): r for r in report["rows"]}
    expected = {("floor", "floor"), ("secret-read", "skm"), ("secret-read-v13", "skm"), ("secret-read", "sidecar-unix"),
                ("secret-read", "sidecar-tcp"), ("secret-read", "sidecar-unix-noreads"), ("encrypt", "skm"), ("decrypt", "skm"), ("sign-rsa", "skm"),
                ("sign-ec", "skm"), ("datakey", "skm"), ("scale-secret-read", "skm@1,000"),
                ("scale-secret-read", "skm@1,500"), ("scale-list-middle-page", "skm@1,500")}
    assert expected <= set(rows), sorted(set(rows))
    for key in expected:
        assert rows[key]["requests"] > 0 and rows[key]["rps"] > 0, key
        assert rows[key]["checked"] > 0, key          # answers compared with the expected values, not just statuses
    assert rows[("secret-read", "skm")]["vs_floor"] is not None
    # The audit-cost baseline is the same server with the writer of before keyed links: its records carry
    # no tag, ours do, and the report sets their secret-read CPU side by side.
    assert rows[("secret-read", "skm-unkeyed")]["checked"] > 0
    assert report["notes"]["audit_cost"]["server_added_pct"] is not None
    for name, tagged in (("skm", True), ("skm-unkeyed", False)):
        (db,) = (tmp_path / "work" / name).rglob("skm.db")
        with sqlite3.connect(db) as c:
            tags = [t for (t,) in c.execute("SELECT tag FROM audit_log WHERE action = 'secret.read'")]
        assert tags and all((t is not None) == tagged for t in tags), name
    assert report["notes"]["sidecar_rss_mb_after"] > 0 and report["notes"]["sidecar_noreads_rss_mb_after"] > 0
    assert report["notes"]["sidecar_read_audit"]["ratio"] > 0
    # The backup row: skm backup create/restore next to sqlite3 .backup/.restore, read p99 idle and during.
    (backup,) = report["notes"]["backup"]
    assert backup["backend"] == "sqlite" and backup["keys"] == 1500 and not backup["errors"]
    for k in ("create_s", "restore_s", "raw_backup_s", "raw_restore_s", "p99_idle_ms", "p99_during_ms"):
        assert backup[k] > 0, k
    assert backup["backups_during"] >= 1 and backup["file_bytes"] > 0
    # Every process the harness started is gone.
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True).stdout
    assert leftover.strip() == ""
