"""Fixtures: a key server (the `skm` harness) with a cert-auth key store, and a sidecar in front of it."""
from __future__ import annotations

import asyncio
import time

import pytest

from server.events import Event
from tests.support.sidecar import register_certificate, start_sidecar


@pytest.fixture
async def store(skm):
    # IPv4 (loopback) AND the sidecar's host certificate.
    return await skm.keystore("apps", certificateAuthUse="Y")


@pytest.fixture
async def make_sidecar(skm, store):
    made = []

    async def make(name: str = "sidecar", register: bool = True, **overrides):
        sc, host = await start_sidecar(skm, name, **overrides)
        made.append(sc)
        if register:
            await register_certificate(skm.rt.storage, skm.rt.barrier, store["keyStoreId"], host, name)
            # What the certificate API does after a change: the data plane drops the store's cached auth data
            # (a second sidecar's certificate must not wait for that cache to expire).
            await skm.rt.events.publish(Event(store["keyStoreId"], "auth_changed"))
            if sc.events is not None:
                # Reads before the stream's hello would be marked expired by it: start from a steady state.
                end = time.monotonic() + 5
                while sc.events.state != "connected":
                    assert time.monotonic() < end, sc.events.status()
                    await asyncio.sleep(0.02)
        return sc

    yield make
    for sc in made:
        await sc.stop()
