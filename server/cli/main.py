"""`skm`: one entry point for every process and every management operation.

Each `server/cli/cmd_*.py` module adds its commands through `register(sub)`;
a command's `func(args)` may be sync or async. Exit codes scripts can rely on:
0 ok, 1 error, 2 usage, 3 authentication/permission, 4 not found, 5 conflict,
6 server unavailable or sealed, 7 approval pending, 141 output pipe closed early.

Every failure is one line on stderr saying what to do (under `--json`, one JSON
object: {"error": {...}}); `SKM_DEBUG=1` shows the traceback of an unexpected one.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import types

from server.errors import (ApprovalRequired, Conflict, ConnectionFailed, Forbidden, InvalidAppkey, InvalidKeyId,
                           KeyStoreNotFound, NotFound, Sealed, SKMError, TooManyAttempts, Unauthenticated, Unavailable)

EXIT = [((Unauthenticated, Forbidden, InvalidAppkey, TooManyAttempts), 3),
        ((NotFound, KeyStoreNotFound, InvalidKeyId), 4), ((Conflict,), 5), ((Sealed, Unavailable), 6),
        ((ApprovalRequired,), 7)]
USAGE, BROKEN_PIPE = 2, 141


class SkmParser(argparse.ArgumentParser):
    """argparse with errors in the CLI's one shape; a command group given alone prints its help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("the following arguments are required: ") and \
                message.split(": ", 1)[1].split(",")[0] in ("COMMAND", "SUBCOMMAND", "KIND"):
            self.print_help()
            sys.exit(USAGE)
        _report(f"{message} (see `{self.prog} --help`)", USAGE, kind="usage")
        sys.exit(USAGE)


# Command names more than one cmd_*.py module adds to (cmd_rollout adds `skm key rollout ...`): their
# parser is always the whole tree.
SHARED_COMMANDS = frozenset({"key"})


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. Given the command line, only the module of its command (`cmd_<command>.py`) is
    imported when that module holds the whole command: every module imports what its commands need, and
    all of them together cost a quarter of a second of start-up (`skm backup create` is measured against
    a C tool). Without argv (or for `skm --help`, an unknown command, a shared one) the whole tree."""
    parser = SkmParser(
        prog="skm", description="Secure Key Manager: key server, system-key server, sidecar and admin CLI.",
        epilog="Management commands read SKM_ADDR, SKM_TOKEN and SKM_CACERT (or ~/.config/skm/config.toml).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    here = os.path.dirname(os.path.abspath(__file__))
    names = sorted(f[:-3] for f in os.listdir(here) if f.startswith("cmd_") and f.endswith(".py"))
    first = argv[0] if argv else ""
    if first.isidentifier() and first not in SHARED_COMMANDS and f"cmd_{first}" in names:
        importlib.import_module(f"server.cli.cmd_{first}").register(sub)
        if first in sub.choices:
            return parser
        return build_parser()
    for name in names:
        importlib.import_module(f"server.cli.{name}").register(sub)
    return parser


def exit_code(e: BaseException) -> int:
    code = getattr(e, "exit_code", None)
    if isinstance(code, int):
        return code
    for classes, code in EXIT:
        if isinstance(e, classes):
            return code
    return 1


def run(args: argparse.Namespace) -> int:
    result = args.func(args)
    if isinstance(result, types.CoroutineType):
        import asyncio          # only for the commands that are async (a sync one does not pay its import)
        result = asyncio.run(result)
    return int(result or 0)


def _report(text: str, code: int, *, kind: str = "error", **extra) -> None:
    from server.cli.common import report_error
    report_error(text, code, kind=kind, **extra)


def _skm_error(e: SKMError, args: argparse.Namespace) -> int:
    from server.cli.common import CliError, name_flags
    code = exit_code(e)
    flags = getattr(args, "api_flags", None)
    detail = name_flags(e.detail, flags)
    if isinstance(e, CliError):
        _report(detail or e.message, code)
        return code
    text = e.message + (f": {detail}" if detail else "")
    extra = {"status": e.status, "resultCode": e.result_code} if e.status >= 400 else {}
    _report(text, code, kind="server", **extra)
    return code


def _client_errors() -> tuple[type[BaseException], ...]:
    """aiohttp's errors once a command has imported it (the `except` evaluates this when an error passes):
    commands that never talk to a server do not pay aiohttp's ~150 ms import."""
    aio = sys.modules.get("aiohttp")
    return (aio.ClientError,) if aio is not None else ()


def _connection_error(e: BaseException, args: argparse.Namespace) -> str:
    """What went wrong talking to the server, and what to change."""
    import ssl

    import aiohttp
    from server.cli.common import connection
    try:
        conn = connection(args)
        where, src = conn.addr, conn.addr_source
    except SKMError:
        where, src = "the server", "SKM_ADDR"
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        cert_err = e.certificate_error
        if isinstance(cert_err, ssl.SSLCertVerificationError) and "hostname" in str(cert_err).lower():
            return (f"the certificate of {where} is not issued for that host name ({cert_err.verify_message}); "
                    f"use the name or address the certificate names in {src}")
        return (f"the certificate of {where} is not trusted ({getattr(cert_err, 'verify_message', None) or cert_err}); "
                "set SKM_CACERT to the CA certificate that signed it (the server's <data-dir>/pki/ca.pem)")
    if isinstance(e, aiohttp.ClientSSLError):
        return (f"the TLS handshake with {where} failed ({e.os_error if hasattr(e, 'os_error') else e}); is "
                f"{src} the key server's management listener?")
    if isinstance(e, aiohttp.ClientConnectorError):
        reason = e.os_error.strerror if e.os_error and e.os_error.strerror else str(e.os_error or e)
        return f"cannot reach {where} ({reason}); is the server running, and is {src} right?"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return (f"{where} closed the connection without answering; is {src} the key server's management "
                "listener (https, default port 8444)?")
    if isinstance(e, aiohttp.InvalidURL):
        return f"{src} is not a valid URL ({e}); use https://HOST:PORT"
    return f"talking to {where} failed ({type(e).__name__}: {e}); is {src} right and the server running?"


def _quiet_stdout() -> None:
    # The reader went away (`skm audit export | head`): drop what is still buffered instead of failing again
    # when the interpreter flushes stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    from server.cli.common import ERRORS
    argv = list(sys.argv[1:] if argv is None else argv)
    ERRORS.json = "--json" in argv
    parser = build_parser(argv)
    if not argv:
        parser.print_help()
        return USAGE
    args = parser.parse_args(argv)
    from server import logs            # (structlog itself is imported only if a line is written)
    logs.configure("auto", os.environ.get("SKM_LOG_LEVEL", "warning"))
    try:
        return run(args)
    except ApprovalRequired as e:
        if ERRORS.json:
            print(json.dumps({"changeRequestId": e.request_id, "status": "PENDING", "detail": e.detail}))
        else:
            print(f"pending approval: change request {e.request_id} was created; an approver must approve it "
                  f"(`skm approval approve {e.request_id}`)", file=sys.stderr)
        return 7
    except ConnectionFailed as e:
        _report(e.detail or e.message, 6, kind="connection")
        return 6
    except SKMError as e:
        return _skm_error(e, args)
    except _client_errors() as e:
        _report(_connection_error(e, args), 6, kind="connection")
        return 6
    except TimeoutError:          # asyncio.TimeoutError is this class (Python 3.11+)
        _report("the server did not answer in time; is it overloaded or is SKM_ADDR pointing somewhere else?", 6,
                kind="connection")
        return 6
    except BrokenPipeError:
        _quiet_stdout()
        return BROKEN_PIPE
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        # Local files: --value-file, --password-file, --output and the like.
        name = f"{e.filename}: " if e.filename else ""
        _report(f"{name}{e.strerror or e}", 1, kind="file")
        return 1
    except Exception as e:
        if os.environ.get("SKM_DEBUG"):
            raise
        _report(f"unexpected {type(e).__name__}: {e} (a bug: please report it; SKM_DEBUG=1 shows the traceback)", 1,
                kind="bug")
        return 1


if __name__ == "__main__":
    sys.exit(main())
