"""What every command shares: the login in use, the engine client, the output, the progress
bar, and finding VMs, hosts and disks by name or id."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import click
from rich.console import Console

from virtyard.cli.client import Engine, items
from virtyard.cli.errors import NOT_FOUND, USAGE, CliError
from virtyard.cli.output import Bar, Output, OutputOptions, check_format, progress
from virtyard.cli.session import Login, SessionStore

F = TypeVar("F", bound=Callable[..., Any])
UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                  r"[0-9a-fA-F]{12}$")


@dataclass(frozen=True)
class Kind:
    """A collection whose members the CLI finds by name or id."""

    collection: str  # vms
    tag: str  # vm (the JSON list's key)
    label: str  # VM (in messages)
    name_field: str = "name"


VMS = Kind("vms", "vm", "VM")
HOSTS = Kind("hosts", "host", "Host")
DISKS = Kind("disks", "disk", "Disk", "alias")
STORAGE_DOMAINS = Kind("storagedomains", "storage_domain", "Storage domain")


@dataclass
class App:
    """The state of one ``virtyard`` run (``ctx.obj``)."""

    out: Console
    err: Console
    engine_url: str | None = None
    user: str | None = None
    timeout: float = 300.0
    show_progress: bool = True
    store: SessionStore = field(default_factory=SessionStore)
    output: Output = field(init=False)
    _engine: Engine | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.output = Output(self.out, self.err)

    # -- the engine -----------------------------------------------------------------------

    def login(self) -> Login:
        return self.store.find(self.engine_url, self.user)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.login(), timeout=self.timeout)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    # -- progress -------------------------------------------------------------------------

    @property
    def progress_enabled(self) -> bool:
        return self.show_progress and self.err.is_terminal

    @contextmanager
    def progress(self, description: str, total: float | None = None) -> Iterator[Bar]:
        with progress(self.err, description, enabled=self.progress_enabled,
                      total=total) as bar:
            yield bar

    # -- finding things -------------------------------------------------------------------

    def find(self, kind: Kind, ident: str, **params: Any) -> dict[str, Any]:
        """The member of ``kind`` whose id or name is ``ident`` (exit 3 if none)."""
        if UUID.match(ident):
            try:
                found: dict[str, Any] = self.engine.get(f"/{kind.collection}/{ident}", **params)
                return found
            except CliError as exc:
                if exc.exit_code != NOT_FOUND:
                    raise
        if '"' in ident or "*" in ident or any(ord(c) < 32 for c in ident):
            listed = items(self.engine.get(f"/{kind.collection}", **params), kind.tag)
        else:
            listed = items(self.engine.get(f"/{kind.collection}", search=f'name="{ident}"',
                                           **params), kind.tag)
        matches = [m for m in listed if m.get(kind.name_field) == ident]
        if not matches:
            raise CliError("Not found", f"{kind.label} '{ident}' does not exist",
                           "ENTITY_NOT_FOUND", exit_code=NOT_FOUND)
        if len(matches) > 1:
            raise CliError("Ambiguous name", f"{len(matches)} {kind.label.lower()}s are named "
                           f"'{ident}': give the id", "AMBIGUOUS_NAME", exit_code=USAGE)
        return matches[0]

    def host_names(self) -> dict[str, str]:
        """Host id → name (one request)."""
        return {str(h["id"]): str(h.get("name", "")) for h in
                items(self.engine.get("/hosts"), "host")}

    def wait_for(self, probe: Callable[[], Any], done: Callable[[Any], bool], *,
                 timeout: float, interval: float = 0.5) -> tuple[Any, bool]:
        """Call ``probe`` until ``done`` holds or ``timeout`` passes: (last value, done?)."""
        deadline = time.monotonic() + timeout
        value = probe()
        while not done(value):
            if time.monotonic() >= deadline:
                return value, False
            time.sleep(interval)
            value = probe()
        return value, True


def current_app() -> App:
    return cast(App, click.get_current_context().find_object(App))


pass_app = click.make_pass_decorator(App)


def output_options(f: F) -> F:
    """``-o table|json|value``, ``--json`` and ``-c FIELD`` on a command."""

    @functools.wraps(f)
    def wrapper(*args: Any, output: str, as_json: bool, columns: tuple[str, ...],
                **kwargs: Any) -> Any:
        # A group's options (``virtyard vm --json``) hold unless the command gives its own.
        if as_json or output != "table" or columns:
            current_app().output.options = OutputOptions(
                "json" if as_json else check_format(output), columns)
        return f(*args, **kwargs)

    decorated: Any = click.option(
        "-c", "--column", "columns", multiple=True, metavar="FIELD",
        help="Only this field (repeat, or comma-separate); the names are the JSON keys.",
    )(wrapper)
    decorated = click.option("--json", "as_json", is_flag=True,
                             help="JSON output (the shapes of docs/cli.md).")(decorated)
    decorated = click.option("-o", "--output", default="table", show_default=True,
                             type=click.Choice(["table", "json", "value"]),
                             help="table for people; json or value for scripts.")(decorated)
    return cast(F, decorated)


def seconds(started: float) -> str:
    return f"{time.monotonic() - started:.1f} s"
