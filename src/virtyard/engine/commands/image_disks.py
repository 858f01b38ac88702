"""ISO disks on a block storage domain: ``POST disks`` with ``content_type=iso``, and what
removing one takes (its volume).

As oVirt's ``AddDiskCommand`` for an image: the disk is ``locked`` while its volume is made,
then ``ok`` and empty (oVirt's upload clients wait for ``ok`` before they start the image
transfer that fills it). An ISO disk is usable as a CD only once an upload was verified
(``content_size`` > 0). The volume is created by a host that reaches the domain: an Up host
holding the domain's connection for it (a ``host_connection_pins`` row owned by ``sd:<id>``).

Crash safety: the disk row (``locked``, with its new image and volume ids) is committed before
the host is asked, so an engine that dies meanwhile finds it at start and removes the volume
if it was made (:func:`settle_locked_disks`).
"""

from __future__ import annotations

import datetime
import logging
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Command, Context, record_event
from virtyard.engine.db.models import (
    BaseDisk,
    Host,
    HostConnectionPin,
    ImageTransfer,
    StorageDomain,
    Vm,
    VmDynamic,
    new_id,
)
from virtyard.engine.hosts.connections import domain_owner
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostUnreachableError

log = logging.getLogger("virtyard.engine.image_disks")

MAX_ALIAS = 255
# An ISO larger than this is a mistake (oVirt's MaxBlockDiskSizeInGibiBytes is 8 TiB).
MAX_ISO_SIZE = 1 << 40
VOLUME_UNIT = 1 << 20
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                     r"[0-9a-fA-F]{12}$")
# Agent error codes (docs/host-api.md).
VOLUME_DOES_NOT_EXIST = 201
VOLUME_IS_BUSY = 203
NO_SPACE_LEFT = 397


def volume_size(size: int) -> int:
    """The volume for ``size`` bytes of content: whole MiB (the agent's lvcreate takes sizes
    in whole sectors only; its extents are 4 MiB anyway)."""
    return -(-size // VOLUME_UNIT) * VOLUME_UNIT


def domain_hosts(tx: Session, domain_id: str) -> list[Host]:
    """The Up hosts that reach the domain (they pin its connection), by name."""
    pinned = select(HostConnectionPin.host_id).where(
        HostConnectionPin.owner == domain_owner(domain_id))
    return list(tx.scalars(select(Host).where(Host.id.in_(pinned), Host.status == "up")
                           .order_by(Host.name, Host.id)))


def domain_host(tx: Session, domain_id: str) -> HostAddress | None:
    """An Up host that reaches the domain, or None."""
    hosts = domain_hosts(tx, domain_id)
    return HostAddress(hosts[0].id, hosts[0].address, hosts[0].port) if hosts else None


@dataclass(frozen=True)
class VolumeRef:
    """Where an image disk's volume is: the PDIV the agent's verbs take."""

    pool_id: str
    domain_id: str
    image_id: str
    volume_id: str

    def params(self) -> dict[str, Any]:
        return {"poolID": self.pool_id, "domainID": self.domain_id,
                "imageID": self.image_id, "volumeID": self.volume_id}


def volume_of(tx: Session, disk: BaseDisk) -> VolumeRef | None:
    """The disk's volume (None for a LUN disk, or a domain no longer known)."""
    if disk.storage_type != "image" or not (disk.storage_domain_id and disk.image_id
                                            and disk.volume_id):
        return None
    domain = tx.get(StorageDomain, disk.storage_domain_id)
    if domain is None:
        return None
    return VolumeRef(domain.data_center_id or "", domain.id, disk.image_id, disk.volume_id)


def active_domain(command: Command[Any], tx: Session, domain_id: str) -> StorageDomain:
    """The domain, which must exist and be active (attached to a data center)."""
    domain = tx.get(StorageDomain, domain_id)
    if domain is None:
        raise command.fail(errors.STORAGE_DOMAIN_NOT_FOUND)
    if domain.status != "active" or not domain.data_center_id:
        raise command.fail(errors.STORAGE_DOMAIN_STATUS_ILLEGAL, name=domain.name,
                           status=domain.status)
    return domain


def host_error(exc: Exception) -> str:
    return str(exc)[:300]


@dataclass
class AddIsoDisk(Command[str]):
    """``POST disks`` with ``content_type=iso``, a size and one storage domain."""

    action: ClassVar[str] = "add"
    entity: ClassVar[str] = "Virtual Disk"

    alias: str
    provisioned_size: int
    domain_id: str = ""
    domain_name: str = ""
    description: str = ""
    disk_format: str = "raw"
    wipe_after_delete: bool = False
    disk_id: str = ""
    host: HostAddress | None = None
    host_name: str = ""
    domain_label: str = ""

    def validate(self, tx: Session, ctx: Context) -> None:
        if not self.alias.strip() or len(self.alias) > MAX_ALIAS:
            raise self.fail(errors.NAME_INVALID, max=MAX_ALIAS)
        if self.disk_format not in ("", "raw"):
            raise self.fail(errors.DISK_FORMAT_INVALID, format=self.disk_format[:16])
        if self.provisioned_size <= 0:
            raise self.fail(errors.DISK_SIZE_ZERO)
        if self.provisioned_size > MAX_ISO_SIZE:
            raise self.fail(errors.DISK_MAX_SIZE_EXCEEDED, max=MAX_ISO_SIZE)
        if self.domain_name and not self.domain_id:
            self.domain_id = tx.scalar(select(StorageDomain.id).where(
                StorageDomain.name == self.domain_name)) or ""
            if not self.domain_id:
                raise self.fail(errors.STORAGE_DOMAIN_NOT_FOUND)
        if not self.domain_id:
            raise self.fail(errors.STORAGE_DOMAIN_MISSING)
        if self.disk_id and not UUID_RE.match(self.disk_id):
            raise self.fail(errors.DISK_ID_INVALID, id=self.disk_id[:64])
        if self.disk_id and tx.get(BaseDisk, self.disk_id) is not None:
            raise self.fail(errors.NAME_ALREADY_USED, name=self.disk_id)
        domain = active_domain(self, tx, self.domain_id)
        self.domain_label = domain.name
        self.host = domain_host(tx, domain.id)
        if self.host is None:
            raise self.fail(errors.NO_HOST_REACHES_DOMAIN, domain=domain.name)
        host = tx.get(Host, self.host.host_id)
        self.host_name = host.name if host else self.host.host_id

    def execute(self, tx: Session, ctx: Context) -> str:  # pragma: no cover - see run_in
        raise NotImplementedError("runs through run_in")

    def run_in(self, ctx: Context) -> str:
        """validate + a ``locked`` disk (one transaction) → Volume.create → ``ok``."""
        if not ctx.principal.can_write:
            raise self.fail(errors.NOT_AUTHORIZED)
        with ctx.db.transaction() as tx:
            self.validate(tx, ctx)
            domain = active_domain(self, tx, self.domain_id)
            disk = BaseDisk(id=self.disk_id or new_id(), alias=self.alias,
                            description=self.description, storage_type="image",
                            content_type="iso", wipe_after_delete=self.wipe_after_delete,
                            storage_domain_id=domain.id, image_id=new_id(),
                            volume_id=new_id(), provisioned_size=self.provisioned_size,
                            status="locked")
            tx.add(disk)
            tx.flush()
            ref = VolumeRef(domain.data_center_id or "", domain.id, disk.image_id or "",
                            disk.volume_id or "")
        assert self.host is not None
        try:
            ctx.services.pool.call_sync(self.host, "Volume.create",
                                        {**ref.params(), "size": volume_size(
                                            self.provisioned_size), "type": "ISO"})
        except (HostCallError, HostUnreachableError) as exc:
            if isinstance(exc, HostUnreachableError):  # it may have been made: remove it
                remove_volume_quietly(ctx, self.host, ref)
            with ctx.db.transaction() as tx:
                row = tx.get(BaseDisk, disk.id)
                if row is not None:
                    tx.delete(row)
            if isinstance(exc, HostCallError) and exc.code == NO_SPACE_LEFT:
                raise self.fail(errors.DISK_SPACE_LOW, domain=self.domain_label,
                                why=host_error(exc)) from None
            raise self.fail(errors.VOLUME_CREATE_FAILED, host=self.host_name,
                            why=host_error(exc)) from None
        with ctx.db.transaction() as tx:
            row = tx.get(BaseDisk, disk.id)
            if row is not None:
                row.status = "ok"
            record_event(tx, ctx, audit.ISO_DISK_ADDED,
                         audit.Ids(disk_id=disk.id, storage_domain_id=domain.id),
                         disk=self.alias, size=self.provisioned_size, domain=self.domain_label)
        return disk.id


def remove_volume_quietly(ctx: Context, host: HostAddress, ref: VolumeRef) -> bool:
    """Remove a volume if it exists; False (logged) if the host could not."""
    try:
        ctx.services.pool.call_sync(host, "Volume.remove", ref.params())
    except HostCallError as exc:
        if exc.code == VOLUME_DOES_NOT_EXIST:
            return True
        log.warning("removing volume %s of domain %s failed: %s", ref.volume_id,
                    ref.domain_id, exc)
        return False
    except HostUnreachableError as exc:
        log.warning("removing volume %s of domain %s failed: %s", ref.volume_id,
                    ref.domain_id, exc)
        return False
    return True


@dataclass
class IsoRemoval:
    """What removing an ISO disk takes: its volume, removed by a host that reaches it."""

    ref: VolumeRef
    host: HostAddress
    host_name: str


def check_removable(command: Command[Any], tx: Session, disk: BaseDisk) -> IsoRemoval | None:
    """For ``RemoveDisk``: refuse an image disk that is locked (an upload in progress, or being
    created) or in a VM's CD-ROM (loaded now or set for the next run); else where its volume is
    (None for a LUN disk or a disk without a volume)."""
    if disk.storage_type != "image":
        return None
    if disk.status == "locked":
        raise command.fail(errors.DISKS_LOCKED, disk=disk.alias)
    vms = list(tx.scalars(select(Vm.name).outerjoin(VmDynamic, VmDynamic.vm_id == Vm.id)
                          .where(or_(Vm.iso_path == disk.id, VmDynamic.current_cd == disk.id))
                          .order_by(Vm.name)))
    if vms:
        raise command.fail(errors.DISK_IS_CD, disk=disk.alias, vms=", ".join(vms[:10]))
    ref = volume_of(tx, disk)
    if ref is None:
        return None
    domain = active_domain(command, tx, ref.domain_id)
    host = domain_host(tx, domain.id)
    if host is None:
        raise command.fail(errors.NO_HOST_REACHES_DOMAIN, domain=domain.name)
    row = tx.get(Host, host.host_id)
    return IsoRemoval(ref, host, row.name if row else host.host_id)


def remove_iso_volume(command: Command[Any], ctx: Context, removal: IsoRemoval,
                      alias: str) -> None:
    """``Volume.remove``; a volume that is already gone is fine, one in use is refused."""
    try:
        ctx.services.pool.call_sync(removal.host, "Volume.remove", removal.ref.params())
    except HostCallError as exc:
        if exc.code == VOLUME_DOES_NOT_EXIST:
            return
        raise command.fail(errors.VOLUME_REMOVE_FAILED, host=removal.host_name, disk=alias,
                           why=host_error(exc)) from None
    except HostUnreachableError as exc:
        raise command.fail(errors.VOLUME_REMOVE_FAILED, host=removal.host_name, disk=alias,
                           why=host_error(exc)) from None


def settle_locked_disks(ctx: Context, started_before: datetime.datetime) -> int:
    """After an engine crash: ISO disks left ``locked`` by an add that died (no transfer holds
    them) lose their volume and their row; retried while no host can remove the volume.
    Returns how many were settled."""
    with ctx.db.read() as tx:
        held = select(ImageTransfer.active_disk_id).where(
            ImageTransfer.active_disk_id.is_not(None))
        disks = list(tx.scalars(select(BaseDisk).where(
            BaseDisk.storage_type == "image", BaseDisk.status == "locked",
            BaseDisk.created_at < started_before, BaseDisk.id.not_in(held))))
        todo = [(d.id, volume_of(tx, d), domain_host(tx, d.storage_domain_id or ""))
                for d in disks]
    settled = 0
    for disk_id, ref, host in todo:
        if ref is not None and (host is None or not remove_volume_quietly(ctx, host, ref)):
            continue  # try again at the next start
        with ctx.db.transaction() as tx:
            row = tx.get(BaseDisk, disk_id)
            if row is not None and row.status == "locked":
                tx.delete(row)
                settled += 1
    return settled
