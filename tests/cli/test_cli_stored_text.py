"""The CLI never prints stored text raw (issue 14): rows written before names were checked may hold
ANSI escapes, newlines, NULs or bidi overrides, and a table shows them escaped."""
from __future__ import annotations

import json

from server.events import Event
from server.text import is_unsafe
from tests.cli.test_cli import skm_cli

EVIL_NAME = "evil\x1b[2J\x1b[31m\u202eexe.gpj"
EVIL_DESC = "line1\nline2 [bold]x[/bold] \x07\x9b31m\u2066"      # (PostgreSQL stores no NUL)


def _raw_controls(text: str) -> list[str]:
    return sorted({f"U+{ord(ch):04X}" for ch in text if ch != "\n" and is_unsafe(ch)})


async def test_tables_and_json_escape_control_and_bidi_characters(skm):
    store = await skm.keystore("legacy")
    key = await skm.key(store, "SECRET", "k", secretValue="v")
    ks = store["keyStoreId"]
    db = skm.rt.storage
    # As a row from before the rule would be: written straight to the database.
    await db.execute("UPDATE keystores SET name = ?, description = ? WHERE id = ?", EVIL_NAME, EVIL_DESC, ks)
    await db.execute("UPDATE keys SET name = ?, description = ? WHERE id = ?", EVIL_NAME, EVIL_DESC, key["keyId"])
    await skm.rt.events.publish(Event(ks, "keystore_updated", key["keyId"]))       # drop the server's cached copies
    wide = {"COLUMNS": "400"}
    for args in (["keystore", "list"], ["key", "list", str(ks)], ["key", "show", key["keyId"]],
                 ["keystore", "show", str(ks)]):
        code, out, err = await skm_cli(skm, *args, env=wide)
        assert code == 0, err
        assert _raw_controls(out) == [], (args, out)
        assert "evil\\x1b[2J\\x1b[31m\\u202eexe.gpj" in out, out           # shown, escaped
        if args[1] == "show":
            assert "line1\\nline2 [bold]x[/bold] \\x07\\x9b31m\\u2066" in out   # markup stays text too
        code, out, err = await skm_cli(skm, *args, "--json")
        assert code == 0, err
        assert _raw_controls(out) == [], (args, out)
        data = json.loads(out)                                          # the same JSON to a parser
        rows = data.get("keyStoreList") or data.get("keyList") or [data]
        assert EVIL_NAME in [r["name"] for r in rows]
