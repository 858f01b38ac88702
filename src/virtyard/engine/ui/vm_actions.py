"""The UI's VM actions: run, stop, shutdown, migrate; attach, activate, deactivate, detach.

Each runs the engine command the REST API runs for it (``api/resources/vm_actions.py``), in
the same order, as the logged-in user; the answer is a message for the page's status area
(success, or the engine's fault), and an ``HX-Trigger`` so the affected views refresh.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.responses import Response

from virtyard.engine.api import follow
from virtyard.engine.api.types.disks import DISK
from virtyard.engine.api.types.vms import VM
from virtyard.engine.commands.attachments import INTERFACES, AttachDisk, DetachDisk
from virtyard.engine.commands.migrate_vm import MigrateVm
from virtyard.engine.commands.plug_disk import PlugDisk, UnplugDisk
from virtyard.engine.commands.run_vm import RunVm
from virtyard.engine.commands.stop_vm import StopVm
from virtyard.engine.db.models import DiskVmElement
from virtyard.engine.queries import disks as disk_queries
from virtyard.engine.queries import hosts as host_queries
from virtyard.engine.queries import vms as vm_queries
from virtyard.engine.ui.web import Ui, page

CHANGED = {"HX-Trigger": "vm-changed"}


def _name(tx: Session, vm_id: str) -> str:
    return str(vm_queries.get_vm(tx, vm_id)["name"])


def _done(ui: Ui, text: str) -> Response:
    response = ui.message(text)
    response.headers.update(CHANGED)
    return response


@page
async def start(ui: Ui) -> Response:
    vm_id = ui.param("id")
    name = await ui.read(_name, vm_id)
    host = ui.field("host")
    await ui.run(RunVm(vm_id, prefer=[host] if host else []))
    return _done(ui, f"VM {name} is running.")


@page
async def stop(ui: Ui) -> Response:
    vm_id = ui.param("id")
    name = await ui.read(_name, vm_id)
    await ui.run(StopVm(vm_id))
    return _done(ui, f"VM {name} is stopped.")


@page
async def shutdown(ui: Ui) -> Response:
    vm_id = ui.param("id")
    name = await ui.read(_name, vm_id)
    await ui.run(StopVm(vm_id, graceful=True))
    return _done(ui, f"VM {name} was shut down.")


def _migrate_choices(tx: Session, vm_id: str) -> dict[str, Any]:
    vm = vm_queries.get_vm(tx, vm_id)
    here = (vm.get("host") or {}).get("id")
    hosts = [h for h in host_queries.list_hosts(tx)
             if h["status"] == "up" and h["id"] != here
             and h["cluster"]["id"] == vm["cluster"]["id"]]
    return {"vm": vm, "hosts": hosts}


@page
async def migrate_dialog(ui: Ui) -> Response:
    ui.require_write()
    return ui.render("_migrate_dialog.html", **await ui.read(_migrate_choices, ui.param("id")))


@page
async def migrate(ui: Ui) -> Response:
    vm_id = ui.param("id")
    name = await ui.read(_name, vm_id)
    host_id = ui.field("host") or None
    await ui.run(MigrateVm(vm_id, host_id=host_id))
    vm = await ui.read(lambda tx: vm_queries.get_vm(tx, vm_id, follow.parse(VM, "host")))
    where = (vm.get("host") or {}).get("name", "another host")
    return _done(ui, f"VM {name} migrated to {where}.")


def _attach_choices(tx: Session, vm_id: str) -> dict[str, Any]:
    """Disks that could be attached: every data disk not on this VM yet — those in use by
    another VM too (the engine says why not, the UI does not guess)."""
    vm = vm_queries.get_vm(tx, vm_id)
    mine = set(tx.scalars(select(DiskVmElement.disk_id).where(DiskVmElement.vm_id == vm_id)))
    disks = [d for d in disk_queries.list_disks(tx, tree=follow.parse(DISK, "vms"))
             if d["id"] not in mine and d.get("content_type") != "iso"]
    return {"vm": vm, "disks": disks, "interfaces": INTERFACES}


@page
async def attach_dialog(ui: Ui) -> Response:
    ui.require_write()
    return ui.render("_attach_dialog.html", **await ui.read(_attach_choices, ui.param("id")))


async def attach_and_plug(ui: Ui, vm_id: str, disk_id: str, *, interface: str,
                          active: bool, read_only: bool = False) -> None:
    """``POST vms/{id}/diskattachments``: attach, then hot-plug when the VM runs."""
    plug_now = await ui.run(AttachDisk(vm_id, disk_id, interface=interface,
                                       read_only=read_only, active=active))
    if plug_now:
        await ui.run(PlugDisk(vm_id, disk_id))


def _alias(tx: Session, disk_id: str) -> str:
    return str(disk_queries.get_disk(tx, disk_id)["alias"])


@page
async def attach(ui: Ui) -> Response:
    vm_id, disk_id = ui.param("id"), ui.field("disk")
    name = await ui.read(_name, vm_id)
    alias = await ui.read(_alias, disk_id) if disk_id else ""
    await attach_and_plug(ui, vm_id, disk_id, interface=ui.field("interface", "virtio_scsi"),
                          active=ui.flag("active"), read_only=ui.flag("read_only"))
    return _done(ui, f"Disk {alias} attached to VM {name}.")


def _attachment(tx: Session, vm_id: str, disk_id: str) -> tuple[str, str, bool]:
    found = vm_queries.get_attachment(tx, vm_id, disk_id)
    return _name(tx, vm_id), _alias(tx, disk_id), bool(found.get("active"))


@page
async def activate(ui: Ui) -> Response:
    vm_id, disk_id = ui.param("id"), ui.param("disk")
    name, alias, _ = await ui.read(_attachment, vm_id, disk_id)
    await ui.run(PlugDisk(vm_id, disk_id))
    return _done(ui, f"Disk {alias} is active on VM {name}.")


@page
async def deactivate(ui: Ui) -> Response:
    vm_id, disk_id = ui.param("id"), ui.param("disk")
    name, alias, _ = await ui.read(_attachment, vm_id, disk_id)
    await ui.run(UnplugDisk(vm_id, disk_id))
    return _done(ui, f"Disk {alias} is deactivated on VM {name}.")


@page
async def detach(ui: Ui) -> Response:
    vm_id, disk_id = ui.param("id"), ui.param("disk")
    name, alias, _ = await ui.read(_attachment, vm_id, disk_id)
    await ui.run(DetachDisk(vm_id, disk_id))
    return _done(ui, f"Disk {alias} detached from VM {name}.")
