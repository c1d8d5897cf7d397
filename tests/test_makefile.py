"""The README's two commands: `make demo` installs the runtime only (no test extras) and shows pip's
progress; `make test` installs the test extras. Checked with `make -n` (what make would run), in a
venv path that does not exist, so nothing is installed."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _plan(target: str, tmp_path: Path) -> list[str]:
    out = subprocess.run(["make", "-n", "-B", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if "pip install" in line]


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed: apt-get install make")
def test_make_demo_installs_the_runtime_only_with_progress(tmp_path):
    pips = _plan("demo", tmp_path)
    project = [p for p in pips if " -e " in p]
    assert project and all("[test" not in p and "[bench" not in p for p in project), pips
    assert all(" -q" not in p for p in project), pips          # a first run downloads a lot: show it


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed: apt-get install make")
def test_make_test_installs_the_test_extras(tmp_path):
    pips = _plan("test", tmp_path)
    assert any("'.[test]'" in p or ".[test]" in p for p in pips), pips
