"""Where does a process's memory go? Run `skm` under a reporter thread (an investigation tool, not a test).

    SKM_MEMPROBE_OUT=/tmp/mem.log .venv/bin/python -m tests.reliability.memprobe server run --config server.toml

Every SKM_MEMPROBE_EVERY seconds (default 15) it appends one line to SKM_MEMPROBE_OUT: VmRSS split
into anonymous and file-backed pages, glibc's heap (mallinfo2: arena, in use, free) and, with
SKM_MEMPROBE_TRACE=1, Python's traced allocations (tracemalloc) and the 15 source lines whose
allocations grew most since the snapshot taken at SKM_MEMPROBE_BASE_AT seconds. Touching
`<OUT>.trim` makes it call malloc_trim(0) once and log the RSS before and after.

How to read it: RSS growing while `traced` and glibc's `inuse` stay flat is fragmentation or
memory outside both (pymalloc arenas are mmapped and show as RssAnon beyond glibc's `arena`);
`traced` growing names the Python lines holding it. This is how the soak's growth was found
(the key-row cache keeping one row per key written; see tests/keys/test_meta_cache_bound.py).
The variables are read by this wrapper only, never by the server's config loader.
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


def _report(path: str, every: float, base_at: float, trace: bool) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
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
