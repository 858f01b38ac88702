"""Plugging disks into, and out of, a running VM without leaving anything half-done.

Plug: check the dict against the VM's disks, check this host sees the LUN, record the device
in our metadata (with a new generation), then attach; if libvirt refuses, the metadata goes
back as it was. A crash between the two leaves only a metadata entry for a disk that is not
there, which nothing reads. Unplug: detach, wait (bounded) for libvirt's device-removed event
(:mod:`virtyard.host.virt.device_events`), confirm the device is gone from the live XML, then
drop its metadata entry (new generation).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import libvirt

from virtyard.host.rpc.errors import HotplugDiskError, HotunplugDiskError, InvalidParamsError
from virtyard.host.virt.device_events import Removal
from virtyard.host.virt.device_specs import parse_disks
from virtyard.host.virt.domain_xml import USER_ALIAS_PREFIX, DomainDisk, drive_name
from virtyard.host.virt.drives import DriveNotVisibleError
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
            raise HotplugDiskError(f"cannot hotplug {disk.name}: {exc}", vmId=vm_id,
                                   invisible=exc.what) from None
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


def live_alias(disk: DomainDisk) -> str | None:
    """The alias libvirt names the disk by in its events (``ua-<diskId>`` for ours)."""
    if disk.device.alias:
        return disk.device.alias
    return f"{USER_ALIAS_PREFIX}{disk.device.disk_id}" if disk.device.disk_id else None


def _wait_gone(manager: VmManager, dom: libvirt.virDomain, disk: DomainDisk, removal: Removal,
               timeout: float) -> VmSnapshot:
    """Sleep until libvirt says the disk is gone (or refused), then confirm in the live XML;
    bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        now = manager.snapshot(dom)
        if all(d.name != disk.name for d in now.domain.disks):
            return now
        if removal.refused:
            raise HotunplugDiskError(f"the guest refused to release {disk.name}; it stays "
                                     "attached", vmId=now.vm_id)
        left = deadline - time.monotonic()
        if left <= 0:
            raise HotunplugDiskError(
                f"the guest did not release {disk.name} within {timeout:g} s; it stays "
                "attached until the guest lets it go", vmId=now.vm_id)
        removal.wait(min(left, manager.removals.poll_period()))


def hotunplug_disk(manager: VmManager, vm_id: str, drive: dict[str, Any], *,
                   timeout: float = UNPLUG_TIMEOUT) -> VmSnapshot:
    """Detach the disk ``drive`` names (by ``GUID``, or ``iface`` + ``index``)."""
    with manager.locks.hold([vm_id]):
        dom = manager.domain(vm_id)
        before = manager.snapshot(dom)
        disk = _find(before, drive)
        alias = live_alias(disk)
        with manager.removals.expect(vm_id, alias) as removal:
            try:
                if alias is not None:  # asynchronous: the end is libvirt's event
                    dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                else:
                    dom.detachDeviceFlags(disk.to_xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                raise HotunplugDiskError(f"libvirt refused to unplug {disk.name}: "
                                         f"{exc.get_error_message()}", vmId=vm_id) from None
            now = _wait_gone(manager, dom, disk, removal, timeout)
        manager.write_metadata(dom, now.metadata.with_device(disk.name, None).next_generation())
        log.info("VM %s: unplugged %s (%s)", vm_id, disk.name,
                 "libvirt's device-removed event" if removal.reported else "seen in the live XML")
        manager.devices_changed(vm_id)
        return manager.snapshot(dom)
