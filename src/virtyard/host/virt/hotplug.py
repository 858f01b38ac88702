"""Plugging disks into, and out of, a running VM without leaving anything half-done.

Plug: check the dict against the VM's disks, check this host sees the LUN, record the device
in our metadata (with a new generation), then attach; if libvirt refuses, the metadata goes
back as it was. A crash between the two leaves only a metadata entry for a disk that is not
there, which nothing reads. Unplug: detach, wait (bounded) until the guest has released the
device and it is gone from the live XML, then drop its metadata entry (new generation).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import libvirt

from virtyard.host.rpc.errors import HotplugDiskError, HotunplugDiskError, InvalidParamsError
from virtyard.host.virt.domain_xml import DomainDisk, drive_name
from virtyard.host.virt.drives import DriveNotVisibleError
from virtyard.host.virt.vm_params import parse_disks
from virtyard.host.virt.vms import VmManager, VmSnapshot

log = logging.getLogger("virtyard.host.virt.hotplug")

UNPLUG_TIMEOUT = 15.0


def hotplug_disk(manager: VmManager, vm_id: str, drive: dict[str, Any]) -> VmSnapshot:
    """Attach ``drive`` (a disk dict) to the running VM ``vm_id``."""
    with manager.locks.hold([vm_id]):
        dom = manager.domain(vm_id)
        before = manager.snapshot(dom)
        [disk] = parse_disks([drive], existing=[d.device for d in before.domain.disks])
        try:
            source = manager.drives.resolve(disk, vm_id)
        except DriveNotVisibleError as exc:
            raise HotplugDiskError(f"cannot hotplug {disk.name}: {exc}", vmId=vm_id) from None
        entry = dataclasses.replace(before.metadata.device(disk.name), guid=disk.guid,
                                    pdiv=disk.pdiv, disk_id=disk.disk_id,
                                    shared="exclusive" if disk.shared == "exclusive" else None)
        planned = before.metadata.with_device(disk.name, entry).next_generation()
        manager.write_metadata(dom, planned)
        try:
            dom.attachDeviceFlags(DomainDisk(disk, source).to_xml(),
                                  libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            manager.write_metadata(dom, before.metadata)
            raise HotplugDiskError(f"libvirt refused to plug {disk.name}: "
                                   f"{exc.get_error_message()}", vmId=vm_id) from None
        log.info("VM %s: plugged %s (%s)", vm_id, disk.name, disk.guid or disk.pdiv)
        manager.devices_changed(vm_id)
        return manager.snapshot(dom)


def _find(snapshot: VmSnapshot, drive: dict[str, Any]) -> DomainDisk:
    guid = drive.get("GUID")
    if guid is not None:
        for disk in snapshot.domain.disks:
            if disk.device.guid == guid:
                return disk
        raise HotunplugDiskError(f"no disk with GUID {guid} in VM {snapshot.vm_id}",
                                 vmId=snapshot.vm_id)
    if "iface" not in drive or "index" not in drive:
        raise InvalidParamsError("invalid parameter 'drive': give GUID, or iface and index")
    try:
        name = drive_name(str(drive["iface"]), int(drive["index"]))
    except (ValueError, TypeError) as exc:
        raise InvalidParamsError(f"invalid parameter 'drive': {exc}") from None
    try:
        return snapshot.domain.disk(name)
    except KeyError:
        raise HotunplugDiskError(f"no disk {name} in VM {snapshot.vm_id}",
                                 vmId=snapshot.vm_id) from None


def hotunplug_disk(manager: VmManager, vm_id: str, drive: dict[str, Any], *,
                   timeout: float = UNPLUG_TIMEOUT) -> VmSnapshot:
    """Detach the disk ``drive`` names (by ``GUID``, or ``iface`` + ``index``)."""
    with manager.locks.hold([vm_id]):
        dom = manager.domain(vm_id)
        before = manager.snapshot(dom)
        disk = _find(before, drive)
        try:
            dom.detachDeviceFlags(disk.to_xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            raise HotunplugDiskError(f"libvirt refused to unplug {disk.name}: "
                                     f"{exc.get_error_message()}", vmId=vm_id) from None
        deadline = time.monotonic() + timeout
        while True:
            now = manager.snapshot(dom)
            if all(d.name != disk.name for d in now.domain.disks):
                break
            if time.monotonic() >= deadline:
                raise HotunplugDiskError(
                    f"the guest did not release {disk.name} within {timeout:g} s; it stays "
                    "attached until the guest lets it go", vmId=vm_id)
            time.sleep(0.05)
        manager.write_metadata(dom, now.metadata.with_device(disk.name, None).next_generation())
        log.info("VM %s: unplugged %s", vm_id, disk.name)
        manager.devices_changed(vm_id)
        return manager.snapshot(dom)
