"""The CI guard itself: under SKM_REQUIRE_ALL=1 a module skipped at collection, a skipped test and
an xfail each fail the run; without it they are ordinary skips."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = {
    "collection": "import pytest\npytest.importorskip('no_such_module_for_skm', reason='not installed')\n"
                  "def test_never():\n    assert True\n",
    "test": "import pytest\ndef test_skips():\n    pytest.skip(reason='no tool')\n",
    "xfail": "import pytest\n@pytest.mark.xfail(reason='known')\ndef test_xfails():\n    assert False\n",
}


def _run(tmp: Path, body: str, require: bool) -> subprocess.CompletedProcess:
    f = tmp / "test_guarded.py"
    f.write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "SKM_REQUIRE_ALL"}
    if require:
        env["SKM_REQUIRE_ALL"] = "1"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.support.require_all", "-p",
                           "no:cacheprovider", "--rootdir", str(tmp), str(f)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_skip_fails_the_run_under_the_guard(tmp_path: Path, case: str):
    guarded = _run(tmp_path, CASES[case], require=True)
    assert guarded.returncode != 0 and "SKM_REQUIRE_ALL=1" in guarded.stdout, guarded.stdout + guarded.stderr
    plain = _run(tmp_path, CASES[case], require=False)
    # Without the guard a skip is a skip (a module skipped whole leaves "no tests ran": exit 5).
    assert plain.returncode in ((0, 5) if case == "collection" else (0,)), plain.stdout + plain.stderr
    assert "SKM_REQUIRE_ALL=1" not in plain.stdout
