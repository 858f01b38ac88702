"""Attach a disk to a VM, change an attachment, detach it (``vms/{id}/diskattachments``).

Attach and detach belong to the VM (the design page). A non-shareable disk is attached to one
VM at most — checked here, and enforced by the database (``disk_vm_element.exclusive_disk_id``
is unique), so of twenty concurrent attaches of one such disk to twenty VMs exactly one wins.
On a VM that is down, ``active`` says whether the disk is plugged at the next run; on a running
VM, activating is a hot-plug (``plug_disk.py``), which the REST layer runs after the attach.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Command, Context, record_event
from virtyard.engine.commands.vms import get_vm
from virtyard.engine.db.models import BaseDisk, DiskVmElement, Vm, VmDevice, VmDynamic

INTERFACES = ("virtio", "virtio_scsi", "sata", "ide")


def vm_status(tx: Session, vm_id: str) -> str:
    dynamic = tx.get(VmDynamic, vm_id)
    return dynamic.status if dynamic else "down"


@dataclass
class AttachDisk(Command[bool]):
    """Attach an existing disk; the result says whether a hot-plug must follow."""

    action: ClassVar[str] = "attach"
    entity: ClassVar[str] = "Virtual Disk"
    conflicts: ClassVar = {
        ("disk_vm_element", ("exclusive_disk_id",)): errors.NOT_SHAREABLE_DISK_ATTACHED,
        ("disk_vm_element", ("disk_id", "vm_id")): errors.DISK_ALREADY_ATTACHED,
        ("vm_device", ("device_id", "vm_id")): errors.DISK_ALREADY_ATTACHED,
    }

    vm_id: str
    disk_id: str
    interface: str = "virtio_scsi"
    bootable: bool = False
    read_only: bool = False
    pass_discard: bool = False
    uses_scsi_reservation: bool = False
    active: bool = True
    vm_name: str = ""
    alias: str = ""
    shareable: bool = False
    sgio: str = ""
    running: bool = False

    def validate(self, tx: Session, ctx: Context) -> None:
        vm = get_vm(self, tx, self.vm_id)
        self.vm_name = vm.name
        disk = tx.get(BaseDisk, self.disk_id)
        if disk is None:
            raise self.fail(errors.DISK_NOT_FOUND)
        self.alias, self.shareable, self.sgio = disk.alias, disk.shareable, disk.sgio
        if disk.content_type == "iso":
            raise self.fail(errors.ISO_DISK_NOT_ATTACHABLE)
        if self.interface not in INTERFACES:
            raise self.fail(errors.INTERFACE_INVALID, iface=self.interface)
        if disk.sgio and self.interface != "virtio_scsi":
            raise self.fail(errors.SGIO_NEEDS_VIRTIO_SCSI)
        if self.uses_scsi_reservation and disk.sgio != "unfiltered":
            raise self.fail(errors.SGIO_IS_FILTERED)
        if tx.get(DiskVmElement, (self.disk_id, self.vm_id)) is not None:
            raise self.fail(errors.DISK_ALREADY_ATTACHED)
        if not disk.shareable and tx.scalar(select(func.count()).where(
                DiskVmElement.disk_id == self.disk_id)):
            raise self.fail(errors.NOT_SHAREABLE_DISK_ATTACHED)
        if self.bootable and tx.scalar(select(func.count()).where(
                DiskVmElement.vm_id == self.vm_id, DiskVmElement.is_boot.is_(True))):
            raise self.fail(errors.DISK_BOOT_IN_USE)
        status = vm_status(tx, self.vm_id)
        if status not in ("down", "up", "paused"):
            raise self.fail(errors.VM_STATUS_ILLEGAL, name=vm.name, status=status)
        self.running = status != "down"

    def execute(self, tx: Session, ctx: Context) -> bool:
        tx.add(DiskVmElement(disk_id=self.disk_id, vm_id=self.vm_id, is_boot=self.bootable,
                             disk_interface=self.interface, pass_discard=self.pass_discard,
                             uses_scsi_reservation=self.uses_scsi_reservation,
                             exclusive_disk_id=None if self.shareable else self.disk_id))
        tx.add(VmDevice(device_id=self.disk_id, vm_id=self.vm_id, type="disk",
                        device="lun" if self.sgio else "disk", alias=f"ua-{self.disk_id}",
                        is_plugged=self.active and not self.running,
                        is_readonly=self.read_only))
        vm = tx.get(Vm, self.vm_id)
        assert vm is not None
        vm.generation += 1
        return self.active and self.running

    def events(self, tx: Session, ctx: Context, result: bool) -> None:
        record_event(tx, ctx, audit.DISK_ATTACHED, audit.Ids(vm_id=self.vm_id,
                                                             disk_id=self.disk_id),
                     disk=self.alias, vm=self.vm_name)


@dataclass
class DetachDisk(Command[str]):
    """Detach a disk that is not plugged into a running VM (deactivate it first)."""

    action: ClassVar[str] = "detach"
    entity: ClassVar[str] = "Virtual Disk"

    vm_id: str
    disk_id: str
    vm_name: str = ""
    alias: str = ""

    def validate(self, tx: Session, ctx: Context) -> None:
        vm = get_vm(self, tx, self.vm_id)
        self.vm_name = vm.name
        device = tx.get(VmDevice, (self.disk_id, self.vm_id))
        if tx.get(DiskVmElement, (self.disk_id, self.vm_id)) is None or device is None:
            raise self.fail(errors.DISK_NOT_ATTACHED)
        disk = tx.get(BaseDisk, self.disk_id)
        self.alias = disk.alias if disk else self.disk_id
        if device.is_plugged and vm_status(tx, self.vm_id) != "down":
            raise self.fail(errors.DISK_PLUGGED_TO_RUNNING_VM, disk=self.alias)

    def execute(self, tx: Session, ctx: Context) -> str:
        for row in (tx.get(VmDevice, (self.disk_id, self.vm_id)),
                    tx.get(DiskVmElement, (self.disk_id, self.vm_id))):
            if row is not None:
                tx.delete(row)
        vm = tx.get(Vm, self.vm_id)
        assert vm is not None
        vm.generation += 1
        return self.disk_id

    def events(self, tx: Session, ctx: Context, result: str) -> None:
        record_event(tx, ctx, audit.DISK_DETACHED, audit.Ids(vm_id=self.vm_id,
                                                             disk_id=self.disk_id),
                     disk=self.alias, vm=self.vm_name)


@dataclass
class UpdateAttachment(Command[None]):
    """Change how a disk is attached (interface, bootable, read-only, pass-discard) while it
    is not plugged into a running VM."""

    action: ClassVar[str] = "update"
    entity: ClassVar[str] = "Virtual Disk"

    vm_id: str
    disk_id: str
    interface: str | None = None
    bootable: bool | None = None
    read_only: bool | None = None
    pass_discard: bool | None = None
    changing: bool = field(default=False, init=False)

    def run_in(self, ctx: Context) -> None:
        """:func:`commands.base.run`, but an update that changes nothing (clients send the
        whole attachment back) is checked in a read and takes no write transaction."""
        if not ctx.principal.can_write:
            raise self.fail(errors.NOT_AUTHORIZED)
        with ctx.db.read() as tx:
            self.validate(tx, ctx)
        if not self.changing:
            return
        with ctx.db.transaction() as tx:  # again: it may have changed since the read
            self.validate(tx, ctx)
            self.execute(tx, ctx)

    def validate(self, tx: Session, ctx: Context) -> None:
        get_vm(self, tx, self.vm_id)
        element = tx.get(DiskVmElement, (self.disk_id, self.vm_id))
        device = tx.get(VmDevice, (self.disk_id, self.vm_id))
        if element is None or device is None:
            raise self.fail(errors.DISK_NOT_ATTACHED)
        changes = [(self.interface, element.disk_interface), (self.bootable, element.is_boot),
                   (self.read_only, device.is_readonly), (self.pass_discard,
                                                          element.pass_discard)]
        self.changing = any(new is not None and new != old for new, old in changes)
        if not self.changing:
            return
        if device.is_plugged and vm_status(tx, self.vm_id) != "down":
            raise self.fail(errors.ATTACHMENT_PLUGGED_UPDATE)
        if self.interface is not None and self.interface not in INTERFACES:
            raise self.fail(errors.INTERFACE_INVALID, iface=self.interface)
        disk = tx.get(BaseDisk, self.disk_id)
        if disk is not None and disk.sgio and (self.interface or element.disk_interface) \
                != "virtio_scsi":
            raise self.fail(errors.SGIO_NEEDS_VIRTIO_SCSI)
        if self.bootable and not element.is_boot and tx.scalar(select(func.count()).where(
                DiskVmElement.vm_id == self.vm_id, DiskVmElement.is_boot.is_(True))):
            raise self.fail(errors.DISK_BOOT_IN_USE)

    def execute(self, tx: Session, ctx: Context) -> None:
        element = tx.get(DiskVmElement, (self.disk_id, self.vm_id))
        device = tx.get(VmDevice, (self.disk_id, self.vm_id))
        assert element is not None and device is not None
        if self.interface is not None and self.interface != element.disk_interface:
            element.disk_interface = self.interface
            device.address = ""  # a new interface: a new place at the next run
        if self.bootable is not None:
            element.is_boot = self.bootable
        if self.pass_discard is not None:
            element.pass_discard = self.pass_discard
        if self.read_only is not None:
            device.is_readonly = self.read_only
