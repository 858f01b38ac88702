"""``virtyard events [--follow]``: the engine's audit log, oldest of the shown first."""

from __future__ import annotations

import time
from typing import Any

import click
from rich.text import Text

from virtyard.cli.app import App, output_options, pass_app
from virtyard.cli.client import items
from virtyard.cli.output import STATUS_STYLES, Column, human_time, plain

COLUMNS = [Column("id"), Column("time", kind="time"), Column("severity", kind="status"),
           Column("code"), Column("description", wrap=True)]


def event_row(event: dict[str, Any]) -> dict[str, Any]:
    """An event as the CLI shows it (the JSON shape of ``events``)."""
    def ref(name: str) -> Any:
        return (event.get(name) or {}).get("id")

    raw_id = str(event.get("id") or "")
    return {
        "id": int(raw_id) if raw_id.isdigit() else raw_id or None,
        "time": event.get("time"), "severity": event.get("severity"),
        "code": event.get("code"), "description": event.get("description"),
        "user": (event.get("user") or {}).get("name"), "host_id": ref("host"),
        "vm_id": ref("vm"), "disk_id": ref("disk"),
        "storage_domain_id": ref("storage_domain"),
        "correlation_id": event.get("correlation_id"),
    }


def _line(app: App, row: dict[str, Any]) -> None:
    """One event as one line (follow mode), in the chosen format."""
    fmt = app.output.options.format
    if fmt == "json":
        app.output.json_line(row)
    elif fmt == "value":
        app.output.values([row], app.output.chosen([row], COLUMNS))
    else:
        text = Text(f"{row['id']:>6}  {human_time(row['time'])}  ")
        severity = str(row["severity"] or "")
        text.append(f"{severity:<8}", style=STATUS_STYLES.get(severity, ""))
        text.append(f"{plain(row['code']):>6}  {plain(row['description'])}")
        app.out.print(text, soft_wrap=True)


@click.command("events")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events (Ctrl-C ends).")
@click.option("--max", "limit", type=click.IntRange(1, 10000), default=20, show_default=True,
              help="How many of the latest events to show first.")
@click.option("--search", "-s", metavar="QUERY",
              help="The engine's search, e.g. severity=error or vm.id=ID.")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=1.0, show_default=True,
              help="Seconds between polls with --follow.")
@output_options
@pass_app
def events(app: App, follow: bool, limit: int, search: str | None, interval: float) -> None:
    """Show the latest events; with --follow, new ones as they come (JSON: one per line)."""
    latest = [event_row(e) for e in
              items(app.engine.get("/events", max=limit, search=search), "event")]
    latest.reverse()
    if not follow:
        app.output.rows(latest, COLUMNS, empty="No events.")
        return
    last = max((int(r["id"]) for r in latest if isinstance(r["id"], int)), default=0)
    if not latest:
        newest = items(app.engine.get("/events", max=1), "event")
        last = int(newest[0]["id"]) if newest else 0
    for row in latest:
        _line(app, row)
    try:
        while True:
            time.sleep(interval)
            new = [event_row(e) for e in items(
                app.engine.get("/events", search=search, **{"from": last}), "event")]
            for row in sorted(new, key=lambda r: int(r["id"])):
                _line(app, row)
                last = max(last, int(row["id"]))
    except KeyboardInterrupt:
        return
