"""``virtyard disk``: add a LUN as a disk (``add-lun``), list, show, remove."""

from __future__ import annotations

from typing import Any

import click

from virtyard.cli.app import DISKS, HOSTS, App, output_options, pass_app
from virtyard.cli.client import items
from virtyard.cli.completion import complete_disks, complete_hosts
from virtyard.cli.errors import NOT_FOUND, CliError
from virtyard.cli.luns import chap, chap_options, lun_row
from virtyard.cli.output import Column, human_size

COLUMNS = [Column("alias"), Column("type"), Column("size", kind="size"),
           Column("wwid", "WWID"), Column("shareable", kind="bool"),
           Column("vms", "VMS", kind="list"), Column("id")]


def disk_row(disk: dict[str, Any]) -> dict[str, Any]:
    """A disk as the CLI shows it (the JSON shape of ``disk list`` and ``disk show``)."""
    storage = disk.get("lun_storage") or {}
    units = items(storage.get("logical_units"), "logical_unit")
    unit = units[0] if units else {}
    vms = items(disk.get("vms"), "vm")
    return {
        "id": disk.get("id"), "alias": disk.get("alias"),
        "type": disk.get("storage_type"), "content_type": disk.get("content_type"),
        "status": disk.get("status"), "shareable": disk.get("shareable"),
        "sgio": disk.get("sgio"),
        "size": unit.get("size") if unit else disk.get("provisioned_size"),
        "wwid": unit.get("id"), "target": unit.get("target"),
        "address": unit.get("address"), "port": unit.get("port"),
        "lun": unit.get("lun_mapping"), "vendor": unit.get("vendor_id"),
        "product": unit.get("product_id"), "serial": unit.get("serial"),
        "storage_domain_id": (disk.get("storage_domain") or {}).get("id"),
        "vms": [str(v.get("name") or v.get("id")) for v in vms],
        "description": disk.get("description") or None,
    }


@click.group("disk", invoke_without_command=True)
@output_options
@click.pass_context
def disk(ctx: click.Context) -> None:
    """Disks: SAN LUNs the engine knows as disks (without a subcommand: list them)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_disks)


@disk.command("list")
@click.option("--search", "-s", metavar="QUERY",
              help="The engine's search, e.g. name=data* or disk_type=lun.")
@output_options
@pass_app
def list_disks(app: App, search: str | None) -> None:
    """List the disks."""
    listed = items(app.engine.get("/disks", search=search, follow="vms"), "disk")
    app.output.rows([disk_row(d) for d in listed], COLUMNS, empty="No disks.")


@disk.command("show")
@click.argument("disk_name", metavar="DISK", shell_complete=complete_disks)
@output_options
@pass_app
def show_disk(app: App, disk_name: str) -> None:
    """Show one disk (by alias or id)."""
    app.output.one(disk_row(app.find(DISKS, disk_name, follow="vms")), COLUMNS)


def _locate(app: App, wwid: str, host: dict[str, Any] | None
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The LUN ``wwid`` as a host sees it, and that host: ``host``, else the first Up host
    that sees it."""
    if host is not None:
        candidates = [host]
    else:
        candidates = items(app.engine.get("/hosts", search="status=up"), "host")
    for candidate in candidates:
        with app.progress(f"looking for LUN {wwid} on host {candidate['name']}"):
            storage = items(app.engine.get(f"/hosts/{candidate['id']}/storage",
                                           report_status="false"), "host_storage")
        for item in storage:
            row = lun_row(item, str(candidate["name"]))
            if row["wwid"] == wwid:
                return row, candidate
    where = f"host {host['name']}" if host is not None else "any host that is up"
    raise CliError("Not found", f"LUN {wwid} is not visible on {where}", "LUN_NOT_FOUND",
                   exit_code=NOT_FOUND, hint="log in to its target with "
                   "'virtyard luns --host H --discover ADDR --login TARGET'")


@disk.command("add-lun")
@click.argument("wwid")
@click.option("--alias", help="The disk's name (default: the WWID).")
@click.option("--sharable", "--shareable", "shareable", is_flag=True,
              help="May be attached to several VMs at once.")
@click.option("--host", shell_complete=complete_hosts,
              help="Find the LUN through this host (and have the engine check it sees it); "
                   "default: the first Up host that sees it.")
@click.option("--passthrough", type=click.Choice(["filtered", "unfiltered"]),
              help="SCSI passthrough (sgio): the guest sees the LUN itself.")
@click.option("--description", help="Free text.")
@chap_options
@output_options
@pass_app
def add_lun(app: App, *, wwid: str, alias: str | None, shareable: bool, host: str | None,
            passthrough: str | None, description: str | None, chap_user: str | None,
            chap_password_file: str | None) -> None:
    """Add the SAN LUN WWID as a disk (the same LUN again answers with its disk)."""
    secret = chap(chap_user, chap_password_file)
    found_host = app.find(HOSTS, host) if host else None
    lun, seen_by = _locate(app, wwid, found_host)
    unit: dict[str, Any] = {"id": wwid, "address": lun["address"], "port": lun["port"],
                            "target": lun["target"], **secret}
    if lun.get("portal"):
        unit["portal"] = lun["portal"]
    # The host that saw it: the engine checks it sees the LUN and records its details.
    storage: dict[str, Any] = {"type": "iscsi", "logical_units": {"logical_unit": [unit]},
                               "host": {"id": seen_by["id"]}}
    body: dict[str, Any] = {"lun_storage": storage, "shareable": shareable}
    for name, value in (("alias", alias), ("sgio", passthrough),
                        ("description", description)):
        if value:
            body[name] = value
    with app.progress(f"adding LUN {wwid} as a disk"):
        added = app.engine.post("/disks", body)
    row = disk_row(added)
    app.output.done(f"Disk {row['alias']} ({row['id']}) is LUN {wwid} "
                    f"({human_size(row['size'])} at {lun['target']})", row, COLUMNS)


@disk.command("remove")
@click.argument("disk_name", metavar="DISK", shell_complete=complete_disks)
@output_options
@pass_app
def remove_disk(app: App, disk_name: str) -> None:
    """Remove a disk (not while a running VM has it plugged); the LUN's data stays."""
    found = app.find(DISKS, disk_name)
    app.engine.delete(f"/disks/{found['id']}")
    app.output.done(f"Disk {found.get('alias')} removed",
                    {"id": found["id"], "alias": found.get("alias")})
