"""Logins kept on disk: one file per engine and user, readable only by its owner.

``$XDG_CONFIG_HOME/virtyard/`` (default ``~/.config/virtyard/``, mode 0700) holds
``<host>[:<port>]-<user>.json`` (mode 0600) per login — the engine's URL, the user, the bearer
token, the CA file — and ``current``, the name of the file the last ``virtyard login`` wrote.
A command uses the current login unless ``--engine``/``--user`` (``VIRTYARD_ENGINE``,
``VIRTYARD_USER``) pick another. Passwords are never stored: when a token expires the user
logs in again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

from virtyard.cli.errors import AUTH, USAGE, CliError

CURRENT = "current"
_UNSAFE = re.compile(r"[^A-Za-z0-9@._:+-]")


def config_dir() -> Path:
    """Where logins live (``$XDG_CONFIG_HOME/virtyard``, else ``~/.config/virtyard``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "virtyard"


def normalize_url(url: str) -> str:
    """The engine's base URL, ``https://host[:port]``, from what a user types: a bare host,
    ``host:port``, or a URL that goes on to ``/ovirt-engine/api``."""
    text = url.strip()
    if not text:
        raise CliError("Invalid URL", "the engine's URL is empty", "BAD_URL", exit_code=USAGE)
    if "://" not in text:
        text = "https://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise CliError("Invalid URL", f"'{url}' is not an https://HOST[:PORT] URL", "BAD_URL",
                       exit_code=USAGE)
    try:
        port = parts.port
    except ValueError:
        raise CliError("Invalid URL", f"'{url}' has a bad port", "BAD_URL",
                       exit_code=USAGE) from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def netloc(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


@dataclass
class Login:
    """One saved login."""

    url: str  # https://host[:port]
    user: str
    token: str
    ca_file: str = ""  # empty: the system's trusted CAs
    expires_ms: int = 0  # the engine's first expiry (it slides on use)

    @property
    def file_name(self) -> str:
        return _UNSAFE.sub("_", f"{netloc(self.url)}-{self.user}") + ".json"


class SessionStore:
    """The saved logins of this user."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or config_dir()

    def path(self, login: Login) -> Path:
        return self.root / login.file_name

    def save(self, login: Login) -> Path:
        """Write the login (mode 0600, atomically) and make it the current one."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.path(login)
        _write_private(target, json.dumps(asdict(login), indent=1) + "\n")
        _write_private(self.root / CURRENT, login.file_name + "\n")
        return target

    def remove(self, login: Login) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(login).unlink()
        if self._current_name() == login.file_name:
            with contextlib.suppress(FileNotFoundError):
                (self.root / CURRENT).unlink()

    def _current_name(self) -> str:
        try:
            return (self.root / CURRENT).read_text().strip()
        except OSError:
            return ""

    def _read(self, path: Path) -> Login | None:
        try:
            data = json.loads(path.read_text())
            return Login(url=str(data["url"]), user=str(data["user"]),
                         token=str(data["token"]), ca_file=str(data.get("ca_file") or ""),
                         expires_ms=int(data.get("expires_ms") or 0))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def all(self) -> list[Login]:
        if not self.root.is_dir():
            return []
        found = (self._read(p) for p in sorted(self.root.glob("*.json")))
        return [login for login in found if login is not None]

    def find(self, engine: str | None = None, user: str | None = None) -> Login:
        """The login to use: for ``engine`` and ``user`` if given, else the current one."""
        if engine:
            base = normalize_url(engine)
            matches = [s for s in self.all() if s.url == base and (not user or s.user == user)]
            current = self._current_name()
            if len(matches) > 1:
                matches = [s for s in matches if s.file_name == current] or matches
            if len(matches) == 1:
                return matches[0]
            if matches:
                users = ", ".join(sorted(s.user for s in matches))
                raise CliError("Several logins", f"{base} has logins for {users}: pick one "
                               "with --user", "AMBIGUOUS_LOGIN", exit_code=USAGE)
            who = f" as {user}" if user else ""
            raise CliError("Not logged in", f"no login to {base}{who}", "NOT_LOGGED_IN",
                           exit_code=AUTH, hint=f"run: virtyard login {base}")
        if user:
            matches = [s for s in self.all() if s.user == user]
            if len(matches) == 1:
                return matches[0]
            if matches:
                raise CliError("Several logins", f"{user} is logged in to several engines: "
                               "pick one with --engine", "AMBIGUOUS_LOGIN", exit_code=USAGE)
            raise CliError("Not logged in", f"no login as {user}", "NOT_LOGGED_IN",
                           exit_code=AUTH, hint="run: virtyard login URL --user " + user)
        name = self._current_name()
        login = self._read(self.root / name) if name and "/" not in name else None
        if login is None:
            raise CliError("Not logged in", "no engine login on this account", "NOT_LOGGED_IN",
                           exit_code=AUTH, hint="run: virtyard login URL")
        return login


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file created mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
