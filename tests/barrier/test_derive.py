"""Barrier.derive: purpose keys from a system-key version (HKDF), without keeping the system key itself."""
from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from server.barrier.barrier import Barrier
from server.errors import BarrierError, Sealed


def test_purpose_keys_are_hkdf_of_the_version_and_independent():
    k1, k2 = os.urandom(32), os.urandom(32)
    b = Barrier()
    b.unseal({1: k1, 2: k2}, 2)
    v, key = b.derive(b"skm backup mac v1:abc")
    assert v == 2 and len(key) == 32
    # Standard HKDF-SHA256 (RFC 5869): anyone holding the system key can check it independently.
    expected = HKDF(hashes.SHA256(), 32, salt=b"skm barrier derive v1", info=b"skm backup mac v1:abc").derive(k2)
    assert key == expected
    assert b.derive(b"skm backup mac v1:abc", 1)[1] != key                  # another version, another key
    assert b.derive(b"another purpose")[1] != key                           # another purpose, another key
    assert b.derive(b"skm backup mac v1:abc", 2) == (2, key)                # stable


def test_only_versions_in_the_keyring_derive_and_a_sealed_barrier_none():
    b = Barrier()
    with pytest.raises(Sealed):
        b.derive(b"x")
    k1 = os.urandom(32)
    b.unseal({1: k1}, 1)
    b.add_version(2, os.urandom(32))
    old = b.derive(b"x", 1)
    b.retire(1)
    with pytest.raises(BarrierError, match="version 1 is not in this server's keyring"):
        b.derive(b"x", 1)
    with pytest.raises(BarrierError, match="version 7"):
        b.derive(b"x", 7)
    assert old[0] == 1
    b.seal_now("test")
    with pytest.raises(Sealed):
        b.derive(b"x", 2)


def test_the_barrier_keeps_no_raw_system_key_bytes():
    k = os.urandom(32)
    b = Barrier()
    b.unseal({1: k}, 1)
    b.derive(b"x")
    held = [v for v in vars(b).values()]
    flat = []
    for v in held:
        flat += list(v.values()) if isinstance(v, dict) else [v]
    assert all(not (isinstance(x, (bytes, bytearray)) and k in bytes(x)) for x in flat)
