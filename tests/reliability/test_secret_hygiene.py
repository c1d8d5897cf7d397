"""The final check: no secret value or key material created during the run appears in any log
line, audit record, test output, database or system-key file (runs last: see conftest.py).

It makes its own traffic first, so it means something when run alone: secrets in
failing requests (bad JSON around a secret, a secret too long for its field, a secret
sent to a key that does not exist), a v1.2 access-key secret, an exported key.

Every make target runs this module last (`-m sweep` joins it to `make test-long`, its path
to `make test-postgres`; tests/support/hygiene_plugin.py orders it after everything else and
keeps the captured output of every test in the session, whatever its directory), so the soak,
the floods, the long fuzz, the compose bring-up (its containers' logs, the demo's token and
passwords) and the PostgreSQL runs (every `skm` harness server harvested before it stops, and
the cluster's log) are grepped too.
"""
from __future__ import annotations

import secrets

import pytest

from tests.access.helpers import access_key, v12_headers

pytestmark = pytest.mark.sweep


def test_the_sweeps_own_repr_holds_no_needle():
    """pytest prints a failing test's fixtures: the sweep's record of secrets must not print them."""
    from tests.support.hygiene import Hygiene
    h = Hygiene()
    value = "repr-" + secrets.token_hex(16)
    h.secret(value, "repr probe")
    h.text("probe output", "some text " + value)
    assert value not in repr(h) and value.encode().hex() not in repr(h)
    assert "1 needles" in repr(h)


def test_the_sweep_finds_each_form_and_respects_where_a_value_belongs(tmp_path):
    """The sweep's own positive control: raw bytes with a newline and a NUL inside, base64 inside binary,
    a value in captured output, a value inside a longer planted one; and a root key in its own file only."""
    import base64

    from tests.support.hygiene import Hygiene
    h = Hygiene()
    raw = b"\x00key\nmaterial-" + secrets.token_bytes(24)
    text = "value-" + secrets.token_hex(12)
    inner = "inner-" + secrets.token_hex(8)
    root = secrets.token_bytes(32)
    h.secret(raw, "raw key")
    h.secret(text, "text secret")
    h.secret(inner, "inner secret")
    h.secret(root, "root key", allowed_in=(tmp_path / "root.key",))
    (tmp_path / "db").write_bytes(b"\x01" * 1000 + raw + b"\xff" * 1000)
    (tmp_path / "wal").write_bytes(b"page " + base64.b64encode(root) + b" " + ("outer-" + inner + "-outer").encode())
    (tmp_path / "root.key").write_bytes(root)
    (tmp_path / "clean").write_bytes(secrets.token_bytes(4096))
    h.path(tmp_path)
    h.text("captured stdout", "line one\n" + text + "\n")
    found, stats = h.scan()
    assert found == ["inner secret found in " + str(tmp_path / "wal"), "raw key found in " + str(tmp_path / "db"),
                     "root key found in " + str(tmp_path / "wal"), "text secret found in captured stdout"]
    assert stats["files"] == 4


async def test_own_traffic_with_secrets_in_failing_requests(tracked, hygiene):
    await own_traffic(tracked, hygiene)


async def own_traffic(skm, hygiene) -> None:
    value = "hygiene-" + secrets.token_hex(16)
    hygiene.secret(value, "hygiene secret value")
    store = await skm.keystore("hygiene")
    kid = (await skm.key(store, "SECRET", "h", secretValue=value))["keyId"]
    sym = (await skm.key(store, "SYMMETRIC_KEY", "hs", exportable=True))["keyId"]
    st, out = await skm.client("GET", f"/secrets/{kid}")
    assert st == 200 and out["body"]["secret"] == value
    st, out = await skm.client("GET", f"/symmetric-keys/{sym}/symmetric-key")
    assert st == 200
    # Requests that fail while carrying secrets: none of them may echo or log the value.
    other = "hygiene-fail-" + secrets.token_hex(16)
    hygiene.secret(other, "hygiene secret in failing requests")
    s = skm._default()
    for body, ctype in (('{"secretValue": "' + other + '"', "application/json"),        # broken JSON
                        ('{"secretValue": ["' + other + '"]}', "application/json"),     # wrong type
                        ('{"secretValue": "' + other + '"}', "text/plain")):            # wrong content type
        async with s.put(skm.client_path(f"/secrets/{kid}", "v1.2"), data=body.encode(),
                         headers={"Content-Type": ctype}) as r:
            assert 400 <= r.status < 500
            assert other not in await r.text()
    st, out = await skm.mgmt("POST", f"/keystores/{store['keyStoreId']}/keys",
                             json={"keyType": "SECRET", "name": "h2", "secretValue": other, "bogus": other})
    assert st == 400 and other not in str(out)
    st, out = await skm.mgmt("POST", f"/keys/{'0' * 32}/rotate", json={"secretValue": other})
    assert st == 404 and other not in str(out)
    st, out = await skm.client("POST", f"/symmetric-keys/{sym}/decrypt", json={"ciphertext": other})
    assert st == 400 and other not in str(out)
    key_id, secret = await access_key(skm)
    hygiene.secret(secret, "hygiene access key secret")
    st, out = await skm.client("PUT", f"/secrets/{kid}", version="v1.2", headers=v12_headers(key_id, secret),
                               json={"secretValue": other + "-new"})
    assert st == 200
    hygiene.secret(other + "-new", "hygiene rotated value")
    st, _ = await skm.client("GET", f"/secrets/{kid}", version="v1.2", headers=v12_headers(key_id, secret[:-2] + "xx"))
    assert st == 401


async def test_no_secret_anywhere(skm, hygiene, numbers, capfd):
    if not hygiene.harvested_servers:
        # Run alone (nothing before it registered a server): make, harvest and keep traffic of its own.
        hygiene.secret(skm.init.token, "harness operator token")
        await own_traffic(skm, hygiene)
        out, err = capfd.readouterr()
        hygiene.text("test_no_secret_anywhere [own traffic output]", out + err)
        await hygiene.harvest(skm.server.config, f"harness {skm.tmp.name}")
    findings, stats = hygiene.scan()
    numbers.add("hygiene", f"{stats['needles']} secrets and key materials from {stats['servers']} servers, grepped "
                           f"in {stats['texts']} captured outputs/row dumps and {stats['files']} files "
                           f"({stats['bytes'] // 1024} KiB): {len(findings)} found")
    if hygiene.unharvested:
        numbers.add("hygiene", f"{len(hygiene.unharvested)} servers left unreadable by their tests, not harvested: "
                               + "; ".join(hygiene.unharvested[:10]))
    assert stats["needles"] > 0 and stats["servers"] > 0
    assert not findings, "\n".join(sorted(set(findings))[:50])

