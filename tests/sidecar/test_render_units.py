"""Render pieces that need no server: the sandbox, key references, the change feed, the config shape."""
from __future__ import annotations

import asyncio

import pytest

from server.errors import ConfigError
from sidecar.keyref import KeyRef, KeyUnavailable
from sidecar.render_config import RenderConfig
from sidecar.settings import load_config
from sidecar.templates import Rendering, TemplateFailed, compile_template
from sidecar.watch import ChangeFeed

VALUE = "hunter2-very-secret"
KID = "0123456789abcdef0123456789abcdef"


async def lookup(kind: str, ref: KeyRef):
    if ref.text == "apps/missing":
        raise KeyUnavailable("apps/missing: no key named 'missing' in key store 'apps'", definitive=True)
    return KID, VALUE, 3


@pytest.mark.parametrize("text", [
    "{{ secret.__globals__ }}",                       # the sandbox: no Python internals
    "{{ secret('a/b').__class__.__mro__ }}",
    "{{ {}[secret('a/b')] }}",                        # jinja's own message would name the missing key (the value)
    "{{ secret('a/b') ~ nope }}",                     # StrictUndefined: a typo is an error, not ""
    "{{ secret('a/b') + 1 }}",
    "{{ secret(42) }}",
])
async def test_template_errors_never_carry_a_value(text):
    with pytest.raises(TemplateFailed) as e:
        await Rendering(lookup).render(compile_template(text))
    msg = str(e.value)
    assert VALUE not in msg and VALUE.upper() not in msg
    assert "line 1" in msg or "secret():" in msg


async def test_a_rendering_fetches_each_key_once_and_records_versions():
    calls = []

    async def counting(kind, ref):
        calls.append((kind, ref.text))
        return await lookup(kind, ref)

    r = Rendering(counting)
    out = await r.render(compile_template("{{ secret('a/b') }}:{{ secret('a/b') | upper }}\n"))
    assert out == f"{VALUE}:{VALUE.upper()}\n" and calls == [("secret", "a/b")]
    assert r.used == {"a/b": (KID, 3)}
    with pytest.raises(TemplateFailed) as e:
        await Rendering(lookup).render(compile_template("x={{ secret('apps/missing') }}"))
    assert e.value.definitive and "no key named 'missing'" in str(e.value)


def test_key_references():
    assert KeyRef.parse(KID).key_id == KID
    r = KeyRef.parse("payments/db/password")
    assert (r.store, r.name) == ("payments", "db/password")      # the first '/' splits
    for bad in ("", "nostore", "/x", "x/", "A" * 32, 7):
        with pytest.raises(ValueError):
            KeyRef.parse(bad)


async def test_change_feed_orders_and_forgets_safely():
    f = ChangeFeed(keep=3)
    start = f.seq
    f.publish("secret_updated", {"key_id": "a" * 32})
    f.publish("key_rotated", {"key_id": "b" * 32})
    assert f.since(start, frozenset({"a" * 32})) == ({"a" * 32}, False)
    assert f.since(start + 1, frozenset({"a" * 32})) == (set(), False)
    f.publish("auth_changed", {"keystore_id": 1})
    assert f.since(start + 2, frozenset({"c" * 32})) == (set(), True)        # access changed: anything may have
    f.publish("key_created", {"key_id": "c" * 32})
    assert f.since(start, frozenset({"a" * 32})) == (set(), True)            # fell out of the log: say so
    assert f.since(f.seq + 5, frozenset({"a" * 32})) == (set(), True)        # a number from a sidecar restart
    waiter = asyncio.ensure_future(f.wait(f.seq, frozenset({"d" * 32}), 5))
    await asyncio.sleep(0)
    f.publish("secret_updated", {"key_id": "e" * 32})                        # not ours: keeps waiting
    await asyncio.sleep(0)
    assert not waiter.done()
    f.publish("secret_updated", {"key_id": "d" * 32})
    assert await asyncio.wait_for(waiter, 2) == ({"d" * 32}, False)
    assert await f.wait(f.seq, frozenset({"d" * 32}), 0) == (set(), False)   # timeout 0: answers at once


def test_render_blocks_come_from_the_file_only(tmp_path):
    base = {"appkey": "App1", "upstream": {"cert": "/c.pem", "key": "/k.pem"}}
    d = tmp_path / "out"
    d.mkdir(mode=0o700)
    cfg = load_config(None, env={}, overrides={**base, "render": [{"template": "x", "destination": str(d / "f")}]})
    assert cfg.render == (RenderConfig(template="x", destination=str(d / "f")),)
    assert cfg.render[0].mode_bits() == 0o400
    with pytest.raises(ConfigError, match="must be a table"):
        load_config(None, env={"SKM_SIDECAR_RENDER": "x"}, overrides=base)
    with pytest.raises(ConfigError, match="two render blocks write"):
        load_config(None, env={}, overrides={**base, "render": [
            {"name": "a", "template": "x", "destination": str(d / "f")},
            {"name": "b", "template": "y", "destination": str(d / "f")}]})
    with pytest.raises(ConfigError, match="not a user on this host"):
        load_config(None, env={}, overrides={**base, "render": [
            {"template": "x", "destination": str(d / "f"), "owner": "no-such-user-here"}]})
    (tmp_path / "t.tmpl").write_text("{{ secret('a/b') }}")
    (tmp_path / "t.tmpl").chmod(0o666)
    with pytest.raises(ConfigError, match="writable by others"):
        load_config(None, env={}, overrides={**base, "render": [
            {"template_file": str(tmp_path / "t.tmpl"), "destination": str(d / "f")}]})
