"""Issue 16: CLI tables never cut an id, an appkey or an action name, at any terminal width (other
columns wrap or are dropped first, and are named as dropped); the data-plane URL is shown without
`public_url`; an unknown `--action` is refused instead of answering an empty table."""
from __future__ import annotations

import json

from tests.cli.test_cli_scripting import one_line_error
from tests.support.cli import skm_cli

WIDTHS = (60, 80, 100)
ELLIPSIS = "\u2026"      # what rich writes where it cuts a cell


def _whole(out: str, value: str) -> bool:
    """`value` appears whole on one line of `out`."""
    return any(value in line for line in out.splitlines())


def _fits(out: str, width: int) -> None:
    assert ELLIPSIS not in out, out
    assert max(len(line) for line in out.splitlines()) <= width, out


async def _table(skm, width: int, *args: str, fit: bool = True) -> str:
    code, out, err = await skm_cli(skm, *args, env={"COLUMNS": str(width)})
    assert code == 0, err
    if fit:
        _fits(out, width)
    return out


async def _json(skm, *args: str):
    code, out, err = await skm_cli(skm, *args, "--json")
    assert code == 0, err
    return json.loads(out)


async def test_list_tables_never_cut_ids_appkeys_or_actions(skm):
    st, out = await skm.mgmt("POST", "/projects", json={"name": "payments-team-with-a-long-name",
                                                         "description": "the team that runs payments " * 3})
    assert st == 201, out
    store = await skm.keystore("a-key-store-with-a-rather-long-name-for-a-table", description="x " * 40,
                               macAuthUse="Y", certificateAuthUse="Y")
    keys = [await skm.key(store, "SYMMETRIC_KEY", f"symmetric-key-number-{i}") for i in range(2)]
    for k in keys:
        st, out = await skm.mgmt("POST", f"/keys/{k['keyId']}/schedule-deletion")
        assert st == 200, out
    projects = (await _json(skm, "project", "list"))["projects"]
    records = (await _json(skm, "audit", "query", "--limit", "30"))["records"]
    assert {r["action"] for r in records} >= {"key.create", "key.schedule-deletion", "keystore.create"}
    for width in WIDTHS:
        out = await _table(skm, width, "project", "list")
        for p in projects:
            assert _whole(out, p["appkey"]), (width, out)
        assert "dataPlaneUrl" in out          # whole, or named among the columns not shown at this width

        out = await _table(skm, width, "keystore", "list")
        assert _whole(out, "keyStoreId"), (width, out)

        out = await _table(skm, width, "audit", "query", "--limit", "30")
        for r in records:
            assert _whole(out, r["action"]), (width, r["action"], out)
            if r["keyId"]:
                assert _whole(out, r["keyId"]), (width, r["keyId"], out)
        # The time is never cut either: shown (the date and the time of day each whole), or not at all.
        shown = all(_whole(out, r["time"][:10]) and _whole(out, r["time"][11:19]) for r in records)
        assert shown or "time (UTC)" in out.split("not shown at this width")[-1], (width, out)

        out = await _table(skm, width, "key", "list", str(store["keyStoreId"]))
        for k in keys:
            assert _whole(out, k["keyId"]), (width, out)
    # A terminal wide enough shows every column, the data-plane URL whole; an empty column takes no room.
    out = await _table(skm, 250, "project", "list")
    assert "not shown" not in out and all(_whole(out, p["dataPlaneUrl"]) for p in projects), out
    out = await _table(skm, 250, "audit", "query", "--limit", "30")
    assert "not shown" not in out and "reason" not in out.splitlines()[2], out     # no record has a reason


async def test_other_id_tables_keep_their_ids(skm):
    await skm.mgmt("POST", "/operators", json={"name": "an-operator-with-a-long-name", "role": "viewer",
                                               "password": "a long enough password"})
    st, out = await skm.mgmt("POST", "/tokens", json={"description": "a token for a script that runs nightly " * 2})
    assert st in (200, 201), out
    st, out = await skm.mgmt("POST", "/access-keys", json={"description": "for the batch jobs " * 4})
    assert st in (200, 201), out
    tokens = [t["tokenId"] for t in (await _json(skm, "token", "list"))["tokens"]]
    access = [k["accessKeyId"] for k in (await _json(skm, "accesskey", "list"))["accessKeys"]]
    assert tokens and access
    for width in WIDTHS:
        out = await _table(skm, width, "token", "list")
        assert all(_whole(out, t) for t in tokens), (width, out)
        out = await _table(skm, width, "accesskey", "list")
        assert all(_whole(out, a) for a in access), (width, out)
        out = await _table(skm, width, "operator", "list")
        assert _whole(out, "an-operator-with-a-long-name"), (width, out)


async def test_the_data_plane_url_is_shown_without_public_url(skm):
    """Without `public_url` the URL is the data listener's (what `skm demo` prints): `project show|list`,
    `keystore show` and `whoami` name it, whole on one line even at 80 columns."""
    store = await skm.keystore("url-store")
    url = f"{skm.data_url}/keymanager/v1.0/appkey/{skm.appkey}"
    for args in (("project", "show", "1"), ("keystore", "show", str(store["keyStoreId"])), ("whoami",)):
        data = await _json(skm, *args)
        assert data["dataPlaneUrl"] == url and data["appkey"] == skm.appkey, (args, data)
        for width in (80, 200):
            # A URL longer than the terminal is printed whole (the terminal wraps it), never split or cut.
            out = await _table(skm, width, *args, fit=False)
            assert ELLIPSIS not in out and _whole(out, url) and _whole(out, skm.appkey), (args, width, out)
    assert [p["dataPlaneUrl"] for p in (await _json(skm, "project", "list"))["projects"]] == [url]


async def test_an_unknown_audit_action_is_refused_with_close_names(skm):
    code, out, err = await skm_cli(skm, "audit", "query", "--action", "nosuch.action")
    line = one_line_error(err)
    assert code != 0 and out == "" and "nosuch.action" in line and "key" in line, err
    code, out, err = await skm_cli(skm, "audit", "query", "--action", "key.rotat")
    line = one_line_error(err)
    assert code != 0 and "did you mean key.rotate" in line, err
    code, out, err = await skm_cli(skm, "audit", "query", "--action", "secrt", "--json")
    assert code != 0 and "secret" in json.loads(err)["error"]["message"], err
    # Names the help suggests, resources and actions written outside a route are accepted.
    for name in ("key.create", "key", "approval.applied", "operator.login", "keystore.update", "secret.read"):
        code, out, err = await skm_cli(skm, "audit", "query", "--action", name, "--json")
        assert code == 0, (name, err)
