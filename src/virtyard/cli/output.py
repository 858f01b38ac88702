"""What the CLI prints: tables for people, ``--json`` and ``-o value -c FIELD`` for scripts,
and a progress bar on stderr while a long operation runs.

Every command turns the engine's objects into *rows*: flat dicts with fixed keys (the JSON
shapes of ``docs/cli.md``). The same row feeds all three formats, so a table column, a JSON key
and a ``-c`` field are one name. Tables use Rich, with colours only on a terminal (and never
with ``NO_COLOR`` or ``--no-color``); sizes and times are made readable there, raw in JSON and
values. Nothing the engine sends is read as Rich markup.
"""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from virtyard.cli.errors import USAGE, CliError

FORMATS = ("table", "json", "value")
Row = dict[str, Any]

STATUS_STYLES = {
    "up": "green", "active": "green", "free": "green", "ok": "green", "normal": "",
    "down": "dim", "maintenance": "yellow", "installing": "cyan", "connecting": "cyan",
    "powering_up": "cyan", "wait_for_launch": "cyan", "migrating": "cyan",
    "powering_down": "cyan", "used": "yellow", "locked": "yellow", "warning": "yellow",
    "paused": "yellow", "non_responsive": "red", "unknown": "red", "unusable": "red",
    "not_responding": "red", "error": "red", "alert": "red", "illegal": "red",
}


@dataclass(frozen=True)
class Column:
    """A column of a table: the row's key, its header, how to show its value."""

    key: str
    header: str = ""
    kind: str = "text"  # text | size | status | bool | time | list
    wrap: bool = False  # may wrap (long free text); others stay on one line

    @property
    def title(self) -> str:
        return self.header or self.key.upper().replace("_", " ")


@dataclass
class OutputOptions:
    format: str = "table"
    columns: tuple[str, ...] = ()


def human_size(value: Any) -> str:
    """Bytes as people read them (binary units)."""
    if not isinstance(value, int) or isinstance(value, bool):
        return "" if value is None else str(value)
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(size)} B"
            return f"{size:.0f} {unit}" if size == int(size) else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)  # pragma: no cover


def human_time(value: Any) -> str:
    """An ISO 8601 time as local ``YYYY-MM-DD HH:MM:SS``."""
    if not isinstance(value, str) or not value:
        return "" if value is None else str(value)
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def plain(value: Any, sep: str = ",") -> str:
    """A value as one line of text for ``-o value`` (None → empty)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return sep.join(plain(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return " ".join(str(value).split()) if "\n" in str(value) else str(value)


def cell(column: Column, value: Any) -> Text:
    """A table cell: readable, styled by status on a terminal, never parsed as markup."""
    if column.kind == "size":
        return Text(human_size(value))
    if column.kind == "time":
        return Text(human_time(value))
    if column.kind == "bool":
        return Text("" if value is None else ("yes" if value else "no"))
    if column.kind == "list":
        return Text(plain(value, ", "))
    text = plain(value)
    if column.kind == "status":
        return Text(text, style=STATUS_STYLES.get(text, ""))
    return Text(text)


@dataclass
class Output:
    """Prints rows in the chosen format."""

    out: Console
    err: Console
    options: OutputOptions = field(default_factory=OutputOptions)

    # -- choosing fields ----------------------------------------------------------------

    def chosen(self, rows: Sequence[Row], columns: Sequence[Column]) -> list[Column]:
        """The columns ``-c`` asks for (checked against the rows' keys), else the default."""
        if not self.options.columns:
            return list(columns)
        by_key = {c.key: c for c in columns}
        known: list[str] = list(by_key)
        for row in rows:
            known.extend(k for k in row if k not in known)
        wanted = [c for part in self.options.columns for c in part.split(",") if c]
        unknown = [c for c in wanted if c not in known]
        if unknown and (rows or columns):
            raise CliError("Unknown column", f"{', '.join(unknown)} (known: "
                           f"{', '.join(known)})", "UNKNOWN_COLUMN", exit_code=USAGE)
        return [by_key.get(c, Column(c)) for c in wanted]

    # -- printing ---------------------------------------------------------------------

    def json(self, data: Any) -> None:
        # Plain print (not Rich): exact bytes, no wrapping, no highlighting.
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def json_line(self, data: Any) -> None:
        """One JSON document on one line (streams: ``events --follow --json``)."""
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def values(self, rows: Sequence[Row], columns: Sequence[Column]) -> None:
        for row in rows:
            sys.stdout.write("\t".join(plain(row.get(c.key)) for c in columns) + "\n")
        sys.stdout.flush()

    def table(self, rows: Sequence[Row], columns: Sequence[Column]) -> None:
        table = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 3, 0, 0),
                      header_style="bold", expand=False)
        for column in columns:
            table.add_column(column.title, no_wrap=not column.wrap,
                             overflow="fold" if column.wrap else "ellipsis",
                             justify="right" if column.kind == "size" else "left")
        for row in rows:
            table.add_row(*(cell(c, row.get(c.key)) for c in columns))
        self.print_table(table)

    def print_table(self, table: Table) -> None:
        """Print a table without the padding Rich leaves at the end of its lines."""
        with self.out.capture() as captured:
            self.out.print(table)
        lines = [line.rstrip() for line in captured.get().splitlines()]
        self.out.file.write("".join(line + "\n" for line in lines))
        self.out.file.flush()

    def rows(self, rows: Sequence[Row], columns: Sequence[Column], *, empty: str = "") -> None:
        """A list: table, JSON array or value lines."""
        chosen = self.chosen(rows, columns)
        if self.options.format == "json":
            keys = [c.key for c in chosen] if self.options.columns else None
            self.json([{k: r.get(k) for k in keys} if keys else r for r in rows])
        elif self.options.format == "value":
            self.values(rows, chosen)
        elif not rows and empty:
            self.note(empty)
        else:
            self.table(rows, chosen)

    def one(self, row: Row, columns: Sequence[Column] = ()) -> None:
        """One object: a FIELD/VALUE table, a JSON object or value lines."""
        fields = list(columns) or [Column(k) for k in row]
        fields += [Column(k) for k in row if k not in {c.key for c in fields}]
        chosen = self.chosen([row], fields) if self.options.columns else fields
        if self.options.format == "json":
            self.json({c.key: row.get(c.key) for c in chosen} if self.options.columns
                      else row)
        elif self.options.format == "value":
            self.values([row], chosen)
        else:
            table = Table(box=None, show_header=False, show_edge=False, pad_edge=False,
                          padding=(0, 3, 0, 0))
            table.add_column(style="bold", no_wrap=True)
            table.add_column(overflow="fold")
            for column in chosen:
                table.add_row(Text(column.key), cell(column, row.get(column.key)))
            self.print_table(table)

    def done(self, message: str, row: Row | None = None,
             columns: Sequence[Column] = ()) -> None:
        """The outcome of an action: a sentence for people, the object for scripts."""
        if self.options.format == "table":
            self.out.print(Text(message))
        elif row is not None:
            self.one(row, columns)
        elif self.options.format == "json":
            self.json({"message": message})

    def note(self, message: str) -> None:
        """Something people may want to know, on stderr when it is a terminal (off a terminal
        stderr carries nothing but an error's one line)."""
        if self.err.is_terminal:
            self.err.print(Text(message, style="dim"))


class Bar:
    """A progress bar (or a spinner when the total is unknown) on stderr, or nothing."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress = progress
        self._task = task

    def update(self, description: str | None = None, *, advance: float = 0) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=description, advance=advance)


@contextmanager
def progress(err: Console, description: str, *, enabled: bool,
             total: float | None = None) -> Iterator[Bar]:
    """Show ``description`` with a bar and the elapsed time while the block runs (on a
    terminal only); the bar disappears when it ends."""
    if not enabled:
        yield Bar(None, None)
        return
    columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}"),
                          BarColumn(bar_width=30)]
    if total is not None:
        columns.append(MofNCompleteColumn())
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, refresh_per_second=10) as bar:
        task = bar.add_task(description, total=total)
        yield Bar(bar, task)


def make_consoles(*, color: bool) -> tuple[Console, Console]:
    """stdout and stderr consoles: colours only on a terminal; piped output never wraps."""
    def console(stderr: bool) -> Console:
        probe = Console(stderr=stderr)
        width = None if probe.is_terminal else 4096
        return Console(stderr=stderr, highlight=False, markup=False, emoji=False,
                       no_color=not color or None, width=width, soft_wrap=False)
    return console(False), console(True)


def check_format(value: str) -> str:
    if value not in FORMATS:
        raise CliError("Unknown output format", f"'{value}' (use {', '.join(FORMATS)})",
                       "UNKNOWN_FORMAT", exit_code=USAGE)
    return value
