"""`skm`: one entry point for every process and every management operation.

Each `server/cli/cmd_*.py` module adds its commands through `register(sub)`;
a command's `func(args)` may be sync or async. Exit codes scripts can rely on:
0 ok, 1 error, 2 usage, 3 authentication/permission, 4 not found, 5 conflict,
6 server unavailable or sealed, 7 approval pending.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import os
import pkgutil
import sys

import aiohttp

from server.errors import (ApprovalRequired, ConfigError, Conflict, Forbidden, InvalidAppkey, KeyStoreNotFound,
                           NotFound, InvalidKeyId, Sealed, SKMError, TooManyAttempts, Unauthenticated, Unavailable)

EXIT = [((Unauthenticated, Forbidden, InvalidAppkey, TooManyAttempts), 3),
        ((NotFound, KeyStoreNotFound, InvalidKeyId), 4), ((Conflict,), 5), ((Sealed, Unavailable), 6),
        ((ApprovalRequired,), 7)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skm", description="Secure Key Manager: key server, system-key server, sidecar and admin CLI.",
        epilog="Management commands read SKM_ADDR, SKM_TOKEN and SKM_CACERT (or ~/.config/skm/config.toml).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import server.cli as pkg
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"server.cli.{info.name}").register(sub)
    return parser


def exit_code(e: BaseException) -> int:
    for classes, code in EXIT:
        if isinstance(e, classes):
            return code
    return 1


def run(args: argparse.Namespace) -> int:
    func = args.func
    result = asyncio.run(func(args)) if inspect.iscoroutinefunction(func) else func(args)
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from server import logs
    logs.configure("auto", os.environ.get("SKM_LOG_LEVEL", "warning"))
    if not hasattr(args, "func"):
        parser.parse_args([*(argv or sys.argv[1:]), "--help"])
    try:
        return run(args)
    except ApprovalRequired as e:
        print(f"pending approval: change request {e.request_id} was created; an approver must approve it "
              f"(`skm approval approve {e.request_id}`)", file=sys.stderr)
        return 7
    except SKMError as e:
        from server.cli.common import shown
        hint = f": {e.detail}" if e.detail else ""
        print(f"error: {shown(e.message)}{shown(hint)}", file=sys.stderr)   # a server message may quote a name
        return exit_code(e)
    except aiohttp.ClientConnectorError as e:
        print(f"error: cannot reach the server ({e.os_error.strerror if e.os_error else e}); "
              "is it running, and is SKM_ADDR right?", file=sys.stderr)
        return 6
    except KeyboardInterrupt:
        return 130
    except (TimeoutError, asyncio.TimeoutError):
        print("error: no answer in time; is the server (or sidecar) overloaded, and is SKM_ADDR right?",
              file=sys.stderr)
        return 6
    except aiohttp.ClientError as e:   # a TLS failure, a dropped connection: the server side, not a file
        print(f"error: the connection to the server failed ({type(e).__name__}: {e}); is SKM_ADDR right, "
              "and SKM_CACERT its CA?", file=sys.stderr)
        return 6
    except OSError as e:
        # A file named on the command line (--value-file, --password-file, --out ...) that cannot be read
        # or written: say which and why, not a traceback.
        from server.cli.common import shown
        where = f": {shown(e.filename)}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; check the path and its permissions", file=sys.stderr)
        return 1
    except Exception as e:   # noqa: BLE001 - the last resort: no traceback reaches a user unless asked for
        if os.environ.get("SKM_DEBUG"):
            raise
        from server.cli.common import shown
        print(f"error: unexpected {type(e).__name__}: {shown(str(e))[:300]} (SKM_DEBUG=1 shows the traceback; "
              "please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
