"""The key server's event stream (server/api/client/event_routes.py): who gets it, what it carries."""
from __future__ import annotations

import asyncio
import json

from server.events import Event


async def next_event(resp, timeout: float = 3.0) -> tuple[str, dict | None, list[str]]:
    """Read one SSE event; returns (kind, data, comment lines seen before it)."""
    kind, data, comments = None, None, []
    while True:
        line = (await asyncio.wait_for(resp.content.readline(), timeout)).decode().rstrip("\n")
        if line.startswith(":"):
            comments.append(line)
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data = json.loads(line[5:])
        elif line == "" and kind is not None:
            return kind, data, comments


async def test_refused_without_a_client_certificate(skm):
    st, out = await skm.client("GET", "/events")
    assert st == 403 and out["header"]["resultMessage"] == "Certificate Auth Failure"
    assert "host certificate" in out["header"]["resultDetail"]


async def test_stream_carries_this_projects_changes_only_with_heartbeats(skm):
    skm.rt.extra["sse_heartbeat"] = 0.3
    store = await skm.keystore("mine")
    key = await skm.key(store, "SECRET", "db", secretValue="v0")
    # Another project's store on the same server.
    rt = skm.rt
    other = await rt.keys.create_project("other")
    other_store = await rt.keys.create_keystore(other.id, "theirs", ip4_auth=True, actor="test")

    cert, k = skm.client_cert("sidecar-host")                    # issued by the server's CA
    s = skm.session(cert, k)
    others = set(rt.events._subs)                                # in-process caches subscribe too
    async with s.get(skm.client_path("/events")) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        assert (await next_event(resp))[0] == "hello"

        await rt.events.publish(Event(other_store.id, "secret_updated", "f" * 32, 1))     # not ours: filtered
        st, _ = await skm.mgmt("POST", f"/keys/{key['keyId']}/rotate", json={"secretValue": "v1"})
        assert st == 200
        kind, data, _ = await next_event(resp)
        assert kind == "secret_updated"
        assert data == {"keystore_id": store["keyStoreId"], "kind": "secret_updated", "key_id": key["keyId"],
                        "version": 1}
        assert "v1" not in json.dumps(data)                      # never a value

        # A store created after subscribing is still this project's.
        late = await skm.keystore("late")                          # its loopback entry admits this caller
        kind, data, _ = await next_event(resp)
        assert kind == "auth_changed" and data["keystore_id"] == late["keyStoreId"]
        await skm.key(late, "SYMMETRIC_KEY", "aes")
        kind, data, _ = await next_event(resp)
        assert kind == "key_created" and data["keystore_id"] == late["keyStoreId"]

        # Quiet: heartbeats keep the connection (and the sidecar's read timeout) alive.
        rt.events.deliver(Event(0, "reset"))
        await asyncio.sleep(0.7)
        kind, _, comments = await next_event(resp)
        assert kind == "reset"
        await rt.events.publish(Event(store["keyStoreId"], "auth_changed"))
        kind, _, comments = await next_event(resp)
        assert kind == "auth_changed" and ": ping" in comments
    # The stream's subscription is gone once the client leaves.
    for _ in range(50):
        if rt.events._subs <= others:
            break
        await asyncio.sleep(0.05)
    assert rt.events._subs <= others
