"""The VM's one CD-ROM drive: the ISO for the next run, and load / change / eject on a
running VM (oVirt's ``ChangeDiskCommand``).

An ISO is an ISO disk (``content_type`` iso) on an active block storage domain; the drive holds
it by its volume's PDIV. The agent's ``VM.changeCD`` is atomic (the old CD stays on any
failure, crashes recovered at its start), so the engine's part is to check, make sure the VM's
host reaches the domain's LUN, send the change, and record what the drive holds. The change is
a flow: the VM's flow row refuses a second change (or any other flow) while one is in flight,
and an engine that dies in the middle asks the host what the drive holds (``recovery.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Command, Context, record_event
from virtyard.engine.commands.cd_media import CDROM_ID, Iso, iso_disk
from virtyard.engine.commands.errors import CommandError
from virtyard.engine.commands.flow import FlowCommand
from virtyard.engine.commands.run_vm import Candidate, prove_sync
from virtyard.engine.commands.vms import get_vm
from virtyard.engine.db.models import BaseDisk, Flow, Host, VmDevice, VmDynamic
from virtyard.engine.hosts import vm_spec
from virtyard.engine.hosts.pool import HostAddress, HostCallError, HostUnreachableError

RUNNING = ("up", "paused")


@dataclass
class SetNextRunCd(Command[str]):
    """``PUT vms/{id}/cdroms/{cd}`` (``current=false``): the ISO the VM boots with next."""

    action: ClassVar[str] = "change CD of"
    entity: ClassVar[str] = "VM"

    vm_id: str
    file_id: str

    def validate(self, tx: Session, ctx: Context) -> None:
        get_vm(self, tx, self.vm_id)
        if self.file_id:
            disk = tx.get(BaseDisk, self.file_id)
            if disk is None or disk.content_type != "iso":
                raise self.fail(errors.ISO_NOT_FOUND, file=self.file_id[:64])

    def execute(self, tx: Session, ctx: Context) -> str:
        vm = get_vm(self, tx, self.vm_id)
        vm.iso_path = self.file_id
        return self.file_id


@dataclass
class ChangeCd(FlowCommand[str]):
    """``PUT vms/{id}/cdroms/{cd}?current=true``: load, change (``file_id``) or eject (``""``)
    the CD of a running VM."""

    action: ClassVar[str] = "change CD of"
    entity: ClassVar[str] = "VM"
    kind: ClassVar[str] = "change_cd"

    vm_id: str
    file_id: str
    vm_name: str = ""
    iso: Iso | None = None
    host: Candidate | None = None
    place: vm_spec.DiskPlace | None = None
    unchanged: bool = False

    @property
    def eject(self) -> bool:
        return not self.file_id

    def validate(self, tx: Session, ctx: Context) -> None:
        vm = get_vm(self, tx, self.vm_id)
        self.vm_name = vm.name
        dynamic = tx.get(VmDynamic, vm.id)
        status = dynamic.status if dynamic is not None else "down"
        if dynamic is None or status not in RUNNING or not dynamic.run_on_host_id:
            raise self.fail(errors.VM_STATUS_ILLEGAL, name=vm.name, status=status)
        if not self.eject:
            self.iso = iso_disk(self, tx, self.file_id)
        self.unchanged = dynamic.current_cd == self.file_id
        row = tx.get(VmDevice, (CDROM_ID, vm.id))
        place = vm_spec.DiskPlace.loads(row.address) if row is not None else None
        if place is None:  # started before it had a drive: it gets one at its next start
            raise self.fail(errors.CDROM_NOT_FOUND)
        self.place = place
        host = tx.get(Host, dynamic.run_on_host_id)
        if host is None or host.status != "up":
            raise self.fail(errors.HOST_STATUS_ILLEGAL, name=host.name if host else "?",
                            status=host.status if host else "gone")
        self.host = Candidate(host.id, host.name, HostAddress(host.id, host.address, host.port))

    def begin(self, tx: Session, ctx: Context) -> Flow:
        assert self.host is not None
        dynamic = tx.get(VmDynamic, self.vm_id)
        return self.new_flow(self.vm_id, ctx, host_id=self.host.host_id, data={
            "file": self.file_id, "previous": dynamic.current_cd if dynamic else ""})

    def perform(self, ctx: Context, flow: Flow) -> str:
        assert self.host is not None and self.place is not None
        if self.unchanged:
            return self.file_id
        if self.iso is not None:
            why = prove_sync(ctx, self.host, [self.iso.wwid] if self.iso.wwid else [])
            if why:
                raise self.fail(errors.CD_HOST_CANNOT_REACH, host=self.host.name,
                                domain=self.iso.domain_name, why=why)
            self.step(ctx, flow, "proven")
        spec = {"drive_spec": self.iso.pdiv if self.iso is not None else {},
                "iface": vm_spec.CD_IFACE, "index": self.place.index}
        try:
            ctx.services.pool.call_sync(self.host.address, "VM.changeCD",
                                        {"vmID": self.vm_id, "driveSpec": spec}, timeout=120)
        except (HostCallError, HostUnreachableError) as exc:
            raise self.fail(errors.CHANGE_CD_FAILED, why=str(exc)[:300]) from exc
        self.step(ctx, flow, "changed")
        return self.file_id

    def finish(self, tx: Session, ctx: Context, flow: Flow, result: str) -> None:
        dynamic = tx.get(VmDynamic, self.vm_id)
        if dynamic is not None:
            dynamic.current_cd = result
        if self.unchanged:
            return
        ids = audit.Ids(vm_id=self.vm_id, host_id=self.host.host_id if self.host else None,
                        disk_id=self.iso.disk_id if self.iso else None)
        if self.iso is None:
            record_event(tx, ctx, audit.CD_EJECTED, ids, vm=self.vm_name)
        else:
            record_event(tx, ctx, audit.CD_CHANGED, ids, vm=self.vm_name, disk=self.iso.alias)

    def undo(self, ctx: Context, flow: Flow, error: BaseException) -> None:
        """Nothing to put back: the agent left the old CD in the drive."""
        if isinstance(error, CommandError) or not isinstance(error, Exception):
            return
        raise self.fail(errors.CHANGE_CD_FAILED, why=str(error)[:300]) from error

    def failed_event(self, tx: Session, ctx: Context, flow: Flow,
                     error: BaseException) -> None:
        record_event(tx, ctx, audit.CD_CHANGE_FAILED, audit.Ids(vm_id=self.vm_id),
                     vm=self.vm_name, why=str(error)[:500])
