"""A `[[render]]` block of the sidecar config: a template rendered to a file, and how to reload its reader.

    [[render]]
    name = "pgpass"                               # label in logs, metrics and status (default: destination)
    template = "db:5432:app:app:{{ secret('payments/db-password') }}\\n"   # or template_file = "/etc/skm/x.tmpl"
    destination = "/run/app/pgpass"
    mode = "0400"                                 # octal string; no bit for others, ever
    owner = "app"                                 # user name or uid (default: the sidecar's)
    group = "app"                                 # group name or gid
    reload_signal = "HUP"                         # one reload action: a signal to the pid in reload_pidfile,
    reload_pidfile = "/run/app/app.pid"
    # reload_command = ["/usr/bin/systemctl", "reload", "app"]    # or a command (argv, no shell)
    # reload_post = "http://127.0.0.1:8080/-/reload"               # or a POST to a local URL

Everything here is checked when the sidecar starts (`skm sidecar --check` too): a bad block is refused
with a message naming it, never skipped.
"""
from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import shutil
import signal
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from server.errors import ConfigError

MAX_TEMPLATE_BYTES = 256 * 1024


@dataclass(frozen=True)
class RenderConfig:
    name: str = ""
    template: str = ""                    # inline Jinja2 text ...
    template_file: str = ""               # ... or a file holding it (read once, at start)
    destination: str = ""                 # absolute path; its directory must exist
    mode: str = "0400"
    owner: str = ""                       # "" = the sidecar's own user
    group: str = ""                       # "" = the sidecar's own group
    reload_signal: str = ""               # HUP, SIGUSR1, 10, ... (default HUP when reload_pidfile is set)
    reload_pidfile: str = ""
    reload_command: tuple[str, ...] = ()  # argv; run without a shell
    reload_post: str = ""                 # http://127.0.0.1[:port]/path (loopback only)
    reload_timeout: float = 10.0          # seconds a command or POST may take
    debounce: float = 0.1                 # seconds to gather a burst of changes into one render

    @property
    def label(self) -> str:
        return self.name or self.destination

    # ------------------------------------------------------------ checks at start
    def validate(self) -> "RenderConfig":
        where = f"render block {self.label or '(unnamed)'!r}"
        if self.name and not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", self.name):
            raise ConfigError(f"{where}: name may use letters, digits, '.', '_' and '-' (at most 64)")
        if bool(self.template) == bool(self.template_file):
            raise ConfigError(f"{where}: give the template inline (template) or as a file (template_file), one of them")
        self.destination_path(where)
        self.mode_bits(where)
        self.uid(where)
        self.gid(where)
        self.reload_action(where)
        if not 0 < self.reload_timeout <= 300:
            raise ConfigError(f"{where}: reload_timeout must be more than 0 and at most 300 seconds")
        if not 0 <= self.debounce <= 10:
            raise ConfigError(f"{where}: debounce must be 0 to 10 seconds")
        from sidecar.templates import compile_template     # syntax errors are refused at start too
        compile_template(self.template_text(where), where)
        return self

    def template_text(self, where: str = "") -> str:
        if self.template:
            return self.template
        p = Path(self.template_file)
        try:
            st = p.stat()
            if st.st_size > MAX_TEMPLATE_BYTES:
                raise ConfigError(f"{where}: template_file {p} is larger than {MAX_TEMPLATE_BYTES} bytes")
            text = p.read_text()
        except (OSError, UnicodeDecodeError):
            raise ConfigError(f"{where}: template_file {p} cannot be read as text") from None
        if st.st_mode & stat.S_IWOTH:
            # Whoever can edit the template chooses which secrets land in the file.
            raise ConfigError(f"{where}: template_file {p} is writable by others; chmod o-w it")
        return text

    def destination_path(self, where: str = "") -> Path:
        d = Path(self.destination)
        if not self.destination or not d.is_absolute():
            raise ConfigError(f"{where}: destination must be an absolute path")
        parent = d.parent
        try:
            pst = parent.stat()
        except OSError:
            raise ConfigError(f"{where}: the destination's directory {parent} does not exist; create it "
                              "(preferably on a tmpfs such as /run)") from None
        if not stat.S_ISDIR(pst.st_mode):
            raise ConfigError(f"{where}: {parent} is not a directory")
        if pst.st_mode & stat.S_IWOTH and not pst.st_mode & stat.S_ISVTX:
            raise ConfigError(f"{where}: {parent} is writable by everyone (without the sticky bit): anyone "
                              "could replace the file; use a directory only the sidecar can write")
        if d.is_symlink():
            raise ConfigError(f"{where}: destination {d} is a symbolic link; name the real path")
        if d.exists() and not d.is_file():
            raise ConfigError(f"{where}: destination {d} exists and is not a regular file")
        return d

    def mode_bits(self, where: str = "") -> int:
        if not re.fullmatch(r"0?[0-7]{3}", self.mode):
            raise ConfigError(f"{where}: mode must be an octal string such as \"0400\" or \"0440\"")
        bits = int(self.mode, 8)
        if bits & 0o007:
            raise ConfigError(f"{where}: mode {self.mode} gives others access; a rendered secret is never "
                              "world-readable (use \"0400\", or \"0440\" with a group)")
        if not bits & 0o444:
            raise ConfigError(f"{where}: mode {self.mode} lets nobody read the file")
        return bits

    def uid(self, where: str = "") -> int | None:
        if not self.owner:
            return None
        try:
            uid = int(self.owner) if self.owner.isdigit() else pwd.getpwnam(self.owner).pw_uid
        except KeyError:
            raise ConfigError(f"{where}: owner {self.owner!r} is not a user on this host") from None
        if os.geteuid() != 0 and uid != os.geteuid():
            raise ConfigError(f"{where}: only a sidecar running as root can give the file to owner {self.owner!r}")
        return uid

    def gid(self, where: str = "") -> int | None:
        if not self.group:
            return None
        try:
            gid = int(self.group) if self.group.isdigit() else grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise ConfigError(f"{where}: group {self.group!r} is not a group on this host") from None
        if os.geteuid() != 0 and gid not in (os.getegid(), *os.getgroups()):
            raise ConfigError(f"{where}: the sidecar's user is not in group {self.group!r}, so it cannot give "
                              "the file to it")
        return gid

    def reload_action(self, where: str = "") -> "ReloadAction | None":
        given = [n for n, on in (("reload_signal/reload_pidfile", self.reload_signal or self.reload_pidfile),
                                 ("reload_command", self.reload_command), ("reload_post", self.reload_post)) if on]
        if len(given) > 1:
            raise ConfigError(f"{where}: give one reload action, not {' and '.join(given)}")
        if self.reload_signal or self.reload_pidfile:
            if not self.reload_pidfile:
                raise ConfigError(f"{where}: reload_signal needs reload_pidfile (the file holding the pid to signal)")
            if not Path(self.reload_pidfile).is_absolute():
                raise ConfigError(f"{where}: reload_pidfile must be an absolute path")
            return ReloadAction("signal", signal=parse_signal(self.reload_signal or "HUP", where),
                                pidfile=self.reload_pidfile)
        if self.reload_command:
            exe = shutil.which(self.reload_command[0])
            if exe is None:
                raise ConfigError(f"{where}: reload_command {self.reload_command[0]!r} is not an executable on "
                                  "PATH; give the command as a list, e.g. [\"/usr/bin/systemctl\", \"reload\", \"app\"]")
            return ReloadAction("command", argv=(exe, *self.reload_command[1:]))
        if self.reload_post:
            u = urlsplit(self.reload_post)
            if u.scheme not in ("http", "https") or not u.hostname or not _loopback(u.hostname):
                raise ConfigError(f"{where}: reload_post must be an http(s) URL on this host "
                                  "(127.0.0.1, ::1 or localhost)")
            return ReloadAction("post", url=self.reload_post)
        return None


@dataclass(frozen=True)
class ReloadAction:
    kind: str                          # signal | command | post
    signal: int = 0
    pidfile: str = ""
    argv: tuple[str, ...] = ()
    url: str = ""


def parse_signal(text: str, where: str = "") -> int:
    t = text.strip().upper()
    try:
        num = int(t) if t.isdigit() else int(getattr(signal, t if t.startswith("SIG") else "SIG" + t))
        signal.Signals(num)
    except (AttributeError, ValueError, TypeError):
        raise ConfigError(f"{where}: reload_signal {text!r} is not a signal (HUP, USR1, TERM, ...)") from None
    if num == 0:
        raise ConfigError(f"{where}: reload_signal 0 sends nothing")
    return num


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_blocks(blocks: tuple[RenderConfig, ...]) -> None:
    seen_names: set[str] = set()
    seen_dest: set[str] = set()
    for b in blocks:
        b.validate()
        if b.label in seen_names:
            raise ConfigError(f"two render blocks are named {b.label!r}; give each its own name")
        dest = os.path.normpath(b.destination)
        if dest in seen_dest:
            raise ConfigError(f"two render blocks write {dest}; one file, one block")
        seen_names.add(b.label)
        seen_dest.add(dest)
