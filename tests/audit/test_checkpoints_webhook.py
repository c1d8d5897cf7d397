"""The webhook checkpoint sink (`[audit] checkpoint_url`) and time-driven checkpoints
(`[audit] checkpoint_interval`), against a real aiohttp receiver on 127.0.0.1 (HTTPS with a private CA,
and plain HTTP on loopback).

Each checkpoint that arrives is signed by the key `skm audit pubkey` prints and names the chain's head
as the database holds it; a server start, `checkpoint_every` records, `checkpoint_interval` seconds and
a clean stop each send one. Waiting is for the condition, with a deadline."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import ssl
from pathlib import Path
from typing import Callable

from aiohttp import web

from server.access.pki import CA, cert_pem, key_pem, write_pem
from server.audit.checkpoints import load_pub_pem, signed_by
from tests.support.cli import skm_cli
from tests.support.loopback import serve
from tests.support.server import start_harness

DEADLINE = 30.0


class Receiver:
    """A webhook endpoint that keeps every JSON body it is sent."""

    def __init__(self) -> None:
        self.got: list[dict] = []
        self.cond = asyncio.Condition()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.json()
        async with self.cond:
            self.got.append(body)
            self.cond.notify_all()
        return web.json_response({"ok": True})

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> "Receiver":
        app = web.Application()
        app.router.add_post("/checkpoints", self._post)
        self.runner, port = await serve(app, ssl_context)
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}/checkpoints"
        return self

    async def wait(self, pred: Callable[[list[dict]], bool], what: str) -> list[dict]:
        async with self.cond:
            try:
                await asyncio.wait_for(self.cond.wait_for(lambda: pred(self.got)), DEADLINE)
            except asyncio.TimeoutError:
                raise AssertionError(f"no {what} within {DEADLINE} s; got {[kinds(self.got)]}") from None
        return list(self.got)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def kinds(got: list[dict]) -> list[str]:
    return [g["checkpoint"]["kind"] for g in got]


def _tls(tmp: Path) -> tuple[ssl.SSLContext, Path]:
    ca = CA.create("webhook test CA")
    cert, key = ca.issue("127.0.0.1", server=True, ips=["127.0.0.1"])
    ca_pem, cp, kp = tmp / "hook-ca.pem", tmp / "hook.pem", tmp / "hook-key.pem"
    write_pem(ca_pem, cert_pem(ca.cert), private=False)
    write_pem(cp, cert_pem(cert), private=False)
    write_pem(kp, key_pem(key), private=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cp, kp)
    return ctx, ca_pem


async def _traffic(h, n: int) -> None:
    store = await h.keystore("hooked")
    key = await h.key(store, "SECRET", "pw", secretValue="webhook-checkpoint-value")
    for _ in range(n):
        assert (await h.client("GET", f"/secrets/{key['keyId']}"))[0] == 200


def _digest_at(db_file: Path, seq: int) -> str:
    con = sqlite3.connect(db_file)
    try:
        return con.execute("SELECT hash FROM audit_log WHERE seq = ?", (seq,)).fetchone()[0]
    finally:
        con.close()


async def test_the_webhook_receives_signed_start_periodic_and_final_checkpoints(tmp_path):
    ctx, ca_pem = _tls(tmp_path)
    hook = await Receiver().start(ctx)
    h = await start_harness(tmp_path, audit={"checkpoint_url": hook.url, "checkpoint_url_ca": str(ca_pem),
                                             "checkpoint_every": 5, "checkpoint_interval": 3600})
    try:
        await hook.wait(lambda g: "start" in kinds(g), "start checkpoint")
        await _traffic(h, 8)
        head = await h.rt.storage.fetchval("SELECT seq FROM audit_head WHERE id = 1")
        # By count (every 5 records; the interval is an hour): a periodic checkpoint close to the head.
        await hook.wait(lambda g: any(c["checkpoint"]["kind"] == "periodic" and c["checkpoint"]["seq"] >= head - 5
                                      for c in g), "periodic checkpoint by count")
        code, pem, err = await skm_cli(h, "audit", "pubkey")
        assert code == 0, err
        db_file = h.server.config.data_path / "skm.db"
    finally:
        await h.close()
    got = await hook.wait(lambda g: "final" in kinds(g), "final checkpoint at stop")
    await hook.close()
    pub = load_pub_pem(pem)
    assert got and all(signed_by(e, pub) for e in got), got
    assert kinds(got)[0] == "start" and kinds(got)[-1] == "final", kinds(got)
    assert len({e["checkpoint"]["epoch"] for e in got}) == 1
    # Each names the head the database held: its digest is the record's at that seq.
    for e in got:
        c = e["checkpoint"]
        if c["seq"]:
            assert _digest_at(db_file, c["seq"]) == c["digest"], c
    # A forged body (one field changed) does not verify under the key.
    forged = json.loads(json.dumps(got[-1]))
    forged["checkpoint"]["seq"] += 1
    assert not signed_by(forged, pub)


async def test_checkpoint_interval_signs_by_time_with_few_records(tmp_path):
    hook = await Receiver().start()             # plain HTTP: allowed on loopback only
    h = await start_harness(tmp_path, audit={"checkpoint_url": hook.url, "checkpoint_every": 1_000_000,
                                             "checkpoint_interval": 0.2})
    try:
        got = await hook.wait(lambda g: "start" in kinds(g), "start checkpoint")
        start_seq = got[0]["checkpoint"]["seq"]
        await _traffic(h, 1)                    # a handful of records, far fewer than checkpoint_every
        head = await h.rt.storage.fetchval("SELECT seq FROM audit_head WHERE id = 1")
        assert head - start_seq < 100
        got = await hook.wait(lambda g: any(c["checkpoint"]["kind"] == "periodic" and c["checkpoint"]["seq"] >= head
                                            for c in g), "periodic checkpoint by time")
        periodic = [c for c in got if c["checkpoint"]["kind"] == "periodic"]
        # Only when the head moved: no two periodic checkpoints of the same head.
        seqs = [c["checkpoint"]["seq"] for c in periodic]
        assert len(seqs) == len(set(seqs)), seqs
        code, pem, err = await skm_cli(h, "audit", "pubkey")
        assert code == 0, err
        assert all(signed_by(e, load_pub_pem(pem)) for e in got)
    finally:
        await h.close()
        await hook.close()


async def _until(cond: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not cond():
        assert loop.time() < end, f"{what} not within {DEADLINE} s"
        await asyncio.sleep(0.02)


async def test_the_start_checkpoint_is_retried_until_a_sink_takes_it(tmp_path):
    """verify relies on every epoch's log beginning with a start checkpoint, so a start no sink took is
    tried again (and no periodic checkpoint goes out before it)."""
    blocker = tmp_path / "cps"
    blocker.write_text("a file where the checkpoint directory should be")
    h = await start_harness(tmp_path, audit={"checkpoint_file": str(blocker / "audit.jsonl"),
                                             "checkpoint_interval": 0.1})
    try:
        cp = h.rt.audit.checkpointer
        await _until(lambda: cp.failed >= 2, "two failed start attempts")
        assert not cp._started
        blocker.unlink()
        await _until(lambda: cp._started, "the start checkpoint stored")
        lines = [json.loads(x) for x in (blocker / "audit.jsonl").read_text().splitlines()]
        assert lines[0]["checkpoint"]["kind"] == "start", lines
        code, out, err = await skm_cli(h, "audit", "verify")
        assert code == 0 and "intact" in out, out + err
    finally:
        await h.close()
