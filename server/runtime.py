"""Everything a running key server holds, in one object kept on the aiohttp app.

No module-level state: handlers reach services through `runtime(request)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from server.barrier.barrier import Barrier
from server.events import EventBus
from server.keys.service import KeyService
from server.settings import ServerConfig
from server.storage.base import Storage


@dataclass
class Runtime:
    config: ServerConfig
    storage: Storage
    barrier: Barrier
    keys: KeyService
    events: EventBus
    access: Any = None        # server.access.clientauth.ClientAccess
    authdata: Any = None      # server.access.authdata.AuthData
    certificates: Any = None  # server.access.certificates.Certificates
    callers: Any = None       # server.access.callers.CallerAuth (v1.2/v1.3 credentials)
    operators: Any = None     # server.access.operators.OperatorAuth (management plane)
    access_seal: Any = None   # server.access.seal.AccessSeal (operators, roles and credentials sealed)
    changes: Any = None       # server.access.approvals.ChangeGate
    audit: Any = None         # server.audit.Audit
    metrics: Any = None       # server.metrics.Metrics
    extra: dict[str, Any] = field(default_factory=dict)


RUNTIME = web.AppKey("skm_runtime", Runtime)


def _request_key(name: str):
    # web.RequestKey exists on newer aiohttp; plain strings work everywhere.
    maker = getattr(web, "RequestKey", None)
    return maker(name, object) if maker else name


CLIENT_CTX = _request_key("skm_client")
OPERATOR = _request_key("skm_operator")
KEY = _request_key("skm_key")
ERROR = _request_key("skm_error")     # the SKMError a request ended with, for audit


def runtime(request: web.Request) -> Runtime:
    # The root application of either listener holds the runtime; config_dict builds a ChainMap
    # per call, and this runs several times per request.
    try:
        return request.match_info.apps[0][RUNTIME]
    except (IndexError, KeyError, AttributeError):
        return request.config_dict[RUNTIME]


def request_value(request: web.Request, key) -> Any:
    """`request.get(key)` for the per-request values above. A Request is a MutableMapping whose
    inherited `get` raises and catches KeyError for an absent key (~1 µs; five absent per client
    request), so this reads aiohttp's state dict directly, falling back to the public `get`."""
    try:
        return request._state.get(key)
    except AttributeError:
        return request.get(key)
