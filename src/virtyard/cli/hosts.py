"""``virtyard hosts``: list, show, add, remove, maintenance, activate, fence (power
management, and the manual confirmation that a host is off)."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from virtyard.cli.app import HOSTS, App, output_options, pass_app, seconds
from virtyard.cli.client import items
from virtyard.cli.completion import complete_hosts
from virtyard.cli.errors import REFUSED, USAGE, CliError
from virtyard.cli.output import Column

COLUMNS = [Column("name"), Column("status", kind="status"), Column("address"),
           Column("port"), Column("vms", "VMS"), Column("id"),
           Column("status_detail", "DETAIL", wrap=True)]
SHOW = [Column("memory", kind="size")]


def _version(value: Any) -> str | None:
    if isinstance(value, dict):
        full = value.get("full_version")
        if full:
            return str(full)
        parts = [value.get(k) for k in ("major", "minor", "build")]
        return ".".join(str(p) for p in parts if p is not None) or None
    return None


def host_row(host: dict[str, Any]) -> dict[str, Any]:
    """A host as the CLI shows it (the JSON shape of ``hosts list`` and ``hosts show``)."""
    cpu = host.get("cpu") or {}
    topology = cpu.get("topology") or {}
    cores = None
    if topology:
        cores = ((topology.get("sockets") or 1) * (topology.get("cores") or 1)
                 * (topology.get("threads") or 1))
    return {
        "id": host.get("id"), "name": host.get("name"), "status": host.get("status"),
        "status_detail": host.get("status_detail"), "address": host.get("address"),
        "port": host.get("port"), "vms": (host.get("summary") or {}).get("active"),
        "cluster_id": (host.get("cluster") or {}).get("id"),
        "memory": host.get("memory"), "cpu_model": cpu.get("name"), "cpus": cores,
        "iscsi_initiator": (host.get("iscsi") or {}).get("initiator"),
        "agent_version": _version(host.get("version")),
        "libvirt_version": _version(host.get("libvirt_version")),
        "hardware_uuid": (host.get("hardware_information") or {}).get("uuid"),
    }


@click.group("hosts", invoke_without_command=True)
@output_options
@click.pass_context
def hosts(ctx: click.Context) -> None:
    """Hypervisor hosts (without a subcommand: list them)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_hosts)


@hosts.command("list")
@click.option("--search", "-s", metavar="QUERY", help="The engine's search, e.g. status=up.")
@output_options
@pass_app
def list_hosts(app: App, search: str | None) -> None:
    """List the hosts."""
    listed = items(app.engine.get("/hosts", search=search), "host")
    app.output.rows([host_row(h) for h in listed], COLUMNS, empty="No hosts.")


@hosts.command("show")
@click.argument("host", shell_complete=complete_hosts)
@output_options
@pass_app
def show_host(app: App, host: str) -> None:
    """Show one host (by name or id)."""
    app.output.one(host_row(app.find(HOSTS, host)), COLUMNS + SHOW)


@hosts.command("add")
@click.argument("name")
@click.argument("address")
@click.option("--port", type=click.IntRange(1, 65535), default=54321, show_default=True,
              help="The host agent's port.")
@click.option("--cluster", help="The cluster (default: Default).")
@click.option("--description", help="Free text.")
@click.option("--wait/--no-wait", default=False, help="Wait until the host is up.")
@click.option("--wait-timeout", type=float, default=120.0, show_default=True,
              help="Seconds --wait waits.")
@output_options
@pass_app
def add_host(app: App, *, name: str, address: str, port: int, cluster: str | None,
             description: str | None, wait: bool, wait_timeout: float) -> None:
    """Add the host NAME whose agent listens at ADDRESS (as in its certificate)."""
    body: dict[str, Any] = {"name": name, "address": address, "port": port}
    if cluster:
        body["cluster"] = {"name": cluster}
    if description:
        body["description"] = description
    started = time.monotonic()
    added = app.engine.post("/hosts", body)
    if wait:
        with app.progress(f"waiting for host {name} to come up"):
            added, up = app.wait_for(lambda: app.engine.get(f"/hosts/{added['id']}"),
                                     lambda h: h.get("status") == "up", timeout=wait_timeout)
        if not up:
            raise CliError("Host not up", f"host {name} is {added.get('status')} after "
                           f"{wait_timeout:g} s: {added.get('status_detail') or 'no detail'}",
                           "HOST_NOT_UP", exit_code=REFUSED)
    row = host_row(added)
    app.output.done(f"Host {name} added ({row['status']}, {seconds(started)}), id {row['id']}",
                    row, COLUMNS)


@hosts.command("remove")
@click.argument("host", shell_complete=complete_hosts)
@click.option("--force", is_flag=True, help="Move it to maintenance first.")
@output_options
@pass_app
def remove_host(app: App, host: str, force: bool) -> None:
    """Remove a host (it must be in maintenance, or give --force)."""
    found = app.find(HOSTS, host)
    if force and found.get("status") not in ("maintenance", "installing", "install_failed"):
        with app.progress(f"moving host {found['name']} to maintenance"):
            app.engine.post(f"/hosts/{found['id']}/deactivate")
    app.engine.delete(f"/hosts/{found['id']}")
    app.output.done(f"Host {found['name']} removed", {"id": found["id"], "name": found["name"]})


@hosts.command("maintenance")
@click.argument("host", shell_complete=complete_hosts)
@output_options
@pass_app
def maintenance(app: App, host: str) -> None:
    """Move a host to maintenance (refused while it runs VMs)."""
    found = app.find(HOSTS, host)
    with app.progress(f"moving host {found['name']} to maintenance"):
        app.engine.post(f"/hosts/{found['id']}/deactivate")
    row = host_row(app.engine.get(f"/hosts/{found['id']}"))
    app.output.done(f"Host {found['name']} is {row['status']}", row, COLUMNS)


@hosts.command("activate")
@click.argument("host", shell_complete=complete_hosts)
@output_options
@pass_app
def activate(app: App, host: str) -> None:
    """Take a host out of maintenance."""
    found = app.find(HOSTS, host)
    app.engine.post(f"/hosts/{found['id']}/activate")
    row = host_row(app.engine.get(f"/hosts/{found['id']}"))
    app.output.done(f"Host {found['name']} is {row['status']}", row, COLUMNS)


@hosts.command("fence")
@click.argument("host", shell_complete=complete_hosts)
@click.argument("action", type=click.Choice(["status", "stop", "start", "restart", "manual"]))
@click.option("--yes", is_flag=True,
              help="Do not ask (stop, restart and manual need it when not on a terminal).")
@output_options
@pass_app
def fence(app: App, host: str, action: str, yes: bool) -> None:
    """Power management of HOST through its fence agents: status, stop, start, restart; or
    'manual': confirm the host has been powered off by hand (its VMs go down and HA VMs
    restart elsewhere — say it only when it is true)."""
    found = app.find(HOSTS, host)
    if action in ("stop", "restart", "manual") and not yes:
        if not sys.stdin.isatty():
            raise CliError("Not confirmed", f"'{action}' on host {found['name']} needs --yes",
                           "NOT_CONFIRMED", exit_code=USAGE)
        click.confirm(f"{action} host {found['name']}?", abort=True)
    with app.progress(f"{action} of host {found['name']}"):
        answer = app.engine.post(f"/hosts/{found['id']}/fence", {"fence_type": action})
    power = (answer.get("power_management") or {}).get("status")
    row = {"name": found["name"], "action": action, "power": power,
           "status": app.engine.get(f"/hosts/{found['id']}").get("status")}
    app.output.done(f"Host {found['name']}: {action} done"
                    + (f", power {power}" if power else ""), row)
