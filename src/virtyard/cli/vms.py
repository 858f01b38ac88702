"""``virtyard vm``: list, show, create, start, stop, shutdown, migrate, remove; a VM's disks
(attach, detach, plug, unplug, disks with the guest's names for them); its CD-ROM (show,
insert, eject)."""

from __future__ import annotations

import re
import time
from typing import Any

import click

from virtyard.cli.app import DISKS, HOSTS, VMS, App, output_options, pass_app, seconds
from virtyard.cli.client import items
from virtyard.cli.completion import complete_disks, complete_hosts, complete_vms
from virtyard.cli.errors import REFUSED, USAGE, CliError
from virtyard.cli.output import Column, human_size

MiB = 1 << 20
_UNITS = {"": MiB, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MiB, "mb": MiB,
          "mib": MiB, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40,
          "tb": 1 << 40, "tib": 1 << 40}

COLUMNS = [Column("name"), Column("status", kind="status"), Column("host"),
           Column("memory", kind="size"), Column("cpus", "CPUS"), Column("id")]
SHOW = [Column("placement", kind="list"), Column("created", kind="time")]
DISK_COLUMNS = [Column("alias", "DISK"), Column("interface"), Column("active", kind="bool"),
                Column("logical_name", "LOGICAL NAME"), Column("wwid", "WWID"),
                Column("size", kind="size"), Column("disk_id", "DISK ID")]


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``1GiB``, ``512`` (MiB) → bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise CliError("Bad size", f"'{text}' (e.g. 512M, 1G, 1GiB; a bare number is MiB)",
                       "BAD_SIZE", exit_code=USAGE)
    return int(float(match.group(1)) * _UNITS[unit])


def vm_row(vm: dict[str, Any], hosts: dict[str, str]) -> dict[str, Any]:
    """A VM as the CLI shows it (the JSON shape of ``vm list`` and ``vm show``)."""
    topology = (vm.get("cpu") or {}).get("topology") or {}
    sockets, cores, threads = (topology.get(k) for k in ("sockets", "cores", "threads"))
    cpus = (sockets or 1) * (cores or 1) * (threads or 1) if topology else None
    host = vm.get("host") or {}
    host_id = host.get("id")
    os_ = vm.get("os") or {}
    placement = items((vm.get("placement_policy") or {}).get("hosts"), "host")
    return {
        "id": vm.get("id"), "name": vm.get("name"), "status": vm.get("status"),
        "host": host.get("name") or (hosts.get(host_id, host_id) if host_id else None),
        "host_id": host_id, "memory": vm.get("memory"), "cpus": cpus,
        "sockets": sockets, "cores": cores, "threads": threads,
        "kernel": os_.get("kernel"), "initrd": os_.get("initrd"),
        "cmdline": os_.get("cmdline"),
        "placement": [hosts.get(str(h.get("id")), h.get("name") or h.get("id"))
                      for h in placement],
        "ha": bool((vm.get("high_availability") or {}).get("enabled")),
        "description": vm.get("description") or None, "created": vm.get("creation_time"),
    }


def attachment_row(attachment: dict[str, Any]) -> dict[str, Any]:
    """A VM's disk as the CLI shows it (the JSON shape of ``vm disks``, ``attach``, ``plug``)."""
    disk = attachment.get("disk") or {}
    units = items((disk.get("lun_storage") or {}).get("logical_units"), "logical_unit")
    unit = units[0] if units else {}
    return {
        "disk_id": attachment.get("id") or disk.get("id"), "alias": disk.get("alias"),
        "wwid": unit.get("id"), "size": unit.get("size") or disk.get("provisioned_size"),
        "interface": attachment.get("interface"), "active": attachment.get("active"),
        "bootable": attachment.get("bootable"), "read_only": attachment.get("read_only"),
        "logical_name": attachment.get("logical_name"),
    }


def placement(app: App, names: tuple[str, ...]) -> dict[str, Any]:
    """A ``placement_policy`` with the hosts ``names`` (found first: exit 3 if one is not)."""
    return {"hosts": {"host": [{"id": app.find(HOSTS, n)["id"]} for n in names]}}


@click.group("vm", invoke_without_command=True)
@output_options
@click.pass_context
def vm(ctx: click.Context) -> None:
    """Virtual machines (without a subcommand: list them)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_vms)


@vm.command("list")
@click.option("--search", "-s", metavar="QUERY",
              help="The engine's search, e.g. status=up or name=web*.")
@output_options
@pass_app
def list_vms(app: App, search: str | None) -> None:
    """List the VMs."""
    hosts = app.host_names()
    listed = items(app.engine.get("/vms", search=search), "vm")
    app.output.rows([vm_row(v, hosts) for v in listed], COLUMNS, empty="No VMs.")


TRANSITIONAL = ("wait_for_launch", "powering_up", "powering_down", "migrating")
SETTLE = 15.0  # seconds an action waits for a status in passing to pass


def _show(app: App, vm_id: str, *, settle: bool = False) -> dict[str, Any]:
    """The VM's row; with ``settle``, once its status is not one in passing (the engine
    answers an action once done, but monitoring may still be catching up)."""
    hosts = app.host_names()
    if not settle:
        return vm_row(app.engine.get(f"/vms/{vm_id}"), hosts)
    found, _ = app.wait_for(lambda: app.engine.get(f"/vms/{vm_id}"),
                            lambda v: v.get("status") not in TRANSITIONAL, timeout=SETTLE,
                            interval=0.25)
    return vm_row(found, hosts)


@vm.command("show")
@click.argument("vm_name", metavar="VM", shell_complete=complete_vms)
@output_options
@pass_app
def show_vm(app: App, vm_name: str) -> None:
    """Show one VM (by name or id)."""
    app.output.one(vm_row(app.find(VMS, vm_name), app.host_names()), COLUMNS + SHOW)


@vm.command("create")
@click.argument("name")
@click.option("--memory", "-m", default="1G", show_default=True,
              help="Memory: 512M, 1G, 1GiB (a bare number is MiB).")
@click.option("--cpus", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="Virtual CPUs.")
@click.option("--kernel", envvar="VIRTYARD_GUEST_KERNEL", show_envvar=True,
              help="Kernel image on the hosts (direct kernel boot).")
@click.option("--initrd", envvar="VIRTYARD_GUEST_INITRD", show_envvar=True,
              help="Initial ramdisk on the hosts.")
@click.option("--cmdline", envvar="VIRTYARD_GUEST_CMDLINE", show_envvar=True,
              help="Kernel command line.")
@click.option("--host", "hosts", multiple=True, shell_complete=complete_hosts,
              help="A host it may run on, preferred first (repeatable).")
@click.option("--cluster", help="The cluster (default: Default).")
@click.option("--description", help="Free text.")
@output_options
@pass_app
def create_vm(app: App, *, name: str, memory: str, cpus: int, kernel: str | None,
              initrd: str | None, cmdline: str | None, hosts: tuple[str, ...],
              cluster: str | None, description: str | None) -> None:
    """Create the VM NAME (down; attach disks, then start it)."""
    body: dict[str, Any] = {
        "name": name, "memory": parse_size(memory),
        "cpu": {"topology": {"sockets": cpus, "cores": 1, "threads": 1}},
        "template": {"name": "Blank"}, "cluster": {"name": cluster or "Default"},
    }
    boot = {k: v for k, v in (("kernel", kernel), ("initrd", initrd), ("cmdline", cmdline))
            if v}
    if boot:
        body["os"] = boot
    if hosts:
        body["placement_policy"] = placement(app, hosts)
    if description:
        body["description"] = description
    created = app.engine.post("/vms", body)
    row = vm_row(created, app.host_names())
    app.output.done(f"VM {name} created ({human_size(row['memory'])}, {row['cpus']} CPU), "
                    f"id {row['id']}", row, COLUMNS + SHOW)


@vm.command("start")
@click.argument("vm_name", metavar="VM", shell_complete=complete_vms)
@click.option("--host", "hosts", multiple=True, shell_complete=complete_hosts,
              help="Try these hosts for this run, the first preferred (repeatable).")
@output_options
@pass_app
def start_vm(app: App, vm_name: str, hosts: tuple[str, ...]) -> None:
    """Run the VM on a host that proves it sees every LUN."""
    found = app.find(VMS, vm_name)
    body: dict[str, Any] = {}
    if hosts:
        body["vm"] = {"placement_policy": placement(app, hosts)}
    started = time.monotonic()
    with app.progress(f"starting VM {found['name']}"):
        app.engine.post(f"/vms/{found['id']}/start", body)
        row = _show(app, found["id"], settle=True)
    app.output.done(f"VM {row['name']} is {row['status']} on {row['host']} "
                    f"({seconds(started)})", row, COLUMNS + SHOW)


def _stop(app: App, vm_name: str, action: str, verb: str) -> None:
    found = app.find(VMS, vm_name)
    started = time.monotonic()
    with app.progress(f"{verb} VM {found['name']}"):
        app.engine.post(f"/vms/{found['id']}/{action}")
        row = _show(app, found["id"], settle=True)
    app.output.done(f"VM {row['name']} is {row['status']} ({seconds(started)})", row,
                    COLUMNS + SHOW)


@vm.command("stop")
@click.argument("vm_name", metavar="VM", shell_complete=complete_vms)
@output_options
@pass_app
def stop_vm(app: App, vm_name: str) -> None:
    """Power the VM off (its host releases its storage connections)."""
    _stop(app, vm_name, "stop", "stopping")


@vm.command("shutdown")
@click.argument("vm_name", metavar="VM", shell_complete=complete_vms)
@output_options
@pass_app
def shutdown_vm(app: App, vm_name: str) -> None:
    """Ask the guest to shut down (the engine waits for it, at most a minute)."""
    _stop(app, vm_name, "shutdown", "shutting down")


@vm.command("migrate")
@click.argument("vm_name", metavar="VM", shell_complete=complete_vms)
@click.option("--host", shell_complete=complete_hosts,
              help="The destination (default: the best other host).")
@output_options
@pass_app
def migrate_vm(app: App, vm_name: str, host: str | None) -> None:
    """Live-migrate the VM (the destination must prove it sees every LUN first)."""
    found = app.find(VMS, vm_name)
    hosts = app.host_names()
    source = hosts.get(str((found.get("host") or {}).get("id")), "?")
    body: dict[str, Any] = {}
    if host:
        body["host"] = {"id": app.find(HOSTS, host)["id"]}
    started = time.monotonic()
    with app.progress(f"migrating VM {found['name']} from {source}"):
        app.engine.post(f"/vms/{found['id']}/migrate", body)
        row = _show(app, found["id"], settle=True)
    app.output.done(f"VM {row['name']} migrated from {source} to {row['host']} "
                    f"({seconds(started)})", row, COLUMNS + SHOW)


@vm.command("remove")
@click.argument("vm_name", metavar="VM", shell_complete=complete_vms)
@click.option("--keep-disks", is_flag=True,
              help="Keep its disks, detached (default: removed with the VM, unless another "
                   "VM uses them).")
@output_options
@pass_app
def remove_vm(app: App, vm_name: str, keep_disks: bool) -> None:
    """Remove a VM that is down."""
    found = app.find(VMS, vm_name)
    app.engine.delete(f"/vms/{found['id']}", detach_only="true" if keep_disks else None)
    app.output.done(f"VM {found['name']} removed", {"id": found["id"], "name": found["name"]})


# -- disks of a VM -------------------------------------------------------------------------


def _attachment(app: App, vm_id: str, disk_id: str) -> dict[str, Any]:
    return attachment_row(app.engine.get(f"/vms/{vm_id}/diskattachments/{disk_id}",
                                         follow="disk"))


@vm.command("disks")
@click.argument("vm_name", metavar="VM", shell_complete=complete_vms)
@output_options
@pass_app
def vm_disks(app: App, vm_name: str) -> None:
    """The VM's disks, with the guest's name for each (LOGICAL NAME, once the guest says)."""
    found = app.find(VMS, vm_name)
    listed = items(app.engine.get(f"/vms/{found['id']}/diskattachments", follow="disk"),
                   "disk_attachment")
    app.output.rows([attachment_row(a) for a in listed], DISK_COLUMNS,
                    empty=f"VM {found['name']} has no disks.")


@vm.command("attach")
@click.argument("vm_name", metavar="VM", shell_complete=complete_vms)
@click.argument("disk_name", metavar="DISK", shell_complete=complete_disks)
@click.option("--interface", type=click.Choice(["virtio_scsi", "virtio", "sata", "ide"]),
              default="virtio_scsi", show_default=True, help="The disk's bus in the guest.")
@click.option("--bootable", is_flag=True, help="Boot from it.")
@click.option("--read-only", is_flag=True, help="The guest may only read it.")
@click.option("--inactive", is_flag=True,
              help="Attach without plugging (plug it later with 'vm plug').")
@output_options
@pass_app
def attach(app: App, *, vm_name: str, disk_name: str, interface: str, bootable: bool,
           read_only: bool, inactive: bool) -> None:
    """Attach DISK to VM; plugged at once (into a running VM too) unless --inactive."""
    found = app.find(VMS, vm_name)
    disk = app.find(DISKS, disk_name)
    body = {"disk": {"id": disk["id"]}, "interface": interface, "bootable": bootable,
            "read_only": read_only, "active": not inactive}
    with app.progress(f"attaching {disk.get('alias')} to {found['name']}"):
        app.engine.post(f"/vms/{found['id']}/diskattachments", body)
    row = _attachment(app, found["id"], disk["id"])
    state = "plugged" if row["active"] else "not plugged"
    app.output.done(f"Disk {row['alias']} attached to VM {found['name']} ({state})", row,
                    DISK_COLUMNS)


@vm.command("detach")
@click.argument("vm_name", metavar="VM", shell_complete=complete_vms)
@click.argument("disk_name", metavar="DISK", shell_complete=complete_disks)
@click.option("--remove-disk", is_flag=True, help="Remove the disk too.")
@output_options
@pass_app
def detach(app: App, vm_name: str, disk_name: str, remove_disk: bool) -> None:
    """Detach DISK from VM (unplug it first on a running VM)."""
    found = app.find(VMS, vm_name)
    disk = app.find(DISKS, disk_name)
    app.engine.delete(f"/vms/{found['id']}/diskattachments/{disk['id']}",
                      detach_only="false" if remove_disk else None)
    what = "detached and removed" if remove_disk else "detached"
    app.output.done(f"Disk {disk.get('alias')} {what} from VM {found['name']}",
                    {"vm": found["name"], "disk_id": disk["id"], "alias": disk.get("alias"),
                     "removed": remove_disk})


def _set_active(app: App, vm_name: str, disk_name: str, active: bool) -> tuple[
        dict[str, Any], dict[str, Any], dict[str, Any]]:
    found = app.find(VMS, vm_name)
    disk = app.find(DISKS, disk_name)
    verb = "plugging" if active else "unplugging"
    with app.progress(f"{verb} {disk.get('alias')} {'into' if active else 'from'} "
                      f"{found['name']}"):
        app.engine.put(f"/vms/{found['id']}/diskattachments/{disk['id']}", {"active": active})
    return found, disk, _attachment(app, found["id"], disk["id"])


@vm.command("plug")
@click.argument("vm_name", metavar="VM", shell_complete=complete_vms)
@click.argument("disk_name", metavar="DISK", shell_complete=complete_disks)
@click.option("--wait", "wait_name", is_flag=True,
              help="On a running VM, wait until the guest names the disk.")
@click.option("--wait-timeout", type=float, default=60.0, show_default=True,
              help="Seconds --wait waits.")
@output_options
@pass_app
def plug(app: App, vm_name: str, disk_name: str, wait_name: bool,
         wait_timeout: float) -> None:
    """Activate DISK of VM (hot-plug into a running VM)."""
    found, disk, row = _set_active(app, vm_name, disk_name, True)
    if wait_name and found.get("status") == "up" and not row["logical_name"]:
        with app.progress(f"waiting for the guest to name {row['alias']}"):
            row, named = app.wait_for(lambda: _attachment(app, found["id"], disk["id"]),
                                      lambda r: bool(r["logical_name"]),
                                      timeout=wait_timeout, interval=0.25)
        if not named:
            raise CliError("No guest name", f"the guest did not name disk {row['alias']} "
                           f"within {wait_timeout:g} s (is a guest agent running?)",
                           "NO_LOGICAL_NAME", exit_code=REFUSED)
    name = f" as {row['logical_name']}" if row["logical_name"] else ""
    app.output.done(f"Disk {row['alias']} plugged into VM {found['name']}{name}", row,
                    DISK_COLUMNS)


@vm.command("unplug")
@click.argument("vm_name", metavar="VM", shell_complete=complete_vms)
@click.argument("disk_name", metavar="DISK", shell_complete=complete_disks)
@output_options
@pass_app
def unplug(app: App, vm_name: str, disk_name: str) -> None:
    """Deactivate DISK of VM (hot-unplug from a running VM; the guest lets go first)."""
    found, _, row = _set_active(app, vm_name, disk_name, False)
    app.output.done(f"Disk {row['alias']} unplugged from VM {found['name']}", row,
                    DISK_COLUMNS)


@vm.command("cd")
@click.argument("vm_name", metavar="VM", shell_complete=complete_vms)
@click.argument("action", required=False, type=click.Choice(["insert", "eject"]))
@click.argument("iso_name", metavar="[ISO]", required=False, shell_complete=complete_disks)
@click.option("--next-run", is_flag=True,
              help="Change the CD the VM boots with next, not the one in the drive now.")
@output_options
@pass_app
def cd(app: App, vm_name: str, action: str | None, iso_name: str | None,
       next_run: bool) -> None:
    """The VM's CD-ROM: show it, 'insert ISO' (an ISO disk, by alias or id) or 'eject'.

    On a running VM the drive changes at once (the old CD stays if the host refuses);
    with --next-run (or on a VM that is down) the CD for the next start is set.
    """
    found = app.find(VMS, vm_name)
    running = found.get("status") not in ("down", None)
    path = f"/vms/{found['id']}/cdroms"

    def iso(current: bool) -> str | None:
        drives = items(app.engine.get(path, current="true" if current else None), "cdrom")
        file = (drives[0].get("file") or {}) if drives else {}
        return str(file["id"]) if file.get("id") else None

    if action is not None:
        if (action == "insert") != bool(iso_name):
            raise CliError("Usage", "'insert' takes an ISO; 'eject' takes none", "USAGE",
                           exit_code=USAGE)
        file_id = app.find(DISKS, iso_name)["id"] if iso_name else ""
        current = running and not next_run
        verb = f"inserting {iso_name}" if iso_name else "ejecting the CD"
        with app.progress(f"{verb} {'in' if current else 'for the next run of'} "
                          f"{found['name']}"):
            app.engine.put(f"{path}/00000000-0000-0000-0000-000000000000",
                           {"file": {"id": file_id}}, current="true" if current else None)
    row = {"vm": found["name"], "iso": iso(False), "current_iso": iso(True) if running else None}
    if action is None:
        app.output.one(row)
    else:
        done = f"ISO {iso_name} inserted" if iso_name else "CD ejected"
        app.output.done(f"{done} ({'now' if running and not next_run else 'next run'}, "
                        f"VM {found['name']})", row)
