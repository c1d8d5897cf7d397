"""Signed checkpoints of the audit chain, kept where the database's owner cannot rewrite them.

A checkpoint signs (epoch, head seq, head digest, time, keyed_from) with the checkpoint key: an
Ed25519 key made once per installation and sealed under the system key in
`audit_head.checkpoint_key_sealed`; its public key is what `skm audit pubkey` prints and what an
offline verifier is given. Because digests chain, one checkpoint pins every record before it.

Sinks: the system-key server's append-only log (it runs apart, with its own mTLS and allow-list),
a JSON-lines file (`[audit] checkpoint_file`, meant to live outside the data dir) and a webhook
(`[audit] checkpoint_url`, write-only). `verify` reads back from the first two.

The epoch names one continuous history of the chain. A restore from backup starts a new one
(`start_restored_epoch`); the epoch id is sealed in `audit_head.epoch_sealed`, so nobody without the
system key can start an epoch to hide a rollback.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from server import jsonlines, logs, timeutil

if TYPE_CHECKING:
    import aiohttp
from server.barrier.barrier import sealed_aad
from server.errors import ConfigError, InvalidRequest

log = logs.get("skm.audit.checkpoints")

CHECKPOINT_PATH = "/v1/audit/checkpoints"
KINDS = ("start", "periodic", "restore", "final")
MAX_ENTRY_BYTES = 4096
_KEY_AAD = sealed_aad("audit_head", "checkpoint_key_sealed", 1)
_EPOCH_AAD = sealed_aad("audit_head", "epoch_sealed", 1)


# ------------------------------------------------------------------ signing
def _canon(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode()


def pub_b64(pub: Ed25519PublicKey) -> str:
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def pub_pem(pub: Ed25519PublicKey) -> str:
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_pub_pem(text: str | bytes) -> Ed25519PublicKey:
    try:
        pub = serialization.load_pem_public_key(text.encode() if isinstance(text, str) else text)
    except ValueError:
        raise ConfigError("the checkpoint public key is not a PEM public key (get it with `skm audit pubkey`)") \
            from None
    if not isinstance(pub, Ed25519PublicKey):
        raise ConfigError("the checkpoint public key is not an Ed25519 key (get it with `skm audit pubkey`)")
    return pub


def sign(key: Ed25519PrivateKey, body: dict) -> dict:
    return {"checkpoint": body, "sig": base64.b64encode(key.sign(_canon(body))).decode(),
            "pub": pub_b64(key.public_key())}


def check_entry(entry: Any) -> dict:
    """Shape and signature of a signed checkpoint (under the key it names); InvalidRequest otherwise."""
    if not isinstance(entry, dict) or not isinstance(entry.get("checkpoint"), dict):
        raise InvalidRequest("a checkpoint is {checkpoint: {...}, sig, pub}")
    body = entry["checkpoint"]
    for f, t in (("epoch", str), ("seq", int), ("digest", str), ("at", str), ("kind", str)):
        if not isinstance(body.get(f), t):
            raise InvalidRequest(f"a checkpoint's {f} is missing or of the wrong type")
    if body["kind"] not in KINDS:
        raise InvalidRequest(f"a checkpoint's kind is one of {', '.join(KINDS)}")
    try:
        pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(entry["pub"], validate=True))
        pub.verify(base64.b64decode(entry["sig"], validate=True), _canon(body))
    except (KeyError, TypeError, ValueError, InvalidSignature):
        raise InvalidRequest("the checkpoint's signature does not verify under the key it names") from None
    return entry


def signed_by(entry: dict, pub: Ed25519PublicKey) -> bool:
    try:
        if entry.get("pub") != pub_b64(pub):
            return False
        pub.verify(base64.b64decode(entry["sig"], validate=True), _canon(entry["checkpoint"]))
        return True
    except (KeyError, TypeError, ValueError, InvalidSignature):
        return False


# ------------------------------------------------------------- keys, epoch
async def checkpoint_key(db, barrier) -> Ed25519PrivateKey:
    """The installation's checkpoint key: made and sealed on first use (compare-and-set across replicas).

    The epoch is made first: a key without an epoch is then never a state the server leaves behind, so
    `epoch` can refuse to make a new epoch once a key exists (an insider blanking the epoch to start a
    fresh history is reported instead of followed)."""
    row = await db.fetchone("SELECT checkpoint_key_sealed FROM audit_head WHERE id = 1")
    if row is not None and row["checkpoint_key_sealed"] is None:
        await epoch(db, barrier)
        raw = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw,
                                                         serialization.PrivateFormat.Raw,
                                                         serialization.NoEncryption())
        await db.execute("UPDATE audit_head SET checkpoint_key_sealed = ? WHERE id = 1 "
                         "AND checkpoint_key_sealed IS NULL", barrier.seal(raw, _KEY_AAD))
        row = await db.fetchone("SELECT checkpoint_key_sealed FROM audit_head WHERE id = 1")
    return Ed25519PrivateKey.from_private_bytes(barrier.open(bytes(row["checkpoint_key_sealed"]), _KEY_AAD))


async def epoch(db, barrier) -> str:
    """The chain's current epoch, made on first use; refused when its seal does not open to it."""
    row = await db.fetchone("SELECT epoch, epoch_sealed, checkpoint_key_sealed FROM audit_head WHERE id = 1")
    if row["epoch"] is None:
        if row["checkpoint_key_sealed"] is not None:
            raise EpochForged(None)
        new = secrets.token_hex(8)
        await db.execute("UPDATE audit_head SET epoch = ?, epoch_sealed = ? WHERE id = 1 AND epoch IS NULL",
                         new, barrier.seal(new.encode(), _EPOCH_AAD))
        row = await db.fetchone("SELECT epoch, epoch_sealed FROM audit_head WHERE id = 1")
    return check_epoch(row, barrier)


def check_epoch(row, barrier) -> str:
    from server.errors import BarrierError
    try:
        sealed = barrier.open(bytes(row["epoch_sealed"]), _EPOCH_AAD).decode() if row["epoch_sealed"] else None
    except BarrierError:
        sealed = None
    if sealed != row["epoch"]:
        raise EpochForged(row["epoch"])
    return row["epoch"]


class EpochForged(Exception):
    def __init__(self, value: str | None) -> None:
        if value is None:
            super().__init__("the audit epoch was removed although checkpoints were signed (audit_head was edited "
                             "to start a new history)")
        else:
            super().__init__(f"the audit epoch {value!r} is not sealed by this installation's system key "
                             "(audit_head was edited)")


async def read_epoch(db, barrier) -> str | None:
    """The current epoch, read only (None: no checkpoint was ever signed); EpochForged when tampered with."""
    row = await db.fetchone("SELECT epoch, epoch_sealed, checkpoint_key_sealed FROM audit_head WHERE id = 1")
    if row is None:
        return None
    if row["epoch"] is None:
        if row["checkpoint_key_sealed"] is not None:
            raise EpochForged(None)
        return None
    return check_epoch(row, barrier)


async def read_public_key(db, barrier) -> Ed25519PublicKey | None:
    """The checkpoint public key, read only (None: no checkpoint key was made yet)."""
    row = await db.fetchone("SELECT checkpoint_key_sealed FROM audit_head WHERE id = 1")
    if row is None or row["checkpoint_key_sealed"] is None:
        return None
    return Ed25519PrivateKey.from_private_bytes(
        barrier.open(bytes(row["checkpoint_key_sealed"]), _KEY_AAD)).public_key()


async def start_restored_epoch(db, barrier, *, restored_from: dict) -> str:
    """After a restore: a new epoch (sealed), announced by a `restore` checkpoint at the next start.

    `restored_from` names what was restored (backup id, its audit head); it goes into that checkpoint."""
    row = await db.fetchone("SELECT epoch FROM audit_head WHERE id = 1")
    new = secrets.token_hex(8)
    note = json.dumps({"prevEpoch": row["epoch"] if row else None, "restoredAt": timeutil.now_db(),
                       **{k: v for k, v in restored_from.items() if isinstance(v, (str, int))}},
                      separators=(",", ":"), sort_keys=True)
    await db.execute("UPDATE audit_head SET epoch = ?, epoch_sealed = ?, restore_note = ? WHERE id = 1",
                     new, barrier.seal(new.encode(), _EPOCH_AAD), note)
    return new


# ------------------------------------------------------------------- sinks
class FileSink:
    name = "file"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def _append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        jsonlines.append(self.path, entry)

    async def send(self, entry: dict) -> None:
        await asyncio.to_thread(self._append, entry)

    async def load(self) -> list[dict]:
        return await asyncio.to_thread(jsonlines.read, self.path)


class WebhookSink:
    name = "webhook"

    def __init__(self, url: str, ca: str = "", timeout: float = 5.0) -> None:
        if not url.startswith(("https://", "http://127.", "http://localhost", "http://[::1]")):
            raise ConfigError("[audit] checkpoint_url must be https:// (or http:// on loopback)")
        self.url, self.ca, self.timeout = url, ca, timeout
        self._ssl: ssl.SSLContext | None = None

    async def send(self, entry: dict) -> None:
        import aiohttp      # (here: offline tools that check chains start without it)
        if self._ssl is None and self.url.startswith("https://"):
            self._ssl = ssl.create_default_context(cafile=self.ca or None)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            async with s.post(self.url, json=entry, ssl=self._ssl if self._ssl else None) as r:
                if r.status >= 300:
                    raise SinkError(f"the checkpoint webhook answered HTTP {r.status}")

    async def load(self) -> None:
        return None     # write-only


class SystemKeySink:
    name = "systemkey"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.urls = tuple(u.rstrip("/") for u in cfg.urls)
        self._ssl: ssl.SSLContext | None = None

    async def _session(self) -> aiohttp.ClientSession:
        import aiohttp
        if self._ssl is None:
            from server.barrier.remote import client_ssl_context
            self._ssl = await asyncio.to_thread(client_ssl_context, self.cfg)
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
                                     connector=aiohttp.TCPConnector(ssl=self._ssl))

    async def send(self, entry: dict) -> None:
        import aiohttp
        errors = []
        async with await self._session() as s:
            for url in self.urls:      # every system-key server keeps its own copy
                try:
                    async with s.post(url + CHECKPOINT_PATH, json=entry) as r:
                        if r.status >= 300:
                            errors.append(f"{url}: HTTP {r.status}")
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                    errors.append(f"{url}: {type(e).__name__}")
        if len(errors) == len(self.urls):
            raise SinkError("no system-key server took the checkpoint: " + "; ".join(errors))

    async def load(self, pub: str | None = None) -> list[dict]:
        """Every server's copy; SinkError when none answered (an outage is not an empty log)."""
        import aiohttp
        out: list[dict] = []
        errors: list[str] = []
        async with await self._session() as s:
            for url in self.urls:
                try:
                    async with s.get(url + CHECKPOINT_PATH, params={"pub": pub} if pub else None) as r:
                        if r.status == 200:
                            out += (await r.json()).get("checkpoints", [])
                        else:
                            errors.append(f"{url}: HTTP {r.status}")
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
                    errors.append(f"{url}: {type(e).__name__}")
        if len(errors) == len(self.urls):
            raise SinkError("no system-key server answered: " + "; ".join(errors))
        return out


class SinkError(Exception):
    pass


def sinks_for(config, settings) -> list:
    out: list = []
    if settings.checkpoint_file:
        out.append(FileSink(settings.checkpoint_file))
    if settings.checkpoint_url:
        out.append(WebhookSink(settings.checkpoint_url, settings.checkpoint_url_ca))
    sk = getattr(config, "systemkey", None)
    if settings.checkpoint_systemkey and sk is not None and sk.source == "remote" and sk.urls:
        out.append(SystemKeySink(config.systemkey_client()))
    if not any(isinstance(s, (FileSink, SystemKeySink)) for s in out) and config is not None:
        # The embedded default: no system-key server, no file named. Keep them beside the data dir
        # (warned at start: the database's owner can rewrite this one).
        out.append(FileSink(Path(config.data_dir) / "audit-checkpoints.jsonl"))
    return out


# ------------------------------------------------------------- the emitter
@dataclass
class Checkpointer:
    """Signs the head every `every` records or `interval` seconds, and at start and clean stop."""
    audit: Any                      # server.audit.log.Audit
    sinks: list
    every: int = 1000
    interval: float = 60.0
    last_seq: int = -1
    last_at: float = 0.0
    sent: int = 0
    failed: int = 0
    last_error: str | None = None
    _task: asyncio.Task | None = None
    _started: bool = False
    _retry_at: float = 0.0
    stored: bool = False            # the last checkpoint reached at least one sink
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    announced: asyncio.Event = field(default_factory=asyncio.Event)     # the start checkpoint was tried

    async def emit(self, kind: str, extra: dict | None = None) -> dict | None:
        a = self.audit
        if a.barrier.sealed:
            return None
        key = await checkpoint_key(a.db, a.barrier)
        ep = await epoch(a.db, a.barrier)
        head = await a.db.fetchone("SELECT seq, hash, keyed_from FROM audit_head WHERE id = 1")
        body = {"v": 1, "epoch": ep, "seq": int(head["seq"]), "digest": head["hash"], "at": timeutil.now_db(),
                "keyedFrom": None if head["keyed_from"] is None else int(head["keyed_from"]), "kind": kind,
                **(extra or {})}
        entry = sign(key, body)
        results = await asyncio.gather(*(s.send(entry) for s in self.sinks), return_exceptions=True)
        ok = 0
        for sink, r in zip(self.sinks, results):
            if isinstance(r, BaseException):
                self.failed += 1
                self.last_error = f"{sink.name}: {r}" if isinstance(r, SinkError) else \
                    f"{sink.name}: {type(r).__name__}"
                log.warning("audit_checkpoint_not_stored", sink=sink.name, error=self.last_error)
            else:
                ok += 1
        if ok:
            self.sent += 1
        self.stored = ok > 0
        self.last_seq, self.last_at = int(head["seq"]), asyncio.get_running_loop().time()
        return entry

    async def _announce(self) -> None:
        a = self.audit
        row = await a.db.fetchone("SELECT restore_note FROM audit_head WHERE id = 1")
        note = row["restore_note"] if row else None
        if note:
            try:
                extra = json.loads(note)
            except ValueError:
                extra = {}
            if await self.emit("restore", {k: v for k, v in extra.items() if isinstance(v, (str, int))}) \
                    and self.stored:
                await a.db.execute("UPDATE audit_head SET restore_note = NULL WHERE id = 1")
            else:
                return
        await self.emit("start")

    def nudge(self, head_seq: int) -> None:
        if self.last_seq >= 0 and head_seq - self.last_seq >= self.every:
            self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not self.audit.barrier.sealed:
                    await self.audit.flush_held()       # what was made while sealed goes in first
                    if not self._started:
                        if loop.time() >= self._retry_at:
                            # Every epoch's log begins with a stored start (or restore) checkpoint: verify
                            # relies on it, so it is tried again until a sink takes it.
                            self._retry_at = loop.time() + min(self.interval, 10.0)
                            self.stored = False
                            try:
                                await self._announce()
                            finally:
                                self.announced.set()        # a verify waiting for it goes on either way
                            self._started = self.stored
                    else:
                        head = await self.audit.db.fetchval("SELECT seq FROM audit_head WHERE id = 1")
                        due = loop.time() - self.last_at >= self.interval
                        if int(head) != self.last_seq and (due or int(head) - self.last_seq >= self.every):
                            await self.emit("periodic")
            except asyncio.CancelledError:
                raise
            except Exception as e:      # noqa: BLE001 - the next round tries again; never silent
                self.failed += 1
                self.last_error = type(e).__name__
                log.warning("audit_checkpoint_failed", error_type=type(e).__name__, error=str(e)[:200])
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(self.interval, 1.0))
            except asyncio.TimeoutError:
                pass

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="audit-checkpoints")

    def wake(self) -> None:
        """Look now (the barrier has just opened: the start checkpoint need not wait for the next round)."""
        self._wake.set()

    async def stop(self) -> None:
        t, self._task = self._task, None
        if t is None:
            return
        t.cancel()
        try:
            await t
        except BaseException:       # noqa: BLE001 - stopping
            pass
        if not self._started and not self.audit.barrier.sealed:
            # Stopped before its start checkpoint was stored (a run of a second or two): store it now, so
            # the final one pins what this run wrote instead of leaving that to the next start.
            try:
                await asyncio.wait_for(self._announce(), 5)
                self._started = self.stored
            except Exception as e:  # noqa: BLE001
                log.warning("audit_start_checkpoint_failed", error_type=type(e).__name__)
        if self._started:
            try:
                await asyncio.wait_for(self.emit("final"), 5)
            except Exception as e:  # noqa: BLE001
                log.warning("audit_final_checkpoint_failed", error_type=type(e).__name__)


async def load_all(sinks: list, pub: Ed25519PublicKey) -> tuple[list[dict], list[str]]:
    """Checkpoints signed by `pub` from every readable sink (deduplicated), and the sinks that answered."""
    found, read, _, _ = await load_all_sinks(sinks, pub)
    return found, read


async def load_all_sinks(sinks: list, pub: Ed25519PublicKey | None
                         ) -> tuple[list[dict], list[str], list[str], list[str]]:
    """(checkpoints signed by `pub`, deduplicated; the sinks that answered; those that could not be read,
    each as `name: why`; checkpoints signed by ANOTHER key, summarised per key). A write-only sink (the
    webhook) is in none of the lists.

    A sink belongs to one installation (its own file, its own system-key server), so a well-signed
    checkpoint under another key means this database's checkpoint key was replaced: blanking the key
    (and the epoch) in the database makes the next start sign a fresh history, which would otherwise hide
    a cut tail behind checkpoints nobody checks any more. `pub` None: no key in the database, so every
    checkpoint a sink holds is another key's."""
    seen: dict[str, dict] = {}
    read: list[str] = []
    unreadable: list[str] = []
    others: dict[str, list[int]] = {}         # pub -> [count, highest seq]
    mine = pub_b64(pub) if pub is not None else None
    for s in sinks:
        try:
            got = await s.load()
        except Exception as e:       # noqa: BLE001 - an unreachable sink is reported by name
            unreadable.append(f"{s.name}: {e}" if isinstance(e, SinkError) else f"{s.name}: {type(e).__name__}")
            continue
        if got is None:
            continue
        read.append(s.name)
        for e in got:
            if not isinstance(e, dict):
                continue
            if pub is not None and signed_by(e, pub):
                seen.setdefault(e["sig"], e)
            elif e.get("pub") != mine and _well_signed(e):
                o = others.setdefault(e["pub"], [0, 0])
                o[0] += 1
                o[1] = max(o[1], int(e["checkpoint"]["seq"]))
    foreign = [f"{n} checkpoint(s) up to seq {top} signed by key {k[:12]}…" for k, (n, top) in others.items()]
    return list(seen.values()), read, unreadable, foreign


def _well_signed(entry: dict) -> bool:
    try:
        check_entry(entry)
        return True
    except InvalidRequest:
        return False


@dataclass
class Found:
    """What a verifier could learn about the checkpoints of a chain (read only: nothing is made)."""
    checkpoints: list[dict]
    read: list[str]
    unreadable: list[str]
    epoch: str | None
    foreign: list[str] = field(default_factory=list)     # checkpoints in the sinks signed by another key


async def find(db, barrier, sinks: list) -> Found:
    """The checkpoints of this installation from `sinks`, without making a key or an epoch.
    EpochForged when audit_head's epoch was tampered with."""
    ep = await read_epoch(db, barrier)
    pub = await read_public_key(db, barrier)
    found, read, unreadable, foreign = await load_all_sinks(sinks, pub)
    return Found(found, read, unreadable, ep, foreign)
