"""`python -m bench`: our key server, sidecar, OpenBao and the aiohttp floor, same load client,
same concurrency and duration, runs interleaved (A B A B), medians of the runs.

Each server runs as its own process pinned to core 1, the load client (ab, or bench.unixload
for the sidecar's Unix socket) on core 0; `--cores 2` gives the servers two cores (unpinned on a
2-core machine) and compares worker counts. Every run also checks a sample of answers
(bench/check.py). Results: a printed table and JSON in bench/results/.
Exit status: 0 when every run finished without errors (wrong answers are errors), 1 when a run
had errors, 2 when the harness could not set a system up.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from bench import backup as backup_bench
from bench import check, keyserver, load, openbao, procs, scale
from bench import sidecar as sidecar_mod
from bench.report import PAIRED, Report, Sample

WORKLOADS = ("floor", "secret-read", "secret-read-v13", "encrypt", "decrypt", "sign-rsa", "sign-ec", "datakey", "scale",
             "backup")
SYSTEMS = ("skm", "skm-unkeyed", "sidecar", "openbao", "floor")
console = Console(stderr=True)


@dataclass
class Case:
    workload: str
    system: str
    request: load.Request
    proc: procs.Proc          # whose CPU time is charged to the requests
    concurrency: int | None = None    # None: --concurrency
    check: check.Check | None = None  # how a sampled answer is judged (None: not checked)
    also: tuple = ()          # more processes charged to the requests (PostgreSQL's postmaster and backends)
    workers: int = 1
    client: check.Client | None = None   # the answer checks' client (None: the first fixture's CA and certificate)


PG_DURABLE = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "off"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                epilog="Workloads: " + ", ".join(WORKLOADS))
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run of each workload (default 10)")
    p.add_argument("--concurrency", type=int, default=64, help="connections kept open by the load client (64)")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs per workload; the median is reported (3)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unrecorded load per case first (2)")
    p.add_argument("--postgres", action="store_true",
                   help="also run our key server on PostgreSQL (a throwaway local cluster; needs postgresql)")
    p.add_argument("--only", action="append", choices=WORKLOADS, metavar="WORKLOAD",
                   help="run only this workload (repeatable): " + ", ".join(WORKLOADS))
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma list of systems to run: " + ",".join(SYSTEMS) + " (default all)")
    p.add_argument("--scale", type=int, default=100_000, metavar="N",
                   help="keys in the large store of the scale workload, compared with 1,000 (0 skips it)")
    p.add_argument("--backup-keys", type=int, default=100_000, metavar="N",
                   help="keys in the store of the backup workload: skm backup create/restore vs sqlite3 .backup "
                        "(and pg_dump/pg_restore with --postgres), read p99 during a backup (0 skips it)")
    p.add_argument("--scale-concurrency", type=int, default=4,
                   help="connections for the scale workload, a latency measurement (default 4)")
    p.add_argument("--no-openbao-audit", action="store_true",
                   help="run OpenBao without its file audit device (ours always audits; the default compares "
                        "both auditing every request)")
    p.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="our key server's event_loop setting (server/loops.py); the floor runs on the same loop "
                        "(default auto: uvloop when installed)")
    p.add_argument("--workers", default=None, metavar="N[,M...]",
                   help="worker processes of our key server (server/workers.py); a list runs one server per "
                        "count side by side (default 1; with --cores 2: 1,2)")
    p.add_argument("--cores", type=int, default=1, metavar="N",
                   help="cores for the servers (default 1: core 1, the client on core 0). With N >= the "
                        "machine's cores nothing is pinned: the scaling comparison (workers 1 vs 2 vs OpenBao)")
    p.add_argument("--pg-synchronous-commit", choices=("on", "off"), default="off",
                   help="PostgreSQL's synchronous_commit (fsync is always on): off matches SQLite's WAL with "
                        "synchronous=NORMAL (durable across a crash of the server, the last commits may be lost "
                        "with the machine); on waits for the WAL flush of every commit")
    p.add_argument("--workdir", type=Path, help="keep data dirs and logs here (default: a temp dir, removed)")
    p.add_argument("--results", type=Path, default=None, help="directory for the JSON (default bench/results)")
    a = p.parse_args(argv)
    a.systems = {s.strip() for s in a.systems.split(",") if s.strip()}
    bad = a.systems - set(SYSTEMS)
    if bad:
        p.error(f"unknown system(s): {', '.join(sorted(bad))}")
    if a.runs < 1 or a.concurrency < 1 or a.duration <= 0 or a.cores < 1:
        p.error("--runs, --concurrency, --duration and --cores must be positive")
    try:
        a.workers = sorted({int(x) for x in (a.workers or ("1,2" if a.cores > 1 else "1")).split(",")})
    except ValueError:
        p.error("--workers takes a number or a comma list of numbers, e.g. 1,2")
    if not a.workers or min(a.workers) < 1 or max(a.workers) > 64:
        p.error("--workers must be from 1 to 64")
    return a


def wanted(args, workload: str) -> bool:
    return not args.only or workload in args.only


def json_body(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def skm_cases(args, fx: keyserver.Fixture, p: procs.Proc, system: str, also: tuple = (),
              workers: int = 1) -> list[Case]:
    pem = fx.client.combined
    bearer = {"X-NHN-Authorization": f"Bearer {fx.token}"}
    k = fx.keys
    url = lambda path, v="v1.0": keyserver.client_url(p, fx, path, v)  # noqa: E731
    decrypt = url(f"/symmetric-keys/{k['aes']}/decrypt")
    checks = {
        "secret-read": check.ours_value("secret", keyserver.SECRET_1K),
        "secret-read-v13": check.ours_value("secret", keyserver.SECRET_1K),
        "encrypt": check.ours_encrypt(decrypt, keyserver.PLAINTEXT_1K),
        "decrypt": check.ours_value("plaintext", keyserver.PLAINTEXT_1K),
        "sign-rsa": check.ours_signature(url(f"/asymmetric-keys/{k['rsa']}/verify-standard", "v1.3"),
                                         keyserver.SIGN_INPUT, "RSASSA-PSS", bearer),
        "sign-ec": check.ours_signature(url(f"/asymmetric-keys/{k['ec']}/verify-standard", "v1.3"),
                                        keyserver.SIGN_INPUT, "ECDSA", bearer),
        "datakey": check.ours_datakey(decrypt),
    }
    reqs = {
        "secret-read": load.Request(url(f"/secrets/{k['secret']}"), cert_pem=pem),
        # The same read with a v1.3 bearer token: what checking the token costs (issue 18: within 10 %).
        "secret-read-v13": load.Request(url(f"/secrets/{k['secret']}", "v1.3"), headers=bearer, cert_pem=pem),
        "encrypt": load.Request(url(f"/symmetric-keys/{k['aes']}/encrypt"), "POST",
                                json_body({"plaintext": keyserver.PLAINTEXT_1K}), cert_pem=pem),
        "decrypt": load.Request(url(f"/symmetric-keys/{k['aes']}/decrypt"), "POST",
                                json_body({"ciphertext": fx.ciphertext}), cert_pem=pem),
        "sign-rsa": load.Request(url(f"/asymmetric-keys/{k['rsa']}/sign-standard", "v1.3"), "POST",
                                 json_body({"plaintext": keyserver.SIGN_INPUT, "algorithm": "RSASSA-PSS"}),
                                 headers=bearer, cert_pem=pem),
        "sign-ec": load.Request(url(f"/asymmetric-keys/{k['ec']}/sign-standard", "v1.3"), "POST",
                                json_body({"plaintext": keyserver.SIGN_INPUT, "algorithm": "ECDSA"}),
                                headers=bearer, cert_pem=pem),
        "datakey": load.Request(url(f"/symmetric-keys/{k['aes']}/create-local-key"), "POST", b"", cert_pem=pem),
    }
    client = check.Client(fx.client.combined, fx.ca)       # each fixture has its own CA
    return [Case(w, system, r, p, check=checks[w], also=also, workers=workers, client=client)
            for w, r in reqs.items() if wanted(args, w)]


def bao_cases(args, bao: openbao.OpenBao, pem: Path) -> list[Case]:
    h = {"X-Vault-Token": bao.token}
    u = bao.url + "/v1/"
    b64 = base64.b64encode(keyserver.PLAINTEXT_1K.encode()).decode()
    reqs = {
        "secret-read": load.Request(u + openbao.SECRET_PATH, headers=h, cert_pem=pem),
        "encrypt": load.Request(u + "transit/encrypt/aes", "POST", json_body({"plaintext": b64}), h, pem),
        "decrypt": load.Request(u + "transit/decrypt/aes", "POST", json_body({"ciphertext": bao.ciphertext}), h, pem),
        "sign-rsa": load.Request(u + "transit/sign/rsa/sha2-256", "POST",
                                 json_body({"input": keyserver.SIGN_INPUT, "signature_algorithm": "pss"}), h, pem),
        "sign-ec": load.Request(u + "transit/sign/ec/sha2-256", "POST", json_body({"input": keyserver.SIGN_INPUT}),
                                h, pem),
        "datakey": load.Request(u + "transit/datakey/plaintext/aes", "POST", b"{}", h, pem),
    }
    checks = {
        "secret-read": check.bao_secret(keyserver.SECRET_1K),
        "encrypt": check.bao_encrypt(u + "transit/decrypt/aes", b64, h),
        "decrypt": check.bao_plaintext(b64),
        "sign-rsa": check.bao_signature(u + "transit/verify/rsa/sha2-256", keyserver.SIGN_INPUT, h,
                                        {"signature_algorithm": "pss"}),
        "sign-ec": check.bao_signature(u + "transit/verify/ec/sha2-256", keyserver.SIGN_INPUT, h),
        "datakey": check.bao_datakey(u + "transit/decrypt/aes", h),
    }
    return [Case(w, "openbao", r, bao.proc, check=checks[w]) for w, r in reqs.items() if wanted(args, w)]


def settle(p: procs.Proc, timeout: float = 60.0) -> None:
    """Wait until the process is idle: a server still draining the last run's queue (all servers
    share one core) would otherwise be charged to the next case."""
    deadline = time.monotonic() + timeout
    last = p.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = p.cpu_seconds()
        if now - last < 0.02:
            return
        last = now


def measure(case: Case, args, run: int) -> Sample:
    for p in args.procs:
        settle(p)
    charged = (case.proc, *case.also)
    cpu0 = sum(p.cpu_seconds() for p in charged)
    sampler = None
    if case.check is not None:
        sampler = check.Sampler(case.client or args.checker, case.request, case.check, args.duration).start()
    r = load.run(case.request, concurrency=case.concurrency or args.concurrency, duration=args.duration)
    cpu = sum(p.cpu_seconds() for p in charged) - cpu0
    errors, detail, checked = r.errors, r.error_detail, 0
    if sampler is not None:
        sampler.join()
        checked = sampler.checked
        if sampler.failures or not sampler.checked:
            errors += max(1, len(sampler.failures))
            why = sampler.failures[0] if sampler.failures else "no answer could be checked"
            detail = "; ".join(x for x in (detail, f"wrong answers: {len(sampler.failures)} of "
                                                   f"{sampler.attempted} sampled ({why})") if x)
    return Sample(case.workload, case.system, run, r.rps, r.p50_ms, r.p99_ms, r.requests, errors,
                  cpu / r.requests * 1e6 if r.requests else 0.0, detail, checked=checked,
                  cores_used=cpu / r.seconds if r.seconds else 0.0, workers=case.workers,
                  client_cores=r.client_cpu_s / r.seconds if r.seconds else 0.0)


def schedule(cases: list[Case]) -> dict[str, list[Case]]:
    """The cases of each run, by workload in WORKLOADS' order; a PAIRED workload's case follows its
    partner's case of the same system (in the partner's group)."""
    order = [w for w in WORKLOADS + tuple(sorted({c.workload for c in cases} - set(WORKLOADS)))]
    by_workload = {w: [c for c in cases if c.workload == w] for w in order}
    for w, partner in PAIRED.items():
        if by_workload.get(partner):
            followers = {c.system: c for c in by_workload.pop(w, [])}
            grouped = []
            for c in by_workload[partner]:
                grouped.append(c)
                if c.system in followers:
                    grouped.append(followers.pop(c.system))
            by_workload[partner] = grouped + list(followers.values())
    return {w: g for w, g in by_workload.items() if g}


def run_cases(cases: list[Case], args, report: Report) -> None:
    by_workload = schedule(cases)
    if args.warmup > 0:
        for c in cases:
            console.print(f"warm-up {c.workload} / {c.system}")
            load.run(c.request, concurrency=c.concurrency or args.concurrency, duration=args.warmup)
    for run in range(1, args.runs + 1):
        for group in by_workload.values():
            for c in group:        # A B A B: every system of a workload, then the next run
                s = measure(c, args, run)
                report.samples.append(s)
                flag = f" [red]{s.errors} errors[/red]" if s.errors else ""
                console.print(f"run {run}/{args.runs} {c.workload:>24} {c.system:<14} {s.rps:9,.0f} req/s  "
                              f"p50 {s.p50_ms:6.1f} ms  p99 {s.p99_ms:6.1f} ms  {s.cpu_us_per_req:7,.0f} µs CPU/req  "
                              f"{s.cores_used:4.2f} cores  {s.checked} answers checked{flag}")


def _uvloop(choice: str) -> bool:
    from server.loops import loop_factory
    return loop_factory(choice) is not None


def system_name(base: str, workers: int) -> str:
    return base if workers == 1 else f"{base}-w{workers}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (and SIGINT where a background shell ignores it) unwinds like Ctrl-C: servers are stopped.
    signal.signal(signal.SIGTERM, _interrupted)
    if not load.ab_available():
        console.print("[red]ab not found[/red]: apt-get install apache2-utils")
        return 2
    procs.use_cores(args.cores)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="skm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started: list = []
    cases: list[Case] = []
    report = Report(settings={"duration": args.duration, "concurrency": args.concurrency, "runs": args.runs,
                              "warmup": args.warmup, "postgres": args.postgres, "only": args.only,
                              "systems": sorted(args.systems), "scale": args.scale, "event_loop": args.event_loop,
                              "openbao_audit": not args.no_openbao_audit, "workers": args.workers,
                              "cores": args.cores, "pg_settings": _pg_settings(args) if args.postgres else None,
                              "scale_concurrency": args.scale_concurrency, "server_cpu": procs.SERVER_CPU,
                              "client_cpu": procs.CLIENT_CPU, "answers_checked_per_run": check.SAMPLES})
    side = None
    pg = None
    try:
        t0 = time.monotonic()
        console.print(f"preparing in {work} (servers on cores {procs.SERVER_CPU or 'all'}, "
                      f"load client on {procs.CLIENT_CPU or 'any'})")
        fx = asyncio.run(keyserver.prepare(work / "skm"))
        args.checker = check.Client(fx.client.combined, fx.ca)
        pem = fx.client.combined
        core_workloads = [w for w in WORKLOADS if w not in ("floor", "scale", "backup") and wanted(args, w)]
        if "skm" in args.systems and core_workloads:
            ks = None
            for n in args.workers:
                fxn = fx if n == args.workers[0] else asyncio.run(keyserver.prepare(work / f"skm-w{n}"))
                name = system_name("skm", n)
                kn = keyserver.launch(fxn, event_loop=args.event_loop, workers=n, name=name)
                started.append(kn)
                cases += skm_cases(args, fxn, kn, name, workers=n)
                ks = ks or kn
            if args.postgres:
                from tests.support.postgres import PostgresCluster
                pg = PostgresCluster(settings=_pg_settings(args))
                pg.__enter__()
                # PostgreSQL works for the key server: its CPU is charged to our requests, on our cores.
                postmaster = procs.Running("postgres", int((pg.data_dir / "postmaster.pid").read_text().split()[0]))
                postmaster.pin(procs.SERVER_CPU)
                args.extra_procs = [postmaster]
                for n in args.workers:
                    fxp = asyncio.run(keyserver.prepare(work / f"skm-pg-w{n}", pg.create_database()))
                    name = system_name("skm-pg", n)
                    kp = keyserver.launch(fxp, event_loop=args.event_loop, workers=n, name=name)
                    started.append(kp)
                    cases += skm_cases(args, fxp, kp, name, also=(postmaster,), workers=n)
            if "skm-unkeyed" in args.systems and wanted(args, "secret-read"):
                # The same server with the audit writer of before keyed links: their cost (issue 14: <= 5 %).
                fxu = asyncio.run(keyserver.prepare(work / "skm-unkeyed"))
                ku = keyserver.launch(fxu, event_loop=args.event_loop, name="skm-unkeyed", unkeyed_audit=True)
                started.append(ku)
                cases += [c for c in skm_cases(args, fxu, ku, "skm-unkeyed") if c.workload == "secret-read"]
            if "sidecar" in args.systems and wanted(args, "secret-read"):
                side = sidecar_mod.launch(fx, ks.info["data_url"])
                started.append(side)
                path = f"/keymanager/v1.0/appkey/{fx.appkey}/secrets/{fx.keys['secret']}"
                secret = check.ours_value("secret", keyserver.SECRET_1K)
                cases.append(Case("secret-read", "sidecar-unix", load.Request(f"unix:{side.info['socket']}:{path}"),
                                  side, check=secret))
                cases.append(Case("secret-read", "sidecar-tcp",
                                  load.Request(side.info["tcp_url"] + path, headers=sidecar_mod.ANTI_SSRF), side,
                                  check=secret))
                # The same sidecar without read auditing: what recording every cache hit costs (issue 17).
                bare = sidecar_mod.launch(fx, ks.info["data_url"], name="sidecar-noreads", reads=False)
                started.append(bare)
                args.bare_sidecar = bare
                cases.append(Case("secret-read", "sidecar-unix-noreads",
                                  load.Request(f"unix:{bare.info['socket']}:{path}"), bare, check=secret))
        if "openbao" in args.systems and core_workloads:
            from server.access.pki import DevPKI
            pki = DevPKI(fx.ca.parent)
            bao = openbao.start(work / "openbao", pki.load_ca(), pki.ca_cert, fx.client.cert, fx.client.key,
                                keyserver.PLAINTEXT_1K, keyserver.SECRET_1K, audit=not args.no_openbao_audit)
            started.append(bao.proc)
            cases += bao_cases(args, bao, pem)
        if "floor" in args.systems and wanted(args, "floor"):
            from bench.floor import BODY
            pki_dir = fx.ca.parent
            cmd = [sys.executable, "-m", "bench.floor", "--cert", str(pki_dir / "server.pem"),
                   "--key", str(pki_dir / "server-key.pem"), "--ca", str(fx.ca)] + (["--uvloop"] if _uvloop(args.event_loop) else [])
            fl = procs.start("floor", cmd, work / "floor.log")
            started.append(fl)
            m = fl.wait_for(r"floor: (https://\S+)")
            cases.append(Case("floor", "floor", load.Request(m.group(1) + "/floor", cert_pem=pem), fl,
                              check=check.exact(BODY)))
        if args.scale > 0 and wanted(args, "scale") and "skm" in args.systems:
            cases += scale_cases(args, work, started)
        console.print(f"set up in {time.monotonic() - t0:.1f} s; {len(cases)} cases")
    except Exception as e:  # a system that cannot start: say which and why, stop what runs
        console.print(f"[red]setup failed:[/red] {e}")
        _stop(started, pg)
        return 2
    backups: list = []
    try:
        args.procs = started + getattr(args, "extra_procs", [])
        run_cases(cases, args, report)
        if side is not None:
            report.notes["sidecar_rss_mb_after"] = round(side.rss_mb(), 1)
        if getattr(args, "bare_sidecar", None) is not None:
            report.notes["sidecar_noreads_rss_mb_after"] = round(args.bare_sidecar.rss_mb(), 1)
        for p in args.procs:
            report.notes.setdefault("rss_mb_after", {})[p.name] = round(p.rss_mb(), 1)
        _scale_notes(report, args)
        backups = run_backup(args, work, pg)
    finally:
        _stop(started, pg)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    wide = Console(width=max(140, Console().width))
    report.print(wide)
    if "skm" in args.systems and wanted(args, "secret-read"):
        from bench import audit_cost
        cost = audit_cost.against(audit_cost.measure(), report.rows())
        report.notes["audit_cost"] = cost.to_dict()
        wide.print(audit_cost.line(cost))
    line = _read_audit_line(report)
    if line:
        wide.print(line)
    if backups:
        report.notes["backup"] = [b.to_dict() for b in backups]
        wide.print(backup_bench.table(backups))
        if any(b.errors for b in backups):
            report.notes["backup_errors"] = [e for b in backups for e in b.errors]
    path = report.write(args.results) if args.results else report.write()
    console.print(f"results: {path}")
    return 1 if report.errors or report.notes.get("backup_errors") else 0


def _read_audit_line(report: Report) -> str | None:
    """The sidecar's cache hits with every read recorded against the same sidecar without (issue 17:
    within 10 %), and both RSS."""
    rows = {(r["workload"], r["system"]): r for r in report.rows()}
    on, off = rows.get(("secret-read", "sidecar-unix")), rows.get(("secret-read", "sidecar-unix-noreads"))
    if not on or not off or not off["rps"]:
        return None
    ratio = on["rps"] / off["rps"]
    report.notes["sidecar_read_audit"] = {"rps_on": on["rps"], "rps_off": off["rps"], "ratio": round(ratio, 3)}
    return (f"sidecar read auditing: cache hits {on['rps']:,.0f} req/s with every read recorded, "
            f"{off['rps']:,.0f} without ({ratio:.2f}x; target >= 0.90x); RSS after "
            f"{report.notes.get('sidecar_rss_mb_after')} MB / {report.notes.get('sidecar_noreads_rss_mb_after')} MB "
            "(target < 80 MB)")


def _pg_settings(args) -> dict[str, str]:
    return {**PG_DURABLE, "synchronous_commit": args.pg_synchronous_commit}


def scale_cases(args, work: Path, started: list[procs.Proc]) -> list[Case]:
    cases = []
    for n in (1_000, args.scale):
        fx = asyncio.run(keyserver.prepare(work / f"scale-{n}", bulk_keys=n))
        p = keyserver.launch(fx, event_loop=args.event_loop, workers=args.workers[0], name=f"skm-{n}")
        started.append(p)
        for w, path in scale.workloads(n, fx.keystore_id, fx.keys["secret"]).items():
            ok = check.ours_value("secret", keyserver.SECRET_1K) if w == "scale-secret-read" else check.ours_ok()
            cases.append(Case(w, f"skm@{n:,}", load.Request(keyserver.client_url(p, fx, path),
                                                             cert_pem=fx.client.combined), p,
                              concurrency=args.scale_concurrency, check=ok,
                              client=check.Client(fx.client.combined, fx.ca)))
    return cases


def run_backup(args, work: Path, pg) -> list:
    """The backup workload (bench/backup.py) on SQLite, and on PostgreSQL with --postgres."""
    if args.backup_keys <= 0 or not wanted(args, "backup") or "skm" not in args.systems:
        return []
    own = None
    if args.postgres and pg is None:
        from tests.support.postgres import PostgresCluster
        pg = own = PostgresCluster()
        pg.__enter__()
    out = []
    try:
        for b in ["sqlite"] + (["postgresql"] if args.postgres else []):
            try:
                out.append(backup_bench.measure(b, args.backup_keys, work, pg=pg, duration=args.duration,
                                                concurrency=args.scale_concurrency, console=console))
            except (RuntimeError, OSError) as e:       # a tool missing or a command failing: say which
                console.print(f"[red]backup workload on {b} failed:[/red] {e}")
                out.append(backup_bench.BackupResult(b, args.backup_keys, 0, 0, 0, 0, "", 0, 0, 0, 0, 0,
                                                     [str(e)]))
        return out
    finally:
        if own is not None:
            own.__exit__(None, None, None)


def _scale_notes(report: Report, args) -> None:
    rows = {(r["workload"], r["system"]): r for r in report.rows()}
    small, large = "skm@1,000", f"skm@{args.scale:,}"
    for w in ("scale-secret-read", "scale-list-first-page", "scale-list-middle-page"):
        a, b = rows.get((w, small)), rows.get((w, large))
        if a and b and a["p50_ms"]:
            report.notes[f"{w} p50 {large}/{small}"] = round(b["p50_ms"] / a["p50_ms"], 2)


def _stop(started: list[procs.Proc], pg) -> None:
    for p in reversed(started):
        with contextlib.suppress(Exception):
            p.stop()
    if pg is not None:
        with contextlib.suppress(Exception):
            pg.__exit__(None, None, None)


def _interrupted(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    # A failed in-process set-up can leave a storage worker thread behind (KeyServer.start does not
    # close storage when it fails); it must not keep the benchmark from exiting.
    os._exit(code)
