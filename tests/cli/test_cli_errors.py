"""What a user meets when a command goes wrong: one line saying what to do, never a traceback."""
from __future__ import annotations

import json

from tests.cli.test_cli import skm_cli


async def test_unreadable_files_are_one_line_errors(skm, tmp_path):
    code, out, err = await skm_cli(skm, "keystore", "create", "files", "--ip", "--json")
    assert code == 0, err
    ks = str(json.loads(out)["keyStoreId"])
    code, out, err = await skm_cli(skm, "key", "create", ks, "pw", "--type", "SECRET", "--json", stdin="v1\n")
    assert code == 0, err
    key = json.loads(out)["keyId"]
    missing = str(tmp_path / "no-such-file")
    for args in (("key", "rotate", key, "--value-file", missing),
                 ("key", "create", ks, "pw2", "--type", "SECRET", "--value-file", missing),
                 ("auth", "cert", "create", ks, "c1", "--password-file", missing)):
        code, out, err = await skm_cli(skm, *args)
        assert code == 1, (args, err)
        assert "Traceback" not in err and err.count("\n") == 1, (args, err)
        assert err.startswith("error: ") and missing in err and "No such file or directory" in err, (args, err)
    # Nothing was changed by the refused commands.
    code, out, _ = await skm_cli(skm, "key", "list", ks, "--json")
    assert [k["name"] for k in json.loads(out)["keyList"]] == ["pw"]
    assert json.loads((await skm_cli(skm, "key", "show", key, "--json"))[1])["currentKeyValueVersion"] == 0


async def test_wrong_ca_is_one_line(skm, tmp_path):
    # Another CA than the server's: the TLS check fails; the user is told what to check.
    from server.access.pki import DevPKI
    other = DevPKI(tmp_path / "other")
    other.dir.mkdir(parents=True, exist_ok=True)
    other.create()
    code, out, err = await skm_cli(skm, "keystore", "list", env={"SKM_CACERT": str(other.ca_cert)})
    assert code == 6 and "Traceback" not in err and err.count("\n") == 1, err


async def test_rollout_and_version_commands_take_a_key_reference(skm):
    # Like every other key command: an id or STORE/NAME; a mistyped reference is named by the CLI
    # (it was answered "URL NOT FOUND: no such endpoint").
    code, out, err = await skm_cli(skm, "keystore", "create", "roll", "--ip", "--json")
    ks = json.loads(out)["keyStoreId"]
    code, out, err = await skm_cli(skm, "key", "create", str(ks), "dk", "--type", "SYMMETRIC_KEY", "--json")
    kid = json.loads(out)["keyId"]
    assert (await skm_cli(skm, "key", "rotate", kid))[0] == 0
    code, out, err = await skm_cli(skm, "key", "rollout", "roll/dk", "--json")
    assert code == 0 and json.loads(out)["keyId"] == kid, err
    code, out, err = await skm_cli(skm, "key", "version", "disable", "roll/dk", "0", "--json")
    assert code == 0 and json.loads(out)["status"] == "DISABLED", err
    code, out, err = await skm_cli(skm, "key", "version", "enable", f"{ks}/dk", "0", "--json")
    assert code == 0 and json.loads(out)["status"] == "ACTIVE", err
    for args in (("key", "rollout", "db-password"), ("key", "version", "disable", "c47a0fb2", "0")):
        code, out, err = await skm_cli(skm, *args)
        assert code == 2 and "is neither a key id" in err and err.count("\n") == 1, (args, err)
        assert "URL NOT FOUND" not in err and "Traceback" not in err
    code, out, err = await skm_cli(skm, "key", "rollout", "roll/nope")
    assert code == 4 and "has no key named 'nope'" in err


async def test_login_without_a_password_says_so(skm):
    code, out, err = await skm_cli(skm, "login", "admin", stdin="")
    assert code == 2 and err == "error: no password given: type it at the prompt, or send it as the first line " \
        "of standard input\n", err
    code, out, err = await skm_cli(skm, "operator", "create", "nopw", "--role", "viewer", "--password-stdin",
                                   stdin="\n")
    assert code == 2 and "no password given" in err
    code, out, err = await skm_cli(skm, "operator", "show", "nopw")
    assert code == 4
    # An admin resetting a password leaves the current one empty: still allowed.
    code, out, err = await skm_cli(skm, "operator", "create", "reset-me", "--role", "viewer", "--password-stdin",
                                   stdin="a long enough password 1\n")
    assert code == 0, err
    code, out, err = await skm_cli(skm, "operator", "update", "reset-me", "--password-stdin",
                                   stdin="a long enough password 2\n")
    assert code == 0, err
