"""The load clients: Apache Bench (`ab -k`, client certificate via -E) and, for the sidecar's Unix
socket (which ab cannot reach), bench.unixload. Both give the same Result.

ab notes: -t implies -n 50000, so -n comes after -t to lift that cap; -E wants one PEM with the
certificate and its key; responses whose length varies (ECDSA signatures) are counted by ab as
"Length" failures, which are not errors here, while connect/receive/exception failures and
non-2xx answers are.
"""
from __future__ import annotations

import csv
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import procs
from bench.procs import pinned


@dataclass
class Request:
    url: str                              # https://127.0.0.1:PORT/path, or unix:/path/to.sock:/http/path
    method: str = "GET"
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    cert_pem: Path | None = None          # combined certificate + key (ab -E)
    content_type: str = "application/json"


@dataclass
class Result:
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    seconds: float
    error_detail: str = ""
    client_cpu_s: float = 0.0        # the load client's own CPU seconds (what it took from the machine)

    def to_dict(self) -> dict:
        return asdict(self)


def ab_available() -> bool:
    return shutil.which("ab") is not None


def run(req: Request, *, concurrency: int, duration: float) -> Result:
    if req.url.startswith("unix:"):
        return run_unix(req, concurrency=concurrency, duration=duration)
    return run_ab(req, concurrency=concurrency, duration=duration)


def run_ab(req: Request, *, concurrency: int, duration: float) -> Result:
    if not ab_available():
        raise RuntimeError("ab not found: apt-get install apache2-utils")
    with tempfile.TemporaryDirectory(prefix="skm-ab-") as tmp:
        pct = Path(tmp) / "pct.csv"
        cmd = ["ab", "-q", "-k", "-r", "-c", str(concurrency), "-t", f"{max(1, round(duration))}", "-n", "100000000",
               "-e", str(pct), "-l"]
        # -l accepts varying response lengths (ECDSA signatures, ciphertexts) as success.
        if req.cert_pem is not None:
            cmd += ["-E", str(req.cert_pem)]
        for k, v in req.headers.items():
            cmd += ["-H", f"{k}: {v}"]
        if req.method == "POST":
            body = Path(tmp) / "body"
            body.write_bytes(req.body or b"")
            cmd += ["-p", str(body), "-T", req.content_type]
        elif req.method != "GET":
            raise ValueError("ab drives GET and POST only")
        cmd.append(req.url)
        before = _children_cpu()
        proc = subprocess.run(pinned(cmd, procs.CLIENT_CPU), capture_output=True, text=True,
                              timeout=duration + 120)
        res = parse_ab(proc.stdout, proc.stderr, pct if pct.exists() else None, proc.returncode)
        res.client_cpu_s = _children_cpu() - before
        return res


def _children_cpu() -> float:
    # In a throughput run ab is the only child reaped in between (the servers are still running); the
    # backup row's back-to-back `skm backup create` processes would count too, and it does not read this.
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _num(rx: str, text: str, default: float = 0.0) -> float:
    m = re.search(rx, text, re.M)
    return float(m.group(1)) if m else default


def parse_ab(out: str, err: str, pct_csv: Path | None, returncode: int = 0) -> Result:
    complete = int(_num(r"^Complete requests:\s+(\d+)", out))
    failed_detail = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: (\d+), Exceptions: (\d+)\)", out)
    hard = 0
    if failed_detail:
        c, r, _length, x = (int(g) for g in failed_detail.groups())
        hard = c + r + x
    non2xx = int(_num(r"^Non-2xx responses:\s+(\d+)", out))
    p50 = p99 = 0.0
    if pct_csv is not None:
        with open(pct_csv) as f:
            rows = {int(float(r[0])): float(r[1]) for r in csv.reader(f) if r and r[0][0].isdigit()}
        p50, p99 = rows.get(50, 0.0), rows.get(99, 0.0)
    detail = ""
    errors = hard + non2xx
    if returncode != 0 or complete == 0:
        errors = max(errors, 1)
        detail = (err.strip().splitlines() or out.strip().splitlines() or ["ab failed"])[-1][:300]
    elif errors:
        detail = f"ab: {hard} failed (connect/receive/exception), {non2xx} non-2xx"
    return Result(requests=complete, errors=errors, rps=_num(r"^Requests per second:\s+([\d.]+)", out),
                  p50_ms=p50, p99_ms=p99, seconds=_num(r"^Time taken for tests:\s+([\d.]+)", out),
                  error_detail=detail)


def run_unix(req: Request, *, concurrency: int, duration: float) -> Result:
    _, sock, path = req.url.split(":", 2)
    cmd = [sys.executable, "-m", "bench.unixload", "--socket", sock, "--path", path, "-c", str(concurrency),
           "-t", str(duration), "--method", req.method]
    for k, v in req.headers.items():
        cmd += ["-H", f"{k}: {v}"]
    proc = subprocess.run(pinned(cmd, procs.CLIENT_CPU), capture_output=True, text=True, timeout=duration + 120,
                          input=(req.body or b"").decode())
    if proc.returncode != 0:
        return Result(0, 1, 0.0, 0.0, 0.0, 0.0, (proc.stderr.strip().splitlines() or ["unixload failed"])[-1][:300])
    return Result(**json.loads(proc.stdout))
