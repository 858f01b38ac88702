"""VM commands: add (a definition in the database, status down) and remove.

Adding a VM touches no host: it is a row in ``vms`` (the definition), one in ``vm_dynamic``
(status ``down``) and its placement hosts in order. Removing one needs it down, and takes its
disk attachments with it; the disks themselves stay, as floating disks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Command, Context, locked, record_event
from virtyard.engine.commands.hosts import check_name
from virtyard.engine.db.models import (
    DEFAULT_CLUSTER_ID,
    BaseDisk,
    Cluster,
    DiskVmElement,
    Host,
    Vm,
    VmDevice,
    VmDynamic,
    VmPlacementHost,
    new_id,
)

BLANK_TEMPLATE_ID = "00000000-0000-0000-0000-000000000000"
BLANK_TEMPLATE_NAME = "Blank"
MIB = 1 << 20
MIN_MEMORY = MIB
MAX_MEMORY = 16 << 40
MAX_CPU = 1024
MAX_HA_PRIORITY = 100
MAX_TEXT = 4000
MAX_OS_TYPE = 64


@dataclass(frozen=True)
class Ref:
    """An object named by id or by name, as oVirt requests name them (``<host id=…/>`` or
    ``<host><name>…</name></host>``)."""

    id: str | None = None
    name: str | None = None

    def label(self) -> str:
        return (self.name or self.id or "")[:255]


def resolve_cluster(command: Command[Any], tx: Session, cluster: Ref) -> str:
    """The cluster's id (Default when none is named)."""
    if cluster.id:
        if tx.get(Cluster, cluster.id) is None:
            raise command.fail(errors.CLUSTER_NOT_FOUND, name=cluster.label())
        return cluster.id
    if cluster.name:
        found = tx.scalar(select(Cluster.id).where(Cluster.name == cluster.name))
        if found is None:
            raise command.fail(errors.CLUSTER_NOT_FOUND, name=cluster.label())
        return str(found)
    return DEFAULT_CLUSTER_ID


def get_vm(command: Command[Any], tx: Session, vm_id: str, *, for_update: bool = True) -> Vm:
    """The VM, locked for this transaction."""
    return locked(command, tx, Vm, vm_id, errors.VM_NOT_FOUND, for_update=for_update)


@dataclass
class AddVm(Command[Vm]):
    """Define a VM (it starts ``down``; running it is another command)."""

    action: ClassVar[str] = "add"
    entity: ClassVar[str] = "VM"
    conflicts: ClassVar = {("vms", ("name",)): errors.NAME_ALREADY_USED}

    name: str
    cluster: Ref = field(default_factory=Ref)
    template: Ref = field(default_factory=Ref)
    memory: int = 1 << 30
    sockets: int = 1
    cores: int = 1
    threads: int = 1
    os_type: str = "other"
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    ha_enabled: bool = False
    ha_priority: int = 1
    placement: list[Ref] = field(default_factory=list)
    description: str = ""
    comment: str = ""
    # Filled by validate: the placement hosts' ids, in order, without repeats.
    placement_ids: list[str] = field(default_factory=list)

    def validate(self, tx: Session, ctx: Context) -> None:
        check_name(self, self.name)
        for label, value, limit in (("description", self.description, MAX_TEXT),
                                    ("comment", self.comment, MAX_TEXT),
                                    ("os.type", self.os_type, MAX_OS_TYPE),
                                    ("os.kernel", self.kernel, MAX_TEXT),
                                    ("os.initrd", self.initrd, MAX_TEXT),
                                    ("os.cmdline", self.cmdline, MAX_TEXT)):
            if len(value) > limit:
                raise self.fail(errors.VALUE_TOO_LONG, name=label, max=limit)
        if not MIN_MEMORY <= self.memory <= MAX_MEMORY:
            raise self.fail(errors.VM_MEMORY_INVALID, min=MIN_MEMORY // MIB,
                            max=MAX_MEMORY // MIB)
        if not all(1 <= n <= MAX_CPU for n in (self.sockets, self.cores, self.threads)):
            raise self.fail(errors.VM_CPU_INVALID, max=MAX_CPU)
        if not 0 <= self.ha_priority <= MAX_HA_PRIORITY:
            raise self.fail(errors.HA_PRIORITY_INVALID, max=MAX_HA_PRIORITY)
        if self.template.id not in (None, BLANK_TEMPLATE_ID) or \
                self.template.name not in (None, BLANK_TEMPLATE_NAME):
            raise self.fail(errors.TEMPLATE_NOT_FOUND, name=self.template.label())
        if tx.scalar(select(func.count()).where(Vm.name == self.name)):
            raise self.fail(errors.NAME_ALREADY_USED, name=self.name)
        self.cluster = Ref(id=resolve_cluster(self, tx, self.cluster))
        self.placement_ids = self._placement_hosts(tx)

    def _placement_hosts(self, tx: Session) -> list[str]:
        ids: list[str] = []
        for ref in self.placement:
            stmt = select(Host.id, Host.name, Host.cluster_id)
            stmt = stmt.where(Host.id == ref.id) if ref.id else stmt.where(Host.name == ref.name)
            host = tx.execute(stmt).first()
            if host is None:
                raise self.fail(errors.PLACEMENT_HOST_NOT_FOUND, name=ref.label())
            if host.cluster_id != self.cluster.id:
                raise self.fail(errors.PLACEMENT_HOST_OTHER_CLUSTER, name=host.name)
            if host.id not in ids:
                ids.append(host.id)
        return ids

    def execute(self, tx: Session, ctx: Context) -> Vm:
        vm = Vm(id=new_id(), name=self.name, description=self.description,
                comment=self.comment, cluster_id=self.cluster.id or DEFAULT_CLUSTER_ID,
                memory_bytes=self.memory, cpu_sockets=self.sockets, cpu_cores=self.cores,
                cpu_threads=self.threads, os_type=self.os_type, kernel=self.kernel,
                initrd=self.initrd, cmdline=self.cmdline, ha_enabled=self.ha_enabled,
                ha_priority=self.ha_priority)
        tx.add(vm)
        tx.flush()  # the rows below refer to it
        tx.add(VmDynamic(vm_id=vm.id, status="down"))
        tx.add_all(VmPlacementHost(vm_id=vm.id, host_id=host_id, position=position)
                   for position, host_id in enumerate(self.placement_ids))
        return vm

    def events(self, tx: Session, ctx: Context, result: Vm) -> None:
        record_event(tx, ctx, audit.VM_ADDED, audit.Ids(vm_id=result.id), vm=result.name)


@dataclass
class RemoveVm(Command[tuple[str, list[tuple[str, str]]]]):
    """Remove a VM that is down, with its disk attachments.

    As oVirt does, its disks go too unless ``detach_only`` — but never a disk another VM still
    has attached (a shareable LUN). Removing a LUN disk forgets the record, not the data: the
    LUN on the SAN is untouched and can be added again.
    """

    action: ClassVar[str] = "remove"
    entity: ClassVar[str] = "VM"

    vm_id: str
    detach_only: bool = False

    def validate(self, tx: Session, ctx: Context) -> None:
        vm = get_vm(self, tx, self.vm_id)
        status = tx.scalar(select(VmDynamic.status).where(VmDynamic.vm_id == vm.id)
                           .with_for_update()) or "down"
        if status != "down":
            raise self.fail(errors.VM_IS_RUNNING, name=vm.name, status=status)

    def execute(self, tx: Session, ctx: Context) -> tuple[str, list[tuple[str, str]]]:
        vm = get_vm(self, tx, self.vm_id)
        disks = [(str(disk_id), str(alias)) for disk_id, alias in tx.execute(
            select(DiskVmElement.disk_id, BaseDisk.alias)
            .join(BaseDisk, BaseDisk.id == DiskVmElement.disk_id)
            .where(DiskVmElement.vm_id == vm.id).order_by(BaseDisk.alias))]
        for table in (VmDevice, DiskVmElement, VmPlacementHost, VmDynamic):
            tx.execute(delete(table).where(table.vm_id == vm.id))
        if not self.detach_only and disks:
            still_used = set(tx.scalars(select(DiskVmElement.disk_id).where(
                DiskVmElement.disk_id.in_([d for d, _a in disks]))))
            gone = [d for d, _a in disks if d not in still_used]
            if gone:
                tx.execute(delete(BaseDisk).where(BaseDisk.id.in_(gone)))
        name = vm.name
        tx.delete(vm)
        return name, disks

    def events(self, tx: Session, ctx: Context,
               result: tuple[str, list[tuple[str, str]]]) -> None:
        name, disks = result
        for disk_id, alias in disks:
            record_event(tx, ctx, audit.VM_DISK_DETACHED,
                         audit.Ids(vm_id=self.vm_id, disk_id=disk_id), disk=alias, vm=name)
        record_event(tx, ctx, audit.VM_REMOVED, audit.Ids(vm_id=self.vm_id), vm=name)
