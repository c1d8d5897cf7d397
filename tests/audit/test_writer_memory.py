"""The audit writer's group commits keep SQLite's compiled statements bounded whatever the batch sizes.

A batch once became one multi-row INSERT per batch size; Python's sqlite3 keeps 128 compiled statements
per connection with no bound on their size (~1 MiB for 256 records), so the key server's RSS grew with
every new batch size the load produced: the soak's +30 % after warm-up (issue 18)."""
from __future__ import annotations

from server.audit import verify_chain
from tests.support.audit_writer import sqlite_audit
from tests.support.sqlite_memory import statement_bytes

SIZES = range(256, 0, -3)          # 86 distinct batch sizes up to the default batch_max, largest first


async def test_batches_of_every_size_keep_statement_memory_flat(tmp_path):
    async with sqlite_audit(tmp_path) as (storage, audit):
        assert audit.settings.batch_max >= max(SIZES)
        await audit.append({"plane": "system", "actor": "t", "actor_kind": "system", "action": "test.warm", "result": "ok"})
        before = statement_bytes(storage)
        written = 0
        for n in SIZES:
            seqs = await audit.append_many([{"plane": "system", "actor": "t", "actor_kind": "system", "action": "test.batch",
                                             "result": "ok", "detail": {"n": n, "i": i}} for i in range(n)])
            assert seqs == sorted(seqs) and len(set(seqs)) == n
            written += n
        grown = statement_bytes(storage) - before
        print(f"audit writer: {written} records in {len(SIZES)} batch sizes, compiled statements "
              f"{before / 1024:.0f} KiB -> +{grown / 1024:.0f} KiB")
        # One INSERT's plan is a few KiB; the 86 multi-row statements held ~27 MiB.
        assert grown < 256 * 1024, f"compiled statements grew {grown / 2**20:.1f} MiB"
        assert await storage.fetchval("SELECT COUNT(*) FROM audit_log WHERE action = 'test.batch'") == written
        # The keyed chain (no server here, so no checkpoint was ever signed: `audit.verify()` would
        # rightly answer `unverified`).
        res = await verify_chain(storage, key=await audit.link_key())
        assert res.ok and res.keyed, res
        assert res.head_seq == written + 1
