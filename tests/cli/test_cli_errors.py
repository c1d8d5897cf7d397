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
        assert err.startswith("error: No such file or directory: ") and missing in err, (args, err)
    # Nothing was changed by the refused commands.
    code, out, _ = await skm_cli(skm, "key", "list", ks, "--json")
    assert [k["name"] for k in json.loads(out)["keyList"]] == ["pw"]
    assert json.loads((await skm_cli(skm, "key", "show", key, "--json"))[1])["currentKeyValueVersion"] == 0


async def test_value_file_for_a_generated_key_is_refused(skm, tmp_path):
    code, out, err = await skm_cli(skm, "keystore", "create", "gen", "--ip", "--json")
    ks = str(json.loads(out)["keyStoreId"])
    f = tmp_path / "material"
    f.write_text("not key material\n")
    code, out, err = await skm_cli(skm, "key", "create", ks, "aes", "--type", "SYMMETRIC_KEY", "--value-file",
                                   str(f))
    assert code == 2 and "--value-file is for SECRET keys only" in err and "Traceback" not in err
    code, out, _ = await skm_cli(skm, "key", "list", ks, "--json")
    assert json.loads(out)["keyList"] == []


async def test_wrong_ca_is_one_line(skm, tmp_path):
    # Another CA than the server's: the TLS check fails; the user is told what to check.
    from server.access.pki import DevPKI
    other = DevPKI(tmp_path / "other")
    other.dir.mkdir(parents=True, exist_ok=True)
    other.create()
    code, out, err = await skm_cli(skm, "keystore", "list", env={"SKM_CACERT": str(other.ca_cert)})
    assert code == 6 and "Traceback" not in err and err.count("\n") == 1, err
    assert "SKM_ADDR" in err


async def test_secret_value_from_the_environment_in_a_script(skm, tmp_path):
    # A script's standard input is not a terminal, and often empty: SKM_SECRET_VALUE (what the README
    # shows) is the value, and an empty value is refused rather than stored.
    code, out, err = await skm_cli(skm, "keystore", "create", "env", "--ip", "--json")
    ks = str(json.loads(out)["keyStoreId"])
    code, out, err = await skm_cli(skm, "key", "create", ks, "db-password", "--type", "SECRET", "--json",
                                   stdin="", env={"SKM_SECRET_VALUE": "from-the-env"})
    assert code == 0, err
    key = await skm.rt.keys.key(json.loads(out)["keyId"])
    assert await skm.rt.keys.secret_value(key) == "from-the-env"
    code, out, err = await skm_cli(skm, "key", "create", ks, "empty", "--type", "SECRET", stdin="")
    assert code == 2 and "it was empty" in err
    empty = tmp_path / "empty"
    empty.write_text("")
    code, out, err = await skm_cli(skm, "key", "rotate", key.id, "--value-file", str(empty))
    assert code == 2 and "empty" in err
    assert await skm.rt.keys.secret_value(await skm.rt.keys.key(key.id)) == "from-the-env"
    code, out, _ = await skm_cli(skm, "key", "list", ks, "--json")
    assert [k["name"] for k in json.loads(out)["keyList"]] == ["db-password"]


async def test_a_mistyped_key_id_is_named_before_any_request(skm):
    for args in (("key", "show", "db-password"), ("key", "rotate", "ABC"), ("key", "rollout", "1"),
                 ("key", "version", "disable", "c47a0fb2", "0")):
        code, out, err = await skm_cli(skm, *args)
        assert code == 2 and "is not a key id: 32 lowercase hex characters" in err, (args, err)
        assert "URL NOT FOUND" not in err and "Traceback" not in err


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
