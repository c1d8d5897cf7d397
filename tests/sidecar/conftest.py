"""Fixtures: a key server (the `skm` harness) with a cert-auth key store, and a sidecar in front of it."""
from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.sidecar import start_registered_sidecar, start_sidecar


@pytest.fixture
async def store(skm):
    # IPv4 (loopback) AND the sidecar's host certificate.
    return await skm.keystore("apps", certificateAuthUse="Y")


@pytest.fixture
async def make_sidecar(skm, store):
    made = []

    async def make(name: str = "sidecar", register: bool = True, **overrides):
        if not register:
            sc, _host = await start_sidecar(skm, name, **overrides)
            made.append(sc)
            return sc
        # Registered (and the server told) before the sidecar starts: its event stream then never sees the
        # registration's event, which would empty its cache after a test's first read.
        sc = await start_registered_sidecar(skm, store["keyStoreId"], name, **overrides)
        made.append(sc)
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
