"""Add a SAN LUN as a disk (``POST disks`` with ``lun_storage``), and remove a disk.

The design page's vDisk rule: adding a WWID that is a disk already, with nothing that
disagrees (the same or no alias, the same or no sharing), answers with the existing disk
instead of a conflict — so a script may run twice. Everything else that would give a LUN a
second user is refused: another disk of it (oVirt's ``..._DISK_LUN_IS_ALREADY_IN_USE``), or a
storage domain on it (which oVirt forgets to check here). The database has the last word
(``luns.disk_id`` is unique, and a LUN has a disk or a storage domain, never both), so twenty
concurrent adds of one WWID leave exactly one disk.

With ``host``, the LUN must be visible there (``Host.getDeviceList`` for that WWID, else
oVirt's 400 ``ACTION_TYPE_FAILED_DISK_LUN_INVALID``), and its size, serial, vendor and product
come from the host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Context, record_event
from virtyard.engine.commands.flow import HostCommand
from virtyard.engine.commands.hosts import get_host
from virtyard.engine.commands.image_disks import IsoRemoval, check_removable, remove_iso_volume
from virtyard.engine.commands.storage import Portal, check_portal, find_or_add_connection
from virtyard.engine.db.models import (
    BaseDisk,
    DiskVmElement,
    Host,
    Lun,
    LunConnection,
    VmDevice,
    VmDynamic,
    new_id,
)
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostUnreachableError

WWID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")
MAX_ALIAS = 255


@dataclass
class AddedDisk:
    disk_id: str
    existing: bool


@dataclass
class AddLunDisk(HostCommand[AddedDisk]):
    """``POST disks`` with a ``lun_storage``."""

    action: ClassVar[str] = "add"
    entity: ClassVar[str] = "Virtual Disk"
    conflicts: ClassVar = {("luns", ("disk_id",)): errors.LUN_ALREADY_USED_BY_DISK}

    wwid: str
    portals: list[Portal] = field(default_factory=list)
    alias: str | None = None
    description: str = ""
    shareable: bool | None = None
    sgio: str | None = None
    propagate_errors: bool = False
    host_id: str | None = None
    host_name: str | None = None
    host: HostAddress | None = None
    existing_id: str | None = None

    def validate(self, tx: Session, ctx: Context) -> None:
        if not WWID_RE.match(self.wwid):
            raise self.fail(errors.LUN_ID_INVALID, wwid=self.wwid[:64])
        if self.alias is not None and (not self.alias.strip() or len(self.alias) > MAX_ALIAS):
            raise self.fail(errors.NAME_INVALID, max=MAX_ALIAS)
        if self.sgio not in (None, "", "disabled", "filtered", "unfiltered"):
            raise self.fail(errors.SGIO_INVALID)
        if self.sgio == "disabled":
            self.sgio = ""
        lun = tx.get(Lun, self.wwid)
        if lun is not None and lun.storage_domain_id:
            raise self.fail(errors.LUN_USED_BY_STORAGE_DOMAIN, wwid=self.wwid)
        if lun is not None and lun.disk_id:
            self.existing_id = self._same_disk(tx, lun.disk_id)
            return
        if not self.portals:
            raise self.fail(errors.ISCSI_MISSING_PARAMS)
        for portal in self.portals:
            check_portal(self, portal, need_target=True)
        if self.host_name and not self.host_id:
            self.host_id = tx.scalar(select(Host.id).where(Host.name == self.host_name))
            if self.host_id is None:
                raise self.fail(errors.HOST_NOT_FOUND)
        if self.host_id:
            host = get_host(self, tx, self.host_id, for_update=False)
            if host.status != "up":
                raise self.fail(errors.HOST_STATUS_ILLEGAL, name=host.name, status=host.status)
            self.host = HostAddress(host.id, host.address, host.port)

    def _same_disk(self, tx: Session, disk_id: str) -> str:
        """The vDisk rule: the existing disk if nothing disagrees, else a conflict."""
        disk = tx.get(BaseDisk, disk_id)
        assert disk is not None
        if (self.alias is not None and self.alias != disk.alias) or \
                (self.shareable is not None and self.shareable != disk.shareable) or \
                (self.sgio is not None and (self.sgio or "") != disk.sgio):
            raise self.fail(errors.LUN_ALREADY_USED_BY_DISK)
        return disk.id

    def perform(self, ctx: Context) -> dict[str, Any] | None:
        if self.existing_id or self.host is None:
            return None
        try:
            devices = ctx.services.pool.call_sync(
                self.host, "Host.getDeviceList",
                {"guids": [self.wwid], "checkStatus": False})
        except (HostCallError, HostUnreachableError) as exc:
            raise self.fail(errors.LUN_NOT_VISIBLE, why=str(exc)[:300]) from exc
        for device in devices if isinstance(devices, list) else []:
            if isinstance(device, dict) and device.get("GUID") == self.wwid and any(
                    p.get("state") == "active" for p in device.get("pathstatus", [])
                    if isinstance(p, dict)):
                return device
        raise self.fail(errors.LUN_NOT_VISIBLE, why="the host does not see it")

    def record(self, tx: Session, ctx: Context, found: Any) -> AddedDisk:
        if self.existing_id:
            return AddedDisk(self.existing_id, True)
        device: dict[str, Any] = found or {}
        disk = BaseDisk(id=new_id(), alias=self.alias or self.wwid,
                        description=self.description, shareable=bool(self.shareable),
                        sgio=self.sgio or "", storage_type="lun", content_type="data",
                        propagate_errors=self.propagate_errors, status="ok",
                        provisioned_size=int(device.get("capacity") or 0))
        try:
            with tx.begin_nested():  # the disk and the LUN's claim stand or fall together
                tx.add(disk)
                tx.flush()
                lun = tx.get(Lun, self.wwid)
                if lun is None:
                    lun = Lun(lun_id=self.wwid)
                    tx.add(lun)
                if lun.disk_id or lun.storage_domain_id:
                    raise _Taken
                lun.disk_id = disk.id
                if device:
                    lun.serial = str(device.get("serial", ""))[:4000]
                    lun.vendor_id = str(device.get("vendorID", ""))[:50]
                    lun.product_id = str(device.get("productID", ""))[:50]
                    lun.device_size = int(device.get("capacity") or 0)
                    lun.discard_max_size = int(device.get("discard_max_bytes") or 0)
                    paths = device.get("pathstatus") or []
                    if paths and isinstance(paths[0], dict):
                        lun.lun_mapping = int(paths[0].get("lun") or 0)
                tx.flush()
        except (IntegrityError, _Taken):
            # Another request made this LUN a disk (or a domain) meanwhile: the vDisk rule.
            if disk in tx:
                tx.expunge(disk)
            lun = tx.get(Lun, self.wwid, populate_existing=True)
            if lun is None or not lun.disk_id or lun.storage_domain_id:
                raise self.fail(errors.LUN_USED_BY_STORAGE_DOMAIN, wwid=self.wwid) from None
            return AddedDisk(self._same_disk(tx, lun.disk_id), True)
        for portal in self.portals:
            conn = find_or_add_connection(tx, portal)
            if tx.get(LunConnection, (self.wwid, conn.id)) is None:
                tx.add(LunConnection(lun_id=self.wwid, connection_id=conn.id))
        return AddedDisk(disk.id, False)

    def events(self, tx: Session, ctx: Context, result: AddedDisk) -> None:
        if not result.existing:
            record_event(tx, ctx, audit.DISK_ADDED, audit.Ids(disk_id=result.disk_id),
                         disk=self.alias or self.wwid, wwid=self.wwid)


class _Taken(Exception):  # noqa: N818 - internal signal, never escapes
    pass


@dataclass
class RemoveDisk(HostCommand[str]):
    """``DELETE disks/{id}``: a disk that no running VM uses; its attachments go with it (an
    ISO disk: its volume too, unless it is in a CD-ROM or locked)."""

    action: ClassVar[str] = "remove"
    entity: ClassVar[str] = "Virtual Disk"

    disk_id: str
    alias: str = ""
    iso: IsoRemoval | None = None

    def validate(self, tx: Session, ctx: Context) -> None:
        disk = tx.get(BaseDisk, self.disk_id)
        if disk is None:
            raise self.fail(errors.DISK_NOT_FOUND)
        self.alias = disk.alias
        plugged_running = tx.scalar(
            select(func.count()).select_from(VmDevice)
            .join(VmDynamic, VmDynamic.vm_id == VmDevice.vm_id)
            .where(VmDevice.device_id == self.disk_id, VmDevice.is_plugged.is_(True),
                   VmDynamic.status != "down"))
        if plugged_running:
            raise self.fail(errors.DISK_PLUGGED_TO_RUNNING_VM, disk=disk.alias)
        self.iso = check_removable(self, tx, disk)

    def perform(self, ctx: Context) -> Any:
        if self.iso is not None:
            remove_iso_volume(self, ctx, self.iso, self.alias)
        return None

    def record(self, tx: Session, ctx: Context, found: Any) -> str:
        tx.execute(delete(VmDevice).where(VmDevice.device_id == self.disk_id))
        tx.execute(delete(DiskVmElement).where(DiskVmElement.disk_id == self.disk_id))
        disk = tx.get(BaseDisk, self.disk_id)
        if disk is not None:
            tx.delete(disk)
        return self.disk_id

    def events(self, tx: Session, ctx: Context, result: str) -> None:
        record_event(tx, ctx, audit.DISK_REMOVED, audit.Ids(disk_id=result), disk=self.alias)
