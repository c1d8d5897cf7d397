"""A CLI that never surprises (issue 16): the `skm` CLI run as a real process against a real server,
from scripts (pipes) and from a terminal (a real pseudo-terminal)."""
from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import termios

from server.access.pki import CA
from tests.cli.test_cli import SKM

SECRET_ENV = {"SKM_SECRET_VALUE": None}     # never inherited from the developer's shell


async def _read_until(master: int, text: bytes) -> None:
    """Read the pty's output until `text` appears (a prompt): input typed earlier would be flushed."""
    loop = asyncio.get_running_loop()
    seen = b""
    while text not in seen:
        ready = loop.create_future()
        loop.add_reader(master, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(master)
        seen += os.read(master, 4096)


async def run(h, *args: str, stdin: str | None = None, env: dict | None = None, tty: bool = False,
              cwd: str | None = None, prompts: tuple[tuple[str, str], ...] = ()) -> tuple[int, str, str]:
    """Run `skm` with stdin a pipe holding `stdin` (closed at once when None), or a pty when `tty`
    (`stdin` typed at once; each (prompt, answer) of `prompts` typed when the prompt shows on the pty)."""
    e = {**os.environ, "SKM_ADDR": h.mgmt_url, "SKM_TOKEN": h.init.token, "SKM_CACERT": str(h.pki.ca_cert),
         "SKM_CONFIG": "/nonexistent", "COLUMNS": "200"}
    for k, v in {**SECRET_ENV, **(env or {})}.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    if tty:
        master, slave = pty.openpty()
        try:
            p = await asyncio.create_subprocess_exec(*SKM, *args, stdin=slave, stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.PIPE, env=e, cwd=cwd,
                                                     preexec_fn=_controlling_tty)
            os.close(slave)
            if stdin is not None:
                os.write(master, stdin.encode())       # the line discipline holds it until the CLI reads
            talk = asyncio.ensure_future(p.communicate())
            for prompt, answer in prompts:
                await asyncio.wait_for(_read_until(master, prompt.encode()), 120)
                os.write(master, answer.encode())
            out, err = await asyncio.wait_for(talk, 120)
        finally:
            os.close(master)
    else:
        p = await asyncio.create_subprocess_exec(*SKM, *args, stdin=asyncio.subprocess.PIPE,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                 env=e, cwd=cwd)
        out, err = await asyncio.wait_for(p.communicate(stdin.encode() if stdin is not None else None), 120)
    return p.returncode, out.decode(), err.decode()


def _controlling_tty() -> None:
    # In the child: a new session whose controlling terminal is the pty on stdin (getpass opens /dev/tty).
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def one_line_error(err: str) -> str:
    """The CLI's failure shape: exactly one line, `error: ...`, never a traceback."""
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


async def _secret(h, key_id: str) -> str:
    return await h.rt.keys.secret_value(await h.rt.keys.key(key_id))


async def _keys(h) -> set[str]:
    return {r["name"] for r in await h.rt.storage.fetchall("SELECT name FROM keys")}


async def test_secret_value_sources_and_their_order(skm, tmp_path):
    store = await skm.keystore("apps")
    ks = str(store["keyStoreId"])

    async def create(name: str, **kw) -> str:
        code, out, err = await run(skm, "key", "create", ks, name, "--type", "SECRET", "--json", **kw)
        assert code == 0, err
        return json.loads(out)["keyId"]

    # The issue: a script sets SKM_SECRET_VALUE; its stdin is a pipe (here: empty, closed). The variable wins.
    kid = await create("from-env", env={"SKM_SECRET_VALUE": "env-value"})
    assert await _secret(skm, kid) == "env-value"
    # An explicit source beats piped stdin: --value-file > SKM_SECRET_VALUE > stdin.
    vf = tmp_path / "value.txt"
    vf.write_text("file-value\n")
    code, out, err = await run(skm, "key", "create", ks, "from-file", "--type", "SECRET", "--value-file", str(vf),
                               "--json", env={"SKM_SECRET_VALUE": "env-value"}, stdin="stdin-value\n")
    assert code == 0, err
    assert await _secret(skm, json.loads(out)["keyId"]) == "file-value"
    kid = await create("env-over-stdin", env={"SKM_SECRET_VALUE": "env-value"}, stdin="stdin-value\n")
    assert await _secret(skm, kid) == "env-value"
    kid = await create("from-stdin", stdin="stdin-value\n")
    assert await _secret(skm, kid) == "stdin-value"
    # On a terminal with no other source: a prompt (no echo), asked twice.
    code, out, err = await run(skm, "key", "create", ks, "prompted", "--type", "SECRET", "--json", tty=True,
                               prompts=(("secret value: ", "typed-value\n"), ("again: ", "typed-value\n")))
    assert code == 0 and "Warning" not in err, err
    assert await _secret(skm, json.loads(out)["keyId"]) == "typed-value"
    code, _, err = await run(skm, "key", "create", ks, "mistyped", "--type", "SECRET", tty=True,
                             prompts=(("secret value: ", "typed-value\n"), ("again: ", "other-value\n")))
    assert code == 2 and "the two values differ" in one_line_error(err)
    # Never an empty secret: each empty source is named, exit 2, nothing is created.
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    for kw, source in (({"env": {"SKM_SECRET_VALUE": ""}}, "SKM_SECRET_VALUE"),
                       ({"stdin": ""}, "standard input"),
                       ({"stdin": "\n"}, "standard input"),
                       ({"extra": ("--value-file", str(empty))}, f"--value-file {empty}")):
        extra = kw.pop("extra", ())
        code, out, err = await run(skm, "key", "create", ks, "empty", "--type", "secret", *extra, **kw)
        assert code == 2 and f"the secret value from {source} is empty" in one_line_error(err), (kw, err)
    code, _, err = await run(skm, "key", "create", ks, "missing", "--type", "SECRET", "--value-file",
                             str(tmp_path / "nope.txt"))
    assert code == 1 and "nope.txt: No such file or directory" in one_line_error(err)
    assert not {"empty", "missing", "mistyped"} & await _keys(skm)


async def test_rotate_reads_a_secret_like_create_and_leaves_other_keys_alone(skm, tmp_path):
    store = await skm.keystore("apps")
    kid = (await skm.key(store, "SECRET", "pw", secretValue="v0"))["keyId"]
    aes = (await skm.key(store, "SYMMETRIC_KEY", "aes"))["keyId"]
    code, out, err = await run(skm, "key", "rotate", kid, "--json", stdin="v1-from-stdin\n")
    assert code == 0 and json.loads(out)["currentKeyValueVersion"] == 1, err
    assert await _secret(skm, kid) == "v1-from-stdin"
    code, out, err = await run(skm, "key", "rotate", kid, "--json", stdin="ignored\n",
                               env={"SKM_SECRET_VALUE": "v2-from-env"})
    assert code == 0 and await _secret(skm, kid) == "v2-from-env", err
    code, _, err = await run(skm, "key", "rotate", kid, stdin="")
    assert code == 2 and "standard input is empty" in one_line_error(err)
    assert (await skm.rt.keys.key(kid)).current_version == 2
    # A symmetric key makes its own material: stdin is not read, a value file is refused.
    code, out, err = await run(skm, "key", "rotate", aes, "--json", stdin="not-a-key\n")
    assert code == 0 and json.loads(out)["currentKeyValueVersion"] == 1, err
    vf = tmp_path / "v.txt"
    vf.write_text("x")
    code, _, err = await run(skm, "key", "rotate", aes, "--value-file", str(vf))
    assert code == 2 and "--value-file is for a SECRET" in one_line_error(err)


async def test_appkey_is_found_again_and_keys_are_named_store_slash_name(skm):
    store = await skm.keystore("payments")
    sid = store["keyStoreId"]
    code, out, err = await run(skm, "keystore", "show", str(sid))
    assert code == 0 and skm.appkey in out, err
    code, out, err = await run(skm, "keystore", "show", "payments", "--json")
    assert code == 0 and json.loads(out)["appkey"] == skm.appkey, err
    code, out, err = await run(skm, "whoami", "--json")
    me = json.loads(out)
    assert code == 0 and me["appkey"] == skm.appkey and skm.appkey in me["appkeys"].values(), err
    code, out, _ = await run(skm, "whoami")
    assert skm.appkey in out

    # Key-store auth data by the store's name too.
    code, _, err = await run(skm, "auth", "ip", "add", "payments", "10.9.0.0/24")
    assert code == 0, err
    code, out, err = await run(skm, "auth", "ip", "list", "payments", "--json")
    assert code == 0 and "10.9.0.0/24" in [e["value"] for e in json.loads(out)["entries"]], err

    kid = (await skm.key(store, "SECRET", "db/password", secretValue="v0"))["keyId"]
    for ref in ("payments/db/password", f"{sid}/db/password", kid):
        code, out, err = await run(skm, "key", "show", ref, "--json")
        assert code == 0 and json.loads(out)["keyId"] == kid, (ref, err)
    code, out, err = await run(skm, "key", "rotate", "payments/db/password", "--json",
                               env={"SKM_SECRET_VALUE": "v1"})
    assert code == 0 and json.loads(out)["currentKeyValueVersion"] == 1, err
    code, _, err = await run(skm, "key", "show", "payments/nope")
    assert code == 4 and "no key named 'nope'" in one_line_error(err)
    code, _, err = await run(skm, "key", "show", "nostore/db")
    assert code == 4 and "no key store named 'nostore'" in one_line_error(err)
    code, _, err = await run(skm, "key", "show", "not-an-id")
    assert code == 2 and "STORE/NAME" in one_line_error(err)
    code, out, err = await run(skm, "key", "delete", "payments/db/password", "--json")
    assert code == 0 and json.loads(out)["keyStatus"] == "SCHEDULED_DELETION", err
    code, out, err = await run(skm, "key", "delete", "payments/db/password", "--now", "--yes", "--json")
    assert code == 0 and json.loads(out)["keyId"] == kid, err


async def test_key_list_never_cuts_an_id(skm):
    store = await skm.keystore("s")
    ids = [(await skm.key(store, "SYMMETRIC_KEY", f"data-key-number-{i}"))["keyId"] for i in range(2)]
    ids.append((await skm.key(store, "ASYMMETRIC_KEY", "signer", keySpec="EC-P256"))["keyId"])
    for columns in ("80", "140"):
        code, out, err = await run(skm, "key", "list", "s", env={"COLUMNS": columns})
        assert code == 0, err
        lines = out.splitlines()
        assert max(len(ln) for ln in lines) <= int(columns), out
        for kid in ids:
            assert any(kid in ln for ln in lines), (columns, kid, out)       # whole, on one line
        if columns == "80":
            assert "not shown at this width" in out and "rotation days" in out.split("not shown")[1]
        else:
            assert "not shown" not in out and "rotation days" in out and "EC-P256" in out
    code, out, _ = await run(skm, "key", "list", str(store["keyStoreId"]), "--type", "asymmetric_key", "--json")
    assert [k["keyId"] for k in json.loads(out)["keyList"]] == [ids[2]]


async def test_ordinary_mistakes_are_one_line_and_say_what_to_do(skm, tmp_path):
    port = skm.mgmt_url.rsplit(":", 1)[1]
    code, _, err = await run(skm, "keystore", "list", env={"SKM_ADDR": f"http://127.0.0.1:{port}"})
    assert code == 2 and f"use https://127.0.0.1:{port}" in one_line_error(err)
    for addr in (f"127.0.0.1:{port}", f"https://127.0.0.1:{port}/api/v1/"):
        code, out, err = await run(skm, "keystore", "list", "--json", env={"SKM_ADDR": addr})
        assert code == 0, err                  # no scheme: https is the only one, so it is assumed
    code, _, err = await run(skm, "keystore", "list", env={"SKM_TOKEN": None})
    assert code == 3 and "set SKM_TOKEN" in one_line_error(err)
    code, _, err = await run(skm, "keystore", "list", env={"SKM_CACERT": str(tmp_path / "missing-ca.pem")})
    assert code == 2 and "SKM_CACERT names" in one_line_error(err) and "does not exist" in err
    other = CA.create("Some Other CA")
    other.save(tmp_path / "other-ca.pem", tmp_path / "other-ca-key.pem")
    code, _, err = await run(skm, "keystore", "list", env={"SKM_CACERT": str(tmp_path / "other-ca.pem")})
    assert code == 6 and "not trusted" in one_line_error(err) and "set SKM_CACERT" in err
    code, _, err = await run(skm, "keystore", "list", env={"SKM_CACERT": None}, cwd=str(tmp_path))
    assert code == 6 and "set SKM_CACERT" in one_line_error(err)
    code, _, err = await run(skm, "keystore", "list", env={"SKM_ADDR": skm.data_url})
    assert code == 1 and "data plane" in one_line_error(err) and "management listener" in err
    code, _, err = await run(skm, "keystore", "list", env={"SKM_ADDR": "https://127.0.0.1:1"})
    assert code == 6 and "cannot reach" in one_line_error(err)
    # `skm` alone: the help, exit 2 (a usage error; nothing ran). A command group alone: its help.
    code, out, err = await run(skm)
    assert code == 2 and "usage: skm" in out and "keystore" in out and "Traceback" not in err
    code, out, err = await run(skm, "key")
    assert code == 2 and "usage: skm key" in out and "rotate" in out
    # Errors name the CLI's flags, not the API's fields.
    code, _, err = await run(skm, "keystore", "create", "nochecks")
    line = one_line_error(err)
    assert code == 1 and "--ip, --mac or --cert" in line and "ip4AuthUse" not in line
    await skm.keystore("s")
    code, _, err = await run(skm, "key", "create", "s", "k", "--type", "symmetric_key", "--rotation-days", "5")
    line = one_line_error(err)
    assert code == 1 and "--rotation-days must be 0" in line and "autoRotationPeriod" not in line
    code, out, err = await run(skm, "key", "create", "s", "k", "--type", "symmetric_key", "--json")
    assert code == 0 and json.loads(out)["keyType"] == "SYMMETRIC_KEY", err
    # --type takes any case and --help lists the choices.
    code, out, _ = await run(skm, "key", "create", "--help")
    assert "{SECRET,SYMMETRIC_KEY,ASYMMETRIC_KEY}" in out
    code, _, err = await run(skm, "key", "create", "1", "k", "--type", "bogus")
    assert code == 2 and "invalid choice: 'BOGUS'" in one_line_error(err)


async def test_a_closed_output_pipe_is_not_a_traceback(skm):
    for i in range(5):
        await skm.keystore(f"noise-{i}")
    # The reader is gone before the CLI writes a byte: every write fails with EPIPE (`skm audit export | head`).
    r, w = os.pipe()
    os.close(r)
    e = {**os.environ, "SKM_ADDR": skm.mgmt_url, "SKM_TOKEN": skm.init.token, "SKM_CACERT": str(skm.pki.ca_cert),
         "SKM_CONFIG": "/nonexistent"}
    try:
        p = await asyncio.create_subprocess_exec(*SKM, "audit", "export", stdin=asyncio.subprocess.DEVNULL,
                                                 stdout=w, stderr=asyncio.subprocess.PIPE, env=e)
    finally:
        os.close(w)
    _, err = await asyncio.wait_for(p.communicate(), 120)
    assert p.returncode == 141 and err.decode() == "", err.decode()


async def test_json_errors_and_confirmation(skm):
    store = await skm.keystore("apps")
    kid = (await skm.key(store, "SECRET", "pw", secretValue="hunter2-reveal-me"))["keyId"]
    # Under --json an error is one JSON object (stderr), and the exit code is in it.
    code, out, err = await run(skm, "key", "show", "0" * 32, "--json")
    doc = json.loads(err)
    assert code == 4 and out == "" and doc["error"]["exitCode"] == 4 and doc["error"]["status"] == 404
    code, out, err = await run(skm, "key", "list", "apps", "--bogus", "--json")
    assert code == 2 and json.loads(err)["error"]["kind"] == "usage"
    code, out, err = await run(skm, "keystore", "list", "--json", env={"SKM_ADDR": "http://x:1"})
    assert code == 2 and "https" in json.loads(err)["error"]["message"]
    code, out, err = await run(skm, "operator", "update", "admin", "--json")     # a command's own check
    assert code == 2 and "nothing to change" in json.loads(err)["error"]["message"]

    # key reveal: the value alone on stdout; audited; admins only.
    code, out, err = await run(skm, "key", "reveal", "apps/pw")
    assert code == 0 and out == "hunter2-reveal-me\n" and "audit" in err, err
    await skm.mgmt("POST", "/operators", json={"name": "viv", "role": "viewer"})
    viewer = await skm.rt.operators.issue_token(await skm.rt.operators.by_name("viv"), "t")
    code, out, err = await run(skm, "key", "reveal", kid, env={"SKM_TOKEN": viewer})
    assert code == 3 and "hunter2" not in out + err
    st, audit = await skm.mgmt("GET", "/audit?action=key.reveal")
    assert [(r["actor"], r["result"]) for r in audit["body"]["records"]] == [("admin", "ok"), ("viv", "denied")]

    # delete --now: refused from a script without --yes; asks on a terminal.
    await skm.mgmt("POST", f"/keys/{kid}/schedule-deletion")
    code, _, err = await run(skm, "key", "delete", kid, "--now")
    assert code == 2 and "add --yes" in one_line_error(err)
    code, _, err = await run(skm, "key", "delete", kid, "--now", tty=True, stdin="n\n")
    assert code == 1 and "cannot be undone. Continue? [y/N]" in err and "nothing was changed" in err
    assert "pw" in await _keys(skm)
    code, out, err = await run(skm, "key", "delete", kid, "--now", tty=True, stdin="y\n")
    assert code == 0 and "pw" not in await _keys(skm), err

    # Key store deletion: confirmation as above; refused while it holds keys; then gone.
    other = await skm.keystore("other")
    await skm.key(other, "SYMMETRIC_KEY", "k")
    code, _, err = await run(skm, "keystore", "delete", "other")
    assert code == 2 and "add --yes" in one_line_error(err)
    code, _, err = await run(skm, "keystore", "delete", "other", "--yes")
    assert code == 5 and "still holds 1 key:" in one_line_error(err)
    code, out, err = await run(skm, "keystore", "delete", "apps", tty=True, stdin="yes\n")
    assert code == 0 and "key store deleted" in out, err
    code, _, err = await run(skm, "keystore", "show", "apps")
    assert code == 4
    # On an approval store the deletion is a change request (exit 7, its id in the JSON).
    await skm.rt.operators.create("ann", "approver")     # no lineage: independent of the requesting admin
    guarded = await skm.keystore("guarded")
    await skm.mgmt("PATCH", f"/keystores/{guarded['keyStoreId']}", json={"approvalRequired": True})
    code, out, err = await run(skm, "keystore", "delete", "guarded", "--yes", "--json")
    pending = json.loads(out)
    assert code == 7 and pending["status"] == "PENDING", (out, err)
    st, cr = await skm.mgmt("GET", f"/approvals/{pending['changeRequestId']}")
    assert st == 200 and cr["body"]["operation"] == "keystore.delete"
