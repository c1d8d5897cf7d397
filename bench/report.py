"""Results: medians per (workload, system), ratios ours/OpenBao and ours/floor, a printed table,
JSON under bench/results/ (git-ignored). A run with errors makes the exit code non-zero."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
OURS = ("skm", "skm-pg", "sidecar-unix", "sidecar-tcp", "sidecar-unix-noreads")


def ours(system: str) -> bool:
    """Our systems: skm, skm-pg, their worker variants (skm-w2, skm-pg-w2) and the sidecar."""
    return system in OURS or system.startswith(("skm-w", "skm-pg-w"))
# Which OpenBao row a row of ours is compared with.
# Workloads measured as a ratio of another on the same server: each runs right after its partner,
# system by system (A A' B B'; bench/__main__.py `schedule`), and the ratio is the median of those
# pairs, so the machine's drift over the minutes between workloads does not count.
PAIRED = {"secret-read-v13": "secret-read"}
BAO_PEER = {"secret-read": "secret-read", "secret-read-v13": "secret-read", "encrypt": "encrypt", "decrypt": "decrypt", "sign-rsa": "sign-rsa",
            "sign-ec": "sign-ec", "datakey": "datakey"}


@dataclass
class Sample:
    workload: str
    system: str
    run: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_us_per_req: float
    error_detail: str = ""
    checked: int = 0              # answers compared with the expected value during the run (bench/check.py)
    cores_used: float = 0.0       # CPU seconds of the charged processes per second of the run
    workers: int = 1
    client_cores: float = 0.0     # CPU seconds of the load client per second of the run


@dataclass
class Report:
    settings: dict
    samples: list[Sample] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        groups: dict[tuple[str, str], list[Sample]] = {}
        for s in self.samples:
            groups.setdefault((s.workload, s.system), []).append(s)
        out = []
        for (w, sysname), ss in groups.items():
            out.append({"workload": w, "system": sysname, "runs": len(ss),
                        "rps": statistics.median(s.rps for s in ss),
                        "p50_ms": statistics.median(s.p50_ms for s in ss),
                        "p99_ms": statistics.median(s.p99_ms for s in ss),
                        "cpu_us_per_req": statistics.median(s.cpu_us_per_req for s in ss),
                        "requests": sum(s.requests for s in ss), "errors": sum(s.errors for s in ss),
                        "checked": sum(s.checked for s in ss), "workers": ss[0].workers,
                        "cores_used": statistics.median(s.cores_used for s in ss),
                        "client_cores": statistics.median(s.client_cores for s in ss),
                        "rps_runs": [round(s.rps, 1) for s in ss]})
        index = {(r["workload"], r["system"]): r for r in out}
        floor = index.get(("floor", "floor"))
        for r in out:
            if r["workload"] == "secret-read-v13":      # the bearer token's cost: v1.3 against v1.0
                r["vs_v10"] = self._paired(r["workload"], r["system"], "rps")
                r["cpu_vs_v10"] = self._paired(r["workload"], r["system"], "cpu_us_per_req")
        for r in out:
            if r["workers"] > 1:        # skm-w2 against skm, skm-pg-w2 against skm-pg
                one = index.get((r["workload"], r["system"].rsplit("-w", 1)[0]))
                r["vs_one_worker"] = r["rps"] / one["rps"] if one and one["rps"] else None
            if ours(r["system"]):
                bao = index.get((BAO_PEER.get(r["workload"], ""), "openbao"))
                r["vs_openbao"] = r["rps"] / bao["rps"] if bao and bao["rps"] else None
                r["vs_floor"] = r["rps"] / floor["rps"] if floor and floor["rps"] else None
        return out

    def _paired(self, workload: str, system: str, attr: str) -> float | None:
        """Median over runs of `workload`'s `attr` / its PAIRED partner's in the same run on `system`."""
        partner = PAIRED[workload]
        mine = {s.run: getattr(s, attr) for s in self.samples if s.workload == workload and s.system == system}
        base = {s.run: getattr(s, attr) for s in self.samples if s.workload == partner and s.system == system}
        ratios = [mine[run] / base[run] for run in mine if base.get(run)]
        return statistics.median(ratios) if ratios else None

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.samples)

    def to_json(self) -> dict:
        return {"settings": self.settings, "machine": machine(), "rows": self.rows(),
                "samples": [s.__dict__ for s in self.samples], "notes": self.notes, "errors": self.errors}

    def write(self, directory: Path = RESULTS) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = directory / f"bench-{stamp}.json"
        text = json.dumps(self.to_json(), indent=2)
        path.write_text(text)
        (directory / "latest.json").write_text(text)
        return path

    def print(self, console: Console | None = None) -> None:
        console = console or Console()
        if not self.samples:            # e.g. only the backup workload ran: it prints its own table
            return
        t = Table(title=f"requests/s (median of {self.settings.get('runs')} runs, concurrency "
                        f"{self.settings.get('concurrency')}, {self.settings.get('duration')} s each)")
        for col in ("workload", "system", "req/s", "p50 ms", "p99 ms", "server CPU µs/req", "ours/OpenBao",
                    "ours/floor", "errors"):
            t.add_column(col, justify="left" if col in ("workload", "system") else "right")
        for r in self.rows():
            t.add_row(r["workload"], r["system"], f"{r['rps']:,.0f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                      f"{r['cpu_us_per_req']:,.0f}", _ratio(r.get("vs_openbao")), _ratio(r.get("vs_floor")),
                      str(r["errors"]) if r["errors"] else "0")
        console.print(t)
        scaling = [r for r in self.rows() if r["system"] == "openbao" or r["system"].startswith("skm")]
        if any(r["workers"] > 1 for r in scaling):
            t = Table(title=f"scaling: servers on {self.settings.get('server_cpu') or 'all cores (unpinned)'}, "
                            f"load client on {self.settings.get('client_cpu') or 'any core'}")
            for col in ("workload", "system", "workers", "req/s", "p99 ms", "cores used", "client cores",
                        "server CPU µs/req",
                        "vs 1 worker", "ours/OpenBao"):
                t.add_column(col, justify="left" if col in ("workload", "system") else "right")
            for r in scaling:
                t.add_row(r["workload"], r["system"], "" if r["system"] == "openbao" else str(r["workers"]),
                          f"{r['rps']:,.0f}", f"{r['p99_ms']:.1f}", f"{r['cores_used']:.2f}", f"{r['client_cores']:.2f}",
                          f"{r['cpu_us_per_req']:,.0f}", _ratio(r.get("vs_one_worker")), _ratio(r.get("vs_openbao")))
            console.print(t)
        for r in self.rows():
            if r.get("vs_v10") is not None:
                cpu = r.get("cpu_vs_v10")
                cpu_text = f", {cpu:.2f}x server CPU per request" if cpu is not None else ""
                console.print(f"secret read v1.3 (bearer token) / v1.0 on {r['system']}, paired runs: "
                              f"{r['vs_v10']:.2f}x req/s{cpu_text}")
        for k, v in self.notes.items():
            console.print(f"{k}: {v}")
        bad = [s for s in self.samples if s.errors]
        for s in bad:
            console.print(f"[red]errors[/red] {s.workload}/{s.system} run {s.run}: {s.errors} ({s.error_detail})")


def _ratio(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "kernel": platform.release(),
            "python": platform.python_version()}
    try:
        import aiohttp
        info["aiohttp"] = aiohttp.__version__
    except ImportError:
        pass
    try:
        info["ab"] = subprocess.run(["ab", "-V"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        pass
    from bench.openbao import binary
    exe = binary()
    if exe:
        out = subprocess.run([exe, "version"], capture_output=True, text=True).stdout.strip()
        info["openbao"] = out.split(" (")[0]
    return info
