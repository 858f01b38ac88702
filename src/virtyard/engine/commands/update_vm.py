"""Update a VM's definition (``PUT vms/{id}``): name, description, comment, memory, CPU
topology, high availability. Only what the request names changes; a running VM takes memory
and CPU at its next run (high availability applies at once: it is the engine's policy, not the
guest's hardware)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from virtyard.engine import audit
from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Command, Context, record_event
from virtyard.engine.commands.hosts import check_name
from virtyard.engine.commands.vms import (
    MAX_CPU,
    MAX_HA_PRIORITY,
    MAX_MEMORY,
    MAX_TEXT,
    MIB,
    MIN_MEMORY,
    get_vm,
)
from virtyard.engine.db.models import Vm


@dataclass
class UpdateVm(Command[Vm]):
    action: ClassVar[str] = "update"
    entity: ClassVar[str] = "VM"
    conflicts: ClassVar[dict[tuple[str, tuple[str, ...]], errors.ErrorKey]] = {
        ("vms", ("name",)): errors.NAME_ALREADY_USED}

    vm_id: str
    name: str | None = None
    description: str | None = None
    comment: str | None = None
    memory: int | None = None
    sockets: int | None = None
    cores: int | None = None
    threads: int | None = None
    ha_enabled: bool | None = None
    ha_priority: int | None = None

    def validate(self, tx: Session, ctx: Context) -> None:
        vm = get_vm(self, tx, self.vm_id)
        if self.name is not None and self.name != vm.name:
            check_name(self, self.name)
            if tx.scalar(select(func.count()).where(Vm.name == self.name)):
                raise self.fail(errors.NAME_ALREADY_USED, name=self.name)
        for label, value in (("description", self.description), ("comment", self.comment)):
            if value is not None and len(value) > MAX_TEXT:
                raise self.fail(errors.VALUE_TOO_LONG, name=label, max=MAX_TEXT)
        if self.memory is not None and not MIN_MEMORY <= self.memory <= MAX_MEMORY:
            raise self.fail(errors.VM_MEMORY_INVALID, min=MIN_MEMORY // MIB,
                            max=MAX_MEMORY // MIB)
        if not all(1 <= n <= MAX_CPU for n in (self.sockets, self.cores, self.threads)
                   if n is not None):
            raise self.fail(errors.VM_CPU_INVALID, max=MAX_CPU)
        if self.ha_priority is not None and not 0 <= self.ha_priority <= MAX_HA_PRIORITY:
            raise self.fail(errors.HA_PRIORITY_INVALID, max=MAX_HA_PRIORITY)

    def execute(self, tx: Session, ctx: Context) -> Vm:
        vm = get_vm(self, tx, self.vm_id)
        for column, value in (("name", self.name), ("description", self.description),
                              ("comment", self.comment), ("memory_bytes", self.memory),
                              ("cpu_sockets", self.sockets), ("cpu_cores", self.cores),
                              ("cpu_threads", self.threads), ("ha_enabled", self.ha_enabled),
                              ("ha_priority", self.ha_priority)):
            if value is not None:
                setattr(vm, column, value)
        return vm

    def events(self, tx: Session, ctx: Context, result: Vm) -> None:
        record_event(tx, ctx, audit.VM_UPDATED, audit.Ids(vm_id=result.id), vm=result.name)
