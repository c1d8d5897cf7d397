"""Semantic action names of audit records: `(method, route) -> (action, change)`.

`action` is `resource.verb` (`secret.read`, `key.create`, `operator.login`); `change` is True when the
request changes state, which is what `skm audit query --changes` shows. A `{name}` in an action is
filled from the route's match (`auth.{action}` -> `auth.delete`). Console page views (GET) are not
recorded at all. Every registered route must appear here (tests/audit/test_actions.py checks).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

_C = "/keymanager/{version}/appkey/{appkey}"
_KS = "/api/v1/keystores/{keystore_id}"
_KEY = "/api/v1/keys/{key_id}"
_CON = "/console"


@dataclass(frozen=True)
class Action:
    name: str
    change: bool


def _t(*rows: tuple[str, str, str, bool]) -> dict[tuple[str, str], Action]:
    return {(m, p): Action(a, c) for m, p, a, c in rows}


TABLE: dict[tuple[str, str], Action] = _t(
    # ---- client API (data plane)
    ("GET", _C + "/confirm", "client.confirm", False),
    ("GET", _C + "/secrets/{keyid}", "secret.read", False),
    ("PUT", _C + "/secrets/{keyid}", "secret.update", True),
    ("POST", _C + "/symmetric-keys/{keyid}/encrypt", "key.encrypt", False),
    ("POST", _C + "/symmetric-keys/{keyid}/decrypt", "key.decrypt", False),
    ("POST", _C + "/symmetric-keys/{keyid}/create-local-key", "key.datakey", False),
    ("GET", _C + "/symmetric-keys/{keyid}/symmetric-key", "key.export", False),
    ("POST", _C + "/asymmetric-keys/{keyid}/sign", "key.sign", False),
    ("POST", _C + "/asymmetric-keys/{keyid}/verify", "key.verify", False),
    ("POST", _C + "/asymmetric-keys/{keyid}/sign-standard", "key.sign", False),
    ("POST", _C + "/asymmetric-keys/{keyid}/verify-standard", "key.verify", False),
    ("GET", _C + "/asymmetric-keys/{keyid}/privateKey", "key.export", False),
    ("GET", _C + "/asymmetric-keys/{keyid}/publicKey", "publickey.read", False),
    ("POST", _C + "/keys/secrets/create", "key.create", True),
    ("POST", _C + "/keys/symmetric-keys/create", "key.create", True),
    ("POST", _C + "/keys/asymmetric-keys/create", "key.create", True),
    ("PUT", _C + "/keys/{keyid}/delete", "key.schedule-deletion", True),
    ("DELETE", _C + "/keys/{keyid}", "key.delete", True),
    ("POST", _C + "/auths/{kind}", "auth.add", True),
    ("PUT", _C + "/auths/{kind}/delete", "auth.schedule-deletion", True),
    ("POST", _C + "/auths/{kind}/delete", "auth.delete", True),
    ("GET", _C + "/keystores", "keystore.list", False),
    ("GET", _C + "/keystores/{keystoreid}", "keystore.read", False),
    ("GET", _C + "/keystores/{keystoreid}/keys", "key.list", False),
    ("GET", _C + "/keystores/{keystoreid}/keys/{keyid}", "key.read", False),
    ("GET", _C + "/keystores/{keystoreid}/{kind}", "auth.list", False),
    ("POST", _C + "/auths/certificates", "cert.create", True),
    ("PUT", _C + "/auths/certificates/delete", "cert.schedule-deletion", True),
    ("POST", _C + "/auths/certificates/delete", "cert.delete", True),
    ("GET", _C + "/keystores/{keystoreid}/certificates", "cert.list", False),
    ("POST", "/oauth2/token/create", "bearer.create", True),
    ("POST", "/oauth2/token/revoke", "bearer.revoke", True),
    ("GET", _C + "/events", "events.subscribe", False),
    ("POST", _C + "/sidecar/acks", "sidecar.ack", False),       # a heartbeat: telemetry, not a change
    ("POST", _C + "/sidecar/reads", "sidecar.report-reads", False),
    # ---- management API
    ("GET", "/api/v1/projects", "project.list", False),
    ("POST", "/api/v1/projects", "project.create", True),
    ("GET", "/api/v1/projects/{project_id}", "project.read", False),
    ("GET", "/api/v1/operators/{name}/roles", "operator.roles", False),
    ("POST", "/api/v1/operators/{name}/roles", "operator.grant", True),
    ("DELETE", "/api/v1/operators/{name}/roles", "operator.revoke", True),
    ("POST", "/api/v1/approvals/{request_id}/collect", "approval.collect", True),
    ("POST", "/api/v1/keystores", "keystore.create", True),
    ("GET", "/api/v1/keystores", "keystore.list", False),
    ("GET", _KS, "keystore.read", False),
    ("PATCH", _KS, "keystore.update", True),
    ("DELETE", _KS, "keystore.delete", True),
    ("POST", _KS + "/keys", "key.create", True),
    ("GET", _KS + "/keys", "key.list", False),
    ("GET", _KEY, "key.read", False),
    ("PATCH", _KEY, "key.update", True),
    ("POST", _KEY + "/rotate", "key.rotate", True),
    ("POST", _KEY + "/schedule-deletion", "key.schedule-deletion", True),
    ("POST", _KEY + "/cancel-deletion", "key.cancel-deletion", True),
    ("DELETE", _KEY, "key.delete", True),
    ("POST", _KEY + "/reveal", "key.reveal", False),
    ("GET", _KEY + "/rollout", "key.rollout", False),
    ("POST", _KEY + "/versions/{version}/disable", "key.version-disable", True),
    ("POST", _KEY + "/versions/{version}/enable", "key.version-enable", True),
    ("GET", _KS + "/auths/{kind}", "auth.list", False),
    ("POST", _KS + "/auths/{kind}", "auth.add", True),
    ("POST", _KS + "/auths/{kind}/schedule-deletion", "auth.schedule-deletion", True),
    ("POST", _KS + "/auths/{kind}/cancel-deletion", "auth.cancel-deletion", True),
    ("POST", _KS + "/auths/{kind}/delete", "auth.delete", True),
    ("GET", _KS + "/certificates", "cert.list", False),
    ("POST", _KS + "/certificates", "cert.create", True),
    ("GET", _KS + "/certificates/{name}", "cert.read", False),
    ("GET", _KS + "/certificates/{name}/bundle", "cert.download", False),
    ("POST", _KS + "/certificates/schedule-deletion", "cert.schedule-deletion", True),
    ("POST", _KS + "/certificates/cancel-deletion", "cert.cancel-deletion", True),
    ("POST", _KS + "/certificates/delete", "cert.delete", True),
    ("POST", "/api/v1/login", "operator.login", False),
    ("GET", "/api/v1/whoami", "operator.whoami", False),
    ("GET", "/api/v1/operators", "operator.list", False),
    ("POST", "/api/v1/operators", "operator.create", True),
    ("GET", "/api/v1/operators/{name}", "operator.read", False),
    ("PATCH", "/api/v1/operators/{name}", "operator.update", True),
    ("DELETE", "/api/v1/operators/{name}", "operator.delete", True),
    ("POST", "/api/v1/tokens", "token.create", True),
    ("GET", "/api/v1/tokens", "token.list", False),
    ("DELETE", "/api/v1/tokens/{token_id}", "token.revoke", True),
    ("GET", "/api/v1/approvals", "approval.list", False),
    ("GET", "/api/v1/approvals/{request_id}", "approval.read", False),
    ("POST", "/api/v1/approvals/{request_id}/approve", "approval.approve", True),
    ("POST", "/api/v1/approvals/{request_id}/deny", "approval.deny", True),
    ("POST", "/api/v1/approvals/{request_id}/cancel", "approval.cancel", True),
    ("GET", "/api/v1/audit", "audit.query", False),
    ("GET", "/api/v1/audit/verify", "audit.verify", False),
    ("GET", "/api/v1/audit/checkpoints", "audit.checkpoints", False),
    ("GET", "/api/v1/audit/pubkey", "audit.pubkey", False),
    ("GET", "/api/v1/system/status", "system.status", False),
    ("POST", "/api/v1/system/keyring/refresh", "system.keyring-refresh", True),
    ("POST", "/api/v1/system/rewrap", "system.rewrap", True),
    ("GET", "/api/v1/system/rewrap", "system.rewrap-status", False),
    ("POST", "/api/v1/system/keyring/retire/{version}", "system.keyring-retire", True),
    ("POST", "/api/v1/access-keys", "accesskey.create", True),
    ("GET", "/api/v1/access-keys", "accesskey.list", False),
    ("DELETE", "/api/v1/access-keys/{key_id}", "accesskey.delete", True),
    ("GET", "/api/v1/usage", "usage.read", False),
    # A backup reads everything (sealed): a sensitive export, not a change.
    ("POST", "/api/v1/backup", "backup.create", False),
    # ---- console (its page views are not recorded; its forms are)
    ("GET", _CON + "/audit/export", "audit.export", False),
    ("POST", _CON + "/login", "operator.login", False),
    ("POST", _CON + "/logout", "operator.logout", False),
    ("POST", _CON + "/approvals/{request_id}/approve", "approval.approve", True),
    ("POST", _CON + "/approvals/{request_id}/deny", "approval.deny", True),
    ("POST", _CON + "/approvals/{request_id}/cancel", "approval.cancel", True),
    ("POST", _CON + "/keystores/{keystore_id}/auth/{kind}/add", "auth.add", True),
    ("POST", _CON + "/keystores/{keystore_id}/auth/{kind}/{action}", "auth.{action}", True),
    ("POST", _CON + "/keystores/{keystore_id}/certificates/new", "cert.create", True),
    ("POST", _CON + "/keystores/{keystore_id}/certificates/{action}", "cert.{action}", True),
    ("POST", _CON + "/keystores/{keystore_id}/certificates/bundle", "cert.download", False),
    ("POST", _CON + "/keystores/{keystore_id}/keys/new", "key.create", True),
    ("POST", _CON + "/keys/{key_id}/reveal", "key.reveal", False),
    ("POST", _CON + "/keys/{key_id}/rotate", "key.rotate", True),
    ("POST", _CON + "/keys/{key_id}/schedule-deletion", "key.schedule-deletion", True),
    ("POST", _CON + "/keys/{key_id}/cancel-deletion", "key.cancel-deletion", True),
    ("POST", _CON + "/keys/{key_id}/delete", "key.delete", True),
    ("POST", _CON + "/keys/{key_id}/edit", "key.update", True),
    ("POST", _CON + "/keystores/new", "keystore.create", True),
    ("POST", _CON + "/projects/new", "project.create", True),
    ("POST", _CON + "/keystores/{keystore_id}/settings", "keystore.update", True),
    ("POST", _CON + "/operators/new", "operator.create", True),
    ("POST", _CON + "/operators/{name}/{action}", "operator.{action}", True),
    ("POST", _CON + "/tokens/new", "token.create", True),
    ("POST", _CON + "/tokens/{token_id}/revoke", "token.revoke", True),
    ("POST", _CON + "/keystores/{keystore_id}/delete", "keystore.delete", True),
    ("POST", _CON + "/keystores/{keystore_id}/certificates/pem", "cert.download", False),
    ("POST", _CON + "/me/password", "operator.password-change", True),
    ("POST", _CON + "/me/tokens/{token_id}/revoke", "token.revoke", True),
    ("POST", _CON + "/me/access-keys/{key_id}/delete", "accesskey.delete", True),
)

UNMATCHED = Action("http.unmatched", False)      # no route: a 404/405 for an unknown path
# A dynamic part filled into an action name must be a plain word (it comes from the URL).
_WORD = frozenset("abcdefghijklmnopqrstuvwxyz-")


def lookup(method: str, route: str | None, match: dict | None = None) -> Action | None:
    """The action of a request; None for an unknown route (the caller records `METHOD route`)."""
    if route is None:
        return UNMATCHED
    a = TABLE.get((method, route))
    if a is None and method == "HEAD":
        a = TABLE.get(("GET", route))
    if a is None or "{" not in a.name:
        return a
    try:
        filled = a.name.format(**{k: v for k, v in (match or {}).items() if set(v) <= _WORD and len(v) <= 32})
    except (KeyError, IndexError, ValueError):
        filled = a.name.split(".")[0] + ".other"
    return Action(filled, a.change)


# Console GETs that are more than a page view: taking the audit log away is itself audited.
_CONSOLE_RECORDED = frozenset({_CON + "/audit/export"})


def is_console_view(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") and (path == _CON or path.startswith(_CON + "/")) \
        and path not in _CONSOLE_RECORDED


def change_actions() -> list[str]:
    return sorted({a.name for a in TABLE.values() if a.change})


# Actions written outside a route of TABLE: approvals decided and applied, jobs, sidecar reports, the writer.
EVENTS = ("approval.requested", "approval.denied", "approval.applied", "approval.failed", "approval.expired",
          "backup.start", "audit.sealed-dropped", "sidecar.reads-dropped", "access.sealed", UNMATCHED.name)
# What a `{name}` in an action of TABLE is filled with (the alternatives its console route accepts).
FILLS = {"auth.{action}": ("schedule-deletion", "cancel-deletion", "delete"),
         "cert.{action}": ("schedule-deletion", "cancel-deletion", "delete"),
         "operator.{action}": ("disable", "enable", "unlock")}


@functools.cache
def known_actions() -> frozenset[str]:
    """Every action name a record can carry."""
    out = set(EVENTS)
    for a in TABLE.values():
        if "{" not in a.name:
            out.add(a.name)
            continue
        out.add(a.name.split(".")[0] + ".other")          # what `lookup` names an unexpected fill
        out.update(a.name.replace("{action}", fill) for fill in FILLS.get(a.name, ()))
    return frozenset(out)


def check_filter(action: str) -> str | None:
    """None when `action` names an action (`key.create`) or a resource (`key`: all of its actions); else
    the one-line reason to refuse it, with the closest names."""
    import difflib
    known = known_actions()
    resources = {a.split(".")[0] for a in known}
    if action in known or action in resources:
        return None
    close = difflib.get_close_matches(action, sorted(known | resources), n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"the resources are {', '.join(sorted(resources))}"
    return (f"no audit action is named {action[:64]!r}; {hint} (give an action such as key.create, or a resource "
            "such as key for all of its actions)")
