"""What a CD-ROM drive holds: ISO disks as drives need them, and where the drive sits.

Shared by the flows that put a CD in a drive: run (the ISO for the next run), change CD,
migrate (the destination must reach the ISO's domain), and recovery (what a drive holds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Command
from virtyard.engine.db.models import BaseDisk, Lun, StorageDomain, VmDevice, VmDynamic
from virtyard.engine.hosts import vm_spec

CDROM_ID = vm_spec.CDROM_DEVICE_ID


@dataclass(frozen=True)
class Iso:
    """An ISO disk as a drive needs it."""

    disk_id: str
    alias: str
    domain_id: str
    domain_name: str
    wwid: str
    pdiv: dict[str, str]


def iso_disk(command: Command[Any], tx: Session, file_id: str) -> Iso:
    """The ISO disk ``file_id``, checked as oVirt's ``validateIsoPath`` does."""
    disk = tx.get(BaseDisk, file_id) if file_id else None
    if disk is None or disk.content_type != "iso" or disk.storage_type != "image" \
            or not disk.storage_domain_id:
        raise command.fail(errors.ISO_NOT_FOUND, file=file_id[:64])
    if disk.status != "ok" or not disk.content_size:
        raise command.fail(errors.ISO_STATUS_ILLEGAL, disk=disk.alias,
                           status=disk.status if disk.status != "ok" else "empty (no upload)")
    domain = tx.get(StorageDomain, disk.storage_domain_id)
    assert domain is not None
    if domain.status != "active" or domain.data_center_id is None:
        raise command.fail(errors.ISO_DOMAIN_NOT_ACTIVE, domain=domain.name,
                           status=domain.status)
    wwid = tx.scalar(select(Lun.lun_id).where(Lun.storage_domain_id == domain.id)) or ""
    return Iso(disk.id, disk.alias, domain.id, domain.name, wwid, {
        "poolID": domain.data_center_id, "domainID": domain.id,
        "imageID": str(disk.image_id), "volumeID": str(disk.volume_id)})


def cd_place(tx: Session, vm_id: str, taken: set[int] | None = None) -> vm_spec.DiskPlace:
    """Where the VM's drive sits (``scsi``, an index no disk uses), kept in its ``cdrom``
    device row so that it stays put across runs and hot-plugs. ``taken``: the indexes this
    run's disks take on that bus."""
    row = tx.get(VmDevice, (CDROM_ID, vm_id))
    if taken is None:  # the scsi indexes of the VM's disks
        taken = vm_spec.taken_places(tx, vm_id, with_cd=False).get(vm_spec.CD_IFACE, set())
    known = vm_spec.DiskPlace.loads(row.address) if row is not None else None
    if known is not None and known.index not in taken:
        return known
    index = next(i for i in range(len(taken) + 1) if i not in taken)
    place = vm_spec.DiskPlace(index, None)
    if row is None:
        tx.add(VmDevice(device_id=CDROM_ID, vm_id=vm_id, type="cdrom", device="cdrom",
                        is_plugged=True, is_readonly=True, address=place.dumps()))
    else:
        row.address = place.dumps()
    return place


def held_volume(definition: Any, iface: str, index: int) -> str | None:
    """The volume id the drive at (``iface``, ``index``) holds in a VM definition the agent
    returned; ``""`` when empty, ``None`` when the VM has no such drive."""
    devices = definition.get("devices", []) if isinstance(definition, dict) else []
    for dev in devices if isinstance(devices, list) else []:
        if isinstance(dev, dict) and dev.get("device") == "cdrom" \
                and dev.get("iface") == iface and dev.get("index") == index:
            pdiv = dev.get("PDIV")
            return str(pdiv.get("volumeID", "")) if isinstance(pdiv, dict) else ""
    return None


def iso_of_volume(tx: Session, volume_id: str) -> str:
    """The ISO disk whose volume this is (``""`` for none)."""
    if not volume_id:
        return ""
    return tx.scalar(select(BaseDisk.id).where(BaseDisk.volume_id == volume_id)) or ""


def cd_wwids(tx: Session, vm_id: str) -> list[str]:
    """The LUN of the domain whose ISO the running VM's drive holds (a migration's
    destination must reach it too)."""
    dynamic = tx.get(VmDynamic, vm_id)
    if dynamic is None or not dynamic.current_cd:
        return []
    disk = tx.get(BaseDisk, dynamic.current_cd)
    if disk is None or not disk.storage_domain_id:
        return []
    return list(tx.scalars(select(Lun.lun_id).where(Lun.storage_domain_id
                                                    == disk.storage_domain_id)))
