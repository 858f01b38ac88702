"""``virtyard sd``: block storage domains — list, show, create on a LUN (attached to the data
center and active at once, unless ``--unattached``), remove (maintenance, detach, remove;
``--format`` wipes the volume group so the LUN is free again)."""

from __future__ import annotations

from typing import Any

import click

from virtyard.cli.app import HOSTS, STORAGE_DOMAINS, App, output_options, pass_app
from virtyard.cli.client import items
from virtyard.cli.completion import complete_hosts
from virtyard.cli.errors import REFUSED, CliError
from virtyard.cli.output import Column

COLUMNS = [Column("name"), Column("status", kind="status"), Column("wwid", "LUN"),
           Column("target"), Column("id")]


def domain_row(domain: dict[str, Any]) -> dict[str, Any]:
    """A storage domain as the CLI shows it (the JSON shape of ``sd list`` and ``sd show``)."""
    group = (domain.get("storage") or {}).get("volume_group") or {}
    units = group.get("logical_units") or {}
    unit = (units.get("logical_unit") or [{}])[0] if isinstance(units, dict) else \
        (units[0] if units else {})
    return {"id": domain.get("id"), "name": domain.get("name"),
            "status": domain.get("status"), "type": domain.get("type"),
            "wwid": unit.get("id"), "target": unit.get("target"),
            "data_center_id": (domain.get("data_center") or {}).get("id")}


@click.group("sd", invoke_without_command=True)
@output_options
@click.pass_context
def sd(ctx: click.Context) -> None:
    """Block storage domains, where ISO disks live (without a subcommand: list them)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_domains)


@sd.command("list")
@output_options
@pass_app
def list_domains(app: App) -> None:
    """List the storage domains."""
    listed = items(app.engine.get("/storagedomains"), "storage_domain")
    app.output.rows([domain_row(d) for d in listed], COLUMNS, empty="No storage domains.")


@sd.command("show")
@click.argument("name")
@output_options
@pass_app
def show_domain(app: App, name: str) -> None:
    """Show one storage domain (by name or id)."""
    app.output.one(domain_row(app.find(STORAGE_DOMAINS, name)), COLUMNS)


def _data_center(app: App) -> str:
    listed = items(app.engine.get("/datacenters", search="name=Default"), "data_center")
    if not listed:
        raise CliError("No data center", "the engine has no Default data center",
                       "NO_DATA_CENTER", exit_code=REFUSED)
    return str(listed[0]["id"])


@sd.command("create")
@click.argument("name")
@click.option("--lun", "wwid", required=True, metavar="WWID", help="The LUN (must be free).")
@click.option("--host", required=True, shell_complete=complete_hosts,
              help="The host that makes the domain (it must see the LUN).")
@click.option("--address", help="The target portal's address (if the engine does not know "
              "the LUN's target yet).")
@click.option("--port", type=click.IntRange(1, 65535), default=3260, show_default=True)
@click.option("--target", metavar="IQN", help="The target's IQN.")
@click.option("--unattached", is_flag=True, help="Do not attach it to the data center.")
@output_options
@pass_app
def create_domain(app: App, *, name: str, wwid: str, host: str, address: str | None,
                  port: int, target: str | None, unattached: bool) -> None:
    """Make a block storage domain on a free LUN, attached and active."""
    found_host = app.find(HOSTS, host)
    unit: dict[str, Any] = {"id": wwid}
    if address or target:
        unit.update(address=address or "", port=port, target=target or "")
    body = {"name": name, "type": "data", "host": {"id": found_host["id"]},
            "storage": {"type": "iscsi",
                        "volume_group": {"logical_units": {"logical_unit": [unit]}}}}
    with app.progress(f"making storage domain {name} on {wwid}"):
        made = app.engine.post("/storagedomains", body)
        if not unattached:
            dc = _data_center(app)
            made = app.engine.post(f"/datacenters/{dc}/storagedomains", {"id": made["id"]})
    app.output.done(f"Storage domain {name} created ({made.get('status')})", domain_row(made),
                    COLUMNS)


@sd.command("remove")
@click.argument("name")
@click.option("--format", "wipe", is_flag=True,
              help="Also wipe its volume group through a host: the LUN is free again.")
@click.option("--host", shell_complete=complete_hosts, help="The host that wipes it.")
@output_options
@pass_app
def remove_domain(app: App, name: str, wipe: bool, host: str | None) -> None:
    """Remove a storage domain (put in maintenance and detached first if needed)."""
    found = app.find(STORAGE_DOMAINS, name)
    dc = (found.get("data_center") or {}).get("id")
    with app.progress(f"removing storage domain {found['name']}"):
        if dc:
            attached = f"/datacenters/{dc}/storagedomains/{found['id']}"
            if found.get("status") == "active":
                app.engine.post(f"{attached}/deactivate", {})
            app.engine.delete(attached)
        host_name = app.find(HOSTS, host)["name"] if host else None
        app.engine.delete(f"/storagedomains/{found['id']}",
                          format="true" if wipe else None, host=host_name)
    app.output.done(f"Storage domain {found['name']} removed",
                    {"id": found["id"], "name": found["name"], "formatted": wipe})
