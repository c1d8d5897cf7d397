"""Barrier.on_change: what watches the barrier (metrics, the audit checkpointer) hears every opening and
sealing, and a watcher that fails cannot make an unseal that happened look failed to its caller."""
from __future__ import annotations

import os

from server.barrier.barrier import Barrier


def test_observers_hear_open_and_seal_and_a_failing_one_changes_nothing():
    b = Barrier()
    heard: list[bool] = []

    def broken() -> None:
        raise RuntimeError("observer bug")
    b.on_change += [broken, lambda: heard.append(b.sealed)]
    b.unseal({1: os.urandom(32)}, 1)            # does not raise
    assert not b.sealed and b.open(b.seal(b"x", b"aad"), b"aad") == b"x"
    b.add_version(2, os.urandom(32))
    b.seal_now("test")
    assert heard == [False, False, True]
