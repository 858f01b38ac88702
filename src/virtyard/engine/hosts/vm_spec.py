"""A VM as the host agent's ``VM.create`` and ``VM.hotplugDisk`` take it, from the database.

Each disk gets a stable place: its interface index is chosen once (the lowest free one on its
interface) and kept in ``vm_device.address`` together with the address the host reported, so a
disk keeps its name and slot across runs, migrations and hot-plugs. A LUN disk's serial is its
disk id cut to 20 characters, as oVirt's engine writes it, so the guest's report of that serial
maps back to the disk; a passthrough LUN (``sgio``) carries the array's own identifiers instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from virtyard.engine.db.models import BaseDisk, DiskVmElement, Lun, Vm, VmDevice

# The API's interfaces → the agent's.
IFACE = {"virtio": "virtio", "virtio_scsi": "scsi", "sata": "sata", "ide": "ide"}
SERIAL_LENGTH = 20
MIB = 1 << 20
# The CD-ROM drive: on the virtio-scsi bus, at an index no disk of the VM uses.
CD_IFACE = "scsi"
CDROM_DEVICE_ID = "00000000-0000-0000-0000-000000000000"


@dataclass
class DiskPlace:
    """Where a disk sits on its VM: interface index and the host-reported address."""

    index: int
    address: dict[str, str] | None

    def dumps(self) -> str:
        return json.dumps({"index": self.index, "address": self.address},
                          separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> DiskPlace | None:
        try:
            raw = json.loads(text) if text else None
        except ValueError:
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("index"), int):
            return None
        address = raw.get("address")
        return cls(raw["index"], address if isinstance(address, dict) else None)


@dataclass
class VmDisk:
    """One attached LUN disk of a VM with everything a device dict needs."""

    disk: BaseDisk
    element: DiskVmElement
    device: VmDevice
    lun: Lun

    @property
    def iface(self) -> str:
        return IFACE.get(self.element.disk_interface, "scsi")

    def drive(self, place: DiskPlace) -> dict[str, Any]:
        passthrough = bool(self.disk.sgio)
        drive: dict[str, Any] = {
            "type": "disk", "device": "lun" if passthrough else "disk", "iface": self.iface,
            "index": place.index, "GUID": self.lun.lun_id, "format": "raw",
            "readonly": self.device.is_readonly,
            "shared": "shared" if self.disk.shareable else "none",
            "diskId": self.disk.id, "alias": f"ua-{self.disk.id}",
            "propagateErrors": "on" if self.disk.propagate_errors else "off",
        }
        if passthrough:
            drive["sgio"] = self.disk.sgio
        else:
            drive["serial"] = self.disk.id[:SERIAL_LENGTH]
        if place.address:
            drive["address"] = place.address
        if self.element.is_boot:
            drive["bootOrder"] = 1
        return drive


def vm_disks(tx: Session, vm_id: str, *, plugged_only: bool = True) -> list[VmDisk]:
    """The VM's LUN disks (plugged ones by default), boot disk first, then by alias."""
    stmt = (select(BaseDisk, DiskVmElement, VmDevice, Lun)
            .join(DiskVmElement, DiskVmElement.disk_id == BaseDisk.id)
            .join(VmDevice, (VmDevice.device_id == BaseDisk.id) & (VmDevice.vm_id == vm_id))
            .join(Lun, Lun.disk_id == BaseDisk.id)
            .where(DiskVmElement.vm_id == vm_id))
    if plugged_only:
        stmt = stmt.where(VmDevice.is_plugged.is_(True))
    rows = [VmDisk(*row) for row in tx.execute(stmt)]
    rows.sort(key=lambda d: (not d.element.is_boot, d.disk.alias, d.disk.id))
    return rows


def place_disks(disks: list[VmDisk], taken: dict[str, set[int]] | None = None
                ) -> dict[str, DiskPlace]:
    """Every disk's place: the one it had, else the lowest free index on its interface."""
    used: dict[str, set[int]] = {k: set(v) for k, v in (taken or {}).items()}
    places: dict[str, DiskPlace] = {}
    pending: list[VmDisk] = []
    for d in disks:
        known = DiskPlace.loads(d.device.address)
        if known is not None and known.index not in used.setdefault(d.iface, set()):
            used[d.iface].add(known.index)
            places[d.disk.id] = known
        else:
            pending.append(d)
    for d in pending:
        free = used.setdefault(d.iface, set())
        index = next(i for i in range(len(free) + 1) if i not in free)
        free.add(index)
        places[d.disk.id] = DiskPlace(index, None)
    return places


def taken_places(tx: Session, vm_id: str, *, except_disk: str | None = None,
                 with_cd: bool = True) -> dict[str, set[int]]:
    """Indexes in use on the VM per interface (plugged disks and the CD-ROM drive), for a
    hot-plug."""
    out: dict[str, set[int]] = {}
    for d in vm_disks(tx, vm_id):
        if d.disk.id == except_disk:
            continue
        place = DiskPlace.loads(d.device.address)
        if place is not None:
            out.setdefault(d.iface, set()).add(place.index)
    cd = tx.get(VmDevice, (CDROM_DEVICE_ID, vm_id)) if with_cd else None
    cd_place = DiskPlace.loads(cd.address) if cd is not None else None
    if cd_place is not None:
        out.setdefault(CD_IFACE, set()).add(cd_place.index)
    return out


def cdrom_drive(place: DiskPlace, pdiv: dict[str, str] | None) -> dict[str, Any]:
    """The VM's CD-ROM device dict: a volume by PDIV, or an empty tray."""
    drive: dict[str, Any] = {"type": "disk", "device": "cdrom", "iface": CD_IFACE,
                             "index": place.index, "readonly": True, "shared": "none"}
    if pdiv:
        drive["PDIV"] = pdiv
    return drive


def vm_params(vm: Vm, disks: list[VmDisk], places: dict[str, DiskPlace],
              cdrom: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``vmParams`` of ``VM.create`` (``cdrom``: its drive, see :func:`cdrom_drive`)."""
    params: dict[str, Any] = {
        "vmId": vm.id, "vmName": vm.name,
        "memSize": max(16, vm.memory_bytes // MIB),
        "smp": max(1, vm.cpu_sockets * vm.cpu_cores * vm.cpu_threads),
        "devices": [d.drive(places[d.disk.id]) for d in disks] + ([cdrom] if cdrom else []),
    }
    if vm.kernel:
        params["kernel"] = vm.kernel
        if vm.initrd:
            params["initrd"] = vm.initrd
        if vm.cmdline:
            params["kernelArgs"] = vm.cmdline
    return params


def reported_addresses(definition: Any) -> dict[str, dict[str, str]]:
    """disk id → address, from a ``VmDefinition`` the agent returned."""
    out: dict[str, dict[str, str]] = {}
    devices = definition.get("devices", []) if isinstance(definition, dict) else []
    for dev in devices if isinstance(devices, list) else []:
        if isinstance(dev, dict) and isinstance(dev.get("diskId"), str) \
                and isinstance(dev.get("address"), dict):
            out[dev["diskId"]] = {str(k): str(v) for k, v in dev["address"].items()}
    return out
