"""Where does a process's memory go? Run `skm` under a reporter thread (an investigation tool, not a test).

    SKM_MEMPROBE_OUT=/tmp/mem.log .venv/bin/python -m tests.reliability.memprobe server run --config server.toml

Every SKM_MEMPROBE_EVERY seconds (default 15) it appends one line to SKM_MEMPROBE_OUT: VmRSS split
into anonymous and file-backed pages, glibc's heap (mallinfo2: arena, in use, free), the thread count,
anonymous memory by kind of mapping (brk heap, per-thread arenas, other: pymalloc, large mmaps), SQLite's
own memory (all connections, then per connection: page cache / schema / compiled statements in MiB),
each glibc arena's size and free bytes (malloc_info) and, with SKM_MEMPROBE_TRACE=1, Python's traced
allocations (tracemalloc) and the 15 source lines whose allocations grew most since the snapshot taken
at SKM_MEMPROBE_BASE_AT seconds. Touching `<OUT>.trim` makes it call malloc_trim(0) once and log the
RSS before and after.

How to read it: RSS growing while `traced` and glibc's `inuse` stay flat is fragmentation or
memory outside both (pymalloc arenas are mmapped and show as `other`); `traced` growing names the
Python lines holding it; `inuse` growing while `traced` stays flat is native memory (SQLite, OpenSSL),
and the arena that grows says which thread holds it. This is how the soak's growths were found (the
key-row cache keeping one row per key written, tests/keys/test_meta_cache_bound.py; SQLite keeping a
compiled INSERT per audit batch size, tests/audit/test_writer_memory.py).
The variables are read by this wrapper only, never by the server's config loader; the reliability
harness (tests/reliability/procs.py) runs its `skm server run` processes under it when the test run
sets SKM_MEMPROBE_OUT (one report per server start, `<OUT>.<log name>`).
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import tracemalloc


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                name, value = line.split()[:2]
                out[name.rstrip(":")] = int(value) // 1024
    return out


def _smaps() -> str:
    """Anonymous resident memory by kind of mapping: the brk heap, thread stacks, glibc's per-thread
    arenas (64 MiB reservations) and the rest (pymalloc's arenas, large mmapped mallocs)."""
    kinds = {"brk": 0, "arenas": 0, "other": 0}
    name, size = "", 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                name, size = (head[5] if len(head) > 5 else ""), hi - lo
                start = lo
            elif head[0] == "Anonymous:":
                kb = int(head[1])
                if name == "[heap]":
                    kinds["brk"] += kb
                elif name == "" and start % (64 << 20) == 0 and size <= (64 << 20):
                    kinds["arenas"] += kb       # a non-main arena's heap starts 64 MiB aligned
                elif name == "":
                    kinds["other"] += kb
    return " ".join(f"{k}={v >> 10}M" for k, v in kinds.items())


def _arenas(libc) -> str:
    """glibc's malloc_info: each arena's size and free bytes, and the mmapped chunks."""
    import re
    import tempfile
    with tempfile.NamedTemporaryFile("r", suffix=".xml") as tmp:
        fp = libc.fopen(tmp.name.encode(), b"w")
        if not fp:
            return ""
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        xml = tmp.read()
    out = []
    for nr, body in re.findall(r'<heap nr="(\d+)">(.*?)</heap>', xml, re.S):
        cur = re.search(r'<system type="current" size="(\d+)"', body)
        free = sum(int(x) for x in re.findall(r'<total type="(?:fast|rest)" count="\d+" size="(\d+)"', body))
        out.append(f"{nr}:{int(cur.group(1)) >> 20}/{free >> 20}" if cur else nr)
    mm = re.search(r'<total type="mmap" count="(\d+)" size="(\d+)"', xml)
    return "arenas(size/free M)=" + ",".join(out) + (f" mmapped={mm.group(1)}x/{int(mm.group(2)) >> 20}M" if mm else "")


def _sqlite() -> str:
    """SQLite's own count of the memory it holds (all connections of the process)."""
    try:
        lib = ctypes.CDLL("libsqlite3.so.0")
    except OSError:
        return ""
    cur, high = ctypes.c_int64(), ctypes.c_int64()
    if lib.sqlite3_status64(0, ctypes.byref(cur), ctypes.byref(high), 0) != 0:    # SQLITE_STATUS_MEMORY_USED
        return ""
    out = f"sqlite={cur.value >> 20}M"
    # Per connection (every open sqlite3.Connection of the process): page cache / schema / statements.
    import gc
    import sqlite3
    from tests.support.sqlite_memory import CACHE_USED, SCHEMA_USED, STMT_USED, db_status
    for i, conn in enumerate(o for o in gc.get_objects() if isinstance(o, sqlite3.Connection)):
        try:
            used = [db_status(conn, None, op) for op in (CACHE_USED, SCHEMA_USED, STMT_USED)]
        except (AssertionError, sqlite3.ProgrammingError):
            continue                                    # closed
        out += f" db{i}=" + "/".join(f"{b / 2**20:.1f}" for b in used)
    return out


def _report(path: str, every: float, base_at: float, trace: bool) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.fopen.restype = ctypes.c_void_p
        libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):
        libc = None
    t0, base = time.monotonic(), None
    with open(path, "a") as f:
        while True:
            time.sleep(every)
            t = time.monotonic() - t0
            st = _status()
            line = f"t={t:.0f}s rss={st.get('VmRSS')}M anon={st.get('RssAnon')}M file={st.get('RssFile')}M"
            if libc is not None:
                mi = libc.mallinfo2()
                line += f" heap={mi.arena >> 20}M inuse={mi.uordblks >> 20}M free={mi.fordblks >> 20}M"
            line += f" threads={threading.active_count()}/{len(os.listdir('/proc/self/task'))} {_smaps()} {_sqlite()}"
            if libc is not None:
                line += " " + _arenas(libc)
            if trace:
                line += f" traced={tracemalloc.get_traced_memory()[0] >> 20}M"
            f.write(line + "\n")
            if trace:
                snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
                if base is None and t >= base_at:
                    base = snap
                    f.write("  (baseline)\n")
                elif base is not None:
                    for stat in snap.compare_to(base, "lineno")[:15]:
                        f.write(f"  {stat}\n")
            if libc is not None and os.path.exists(path + ".trim"):
                os.remove(path + ".trim")
                before = _status()["VmRSS"]
                libc.malloc_trim(0)
                f.write(f"  malloc_trim(0): rss {before}M -> {_status()['VmRSS']}M\n")
            f.flush()


def main() -> int:
    path = os.environ.get("SKM_MEMPROBE_OUT", "memprobe.log")
    trace = os.environ.get("SKM_MEMPROBE_TRACE", "0") == "1"
    if trace:
        tracemalloc.start(int(os.environ.get("SKM_MEMPROBE_FRAMES", "1")))
    threading.Thread(target=_report, name="memprobe", daemon=True,
                     args=(path, float(os.environ.get("SKM_MEMPROBE_EVERY", "15")),
                           float(os.environ.get("SKM_MEMPROBE_BASE_AT", "30")), trace)).start()
    from server.cli.main import main as skm_main
    sys.argv = ["skm", *sys.argv[1:]]
    return skm_main()


if __name__ == "__main__":
    sys.exit(main())
