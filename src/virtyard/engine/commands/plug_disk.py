"""Hot-plug and hot-unplug a LUN disk of a VM (``PUT vms/{id}/diskattachments/{id}``).

Plug: the VM's host is connected to the LUN's storage and shows it sees the LUN, then
``VM.hotplugDisk``. When the host already holds a pin for every connection of the LUN (its
storage is connected for something else, e.g. another disk on the same target) that proof is
skipped: ``VM.hotplugDisk`` itself refuses a LUN the host does not see, and on that refusal the
plug proves as a first one would (connect, show the LUN) and tries once more, so a pin whose
connection was lost costs time, never a different outcome. Unplug: ``VM.hotunplugDisk`` (the
agent waits for the guest to let go), then the host's connections that no plugged disk of the
VM needs any more are released. A VM that is down only changes its next run (no host is
called).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Context, record_event
from virtyard.engine.commands.errors import CommandError
from virtyard.engine.commands.flow import FlowCommand
from virtyard.engine.commands.run_vm import Candidate, prove_sync, release_hosts
from virtyard.engine.commands.vms import get_vm
from virtyard.engine.db.models import (
    BaseDisk,
    DiskVmElement,
    Flow,
    Host,
    HostConnectionPin,
    VmDevice,
    VmDynamic,
    utcnow,
)
from virtyard.engine.hosts import connections as conns
from virtyard.engine.hosts import vm_spec
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostUnreachableError

log = logging.getLogger("virtyard.engine.plug_disk")

HOTPLUGGABLE = ("virtio", "virtio_scsi", "sata")
HOTPLUG_REFUSED = 45  # the agent's hotplugDisk error (host/rpc/errors.py HotplugDiskError)


def refused_as_not_visible(exc: HostCallError) -> bool:
    """Whether the agent refused a plug because it does not see the LUN (its error's data
    names what it does not see: ``invisible``)."""
    return exc.code == HOTPLUG_REFUSED and bool(exc.data.get("invisible"))


def pinned_everywhere(tx: Session, host_id: str, connection_ids: set[str]) -> bool:
    """Whether ``host_id`` holds a pin (any owner's) for each of these connections: its
    reconciler keeps them connected, so the host should see their LUNs already."""
    if not connection_ids:
        return False
    held = tx.scalar(select(func.count(func.distinct(HostConnectionPin.connection_id))).where(
        HostConnectionPin.host_id == host_id,
        HostConnectionPin.connection_id.in_(connection_ids)))
    return held == len(connection_ids)


@dataclass
class PlugDisk(FlowCommand[dict[str, Any]]):
    """Activate (``plug=True``) or deactivate a disk attachment."""

    action: ClassVar[str] = "activate"
    entity: ClassVar[str] = "Virtual Disk"
    kind: ClassVar[str] = "plug_disk"

    vm_id: str
    disk_id: str
    plug: bool = True
    vm_name: str = ""
    alias: str = ""
    host: Candidate | None = None
    wwid: str = ""
    pinned: bool = False  # the host held pins for the LUN's connections before this plug

    def validate(self, tx: Session, ctx: Context) -> None:
        vm = get_vm(self, tx, self.vm_id)
        self.vm_name = vm.name
        element = tx.get(DiskVmElement, (self.disk_id, self.vm_id))
        device = tx.get(VmDevice, (self.disk_id, self.vm_id))
        disk = tx.get(BaseDisk, self.disk_id)
        if element is None or device is None or disk is None:
            raise self.fail(errors.DISK_NOT_ATTACHED)
        self.alias = disk.alias
        if self.plug and device.is_plugged:
            raise self.fail(errors.DISK_ALREADY_ACTIVE)
        if not self.plug and not device.is_plugged:
            raise self.fail(errors.DISK_ALREADY_INACTIVE)
        dynamic = tx.get(VmDynamic, vm.id)
        status = dynamic.status if dynamic else "down"
        if status == "down":
            return
        if status not in ("up", "paused"):
            raise self.fail(errors.VM_STATUS_ILLEGAL, name=vm.name, status=status)
        if element.disk_interface not in HOTPLUGGABLE:
            raise self.fail(errors.HOTPLUG_INTERFACE, iface=element.disk_interface)
        assert dynamic is not None and dynamic.run_on_host_id is not None
        host = tx.get(Host, dynamic.run_on_host_id)
        assert host is not None
        self.host = Candidate(host.id, host.name, HostAddress(host.id, host.address, host.port))
        lun = [d for d in vm_spec.vm_disks(tx, vm.id, plugged_only=False)
               if d.disk.id == self.disk_id]
        self.wwid = lun[0].lun.lun_id if lun else ""

    def begin(self, tx: Session, ctx: Context) -> Flow:
        if self.host is not None and self.plug and self.wwid:
            owner = conns.vm_owner(self.vm_id)
            connection_ids = conns.lun_connection_ids(tx, [self.wwid])
            self.pinned = pinned_everywhere(tx, self.host.host_id, connection_ids)
            for connection_id in connection_ids:
                if tx.get(HostConnectionPin,
                          (self.host.host_id, connection_id, owner)) is None:
                    tx.add(HostConnectionPin(host_id=self.host.host_id,
                                                   connection_id=connection_id, owner=owner))
        return self.new_flow(self.vm_id, ctx, disk_id=self.disk_id,
                             host_id=self.host.host_id if self.host else None,
                             data={"plug": self.plug})

    def perform(self, ctx: Context, flow: Flow) -> dict[str, Any]:
        """The host calls. Its steps are not journaled (no commit, the die points stay):
        recovery asks the host whether the disk is in the guest, whatever the row says."""
        if self.host is None:
            return {}
        with ctx.db.read() as tx:  # under the flow row, the VM's lock: its places as they are
            disks = [d for d in vm_spec.vm_disks(tx, self.vm_id, plugged_only=False)
                     if d.disk.id == self.disk_id]
            taken = vm_spec.taken_places(tx, self.vm_id, except_disk=self.disk_id)
        if not disks:
            raise self.fail(errors.DISK_NOT_ATTACHED)
        place = vm_spec.place_disks(disks, taken)[self.disk_id]
        drive = disks[0].drive(place)
        if self.plug:
            if not self.pinned:
                self._prove(ctx)
            self.step(ctx, flow, "proven", journal=False)
        try:
            definition = self._call(ctx, drive)
        except HostCallError as exc:
            if not (self.plug and self.pinned and refused_as_not_visible(exc)):
                raise self._failed(exc) from exc
            log.info("VM %s: host %s does not see LUN %s despite its pins; proving it",
                     self.vm_id, self.host.name, self.wwid)
            self._prove(ctx)
            try:
                definition = self._call(ctx, drive)
            except (HostCallError, HostUnreachableError) as again:
                raise self._failed(again) from again
        except HostUnreachableError as exc:
            raise self._failed(exc) from exc
        self.step(ctx, flow, "plugged" if self.plug else "unplugged", journal=False)
        address = vm_spec.reported_addresses(definition).get(self.disk_id, place.address)
        return {"place": vm_spec.DiskPlace(place.index, address).dumps()}

    def _prove(self, ctx: Context) -> None:
        """Connect the host to the LUN's storage and make it show it sees the LUN."""
        assert self.host is not None
        why = prove_sync(ctx, self.host, [self.wwid])
        if why:
            raise self.fail(errors.LUN_NOT_VISIBLE_ON_HOST, host=self.host.name, why=why)

    def _call(self, ctx: Context, drive: dict[str, Any]) -> Any:
        assert self.host is not None
        verb = "VM.hotplugDisk" if self.plug else "VM.hotunplugDisk"
        return ctx.services.pool.call_sync(self.host.address, verb,
                                           {"vmID": self.vm_id, "drive": drive})

    def _failed(self, exc: Exception) -> CommandError:
        return self.fail(errors.HOTPLUG_FAILED if self.plug else errors.HOTUNPLUG_FAILED,
                         why=str(exc)[:400])

    def finish(self, tx: Session, ctx: Context, flow: Flow, result: dict[str, Any]) -> None:
        device = tx.get(VmDevice, (self.disk_id, self.vm_id))
        assert device is not None
        device.is_plugged = self.plug
        dynamic = tx.get(VmDynamic, self.vm_id)
        if dynamic is not None:  # reports asked before now are older than this change
            dynamic.status_changed_at = utcnow()
        if not self.plug:
            device.logical_name = ""
        if "place" in result:
            device.address = result["place"]
        # A plug's pins were set in begin (what the plugged disks needed, and this LUN's).
        self.released = self._repin(tx) if self.host and not self.plug else []
        kind = audit.DISK_PLUGGED if self.plug else audit.DISK_UNPLUGGED
        record_event(tx, ctx, kind, audit.Ids(vm_id=self.vm_id, disk_id=self.disk_id,
                                              host_id=self.host.host_id if self.host else None),
                     disk=self.alias, vm=self.vm_name)

    def _repin(self, tx: Session) -> list[str]:
        """The VM's pins on its host = what its plugged disks need; the host if it lost any."""
        assert self.host is not None
        owner = conns.vm_owner(self.vm_id)
        wanted = conns.lun_connection_ids(tx, conns.vm_lun_ids(tx, self.vm_id))
        before = set(tx.scalars(select(HostConnectionPin.connection_id).where(
            HostConnectionPin.host_id == self.host.host_id,
            HostConnectionPin.owner == owner)))
        conns.set_pins(tx, self.host.host_id, owner, wanted)
        return [self.host.host_id] if before - wanted else []

    def after_commit(self, ctx: Context, result: dict[str, Any]) -> None:
        release_hosts(ctx, getattr(self, "released", []))

    def undo(self, ctx: Context, flow: Flow, error: BaseException) -> None:
        if self.host is None:
            return
        with ctx.db.transaction() as tx:
            released = self._repin(tx)
        release_hosts(ctx, released)
        if not isinstance(error, CommandError):
            raise self.fail(errors.HOST_CALL_FAILED, name=self.host.name,
                            why=str(error)[:300]) from error

    def failed_event(self, tx: Session, ctx: Context, flow: Flow,
                     error: BaseException) -> None:
        kind = audit.DISK_PLUG_FAILED if self.plug else audit.DISK_UNPLUG_FAILED
        record_event(tx, ctx, kind, audit.Ids(vm_id=self.vm_id, disk_id=self.disk_id),
                     disk=self.alias, vm=self.vm_name, why=str(error)[:500])


@dataclass
class UnplugDisk(PlugDisk):
    """Deactivate a disk attachment (hot-unplug on a running VM)."""

    action: ClassVar[str] = "deactivate"

    plug: bool = False
