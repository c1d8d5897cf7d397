"""server/loops.py: the event loop a long-running process runs on."""
from __future__ import annotations

import pytest

from server import loops
from server.errors import ConfigError


def test_auto_takes_uvloop_and_asyncio_refuses_it():
    import uvloop          # a dependency: "auto" must pick it up
    assert loops.loop_factory("auto") is uvloop.new_event_loop
    assert loops.loop_factory("uvloop") is uvloop.new_event_loop
    assert loops.loop_factory("asyncio") is None

    async def which() -> str:
        return loops.loop_name()
    assert loops.run(which(), "auto") == "uvloop"
    assert loops.run(which(), "asyncio") == "asyncio"


def test_unknown_choice_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="auto, uvloop, asyncio"):
        loops.loop_factory("tokio")


def test_insisting_on_a_missing_uvloop_says_how_to_fix(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "uvloop", None)     # import fails as if not installed
    assert loops.loop_factory("auto") is None
    with pytest.raises(ConfigError, match="pip install uvloop"):
        loops.loop_factory("uvloop")


def test_settle_heap_freezes_start_up_and_collects_young_objects_less_often():
    """What a started server or sidecar calls once (in a child: the test process's collector stays as is)."""
    import json
    import subprocess
    import sys
    code = ("import gc, json; from server import loops; before = gc.get_threshold(); loops.settle_heap(); "
            "print(json.dumps([gc.get_freeze_count(), gc.get_threshold(), before]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    frozen, after, before = json.loads(out)
    assert frozen > 1000                         # the modules and classes start-up made
    assert after[0] == loops.GEN0_THRESHOLD > before[0] and after[1:] == before[1:]
