"""The audit log: records, chain, checkpoints, the writer and the request middleware (docs/audit.md)."""
from __future__ import annotations

from server.audit.chain import VerifyResult, verify_chain
from server.audit.log import Audit, parse_time
from server.audit.record import FIELDS, GENESIS, digest, record_hash, to_api
from server.settings import AuditSettings

__all__ = ["Audit", "AuditSettings", "AUDIT_ACTION", "AUDIT_DETAIL", "BODY_MODEL", "BODY_NOT_READ", "FIELDS",
           "GENESIS", "NO_BODY_HMAC", "VerifyResult", "digest", "install", "parse_time", "record_hash", "to_api",
           "verify_chain"]

# The request middleware's names load with it, on first use: it brings aiohttp, the runtime and the key
# service, which offline tools that only check a chain (skm backup restore, audit verify) do without.
_MIDDLEWARE_NAMES = frozenset({"AUDIT_ACTION", "AUDIT_DETAIL", "BODY_MODEL", "BODY_NOT_READ", "NO_BODY_HMAC"})


def __getattr__(name: str):
    if name in _MIDDLEWARE_NAMES:
        from server.audit import middleware
        return getattr(middleware, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install(rt) -> None:
    from server.audit.middleware import middleware
    rt.audit = audit = Audit(rt.storage, rt.barrier, AuditSettings.from_config(rt.config), config=rt.config)
    audit.metrics = rt.metrics
    rt.extra.setdefault("data_middlewares", []).append(middleware(rt.audit, "data"))
    rt.extra.setdefault("mgmt_middlewares", []).append(middleware(rt.audit, "mgmt"))

    async def start(rt_) -> None:
        # The process that runs the jobs signs checkpoints (worker 0; each replica's).
        from server.audit.checkpoints import Checkpointer
        a = rt_.audit
        if a is None or not a.settings.enabled:
            return
        a.checkpointer = cp = Checkpointer(a, a.sinks(), every=max(1, a.settings.checkpoint_every),
                                           interval=max(0.05, a.settings.checkpoint_interval))
        rt_.barrier.on_change.append(cp.wake)
        cp.start()

    async def stop(rt_) -> None:
        if rt_.audit is not None:
            await rt_.audit.close()
            if rt_.audit.checkpointer is not None:
                await rt_.audit.checkpointer.stop()

    rt.extra.setdefault("on_start", []).append(start)
    rt.extra.setdefault("on_stop", []).append(stop)
