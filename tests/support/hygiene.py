"""Secret hygiene: remember every secret and key material a run creates, grep everything it leaves.

Needles are registered by the tests (secret values, tokens, passwords) and harvested
from each key server's storage after use (every key version's material, the system
keys, the root key). Haystacks are captured test output, subprocess and container logs,
the data directories (database, WAL, keyring files) and a row dump of every table (so a
PostgreSQL database is covered too). `scan()` lists every needle found anywhere.

The session's collector, its `hygiene` fixture and the hook that keeps every test's captured
output live in tests/support/hygiene_plugin.py (loaded by tests/conftest.py), so any test can
register; tests/reliability/test_secret_hygiene.py runs last and greps the lot.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.barrier.barrier import Barrier, sealed_aad
from server.barrier.keyring import LocalKeyringSource
from server.barrier.providers import make_provider
from server.settings import ServerConfig
from server.storage.factory import open_storage

MIN_NEEDLE = 8          # shorter values would match by chance


def _forms(value: str | bytes) -> list[bytes]:
    raw = value.encode() if isinstance(value, str) else bytes(value)
    forms = {raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"=")}
    if isinstance(value, bytes):
        forms |= {raw.hex().encode(), raw.hex().upper().encode(),
                  ", ".join(f"0x{b:02x}" for b in raw[:16]).encode()}   # NHN hex-literal rendering
    if isinstance(value, str):
        forms.add(json.dumps(value)[1:-1].encode())          # as escaped inside JSON
    return [f for f in forms if len(f) >= MIN_NEEDLE]


MAX_MATERIALS = 400          # key materials registered per harvested server (see harvest)


@dataclass
class Needle:
    label: str
    forms: list[bytes]
    allowed_in: frozenset[str] = frozenset()   # file paths where this value belongs (the root key file)


@dataclass
class Hygiene:
    needles: dict[bytes, Needle] = field(default_factory=dict)
    # Captured texts are spooled to files as they arrive (a whole suite's output would not fit in memory).
    texts: list[tuple[str, Path]] = field(default_factory=list)
    paths: set[Path] = field(default_factory=set)
    harvested_servers: int = 0
    harvested: set[str] = field(default_factory=set)        # data dirs already harvested (one harvest each)
    unharvested: list[str] = field(default_factory=list)    # servers a test left unreadable (see harvest_quietly)
    _spool: Path | None = None

    def __repr__(self) -> str:
        # pytest prints a failing test's arguments: the default repr would put every needle (the secrets
        # themselves) into the failure report, which the sweep then greps and finds.
        return (f"Hygiene({len(self.needles)} needles, {len(self.texts)} texts, {len(self.paths)} paths, "
                f"{self.harvested_servers} servers)")

    # -- what must never leak ----------------------------------------------------
    def secret(self, value: str | bytes, label: str, *, allowed_in: tuple[Path, ...] = ()) -> None:
        if len(value) < MIN_NEEDLE:
            raise ValueError(f"hygiene needles must be at least {MIN_NEEDLE} long ({label})")
        forms = _forms(value)
        needle = Needle(label, forms, frozenset(str(p) for p in allowed_in))
        self.needles.setdefault(forms[0] if forms else bytes(value), needle)

    # -- where to look -------------------------------------------------------------
    def text(self, label: str, text: str) -> None:
        if text:
            if self._spool is None:
                self._spool = Path(tempfile.mkdtemp(prefix="skm-hygiene-spool-"))
                weakref.finalize(self, shutil.rmtree, str(self._spool), True)
            f = self._spool / f"text-{len(self.texts)}"
            f.write_bytes(text.encode("utf-8", "replace"))
            self.texts.append((label, f))

    def path(self, p: Path) -> None:
        """A file, or a directory scanned recursively at the end (it must outlive the test)."""
        self.paths.add(Path(p))

    async def harvest(self, cfg: ServerConfig, label: str) -> int:
        """Register the key material, system keys and root key of one key server; its files; a row dump.

        Opens the storage with the server's own root key and keyring, so it works for an
        in-process harness and for a `skm server run` subprocess alike. Returns key versions seen
        (0 when this data dir was harvested already).
        """
        if str(cfg.data_path) in self.harvested:
            return 0
        root_path = cfg.root_key_path()
        root = make_provider(cfg.rootkey, root_path)
        ring = await LocalKeyringSource(cfg.system_key_path()).fetch()
        system_keys = await ring.unwrap_all(root)
        await root.close()
        barrier = Barrier()
        barrier.unseal(system_keys, ring.current)
        self.secret(root_path.read_bytes(), f"{label}: root key", allowed_in=(root_path,))
        for v, k in system_keys.items():
            self.secret(k, f"{label}: system key v{v}")
        storage = open_storage(cfg.storage_url())
        await storage.open()
        seen = 0
        try:
            rows = await storage.fetchall("SELECT key_id, version, material_sealed FROM key_versions")
            if len(rows) > MAX_MATERIALS:
                # A soak writes tens of thousands of keys: every needle is grepped through every byte, so
                # keep the first and last MAX_MATERIALS / 2 (a path that leaks material leaks any of it).
                rows = rows[:MAX_MATERIALS // 2] + rows[-(MAX_MATERIALS // 2):]
            for row in rows:
                material = barrier.open(bytes(row["material_sealed"]),
                                        sealed_aad("key_versions", "material_sealed", row["key_id"], row["version"]))
                if len(material) >= MIN_NEEDLE:
                    self.secret(material, f"{label}: key {row['key_id']} v{row['version']} material")
                seen += 1
            self.text(f"{label}: row dump", await dump_rows(storage))
        finally:
            await storage.close()
        self.path(cfg.data_path)
        self.harvested.add(str(cfg.data_path))
        self.harvested_servers += 1
        return seen

    async def harvest_quietly(self, cfg: ServerConfig, label: str) -> None:
        """`harvest` for fixtures that harvest every server a test made: a test may have left its server
        unreadable on purpose (storage stopped, keys destroyed); that is noted for the sweep's summary,
        not turned into an error of the test."""
        try:
            await self.harvest(cfg, label)
        except Exception as e:          # noqa: BLE001  (any failure: noted, named in the summary)
            self.unharvested.append(f"{label}: {type(e).__name__}")

    # -- the check -------------------------------------------------------------------
    def scan(self) -> tuple[list[str], dict[str, int]]:
        """Every needle found in any haystack. GNU grep's fixed-string search (one pass for all needles)
        names the files holding any of them, then Python looks for each form in those files only: a pass
        of `bytes in` per needle form over every file took ~6 min for a soak's 500 MB."""
        findings: set[str] = set()
        stats = {"needles": len(self.needles), "texts": len(self.texts), "files": 0, "bytes": 0,
                 "servers": self.harvested_servers}
        forms = [(needle, form) for needle in self.needles.values() for form in needle.forms]
        # grep reads a pattern a line: it looks for each form's longest newline-free piece. A form without
        # a piece long enough to mean anything is looked for in every file.
        pieces, everywhere = set(), []
        for needle, form in forms:
            piece = max(form.split(b"\n"), key=len)
            pieces.add(piece) if len(piece) >= MIN_NEEDLE else everywhere.append((needle, form))
        with tempfile.TemporaryDirectory(prefix="skm-hygiene-") as tmp:
            where: dict[str, tuple[str, str | None]] = {}    # file grep reads -> (label, haystack path)
            for label, f in self.texts:
                where[str(f)] = (label, None)
            for f in self._files():
                where[str(f)] = (str(f), str(f))
                stats["files"] += 1
            patterns = Path(tmp, "patterns")
            patterns.write_bytes(b"".join(piece + b"\n" for piece in pieces))
            holding = _grep_files(patterns, list(where)) if pieces and where else set()
            for name, (label, path) in where.items():
                try:
                    size = os.stat(name).st_size
                    stats["bytes"] += size
                    check = forms if name in holding else everywhere
                    data = Path(name).read_bytes() if check else b""
                except FileNotFoundError:
                    continue
                for needle, form in check:
                    if (path is None or path not in needle.allowed_in) and form in data:
                        findings.add(f"{needle.label} found in {label}")
        return sorted(findings), stats

    def _files(self) -> list[Path]:
        out = []
        for p in sorted(self.paths):
            out.extend([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.exists() else [])
        return out


# The compose demo's generated secrets, as (service, path in its container): tests/compose/test_compose_up.py
# reads them out of the running stack (docker/bootstrap.py writes them) and registers them with the sweep.
COMPOSE_TOKEN = ("keyserver", "/shared/admin-token")
COMPOSE_PASSWORD = ("demo-file-app", "/run/app/db.env")        # rendered by the sidecar: DB_PASSWORD=...
COMPOSE_ROOT_KEY = ("keyserver", "/certs/root.key")
COMPOSE_KEYRING = ("keyserver", "/certs/systemkey-keyring.json")


async def register_compose(hygiene: Hygiene, read: Callable[[str, str], bytes], label: str) -> list[str]:
    """Register the compose stack's generated secrets: the demo admin token, the demo database password
    (the secret the sidecar renders), the root key and the system keys it unwraps. `read(service, path)`
    returns a file's bytes from a container of the stack. Returns the labels registered."""
    from server.barrier.keyring import LocalKeyringSource
    from server.barrier.rootkey import FileRootKey

    out: list[str] = []

    def add(value: str | bytes, what: str) -> None:
        hygiene.secret(value, f"{label}: {what}")
        out.append(f"{label}: {what}")

    add(read(*COMPOSE_TOKEN).decode().strip(), "demo admin token")
    env = dict(line.partition("=")[::2] for line in read(*COMPOSE_PASSWORD).decode().splitlines() if "=" in line)
    if not env.get("DB_PASSWORD"):
        raise ValueError(f"{COMPOSE_PASSWORD[1]} holds no DB_PASSWORD")
    add(env["DB_PASSWORD"], f"demo password ({len(env['DB_PASSWORD'])} characters)")
    with tempfile.TemporaryDirectory(prefix="skm-hygiene-compose-") as tmp:
        root_path, ring_path = Path(tmp, "root.key"), Path(tmp, "keyring.json")
        root_bytes = read(*COMPOSE_ROOT_KEY)
        root_path.write_bytes(root_bytes)
        root_path.chmod(0o600)
        ring_path.write_bytes(read(*COMPOSE_KEYRING))
        root = FileRootKey(root_path)
        try:
            keys = await (await LocalKeyringSource(ring_path).fetch()).unwrap_all(root)
        finally:
            await root.close()
    add(root_bytes, "root key")
    for v, k in sorted(keys.items()):
        add(k, f"system key v{v}")
    return out


def _grep_files(patterns: Path, files: list[str]) -> set[str]:
    """The files holding any of the fixed strings in `patterns` (the C locale: grep compares bytes)."""
    out: set[str] = set()
    for i in range(0, len(files), 200):                      # far below the argument-size limit
        r = subprocess.run(["grep", "-F", "-a", "-l", "-Z", "-f", str(patterns), "--", *files[i:i + 200]],
                           capture_output=True, env={**os.environ, "LC_ALL": "C"})
        errors = [e for e in r.stderr.decode(errors="replace").splitlines() if not e.endswith("No such file or directory")]
        if r.returncode not in (0, 1) and errors:
            # A file that could not be read was not looked at: fail rather than pass a sweep that did not look.
            raise RuntimeError(f"grep failed ({r.returncode}): {'; '.join(errors)[:500]}")
        out.update(name.decode() for name in r.stdout.split(b"\0") if name)
    return out


async def dump_rows(storage) -> str:
    """Every row of every table as text (portable: SQLite and PostgreSQL)."""
    if storage.dialect == "sqlite":
        names = [r["name"] for r in await storage.fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    else:
        names = [r["tablename"] for r in await storage.fetchall(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]
    out = []
    for name in names:
        for row in await storage.fetchall(f'SELECT * FROM "{name}"'):
            out.append(f"{name}: " + repr({k: (bytes(v) if isinstance(v, memoryview) else v) for k, v in row.items()}))
    return "\n".join(out)
