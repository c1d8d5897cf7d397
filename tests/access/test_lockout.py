"""Login lockout per (operator name, source address), with a per-name ceiling, from real loopback
addresses (127.0.0.1 .. 127.0.0.4 are all this host: each is a different source to the server)."""
from __future__ import annotations

import dataclasses

import aiohttp

from server.access.operators import login_source

PW = "correct horse battery staple"


def _policy(skm, **changes) -> None:
    s = dataclasses.replace(skm.rt.operators.settings, argon2_memory_kib=8192, argon2_time_cost=1, **changes)
    skm.rt.operators.configure(s)


async def _login_from(skm, source: str, name: str, password: str) -> tuple[int, dict]:
    conn = aiohttp.TCPConnector(ssl=skm.ssl(), local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.post(f"{skm.mgmt_url}/api/v1/login", json={"name": name, "password": password}) as r:
            return r.status, await r.json()


async def test_failures_from_one_address_do_not_lock_out_another(skm):
    _policy(skm, max_failures=3, lockout_seconds=600, max_failures_per_name=100)
    await skm.mgmt("POST", "/operators", json={"name": "boss", "role": "admin", "password": PW})
    attacker = [await _login_from(skm, "127.0.0.2", "boss", "not the password") for _ in range(4)]
    assert [st for st, _ in attacker] == [401, 401, 429, 429]
    st, out = await _login_from(skm, "127.0.0.2", "boss", PW)
    assert st == 429 and "try again" in out["header"]["resultDetail"]      # locked there, even the right one
    # The operator, from an address that never failed, logs in as usual.
    st, out = await _login_from(skm, "127.0.0.1", "boss", PW)
    assert st == 200 and out["body"]["operator"] == "boss", out
    st, desc = await skm.mgmt("GET", "/operators/boss")
    assert desc["body"]["locked"] is True                   # an admin sees a lock exists somewhere
    st, _ = await skm.mgmt("PATCH", "/operators/boss", json={"unlock": True})
    assert (await _login_from(skm, "127.0.0.2", "boss", PW))[0] == 200
    # Unknown names behave the same way per address, so a lockout tells nothing about which names exist.
    ghost = [await _login_from(skm, "127.0.0.2", "ghost", "not the password") for _ in range(3)]
    assert [st for st, _ in ghost] == [401, 401, 429]
    assert ghost[2][1]["header"] == attacker[2][1]["header"]
    assert (await _login_from(skm, "127.0.0.1", "ghost", "not the password"))[0] == 401


async def test_a_ceiling_per_name_stops_many_addresses_but_not_a_known_one(skm):
    _policy(skm, max_failures=3, lockout_seconds=600, max_failures_per_name=4)
    await skm.mgmt("POST", "/operators", json={"name": "boss", "role": "admin", "password": PW})
    assert (await _login_from(skm, "127.0.0.1", "boss", PW))[0] == 200            # a known address
    statuses = [(await _login_from(skm, src, "boss", "guess-guess-guess"))[0]
                for src in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3")]
    assert statuses == [401, 401, 401, 401]
    # Four failures from all addresses: the ceiling. A new address is refused, even with the password.
    st, out = await _login_from(skm, "127.0.0.4", "boss", PW)
    assert st == 429 and "addresses it has logged in from before" in out["header"]["resultDetail"], out
    # The address the operator used before still works.
    st, out = await _login_from(skm, "127.0.0.1", "boss", PW)
    assert st == 200, out
    # The same ceiling for a name that does not exist.
    ghost = [(await _login_from(skm, src, "ghost", "guess-guess-guess"))[0]
             for src in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3", "127.0.0.4")]
    assert ghost == [401, 401, 401, 401, 429]
    # An admin's unlock lifts the ceiling.
    st, _ = await skm.mgmt("PATCH", "/operators/boss", json={"unlock": True})
    assert (await _login_from(skm, "127.0.0.4", "boss", PW))[0] == 200


def test_login_sources():
    assert login_source("127.0.0.2") == "127.0.0.2"
    assert login_source("::ffff:10.1.2.3") == "10.1.2.3"
    # An IPv6 host holds a /64: one source, so fresh addresses in it give no fresh budget.
    assert login_source("2001:db8:1:2::5") == login_source("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert login_source("fe80::1%eth0") == "fe80::/64"
    assert login_source("") == "-"
